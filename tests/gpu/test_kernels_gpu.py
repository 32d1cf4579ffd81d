"""Each CUDA kernel against its PyTorch reference (stars_scale/kernels/reference.py), forward and
backward, in fp32 and bf16. Tolerances: fp32 rtol 1e-5 / atol 1e-5 (2e-5 where a reduction's
order differs); bf16 one bf16 ulp of the output (rtol 1.6e-2, atol 1e-2) since both round the same
fp32 value to bf16 and may land on neighbouring values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stars_scale import kernels
from stars_scale.kernels import reference as ref
from stars_scale.model.layers import rope_cache

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def rnd(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("H", [2048, 5280])  # the 1B config's hidden; Huginn's (not a power of 2)
def test_add_norm(native, dtype, rms, residual, H):
    x, r = rnd(3, 17, H, dtype=dtype), (rnd(3, 17, H, dtype=dtype, seed=1) if residual else None)
    w, b = rnd(H, seed=2), (None if rms else rnd(H, seed=3))
    out, mean, rstd = native.add_norm_fwd(x, r, w, b, 1e-6, rms)
    want, wmean, wrstd = ref.add_norm(x, r, w, b, 1e-6, rms)
    torch.testing.assert_close(out, want, **TOL[dtype])
    torch.testing.assert_close(rstd, wrstd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, wmean, rtol=1e-5, atol=1e-5)
    g = rnd(3, 17, H, dtype=dtype, seed=4)
    dz, dw, db = native.add_norm_bwd(g, x, r, w, mean, rstd, rms)
    wdz, wdw, wdb = ref.add_norm_backward(g, x, r, w, wmean, wrstd, rms)
    torch.testing.assert_close(dz, wdz, **TOL[dtype])
    torch.testing.assert_close(dw, wdw, rtol=1e-4, atol=1e-3)  # a sum over 51 rows, different order
    torch.testing.assert_close(db, wdb, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations(native, dtype):
    gu = rnd(4, 33, 2 * 1000, dtype=dtype)
    torch.testing.assert_close(native.swiglu_fwd(gu), ref.swiglu(gu), **TOL[dtype])
    g = rnd(4, 33, 1000, dtype=dtype, seed=1)
    torch.testing.assert_close(native.swiglu_bwd(g, gu), ref.swiglu_backward(g, gu), **TOL[dtype])
    x = rnd(4, 33, 1000, dtype=dtype, seed=2)
    torch.testing.assert_close(native.gelu_fwd(x), ref.gelu(x), **TOL[dtype])
    torch.testing.assert_close(native.gelu_bwd(g, x), ref.gelu_backward(g, x), **TOL[dtype])
    torch.testing.assert_close(native.gelu_fwd(x).float(), F.gelu(x.float()), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_transposed_views(native, dtype):
    cos, sin = (t.cuda() for t in rope_cache(128, 256, 50000.0))
    q = rnd(2, 200, 16, 128, dtype=dtype).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    out = native.rope_fwd(q, cos, sin)
    torch.testing.assert_close(out, ref.rope(q, cos, sin), **TOL[dtype])
    back = native.rope_fwd(out, cos, -sin)  # the backward: rotation by -θ
    torch.testing.assert_close(back, q, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(native, dtype):
    logits = rnd(512, 65536, dtype=dtype)
    labels = torch.randint(0, 65536, (512,), device="cuda")
    labels[::7] = -100
    want = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    leaf = logits.float().requires_grad_()
    F.cross_entropy(leaf, labels, ignore_index=-100).backward()
    buf = logits.clone().requires_grad_()
    h = buf * 1
    loss = kernels.cross_entropy(h, labels, -100)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    torch.testing.assert_close(buf.grad.float(), leaf.grad, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-4,
                               atol=1e-7 if dtype == torch.float32 else 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token", [False, True])
def test_probe_reduce(native, dtype, token):
    y1, y0 = rnd(16, 2048, 512, dtype=dtype), rnd(16, 2048, 512, dtype=dtype, seed=1)
    v, sq = native.probe_reduce(y1, y0, 0.05, token)
    wv, wsq = ref.probe_reduce(y1, y0, 0.05, token)
    torch.testing.assert_close(sq, wsq, rtol=1e-4, atol=0)
    torch.testing.assert_close(v, wv, **TOL[dtype])
    g = torch.tensor(0.7, device="cuda")
    torch.testing.assert_close(native.probe_reduce_bwd(g, y1, y0, 0.05), ref.probe_reduce_backward(g, y1, y0, 0.05),
                               **TOL[dtype])


def test_the_custom_ops_dispatch_to_the_kernels(native):
    x = rnd(4, 64)
    assert kernels.fused("auto", x) and kernels.fused("cuda", x) and not kernels.fused("torch", x)
    with kernels.reference_ops():
        assert not kernels.fused("cuda", x)
    torch.library.opcheck(torch.ops.stars_scale.swiglu, (rnd(4, 64).requires_grad_(),))
    torch.library.opcheck(torch.ops.stars_scale.add_norm, (rnd(4, 64).requires_grad_(), None,
                                                           rnd(64, seed=1).requires_grad_(), None, 1e-5, True))
