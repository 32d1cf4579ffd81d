"""Point-to-point between pipeline stages on plain `torch.distributed` (gloo and nccl alike).

megatron-core's p2p communication hard-codes CUDA streams; these are the few pieces the loop
pipeline needs. Sends are non-blocking (`isend`, the handle and its buffer are kept until
`Mailbox.wait_all`), receives block: a stage that works through its tasks in the schedule's
order therefore never deadlocks, whatever the ring.

`send_with_grad` / `recv_with_grad` put the communication into autograd: the receiver's
backward sends the gradient of what it received back to the sender, whose backward receives
it. A stage's whole step is then one graph and one `backward()` call (what DeepSpeed's ZeRO
hooks expect), and autograd's engine, which runs ready nodes in decreasing creation order,
replays the forward's communication in exact reverse on every stage.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Mailbox:
    """Outstanding isends of one step (their buffers must live until the send completes)."""

    def __init__(self) -> None:
        self.pending: list[tuple[object, torch.Tensor]] = []
        self.recv_wait_s = 0.0  # time blocked in receives: this stage's share of the bubble

    def isend(self, tensor: torch.Tensor, dst: int) -> None:
        buf = tensor.detach().contiguous()
        self.pending.append((dist.isend(buf, dst), buf))

    def recv(self, shape, dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        t0 = time.perf_counter()
        dist.recv(out, src)
        self.recv_wait_s += time.perf_counter() - t0
        return out

    def wait_all(self) -> None:
        for handle, _ in self.pending:
            handle.wait()
        self.pending.clear()


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dst: int, mailbox: Mailbox) -> torch.Tensor:
        ctx.dst, ctx.mailbox, ctx.shape, ctx.dtype, ctx.device = dst, mailbox, x.shape, x.dtype, x.device
        mailbox.isend(x, dst)
        return torch.zeros((), dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        grad = ctx.mailbox.recv(ctx.shape, ctx.dtype, ctx.device, ctx.dst)
        return grad, None, None


class _Recv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: torch.Tensor, shape, dtype, src: int, mailbox: Mailbox) -> torch.Tensor:
        ctx.src, ctx.mailbox = src, mailbox
        return mailbox.recv(shape, dtype, anchor.device, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.mailbox.isend(grad, ctx.src)
        return torch.zeros((), dtype=grad.dtype, device=grad.device), None, None, None, None


def send_with_grad(x: torch.Tensor, dst: int, mailbox: Mailbox) -> torch.Tensor:
    """Send x; returns a zero scalar to add to the stage's backward root (its backward receives x's grad)."""
    return _Send.apply(x, dst, mailbox)


def recv_with_grad(anchor: torch.Tensor, shape, dtype: torch.dtype, src: int, mailbox: Mailbox) -> torch.Tensor:
    """Receive a tensor that requires grad; backward sends its gradient back to `src`.

    `anchor` is a scalar leaf with requires_grad (autograd records a Function only when an input
    needs grad); its own gradient is zero."""
    return _Recv.apply(anchor, tuple(shape), dtype, src, mailbox)
