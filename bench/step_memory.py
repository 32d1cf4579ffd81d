"""Measured peak memory of one training step on CPU (Linux): resident-set high-water mark.

The kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs before the step, so
the figure is the step's own peak above the resident baseline (weights, allocator caches). Run
each measurement in a fresh process: the allocator keeps what a previous step freed.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.nn.functional as F

from stars_scale.config import ModelConfig
from stars_scale.model.looped import LoopedLM
from stars_scale.train.host_malloc import return_freed_memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def step_peak_memory_mb(depth: int, checkpointing: str = "loop", backprop: int | None = None, hidden: int = 128,
                        heads: int = 4, batch: int = 16, seq: int = 128, vocab: int = 256, seed: int = 0) -> dict:
    return_freed_memory()
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden=hidden, heads=heads, max_seq_len=seq, n_core=1,
                      injection="add", init_state="zero")
    model = LoopedLM(cfg)
    model.checkpointing = checkpointing
    ids = torch.randint(0, vocab, (batch, seq))
    n_grad = depth if backprop is None else min(depth, backprop)

    def step(n_free: int, n_grad: int) -> None:
        out = model(ids, n_free=n_free, n_grad=n_grad)
        F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()).backward()
        model.zero_grad(set_to_none=False)

    step(0, 1)  # allocate gradients and warm up
    gc.collect()
    base = _status_kb("VmRSS")
    reset_peak()
    step(depth - n_grad, n_grad)
    hwm = _status_kb("VmHWM")
    return {"depth": depth, "n_grad": n_grad, "checkpointing": checkpointing, "peak_mb": max(hwm - base, 0) / 1024}
