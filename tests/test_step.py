"""The microbatch step: gradient accumulation and bf16 autocast."""
import pytest
import torch

from stars_scale.config import ModelConfig, StarsConfig
from stars_scale.data.arithmetic import ArithmeticTask
from stars_scale.model import LoopedLM
from stars_scale.stars.depth import Depth
from stars_scale.stars.objective import forward_backward


def model_and_batch():
    torch.manual_seed(0)
    model = LoopedLM(ModelConfig(vocab_size=15, hidden=32, heads=2, max_seq_len=16, mlp_hidden=64, n_prelude=1,
                                 injection="add"))
    return model, ArithmeticTask(3, seed=0, test_size=16).train_batch(0, 0, 8)


@pytest.mark.parametrize("method", ["vjp", "fd"])
def test_two_half_microbatches_accumulate_to_the_full_batch(method):
    stars = StarsConfig(lam=0.1, method=method, sample_fraction=1.0)
    depth = Depth(1, 2)
    model, batch = model_and_batch()
    # CE: halves at loss_scale 0.5 sum to the full batch (equal answer-token counts per half);
    # the penalty's random direction differs per microbatch, so it is checked on its own below
    ce_only = StarsConfig(lam=0.0, estimate_every=0)
    forward_backward(model, batch, depth, ce_only, step=0, micro=0, seed=0, loss_scale=1.0)
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i, sl in enumerate((slice(0, 4), slice(4, 8))):
        half = {k: v[sl] for k, v in batch.items()}
        forward_backward(model, half, depth, ce_only, step=0, micro=i, seed=0, loss_scale=0.5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, full[n], atol=1e-6), n
    model.zero_grad()
    r = forward_backward(model, batch, depth, stars, step=0, micro=0, seed=0, loss_scale=1.0)
    assert r.penalty is not None and r.rho is not None and r.loss == pytest.approx(0.9 * r.ce + 0.1 * r.penalty)


@pytest.mark.parametrize("method", ["vjp", "jvp", "fd"])
def test_bf16_autocast_step_runs_and_tracks_fp32(method):
    model, batch = model_and_batch()
    stars = StarsConfig(lam=0.1, method=method)
    r32 = forward_backward(model, batch, Depth(0, 3), stars, step=0, micro=0, seed=0, loss_scale=1.0)
    model.zero_grad()
    r16 = forward_backward(model, batch, Depth(0, 3), stars, step=0, micro=0, seed=0, loss_scale=1.0, dtype="bf16")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert r16.ce == pytest.approx(r32.ce, rel=0.05)
    assert r16.rho == pytest.approx(r32.rho, rel=0.1)
