"""Attention dispatch decisions (capabilities passed in, as on machines we do not have) and the
CPU numerics of native GQA. The GPU numerics are in tests/gpu/test_attention_gpu.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from stars_scale.model.attention import CUDA_SDPA_BACKENDS, attend, attention_plan, math_attention

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("flash", [True, False])
def test_cuda_never_runs_the_math_backend_outside_the_estimator(flash):
    for dtype in (BF16, torch.float16, FP32):
        for n_rep in (1, 4):
            plan = attention_plan("cuda", dtype, n_rep, "auto", flash_installed=flash, force_math=False)
            assert plan.kind in ("flash", "sdpa")
            if plan.kind == "sdpa":
                assert SDPBackend.MATH not in plan.sdpa_backends
                assert set(plan.sdpa_backends) == set(CUDA_SDPA_BACKENDS)


def test_flash_attn_when_installed_on_cuda_half():
    assert attention_plan("cuda", BF16, 4, "auto", flash_installed=True, force_math=False).kind == "flash"
    assert attention_plan("cuda", BF16, 1, "flash", flash_installed=True, force_math=False).kind == "flash"
    # fp32, or CPU, or not installed: SDPA
    assert attention_plan("cuda", FP32, 1, "auto", flash_installed=True, force_math=False).kind == "sdpa"
    assert attention_plan("cpu", BF16, 1, "auto", flash_installed=True, force_math=False).kind == "sdpa"
    assert attention_plan("cuda", BF16, 1, "auto", flash_installed=False, force_math=False).kind == "sdpa"
    with pytest.raises(RuntimeError, match="model.attention=flash needs flash-attn"):
        attention_plan("cuda", FP32, 1, "flash", flash_installed=True, force_math=False)
    with pytest.raises(RuntimeError, match="model.attention=flash needs flash-attn"):
        attention_plan("cuda", BF16, 1, "flash", flash_installed=False, force_math=False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_plan("cuda", BF16, 1, "xformers", flash_installed=False, force_math=False)


def test_the_estimator_gets_the_math_path_everywhere():
    for device in ("cuda", "cpu"):
        for backend in ("auto", "flash", "sdpa", "math"):
            plan = attention_plan(device, BF16, 2, backend, flash_installed=True, force_math=True)
            assert plan.kind == "math" and plan.sdpa_backends == (SDPBackend.MATH,)
    assert attention_plan("cpu", FP32, 1, "math", flash_installed=False, force_math=False).kind == "math"
    with math_attention():  # the real thread-local switch reaches the decision
        assert attention_plan("cuda", BF16, 1, "auto", flash_installed=True).kind == "math"


def test_gqa_without_repeat_copies_where_the_backend_takes_it():
    assert attention_plan("cuda", BF16, 4, "auto", flash_installed=False, force_math=False).gqa_native
    assert attention_plan("cuda", torch.float16, 4, "auto", flash_installed=False, force_math=False).gqa_native
    assert attention_plan("cpu", FP32, 4, "auto", flash_installed=False, force_math=False).gqa_native
    # fp32 on CUDA goes to the memory-efficient kernel, which is handed repeated k/v
    assert not attention_plan("cuda", FP32, 4, "auto", flash_installed=False, force_math=False).gqa_native
    assert attention_plan("cuda", FP32, 1, "auto", flash_installed=False, force_math=False).gqa_native


def test_native_gqa_matches_repeated_heads_on_cpu(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 10, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 10, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 10, 16, generator=g, requires_grad=True)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    calls = []
    real = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = attend(q, k, v)
    assert not calls, "k/v were copied to every query head"
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with math_attention():  # the estimator's path is differentiable twice, GQA included
        y = attend(q, k, v)
        gq, = torch.autograd.grad(y.pow(2).sum(), q, create_graph=True)
        gq.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()


def test_written_out_math_path_matches_sdpa_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 9, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
    got = attend(q, k, v, backend="math")
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn(got.shape, generator=g)
    grads = [torch.autograd.grad((out * w).sum(), (q, k, v)) for out in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_math_path_dropout_drops_attention_weights_from_the_global_rng():
    q = torch.randn(1, 1, 6, 4)
    v = torch.eye(6).view(1, 1, 6, 6)  # the output rows are the attention weights
    torch.manual_seed(3)
    a = attend(q, q, v, backend="math", dropout_p=0.5)
    torch.manual_seed(3)
    b = attend(q, q, v, backend="math", dropout_p=0.5)
    assert torch.equal(a, b)  # masks come from the global generator
    full = attend(q, q, v, backend="math")
    kept = a != 0
    assert 0 < int(kept.sum()) < int((full != 0).sum())  # some weights dropped, some kept
    torch.testing.assert_close(a[kept], 2 * full[kept])  # the kept ones scaled by 1 / (1 - p)
