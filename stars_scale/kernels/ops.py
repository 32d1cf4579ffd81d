"""The fused kernels as `torch.library` custom ops: `torch.ops.stars_scale.*`.

Every op has a fake (meta) implementation, so it traces under `torch.compile` and FakeTensor
mode, and every differentiable op an autograd formula, so it composes with activation
checkpointing (recomputation replays the op) and tensor parallelism (the ops act on the local
shard). An op runs the CUDA kernel of `csrc/` when its inputs are on CUDA and the extension is
loaded (`stars_scale.kernels.extension`), else the PyTorch reference of the same function.

The backward ops carry no autograd formula of their own: a second derivative through a fused op
raises an error instead of silently being wrong. Code that needs one (the vjp/jvp estimators)
runs under `reference_ops()`, which routes the model's call sites to differentiable PyTorch.

Cross-entropy writes its gradient into the logits during the forward pass, which a functional
custom op cannot express: its two kernels are mutable/functional custom ops and the autograd
glue is the `torch.autograd.Function` in `stars_scale.kernels.cross_entropy`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from stars_scale.kernels import reference as ref
from stars_scale.kernels.reference import acc_dtype
from stars_scale.kernels.extension import cuda_ops


def _native(t: Tensor):
    """The extension's op namespace when `t` is on CUDA (fp32/bf16/fp16) and the extension is
    loaded, else None (fp64 always runs the reference)."""
    return cuda_ops() if t.is_cuda and t.dtype != torch.float64 else None


def _elementwise(kernel: str, reference, *ts: Tensor) -> Tensor:
    """`kernel` of the extension on contiguous copies of `ts` where it applies, else the reference."""
    native = _native(ts[-1])
    return getattr(native, kernel)(*(t.contiguous() for t in ts)) if native is not None else reference(*ts)


# ------------------------------------------------------------------ residual add + norm

@torch.library.custom_op("stars_scale::add_norm", mutates_args=())
def add_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
             rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    native = _native(x)
    if native is not None:
        return native.add_norm_fwd(x.contiguous(), None if residual is None else residual.contiguous(),
                                   weight, bias, eps, rms)
    return ref.add_norm(x, residual, weight, bias, eps, rms)


@add_norm.register_fake
def _(x, residual, weight, bias, eps, rms):
    stats = x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("stars_scale::add_norm_backward", mutates_args=())
def add_norm_backward(grad: Tensor, x: Tensor, residual: Optional[Tensor], weight: Tensor, mean: Tensor,
                      rstd: Tensor, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    native = _native(x)
    if native is not None:
        return native.add_norm_bwd(grad.contiguous(), x.contiguous(),
                                   None if residual is None else residual.contiguous(), weight, mean, rstd, rms)
    return ref.add_norm_backward(grad, x, residual, weight, mean, rstd, rms)


@add_norm_backward.register_fake
def _(grad, x, residual, weight, mean, rstd, rms):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(weight))


def _add_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.rms, ctx.has_residual, ctx.has_bias = rms, residual is not None, bias is not None


def _add_norm_grad(ctx, grad_out, _grad_mean, _grad_rstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    dz, dw, db = add_norm_backward(grad_out, x, residual if ctx.has_residual else None, weight, mean, rstd,
                                   ctx.rms)
    return dz, (dz if ctx.has_residual else None), dw, (db if ctx.has_bias else None), None, None


add_norm.register_autograd(_add_norm_grad, setup_context=_add_norm_setup)


# ------------------------------------------------------------------ gated MLP activations

def _activation_backward(name: str, kernel: str, reference):
    """The backward op of an activation: grad, saved input -> grad of the input (its shape)."""
    @torch.library.custom_op(f"stars_scale::{name}", mutates_args=())
    def op(grad: Tensor, saved: Tensor) -> Tensor:
        return _elementwise(kernel, reference, grad, saved)

    op.register_fake(lambda grad, saved: torch.empty_like(saved, memory_format=torch.contiguous_format))
    return op


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


swiglu_backward = _activation_backward("swiglu_backward", "swiglu_bwd", ref.swiglu_backward)
gelu_backward = _activation_backward("gelu_backward", "gelu_bwd", ref.gelu_backward)


@torch.library.custom_op("stars_scale::swiglu", mutates_args=())
def swiglu(gate_up: Tensor) -> Tensor:
    return _elementwise("swiglu_fwd", ref.swiglu, gate_up)


@swiglu.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("stars_scale::gelu", mutates_args=())
def gelu(x: Tensor) -> Tensor:
    return _elementwise("gelu_fwd", ref.gelu, x)


@gelu.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


swiglu.register_autograd(lambda ctx, grad: swiglu_backward(grad, ctx.saved_tensors[0]), setup_context=_save_input)
gelu.register_autograd(lambda ctx, grad: gelu_backward(grad, ctx.saved_tensors[0]), setup_context=_save_input)


# ------------------------------------------------------------------ rotary positions

@torch.library.custom_op("stars_scale::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    native = _native(x)
    if native is not None:
        return native.rope_fwd(x if x.stride(-1) == 1 else x.contiguous(), cos.contiguous(), sin.contiguous())
    return ref.rope(x, cos, sin)


@rope.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rope_grad(ctx, grad):
    cos, sin = ctx.saved_tensors
    return rope(grad, cos, -sin), None, None  # a rotation's transpose is the rotation by -θ


rope.register_autograd(_rope_grad, setup_context=_rope_setup)


# ------------------------------------------------------------------ cross-entropy kernels

@torch.library.custom_op("stars_scale::xent_stats", mutates_args=())
def xent_stats(logits: Tensor, labels: Tensor, vocab_start: int) -> tuple[Tensor, Tensor, Tensor]:
    native = _native(logits)
    if native is not None:
        return native.xent_stats(logits.contiguous(), labels.contiguous(), vocab_start)
    return ref.xent_stats(logits, labels, vocab_start)


@xent_stats.register_fake
def _(logits, labels, vocab_start):
    s = logits.new_empty(logits.shape[:-1], dtype=acc_dtype(logits.dtype))
    return s, torch.empty_like(s), torch.empty_like(s)


@torch.library.custom_op("stars_scale::xent_grad_", mutates_args=("logits",))
def xent_grad_(logits: Tensor, labels: Tensor, mx: Tensor, sumexp: Tensor, vocab_start: int, ignore_index: int,
               scale: Tensor) -> None:
    """Overwrites logits (contiguous) with scale · (softmax − onehot), zero on ignored rows; `scale` is
    a 0-dim fp32 tensor (1 / valid tokens, computed on the device: no host sync)."""
    native = _native(logits)
    if native is not None:
        native.xent_grad_(logits, labels.contiguous(), mx, sumexp, vocab_start, ignore_index, scale)
    else:
        logits.copy_(ref.xent_grad(logits, labels, mx, sumexp, vocab_start, ignore_index, scale))


@xent_grad_.register_fake
def _(logits, labels, mx, sumexp, vocab_start, ignore_index, scale):
    return None


# ------------------------------------------------------------------ STARS probe reduction

@torch.library.custom_op("stars_scale::probe_reduce", mutates_args=())
def probe_reduce(y1: Tensor, y0: Tensor, eps: float, token: bool) -> tuple[Tensor, Tensor]:
    native = _native(y1)
    if native is not None:
        return native.probe_reduce(y1.contiguous(), y0.contiguous(), eps, token)
    return ref.probe_reduce(y1, y0, eps, token)


@probe_reduce.register_fake
def _(y1, y0, eps, token):
    return torch.empty_like(y1, memory_format=torch.contiguous_format), y1.new_empty((), dtype=acc_dtype(y1.dtype))


@torch.library.custom_op("stars_scale::probe_reduce_backward", mutates_args=())
def probe_reduce_backward(grad_sq: Tensor, y1: Tensor, y0: Tensor, eps: float) -> Tensor:
    native = _native(y1)
    if native is not None:
        return native.probe_reduce_bwd(grad_sq, y1.contiguous(), y0.contiguous(), eps)
    return ref.probe_reduce_backward(grad_sq, y1, y0, eps)


@probe_reduce_backward.register_fake
def _(grad_sq, y1, y0, eps):
    return torch.empty_like(y1, memory_format=torch.contiguous_format)


def _probe_setup(ctx, inputs, output):
    y1, y0, eps, _ = inputs
    ctx.save_for_backward(y1, y0)
    ctx.mark_non_differentiable(output[0])
    ctx.eps = eps


def _probe_grad(ctx, _grad_v, grad_sq):
    y1, y0 = ctx.saved_tensors
    g = probe_reduce_backward(grad_sq, y1, y0, ctx.eps)  # the direction output carries no gradient
    return g.to(y1.dtype), (-g).to(y0.dtype), None, None


probe_reduce.register_autograd(_probe_grad, setup_context=_probe_setup)
