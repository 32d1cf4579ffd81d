"""attend() on CUDA: flash-attn (when installed) and SDPA's fused kernels against the math path."""
from __future__ import annotations

import pytest
import torch

from stars_scale.model.attention import attend, attention_plan, flash_available, math_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_heads", [16, 4])
def test_fused_attention_matches_math(dtype, kv_heads):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 16, 512, 128, device="cuda", generator=g).to(dtype)
    k = torch.randn(2, kv_heads, 512, 128, device="cuda", generator=g).to(dtype)
    v = torch.randn(2, kv_heads, 512, 128, device="cuda", generator=g).to(dtype)
    plan = attention_plan("cuda", dtype, 16 // kv_heads)
    out = attend(q, k, v)
    with math_attention():
        want = attend(q.float(), k.float(), v.float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), want, **tol, msg=lambda m: f"{plan}: {m}")


def test_flash_attn_is_used_when_installed():
    if not flash_available():
        pytest.skip("flash-attn is not installed here")
    assert attention_plan("cuda", torch.bfloat16, 1).kind == "flash"
