"""Fused kernels for the looped model's hot path, and when to use them.

`model.kernels` chooses, per model:
- ``torch``: plain PyTorch modules everywhere (the CPU default's behaviour);
- ``auto``: the CUDA kernels of `csrc/` for tensors on CUDA when the extension is built, else torch;
- ``cuda``: the CUDA kernels; a machine without the built extension is a config error.

Call sites ask `fused(mode, tensor)` and then call the op here (`add_norm`, `swiglu`, `gelu`,
`rope`, `cross_entropy`, `probe_reduce`). Inside `reference_ops()` the answer is always no: the
vjp/jvp estimators need second derivatives, which the fused backward ops do not have (calling one
there raises an error instead of returning a wrong value).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from stars_scale.errors import ConfigError
from stars_scale.kernels import ops
from stars_scale.kernels.cross_entropy import cross_entropy
from stars_scale.kernels.extension import cuda_ops, why_unavailable

MODES = ("auto", "torch", "cuda")

_state = threading.local()


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Route every call site to differentiable PyTorch (for double backward / forward-mode AD)."""
    _state.ref = getattr(_state, "ref", 0) + 1
    try:
        yield
    finally:
        _state.ref -= 1


def check_mode(mode: str) -> None:
    """`model.kernels` must name a mode, and `cuda` needs the extension: one ConfigError line if not."""
    if mode not in MODES:
        raise ConfigError(f"model.kernels: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "cuda" and cuda_ops() is None:
        raise ConfigError("model.kernels=cuda needs the built CUDA extension (pip install -e . on a machine with "
                          f"nvcc and a CUDA torch, or STARS_KERNELS_JIT=1): {why_unavailable()}; "
                          "use model.kernels=auto to fall back to torch")


def fused(mode: str, t: torch.Tensor) -> bool:
    """Whether a call site with kernels `mode` runs the fused op on tensor `t`."""
    return (mode != "torch" and t.is_cuda and not getattr(_state, "ref", 0) and cuda_ops() is not None)


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, rms: bool) -> torch.Tensor:
    """norm(x + residual) (residual may be None), fp32 statistics, in the promoted input dtype."""
    if residual is not None and residual.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    def stat(t):  # the kernels read fp32 weights; an fp64 model keeps its own
        return None if t is None else (t if t.dtype in (torch.float32, torch.float64) else t.float())

    return ops.add_norm(x, residual, stat(weight), stat(bias), eps, rms)[0]


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return ops.swiglu(gate_up)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return ops.gelu(x)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return ops.rope(x, cos, sin)


def probe_reduce(y1: torch.Tensor, y0: torch.Tensor, eps: float, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(h+εv) − f(h))/ε -> (its unit direction, `normalize` tensor|token; its squared norm, fp32)."""
    if normalize not in ("tensor", "token"):
        raise ValueError(f"normalize must be 'tensor' or 'token', got {normalize!r}")
    if y0.dtype != y1.dtype:
        y0 = y0.to(y1.dtype)
    return ops.probe_reduce(y1, y0, float(eps), normalize == "token")


__all__ = ["MODES", "check_mode", "fused", "reference_ops", "add_norm", "swiglu", "gelu", "rope", "cross_entropy",
           "probe_reduce", "cuda_ops", "why_unavailable"]
