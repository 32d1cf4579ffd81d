"""The KV cache of a looped model: prelude, every core iteration, coda.

A looped model runs its core blocks r times per token, and iteration i of a new token attends
to the keys/values that earlier tokens produced *at iteration i*. The cache therefore holds one
set of per-layer buffers per core-iteration slot:

- `full`:   slot i for iteration i (i = 0 .. max_depth - 1). Exact: generation with it equals
            recomputing the whole sequence at the same depth. Memory grows with depth.
- `shared`: Huginn's scheme: iteration i reads and writes slot i mod k (k = `slots`), so memory
            is k slots whatever the depth. Exact while every token loops at most k times; beyond
            that, iteration i of a new token sees an earlier token's keys from iteration
            i - k, i - 2k, ... (whichever it wrote last into that slot): an approximation.

Adaptive exit: a token that stopped after j iterations never writes the slots of iterations
> j. Those slots are filled with the token's last computed entry (iteration j), so a later
token looping deeper sees the earlier token's final keys/values (Huginn's "latest" lookup).

All rows of a batch share positions (`pos` = the length already cached). Writes go to
[pos, pos + T); `commit(T, loops)` fills the skipped slots and advances `pos`. Inside
`read_only()` nothing is written (probe evaluations: the KL rule's decode, the contraction
rule's power iteration). `write_rows` (bool [B]) restricts writes to rows still looping.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class LayerKV:
    """One attention layer's cache (what `Attention.forward(kv_cache=...)` receives)."""

    def __init__(self, owner: "LoopKVCache"):
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def offset(self) -> int:
        return self.owner.pos

    def _allocate(self, like: torch.Tensor) -> None:
        B, H, _, D = like.shape
        shape = (B, H, self.owner.max_len, D)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.owner
        pos, T = o.pos, k.shape[-2]
        if pos + T > o.max_len:
            raise ValueError(f"KV cache holds {o.max_len} positions; asked for {pos + T}")
        if self.k is None:
            self._allocate(k)
        if o.is_read_only:
            return (torch.cat([self.k[:, :, :pos], k], dim=2), torch.cat([self.v[:, :, :pos], v], dim=2))
        rows = o.write_rows
        if rows is None:
            self.k[:, :, pos:pos + T] = k
            self.v[:, :, pos:pos + T] = v
        else:  # rows that already exited keep their entries
            m = rows.view(-1, 1, 1, 1)
            self.k[:, :, pos:pos + T] = torch.where(m, k, self.k[:, :, pos:pos + T])
            self.v[:, :, pos:pos + T] = torch.where(m, v, self.v[:, :, pos:pos + T])
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]

    def copy_rows(self, src: "LayerKV", rows: torch.Tensor, pos: int, T: int) -> None:
        if src.k is None:
            return
        if self.k is None:
            self._allocate(src.k)
        m = rows.view(-1, 1, 1, 1)
        self.k[:, :, pos:pos + T] = torch.where(m, src.k[:, :, pos:pos + T], self.k[:, :, pos:pos + T])
        self.v[:, :, pos:pos + T] = torch.where(m, src.v[:, :, pos:pos + T], self.v[:, :, pos:pos + T])


class LoopKVCache:
    def __init__(self, model, batch: int, max_len: int, *, scheme: str = "full", max_depth: int,
                 slots: int = 4):
        if scheme not in ("full", "shared"):
            raise ValueError(f"cache scheme must be full or shared, got {scheme!r}")
        if scheme == "shared" and slots < 1:
            raise ValueError(f"a shared cache needs slots >= 1, got {slots}")
        self.scheme = scheme
        self.n_slots = max_depth if scheme == "full" else slots
        self.batch, self.max_len, self.max_depth = batch, max_len, max_depth
        self.pos = 0
        self.is_read_only = False
        self.write_rows: torch.Tensor | None = None
        self.prelude = [LayerKV(self) for _ in model.prelude]
        self.coda = [LayerKV(self) for _ in model.coda]
        self.core = [[LayerKV(self) for _ in model.core] for _ in range(self.n_slots)]
        self.device = next(model.parameters()).device
        self._written = [torch.zeros(batch, dtype=torch.bool, device=self.device) for _ in range(self.n_slots)]

    def slot(self, i: int) -> int:
        """The slot of core iteration i (0-based)."""
        if self.scheme == "full":
            if i >= self.n_slots:
                raise ValueError(f"iteration {i + 1} exceeds the full cache's max_depth={self.max_depth}")
            return i
        return i % self.n_slots

    def iteration(self, i: int) -> list[LayerKV]:
        """The per-core-block caches core iteration i (0-based) reads and writes."""
        s = self.slot(i)
        if not self.is_read_only:
            if self.write_rows is None:
                self._written[s].fill_(True)
            else:
                self._written[s] |= self.write_rows
        return self.core[s]

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        prev, self.is_read_only = self.is_read_only, True
        try:
            yield
        finally:
            self.is_read_only = prev

    def commit(self, T: int, loops: torch.Tensor) -> None:
        """The T tokens at `pos` are done; row b looped loops[b] >= 1 times. Fill the slots a
        row did not write with its last iteration's entry, then advance `pos`."""
        last_slot = torch.tensor([self.slot(int(n) - 1) for n in loops.tolist()], device=self.device)
        for s in range(self.n_slots):
            missing = ~self._written[s]
            for src in last_slot[missing].unique().tolist():
                rows = missing & (last_slot == src)
                for dst_layer, src_layer in zip(self.core[s], self.core[src]):
                    dst_layer.copy_rows(src_layer, rows, self.pos, T)
            self._written[s].zero_()
        self.pos += T
