"""The one set of layout rules: which tp × pp × dp a run can use, for the trainer (before any
process group exists), `stars-launch` (against the allocation) and `stars-plan` (every layout it
considers). Each rule names the config field and what would fix it.

Tensor parallelism splits whole attention and key/value heads and the MLP width; the vocabulary
need not divide by tp (`padded_vocab`: the embedding and head are padded to a multiple of tp,
as parallel/tensor.py builds them). The pipeline splits the core's blocks, so pp ≤ n_core.
"""
from __future__ import annotations

import math

from stars_scale.config import RunConfig
from stars_scale.errors import ConfigError


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary rows tensor parallelism builds: the next multiple of tp."""
    return int(math.ceil(vocab / tp) * tp)


def layout_problems(cfg: RunConfig, world: int, *, tp: int | None = None, pp: int | None = None,
                    allocation: str = "", batch: bool = True, cuda: bool = True) -> list[str]:
    """Why tp × pp (default: the config's) cannot run on `world` processes; [] when it can.

    `allocation` describes where `world` comes from (e.g. "--nodes 2 x --gpus-per-node 4");
    `batch=False` skips the rule on data.batch_size (a planner given its own microbatch size);
    `cuda` says whether the processes have CUDA (the bf16 ZeRO rule)."""
    from stars_scale.model.layers import mlp_hidden

    p, m = cfg.parallel, cfg.model
    tp = p.tp if tp is None else tp
    pp = p.pp if pp is None else pp
    where = f" ({allocation})" if allocation else ""
    if world % (tp * pp):
        return [f"parallel.tp × parallel.pp = {tp} × {pp} = {tp * pp} does not divide the world size {world}{where}: "
                f"run a multiple of {tp * pp} processes or change parallel.tp/pp"]
    dp = world // (tp * pp)
    out = []
    kv = m.kv_heads or m.heads
    if m.heads % tp:
        out.append(f"model.heads={m.heads} is not divisible by parallel.tp={tp} "
                   "(every tensor-parallel rank holds whole attention heads)")
    if kv % tp:
        out.append(f"model.kv_heads={kv} is not divisible by parallel.tp={tp} "
                   "(every tensor-parallel rank holds whole key/value heads)")
    if mlp_hidden(m) % tp:
        out.append(f"model.mlp_hidden={mlp_hidden(m)} is not divisible by parallel.tp={tp}")
    if pp > m.n_core:
        out.append(f"parallel.pp={pp} is larger than model.n_core={m.n_core}: the pipeline splits the core's "
                   "blocks over the stages, so every stage needs at least one core block")
    if batch and cfg.data.batch_size % (dp * p.microbatches):
        out.append(f"data.batch_size={cfg.data.batch_size} is not divisible by dp × parallel.microbatches = "
                   f"{dp} × {p.microbatches} (every microbatch needs the same number of rows)")
    s = cfg.stars
    if (s.lam > 0 or s.estimate_every > 0) and s.method != "fd" and (tp > 1 or pp > 1):
        out.append(f"stars.method={s.method} needs double backward (or forward-mode AD) through the core map, "
                   f"which tensor- and pipeline-parallel layers do not support: use stars.method: fd with "
                   f"parallel.tp={tp}, parallel.pp={pp}")
    for name in ("probe_beyond", "progressive"):
        if getattr(s, name) and (tp > 1 or pp > 1):
            out.append(f"stars.{name}={getattr(s, name)} runs in one process's loop only: "
                       f"set it to 0 or use parallel.tp=1, parallel.pp=1 (got tp={tp}, pp={pp})")
    if cfg.train.dtype == "bf16" and p.zero and world > 1 and not cuda:
        out.append("train.dtype=bf16 with parallel.zero > 0 needs CUDA (DeepSpeed's CPU path here is fp32)")
    return out


def check_layout(cfg: RunConfig, world: int, *, allocation: str = "", cuda: bool = True) -> int:
    """The data-parallel size of the config's layout on `world` processes, or one ConfigError."""
    problems = layout_problems(cfg, world, allocation=allocation, cuda=cuda)
    if problems:
        raise ConfigError(problems[0])
    return world // (cfg.parallel.tp * cfg.parallel.pp)
