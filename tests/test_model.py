"""LoopedLM: configurations, explicit depth, states, checkpointing across loops."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stars_scale.config import ModelConfig
from stars_scale.model import LoopedLM
from stars_scale.model.attention import attend, math_attention


def tiny(**kw):
    base = dict(vocab_size=15, hidden=32, heads=4, max_seq_len=16, mlp_hidden=64)
    base.update(kw)
    return ModelConfig(**base)


OPTIONS = {
    "norm_placement": ["pre", "sandwich", "post"],
    "injection": ["none", "add", "concat-linear"],
    "positions": ["learned", "rope"],
}


@pytest.mark.parametrize("placement,injection,positions", list(itertools.product(*OPTIONS.values())))
def test_forward_backward_every_layout(placement, injection, positions):
    torch.manual_seed(0)
    init = "embed" if injection == "none" else "random"
    model = LoopedLM(tiny(norm_placement=placement, injection=injection, positions=positions, init_state=init,
                          n_prelude=1, n_coda=1, mlp="swiglu", norm="rmsnorm", kv_heads=2))
    ids = torch.randint(0, 15, (2, 10))
    out = model(ids, n_free=2, n_grad=2, return_states=True)
    assert out.logits.shape == (2, 10, 15)
    assert len(out.states) == 5 and all(s.shape == (2, 10, 32) for s in out.states)
    out.logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.core.parameters())


def test_zero_loops_decode_the_initial_state():
    torch.manual_seed(0)
    model = LoopedLM(tiny(n_prelude=2)).eval()
    ids = torch.randint(0, 15, (1, 5))
    out = model(ids, n_free=0, n_grad=0)
    assert torch.allclose(out.logits, model.decode(model.encode(ids)))


def test_depth_changes_output_and_is_explicit():
    torch.manual_seed(0)
    model = LoopedLM(tiny()).eval()
    ids = torch.randint(0, 15, (1, 5))
    a = model(ids, 0, 2).logits
    b = model(ids, 1, 1).logits  # same total depth, different gradient split: same values
    c = model(ids, 0, 3).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c)


def test_random_init_state_statistics():
    model = LoopedLM(tiny(hidden=64, heads=4, injection="concat-linear", init_state="random", embed_scale=8.0))
    e = torch.zeros(4, 16, 64)
    s = model.init_state(e, torch.Generator().manual_seed(0))
    std = (2 / (5 * 64)) ** 0.5 * 8.0  # Huginn: sqrt(2/(5h)) * embed scale = ~0.63
    assert s.abs().max() <= 3 * std + 1e-6  # truncated at 3 sigma
    assert abs(s.std().item() - std * 0.986) / std < 0.05  # trunc-normal(±3σ) has std 0.986σ


def test_tied_and_untied_heads():
    tied = LoopedLM(tiny(tie_embeddings=True))
    untied = LoopedLM(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert tied.param_groups_counts()["total"] == sum(p.numel() for p in tied.parameters())
    assert untied.param_groups_counts()["total"] == sum(p.numel() for p in untied.parameters())


def test_gqa_attention_matches_repeated_kv():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out = attend(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    assert torch.allclose(out, ref, atol=1e-6)


def test_math_attention_allows_double_backward():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 4, requires_grad=True)
    with math_attention():
        y = attend(x, x, x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        g.sum().backward()
    assert x.grad is not None


def test_flash_backend_refuses_without_flash_attn_on_cpu():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="flash-attn"):
        attend(q, q, q, backend="flash")


@pytest.mark.parametrize("mode", ["loop", "block"])
def test_checkpointing_gives_identical_loss_and_gradients(mode):
    cfg = tiny(n_prelude=1, n_coda=1, injection="concat-linear", init_state="zero", dropout=0.1)
    ids = torch.randint(0, 15, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for ck in ("none", mode):
        torch.manual_seed(0)
        model = LoopedLM(cfg)
        model.checkpointing = ck
        torch.manual_seed(42)  # same dropout masks (checkpoint replays the RNG state)
        out = model(ids, n_free=2, n_grad=4)
        loss = out.logits.float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n


def peak(depth, checkpointing, backprop=None):
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "bench")!r})
from step_memory import step_peak_memory_mb
print(json.dumps(step_peak_memory_mb(depth={depth}, checkpointing={checkpointing!r}, backprop={backprop!r},
                                     hidden=128, batch=16, seq=128)))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two measurements run at a time
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out)["peak_mb"]


def test_loop_checkpointing_keeps_peak_memory_flat_in_depth():
    """Measured peak RSS growth of one training step (fresh process per measurement, so peaks are
    per process and two can run side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(4, "none"), (16, "none"), (4, "loop"), (16, "loop"), (4, "loop", 4), (32, "loop", 4)]
    with ThreadPoolExecutor(2) as pool:
        plain4, plain16, ckpt4, ckpt16, flat4, flat32 = pool.map(lambda c: peak(*c), cases)
    assert plain16 > 2.5 * plain4  # without checkpointing activations grow with depth
    # loop checkpointing keeps one state per iteration: growth a small fraction of the plain growth
    assert ckpt16 - ckpt4 < 0.2 * (plain16 - plain4)
    # with truncated BPTT on top the peak is flat (8 MB slack for allocator noise)
    assert flat32 <= 1.25 * flat4 + 8


def test_embed_init_std_sets_the_embeddings_only():
    """`embed_init_std` draws the token and position embeddings (and so the tied head) from N(0, s^2);
    every other weight keeps `init_std`. None keeps init_std everywhere (the default, unchanged)."""
    torch.manual_seed(0)
    m = LoopedLM(tiny(hidden=64, vocab_size=300, positions="learned", max_seq_len=256, embed_init_std=1.0,
                      tie_embeddings=True))
    # 300 x 64 (and 256 x 64) draws: the sample std is within ~1% of s; 10% is far from both 1.0 and 0.02
    assert 0.9 < m.embed.weight.std().item() < 1.1 and 0.9 < m.pos_embed.weight.std().item() < 1.1
    assert m.lm_head.weight is m.embed.weight
    linears = [p for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n]
    assert linears and all(0.015 < p.std().item() < 0.025 for p in linears if p.numel() >= 4096)
    torch.manual_seed(0)
    d = LoopedLM(tiny(hidden=64, vocab_size=300, positions="learned", max_seq_len=256))
    assert 0.018 < d.embed.weight.std().item() < 0.022 and 0.018 < d.pos_embed.weight.std().item() < 0.022
