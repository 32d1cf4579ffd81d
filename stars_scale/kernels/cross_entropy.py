"""Fused (vocab-parallel) cross-entropy with the gradient written into the logits in the forward.

Apex `xentropy` / Megatron fused-CE style: one pass computes each row's max, Σexp and the
label's logit (`xent_stats`); with a tensor-parallel vocabulary these are all-reduced over the
group (max, then the rescaled sums); a second pass overwrites the logits with
d loss/d logits = (softmax − onehot) / n_valid. Backward only scales that buffer by the incoming
(scalar) gradient, in place, so a 65,536-word vocabulary at 4,096 tokens never holds a second
logits-sized tensor. The loss is the mean over tokens whose label is not `ignore_index`.

The logits are consumed: after the call they hold the gradient. Pass `inplace=False` to work on
a copy (tests, or a caller that still needs the logits).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from stars_scale.kernels import ops


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, group):
        V = logits.shape[-1]
        buf = logits.reshape(-1, V)  # a view when contiguous: the gradient lands in the logits' memory
        lab = labels.reshape(-1)
        vocab_start = dist.get_rank(group) * V if group is not None else 0
        mx, sumexp, target = ops.xent_stats(buf, lab, vocab_start)
        if group is not None:
            gmx = mx.clone()
            dist.all_reduce(gmx, op=dist.ReduceOp.MAX, group=group)
            sumexp = sumexp * torch.exp(mx - gmx)
            dist.all_reduce(sumexp, group=group)
            dist.all_reduce(target, group=group)
            mx = gmx
        valid = lab != ignore_index
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        loss = torch.where(valid, torch.log(sumexp) + mx - target, torch.zeros_like(mx)).sum() / n_valid
        ops.xent_grad_(buf, lab, mx, sumexp, vocab_start, ignore_index, 1.0 / n_valid)
        ctx.grad_buf = buf.detach()  # held as is: it was written after the view was made, on purpose
        ctx.shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad_buf = ctx.grad_buf, None
        grad.mul_(grad_loss.to(grad.dtype))  # the buffer is ours: scale it in place
        return grad.view(ctx.shape), None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  group: dist.ProcessGroup | None = None, inplace: bool = True) -> torch.Tensor:
    """Mean token cross-entropy of logits [..., V_local] against labels [...] (global vocab ids).
    `group`: the tensor-parallel group whose ranks hold consecutive vocab slices (rank r holds
    [r·V_local, (r+1)·V_local)); None for a whole vocabulary. Overwrites logits unless inplace=False."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    if not inplace:
        logits = logits.clone()
    return _FusedCrossEntropy.apply(logits, labels, ignore_index, group)
