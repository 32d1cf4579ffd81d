"""Regional compilation of the looped model (`train.compile`), torchtitan style.

    none   eager
    block  every transformer block compiled on its own (`nn.Module.compile`, in place: parameter
           names and checkpoints do not change); identical blocks share one graph
    model  the larger regions the loop is made of: `encode` (embedding + prelude), `core_step`
           (one loop iteration: injection, every core block, the state norm) and `decode`

Never the loop itself: the depth is a Python loop *around* the compiled regions, so a new
sampled depth reuses the same graphs (depth is not a compile-time constant). What does make a
new graph: gradient mode (the no-grad iterations of truncated BPTT), train/eval mode, a new
batch shape (the estimator's row subset; dynamo then marks it dynamic); each once.

Works with loop/block activation checkpointing (the checkpoint wraps the compiled region), the
`fd` estimator and tensor parallelism (megatron's layers run inside the regions). The `vjp`
estimator and `jvp` with a graph need double backward, which compiled graphs do not provide,
so `stars_scale.stars.regularizer` runs those probes under `torch.compiler.set_stance
("force_eager")`, as it does any probe that replays dropout masks: the eager block, same weights.

Inductor generates C++ on CPU and Triton on GPU; the first step of each graph pays the
compilation (tens of seconds on a small CPU), later steps only the guards.
"""
from __future__ import annotations

import torch

MODES = ("none", "block", "model")


def apply_compile(model, mode: str, **compile_kwargs) -> None:
    """Compile `model`'s regions in place (after tensor parallelism swapped its layers, or before:
    compilation happens at the first call)."""
    if mode not in MODES:
        raise ValueError(f"train.compile must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "block":
        for block in (*model.prelude, *model.core, *model.coda):
            block.compile(**compile_kwargs)
    elif mode == "model":
        for name in ("encode", "core_step", "decode"):
            setattr(model, name, torch.compile(getattr(model, name), **compile_kwargs))
