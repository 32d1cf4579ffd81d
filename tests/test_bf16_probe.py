"""STARS estimators under bf16 autocast (CPU): every estimator's ρ̂ within 5% of its fp32 value at
the same state, and the penalty's gradient within cosine 0.95 of the fp32 gradient, for a tiny
Huginn-shaped core and a STARS-shaped one. bench/bf16_probe.py measures the same on the trained
main-job model."""
from __future__ import annotations

import math

import pytest
import torch

from stars_scale.config import config_from_dict
from stars_scale.model.looped import LoopedLM
from stars_scale.stars import estimate_spectral_radius, spectral_penalty
from stars_scale.stars.jacobian import METHODS, fd_epsilon

HUGINN = {"vocab_size": 32, "hidden": 32, "heads": 4, "mlp": "swiglu", "norm": "rmsnorm", "norm_placement": "sandwich",
          "positions": "rope", "max_seq_len": 16, "n_prelude": 1, "n_core": 4, "n_coda": 1,
          "injection": "concat-linear", "init_state": "random", "embed_scale": math.sqrt(32), "bias": False,
          "init_std": math.sqrt(2 / (5 * 32))}
STARS = {"vocab_size": 15, "hidden": 32, "heads": 4, "mlp": "gelu", "norm": "layernorm", "positions": "learned",
         "max_seq_len": 16, "n_prelude": 1, "n_core": 1, "n_coda": 1, "injection": "add", "init_std": 0.1}


def _state(arch: dict):
    torch.manual_seed(0)
    model = LoopedLM(config_from_dict({"model": arch}).model).eval()
    ids = torch.randint(0, arch["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, n_free=8, n_grad=0, generator=torch.Generator().manual_seed(0))
    return model, out.state, out.embedded


def _grad(model, h, e, method, bf16: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        est = spectral_penalty(lambda x: model.core_step(x, e), h, method, 1,
                               generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(est.penalty, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


@pytest.mark.parametrize("arch", [HUGINN, STARS], ids=["huginn-shaped", "stars-shaped"])
@pytest.mark.parametrize("method", METHODS)
def test_bf16_estimate_within_5_percent_and_gradient_aligned(arch, method):
    model, h, e = _state(arch)
    fn = lambda x: model.core_step(x, e)  # noqa: E731
    for seed in (0, 1):
        ref = float(estimate_spectral_radius(fn, h, method, 20, generator=torch.Generator().manual_seed(seed)))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the public function inside an active autocast
            got = float(estimate_spectral_radius(fn, h, method, 20, generator=torch.Generator().manual_seed(seed)))
        assert abs(got / ref - 1) < 0.05, (method, seed, ref, got)
    cos = torch.nn.functional.cosine_similarity(_grad(model, h, e, method, True), _grad(model, h, e, method, False), dim=0)
    assert float(cos) >= 0.95


def test_fd_epsilon_follows_the_evaluation_dtype():
    h = torch.ones(4, 4)
    assert fd_epsilon(h) == pytest.approx(math.sqrt(torch.finfo(torch.float32).eps) * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fd_epsilon(h) == pytest.approx(math.sqrt(torch.finfo(torch.bfloat16).eps) * 4)


def test_the_fp32_probe_evaluates_in_fp32_and_autocast_keeps_the_step_dtype():
    seen = []

    def fn(x):
        y = x @ torch.eye(x.shape[-1])
        seen.append(y.dtype)
        return y

    h = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spectral_penalty(fn, h, "fd", 2, create_graph=False)
        assert set(seen) == {torch.float32}
        seen.clear()
        spectral_penalty(fn, h, "fd", 2, create_graph=False, precision="autocast")
        assert set(seen) == {torch.bfloat16}
    assert torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(ValueError, match="precision"):
        spectral_penalty(fn, h, "fd", 1, precision="bf16")
