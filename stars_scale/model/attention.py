"""The one attention function of the project.

`attend(q, k, v)` takes [batch, heads, seq, head_dim] tensors and runs causal attention through
flash-attn when it is installed, the tensors are on CUDA in fp16/bf16 and nothing needs higher
derivatives; otherwise through `F.scaled_dot_product_attention`.

Higher-order autodiff (double backward for the VJP estimator, forward-mode AD for the JVP
estimator) does not run through flash kernels (neither flash-attn's nor SDPA's default CPU
kernel). Code that needs it wraps the computation in `math_attention()`, which forces the math
path everywhere underneath.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: `pip install stars_scale[flash]` on a CUDA machine
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build: fall back cleanly
    _flash_attn_func = None

_state = threading.local()


def flash_available() -> bool:
    return _flash_attn_func is not None


def _force_math() -> bool:
    return getattr(_state, "math", 0) > 0


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Force the differentiable-twice math attention path (for vjp/jvp estimators)."""
    _state.math = getattr(_state, "math", 0) + 1
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _state.math -= 1


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
           dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention; q [B, H, T, D], k/v [B, H_kv, T, D] with H a multiple of H_kv."""
    if backend not in ("auto", "sdpa", "math", "flash"):
        raise ValueError(f"unknown attention backend {backend!r}")
    n_rep = q.shape[1] // k.shape[1]
    use_flash = (
        backend in ("auto", "flash")
        and _flash_attn_func is not None
        and not _force_math()
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    )
    if backend == "flash" and not use_flash and not _force_math():
        raise RuntimeError(
            "model.attention=flash needs flash-attn installed and CUDA fp16/bf16 tensors; "
            "use attention: auto to fall back to SDPA"
        )
    if use_flash:
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               dropout_p=dropout_p, causal=True)
        return out.transpose(1, 2)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if backend == "math" and not _force_math():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal attention of the last Tq positions (q [B, H, Tq, D]) over Tk >= Tq cached keys.

    Query i sits at position Tk - Tq + i (bottom-right aligned causal mask): generation with a
    KV cache. Inference only (no dropout).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return attend(q, k, v, backend)
    if (backend in ("auto", "flash") and _flash_attn_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)):  # flash-attn aligns causal bottom-right
        return _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                causal=True).transpose(1, 2)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    mask = None
    if Tq > 1:
        pos_q = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        mask = torch.arange(Tk, device=q.device)[None, :] <= pos_q
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
