"""The fused-kernel ops on CPU: references against PyTorch, torch.library.opcheck, gradcheck, the
model's call sites through the custom ops, the estimators' fallback, and model.kernels errors.

On CPU the custom ops run their PyTorch references; `ops_everywhere` makes the model's call
sites take the custom-op path on CPU tensors (as they do on CUDA with the extension), so the
call sites, the autograd formulas and the estimator fallback are exercised here. The CUDA
kernels themselves are compared with these references in tests/gpu/.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stars_scale import kernels
from stars_scale.config import config_from_dict
from stars_scale.errors import ConfigError
from stars_scale.kernels import ops
from stars_scale.kernels import reference as ref
from stars_scale.model.layers import RMSNorm, apply_rope, rope_cache
from stars_scale.model.looped import LoopedLM
from stars_scale.stars import jacobian
from stars_scale.stars.depth import Depth
from stars_scale.stars.objective import forward_backward

REPO = Path(__file__).resolve().parents[1]


def rnd(*shape, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


@pytest.fixture
def ops_everywhere(monkeypatch):
    """Call sites use the custom ops on any device (outside reference_ops()), as on CUDA."""
    monkeypatch.setattr(kernels, "fused", lambda mode, t: mode != "torch" and not getattr(kernels._state, "ref", 0))


# ------------------------------------------------------------------ references vs PyTorch

@pytest.mark.parametrize("rms", [True, False])
def test_add_norm_reference_matches_the_modules(rms):
    x, r = rnd(4, 5, 32, dtype=torch.float32), rnd(4, 5, 32, dtype=torch.float32, seed=1)
    w, b = rnd(32, dtype=torch.float32, seed=2), rnd(32, dtype=torch.float32, seed=3)
    if rms:
        mod = RMSNorm(32, 1e-5)
        bias = None
    else:
        mod = torch.nn.LayerNorm(32, eps=1e-5)
        bias = b
        mod.bias.data.copy_(b.detach())
    mod.weight.data.copy_(w.detach())
    out, _, _ = ref.add_norm(x, r, w, bias, 1e-5, rms)
    expect = mod(x + r)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    g = rnd(4, 5, 32, dtype=torch.float32, seed=4, grad=False)
    want = torch.autograd.grad(expect, [x, mod.weight] + ([] if rms else [mod.bias]), g)
    _, mean, rstd = ref.add_norm(x.detach(), r.detach(), w.detach(), None if bias is None else b.detach(), 1e-5, rms)
    dz, dw, db = ref.add_norm_backward(g, x.detach(), r.detach(), w.detach(), mean, rstd, rms)
    torch.testing.assert_close(dz, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, want[1], rtol=1e-4, atol=1e-5)
    if not rms:
        torch.testing.assert_close(db, want[2], rtol=1e-4, atol=1e-5)


def test_activation_and_rope_references_match_pytorch():
    gu = rnd(3, 4, 16, dtype=torch.float32)
    g, u = gu.chunk(2, -1)
    torch.testing.assert_close(ref.swiglu(gu), F.silu(g) * u)
    torch.testing.assert_close(ref.gelu(gu), F.gelu(gu))
    dy = rnd(3, 4, 8, dtype=torch.float32, seed=1, grad=False)
    torch.testing.assert_close(ref.swiglu_backward(dy, gu), torch.autograd.grad(F.silu(g) * u, gu, dy)[0])
    dy2 = rnd(3, 4, 16, dtype=torch.float32, seed=2, grad=False)
    torch.testing.assert_close(ref.gelu_backward(dy2, gu), torch.autograd.grad(F.gelu(gu), gu, dy2)[0])
    q = rnd(2, 4, 7, 16, dtype=torch.float32).transpose(1, 2)  # a transposed view, as q/k are
    cos, sin = rope_cache(16, 9, 10000.0)
    torch.testing.assert_close(ref.rope(q, cos, sin), apply_rope(q, cos, sin))


def test_cross_entropy_matches_pytorch_and_writes_the_gradient_in_place():
    logits = rnd(2, 5, 11, dtype=torch.float32)
    labels = torch.tensor([[1, 2, -100, 4, 10], [0, -100, 3, 3, 7]])
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    want_grad, = torch.autograd.grad(want * 3.0, logits)
    h = logits.detach().clone().requires_grad_()
    buf = h * 1.0  # a non-leaf logits buffer, as the head's output is
    loss = kernels.cross_entropy(buf, labels, ignore_index=-100)
    torch.testing.assert_close(loss, want)
    (loss * 3.0).backward()
    torch.testing.assert_close(h.grad, want_grad)
    torch.testing.assert_close(buf.detach(), want_grad, msg="the gradient lives in the logits' own memory")
    kept = logits.detach().clone()
    kernels.cross_entropy(kept, labels, inplace=False)
    assert torch.equal(kept, logits.detach())
    none = torch.full_like(labels, -100)
    assert float(kernels.cross_entropy(logits.detach().clone(), none)) == 0.0  # no valid token: 0, not NaN


def _vocab_parallel_ce(rank: int, world: int, logits: torch.Tensor, labels: torch.Tensor):
    dist.init_process_group("gloo", rank=rank, world_size=world)
    V = logits.shape[-1] // world
    shard = logits[:, rank * V:(rank + 1) * V].clone().requires_grad_()
    loss = kernels.cross_entropy(shard * 1.0, labels, ignore_index=-100, group=dist.group.WORLD)
    loss.backward()
    dist.destroy_process_group()
    return float(loss), shard.grad


def test_vocab_parallel_cross_entropy_matches_the_whole_vocabulary():
    from multirank import spawn

    logits = rnd(6, 16, dtype=torch.float32, grad=False)
    labels = torch.tensor([0, 15, 7, 8, -100, 3])
    full = logits.clone().requires_grad_()
    want = F.cross_entropy(full, labels, ignore_index=-100)
    want.backward()
    per_rank = spawn(_vocab_parallel_ce, 2, logits, labels)
    for rank, (loss, grad) in enumerate(per_rank):
        assert abs(loss - float(want)) < 1e-6
        torch.testing.assert_close(grad, full.grad[:, rank * 8:(rank + 1) * 8])


def test_probe_reduce_reference():
    y1, y0 = rnd(3, 4, 8, dtype=torch.float32, grad=False), rnd(3, 4, 8, dtype=torch.float32, seed=1, grad=False)
    d = (y1 - y0) / 0.01
    for mode in ("tensor", "token"):
        v, sq = kernels.probe_reduce(y1, y0, 0.01, mode)
        torch.testing.assert_close(sq, d.pow(2).sum())
        torch.testing.assert_close(v, jacobian.normalize_direction(d, mode))
    with pytest.raises(ValueError, match="normalize"):
        kernels.probe_reduce(y1, y0, 0.01, "row")


# ------------------------------------------------------------------ custom-op registration

def _op_cases():
    x, r, w, b = rnd(2, 3, 8), rnd(2, 3, 8, seed=1), rnd(8, seed=2), rnd(8, seed=3)
    cos, sin = rope_cache(8, 6, 10000.0)
    yield "add_norm ln", ops.add_norm, (x, r, w, b, 1e-5, False)
    yield "add_norm rms", ops.add_norm, (x, None, w, None, 1e-5, True)
    yield "swiglu", ops.swiglu, (rnd(2, 3, 8),)
    yield "gelu", ops.gelu, (rnd(2, 3, 8),)
    yield "rope", ops.rope, (rnd(2, 6, 4, 8).transpose(1, 2), cos.double(), sin.double())
    yield "probe tensor", ops.probe_reduce, (rnd(2, 3, 8), rnd(2, 3, 8, seed=1), 0.5, False)
    yield "probe token", ops.probe_reduce, (rnd(2, 3, 8), rnd(2, 3, 8, seed=1), 0.5, True)
    lg = rnd(5, 7, dtype=torch.float32, grad=False)
    lab = torch.tensor([1, -100, 6, 0, 2])
    mx, se, _ = ref.xent_stats(lg, lab, 0)
    yield "xent_stats", ops.xent_stats, (lg, lab, 0)
    yield "xent_grad_", ops.xent_grad_, (lg.clone(), lab, mx, se, 0, -100, torch.tensor(0.25))


@pytest.mark.parametrize("name,op,args", list(_op_cases()), ids=[c[0] for c in _op_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name,fn,args", [
    ("add_norm ln", lambda x, r, w, b: ops.add_norm(x, r, w, b, 1e-5, False)[0],
     (rnd(2, 3, 8), rnd(2, 3, 8, seed=1), rnd(8, seed=2), rnd(8, seed=3))),
    ("add_norm rms", lambda x, w: ops.add_norm(x, None, w, None, 1e-5, True)[0], (rnd(2, 3, 8), rnd(8, seed=2))),
    ("swiglu", ops.swiglu, (rnd(2, 3, 8),)),
    ("gelu", ops.gelu, (rnd(2, 3, 8),)),
    ("rope", lambda x: ops.rope(x, *(t.double() for t in rope_cache(8, 6, 10000.0))), (rnd(2, 6, 4, 8).transpose(1, 2),)),
    ("probe", lambda a, b: ops.probe_reduce(a, b, 0.5, True)[1], (rnd(2, 3, 8), rnd(2, 3, 8, seed=1))),
])
def test_gradcheck(name, fn, args):
    assert torch.autograd.gradcheck(fn, args)


def test_second_derivative_through_a_fused_op_raises_instead_of_being_wrong():
    x = rnd(3, 8, dtype=torch.float32)
    out = ops.add_norm(x, None, torch.ones(8), None, 1e-5, True)[0]
    g, = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


def test_compile_traces_the_ops():
    """The fake implementations let torch.compile trace through the custom ops (no graph break)."""
    def f(x, r, w):
        return kernels.swiglu(torch.cat([x, r], -1)) + kernels.add_norm(x, r, w, None, 1e-5, True)

    x, r, w = rnd(2, 4, 8, dtype=torch.float32, grad=False), rnd(2, 4, 8, dtype=torch.float32, seed=1, grad=False), torch.ones(8)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, r, w), f(x, r, w))


# ------------------------------------------------------------------ the model's call sites

HUGINN_LIKE = {"vocab_size": 32, "hidden": 32, "heads": 4, "kv_heads": 2, "mlp": "swiglu", "norm": "rmsnorm",
               "positions": "rope", "max_seq_len": 16, "n_prelude": 1, "n_core": 2, "n_coda": 1,
               "injection": "concat-linear", "init_state": "zero", "bias": False}
STARS_LIKE = {"vocab_size": 15, "hidden": 32, "heads": 4, "mlp": "gelu", "norm": "layernorm", "positions": "learned",
              "max_seq_len": 16, "n_prelude": 1, "n_core": 1, "n_coda": 1, "injection": "add"}


def _pair(model_cfg: dict):
    torch.manual_seed(0)
    a = LoopedLM(config_from_dict({"model": {**model_cfg, "kernels": "torch"}}).model)
    b = LoopedLM(config_from_dict({"model": {**model_cfg, "kernels": "auto"}}).model)
    b.load_state_dict(a.state_dict())
    # fp64: fd divides rounding differences by ε; in fp64 they stay far below the tolerances
    return a.double(), b.double()


@pytest.mark.parametrize("arch", [HUGINN_LIKE, STARS_LIKE], ids=["huginn-like", "stars-like"])
@pytest.mark.parametrize("method", ["vjp", "fd"])
def test_training_step_through_the_ops_equals_torch(ops_everywhere, arch, method):
    """Forward, CE, the STARS penalty and every gradient: custom-op call sites vs plain PyTorch.
    (vjp needs double backward: it must fall back to the reference ops, and still agree.)"""
    a, b = _pair(arch)
    ids = torch.randint(0, arch["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    stars = config_from_dict({"stars": {"lam": 0.5, "method": method}}).stars
    res = []
    for m in (a, b):
        r = forward_backward(m, batch, Depth(1, 2), stars, step=0, micro=0, seed=0, loss_scale=1.0)
        res.append((r, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (ra, ga), (rb, gb) = res
    assert abs(ra.loss - rb.loss) < 1e-5 and abs(ra.penalty - rb.penalty) < 1e-4 * max(1.0, ra.penalty)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_vjp_without_the_fallback_would_fail_loudly(ops_everywhere, monkeypatch):
    monkeypatch.setattr(jacobian.K, "reference_ops", contextlib.nullcontext)
    _, b = _pair(HUGINN_LIKE)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    out = b(ids, n_free=1, n_grad=0)
    est = jacobian.spectral_penalty(lambda h: b.core_step(h, out.embedded), out.state, "vjp", 1)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        est.penalty.backward()


def test_fd_uses_the_fused_probe_op_when_kernels_allow(ops_everywhere, monkeypatch):
    calls = []
    real = kernels.probe_reduce
    monkeypatch.setattr(kernels, "probe_reduce", lambda *a: calls.append(1) or real(*a))
    h = rnd(2, 3, 4, dtype=torch.float32, grad=False)
    w = rnd(4, 4, dtype=torch.float32, seed=1, grad=False)
    for mode, n in (("auto", 3), ("torch", 0)):
        calls.clear()
        jacobian.estimate_spectral_radius(lambda x: x @ w, h, "fd", 3, kernels=mode)
        assert len(calls) == n


# ------------------------------------------------------------------ model.kernels

def test_kernels_mode_decisions(monkeypatch):
    x = torch.zeros(2)
    assert not kernels.fused("auto", x) and not kernels.fused("cuda", x)  # CPU tensors: references
    with pytest.raises(ConfigError, match="model.kernels=cuda needs the built CUDA extension"):
        kernels.check_mode("cuda")
    kernels.check_mode("auto")
    kernels.check_mode("torch")
    with pytest.raises(ConfigError, match="model.kernels"):
        config_from_dict({"model": {"kernels": "triton"}})


def test_stars_train_with_kernels_cuda_on_a_cpu_machine_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "stars_scale.cli.train", "--config", str(REPO / "configs/arith_tiny.yaml"),
                        "--out", str(tmp_path / "run"), "--set", "model.kernels=cuda", "--set", "tracking.mlflow=false"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.kernels=cuda needs the built CUDA extension" in lines[0], p.stderr
