"""The one attention function of the project.

`attend(q, k, v)` takes [batch, heads, seq, head_dim] tensors and runs causal attention through
flash-attn when it is installed, the tensors are on CUDA in fp16/bf16 and nothing needs higher
derivatives; otherwise through `F.scaled_dot_product_attention` (on CUDA only its cuDNN, flash
and memory-efficient kernels). `attention_plan` is that decision, as a function. The math path
(`model.attention: math`, or forced) is written out here, `softmax(q kᵀ/√d + causal) v` as the
STARS reference writes it, with its dropout through `stars_scale.model.dropout.dropout` (cheap
CPU masks, masks replayed for the STARS probe); SDPA's math backend is the same arithmetic with
two more scaling passes, and its double backward cost up to twice as much on CPU.

Higher-order autodiff (double backward for the VJP estimator, forward-mode AD for the JVP
estimator) does not run through flash kernels (neither flash-attn's nor SDPA's default CPU
kernel). Code that needs it wraps the computation in `math_attention()`, which forces the math
path everywhere underneath.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stars_scale.model.dropout import dropout

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
    """Force the differentiable-twice math attention path (for vjp/jvp estimators); the
    SDPA backend is pinned to MATH too, for any SDPA call made underneath."""
    _state.math = getattr(_state, "math", 0) + 1
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _state.math -= 1


@dataclass(frozen=True)
class AttentionPlan:
    """How one call runs: `kind` flash (flash-attn) | sdpa | math; for sdpa the backends allowed
    (None: PyTorch's own choice, as on CPU); `gqa_native` when k/v are not repeated to H heads."""

    kind: str
    sdpa_backends: Optional[tuple[SDPBackend, ...]] = None
    gqa_native: bool = True


# On CUDA outside the estimator: fused kernels only, never the O(T^2)-memory math backend.
CUDA_SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
HALF = (torch.float16, torch.bfloat16)


def attention_plan(device_type: str, dtype: torch.dtype, n_rep: int, backend: str = "auto", *,
                   flash_installed: bool | None = None, force_math: bool | None = None) -> AttentionPlan:
    """The dispatch decision, a pure function of the call's properties (tests pass the capabilities).

    - math (`backend: math`, or inside `math_attention()`): `math_causal_attention`, differentiable twice;
    - flash-attn when installed, on CUDA, fp16/bf16 (`auto` or `flash`); it takes GQA natively;
    - else SDPA: on CUDA restricted to cuDNN / flash / memory-efficient, with GQA native
      (`enable_gqa`) in fp16/bf16, where SDPA's flash kernel takes it; fp32 GQA on CUDA repeats k/v
      for the memory-efficient kernel. On CPU, PyTorch's own choice with native GQA.
    """
    if backend not in ("auto", "sdpa", "math", "flash"):
        raise ValueError(f"unknown attention backend {backend!r}")
    flash_installed = flash_available() if flash_installed is None else flash_installed
    force_math = _force_math() if force_math is None else force_math
    if force_math or backend == "math":
        return AttentionPlan("math", (SDPBackend.MATH,), gqa_native=True)
    cuda = device_type == "cuda"
    if backend in ("auto", "flash") and flash_installed and cuda and dtype in HALF:
        return AttentionPlan("flash")
    if backend == "flash":
        raise RuntimeError("model.attention=flash needs flash-attn installed and CUDA fp16/bf16 tensors; "
                           "use attention: auto to fall back to SDPA")
    if not cuda:
        return AttentionPlan("sdpa", None, gqa_native=True)
    return AttentionPlan("sdpa", CUDA_SDPA_BACKENDS, gqa_native=n_rep == 1 or dtype in HALF)


def _sdpa(q, k, v, plan: AttentionPlan, dropout_p: float) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not plan.gqa_native:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    ctx = sdpa_kernel(list(plan.sdpa_backends)) if plan.sdpa_backends else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                              enable_gqa=n_rep > 1 and plan.gqa_native)


def math_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ/√d, causal) v with dropout on the weights, differentiable to any order.
    Causal bottom-right aligned when k is longer than q (queries are the last positions)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return dropout(weights, dropout_p) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
           dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention; q [B, H, T, D], k/v [B, H_kv, T, D] with H a multiple of H_kv."""
    plan = attention_plan(q.device.type, q.dtype, q.shape[1] // k.shape[1], backend)
    if plan.kind == "math":
        return math_causal_attention(q, k, v, dropout_p)
    if plan.kind == "flash":
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               dropout_p=dropout_p, causal=True)
        return out.transpose(1, 2)
    return _sdpa(q, k, v, plan, dropout_p)


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
