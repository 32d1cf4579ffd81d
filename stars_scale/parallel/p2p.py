"""Point-to-point between pipeline stages on plain `torch.distributed` (gloo and nccl alike).

megatron-core's p2p communication hard-codes CUDA streams; this is the little the loop pipeline
needs. Every message of a step is named (e.g. ("x", microbatch, pass): a pass's input) and the
schedule fixes, for each pair of stages, the order in which the sender sends them (its task
order). The receiver may consume them in another order (its own task order), so `Channels`
posts non-blocking receives in the *sender's* order, as far as the message it needs, and waits
only on that one: messages between two ranks are matched in order by both backends, and each
is received into the right buffer whatever the receiver's order. Sends are non-blocking; their
buffers are kept until the send completes.
"""
from __future__ import annotations

import time
from typing import Callable, Hashable

import torch
import torch.distributed as dist


class Channels:
    """The step's messages from each source rank, in the order that rank sends them.

    `incoming[src]`: the names of the messages `src` sends to this rank, in order; `shape(name)`:
    the shape of message `name` (float32)."""

    def __init__(self, incoming: dict[int, list[Hashable]], shape: Callable[[Hashable], tuple],
                 device: torch.device) -> None:
        self.incoming, self.shape, self.device = incoming, shape, device
        self.posted: dict[tuple[int, Hashable], tuple[object, torch.Tensor]] = {}
        self.next = {src: 0 for src in incoming}
        self.sends: list[tuple[object, torch.Tensor]] = []
        self.recv_wait_s = 0.0  # time blocked in receives: this stage's share of the bubble

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        buf = tensor.detach().float().contiguous()
        self.sends.append((dist.isend(buf, dst), buf))
        self.sends = [(h, b) for h, b in self.sends if not h.is_completed()]

    def recv(self, src: int, name: Hashable) -> torch.Tensor:
        order = self.incoming[src]
        while (src, name) not in self.posted:
            if self.next[src] >= len(order):
                raise RuntimeError(f"pipeline: no message {name!r} from rank {src} in the schedule")
            nxt = order[self.next[src]]
            buf = torch.empty(self.shape(nxt), dtype=torch.float32, device=self.device)
            self.posted[(src, nxt)] = (dist.irecv(buf, src), buf)
            self.next[src] += 1
        handle, buf = self.posted.pop((src, name))
        t0 = time.perf_counter()
        handle.wait()
        self.recv_wait_s += time.perf_counter() - t0
        return buf

    def close(self) -> None:
        """Wait for the outstanding sends; every expected message must have been received."""
        for handle, _ in self.sends:
            handle.wait()
        self.sends.clear()
        left = [name for src, order in self.incoming.items() for name in order[self.next[src]:]]
        if self.posted or left:
            raise RuntimeError(f"pipeline: messages not consumed: {list(self.posted) + left}")
