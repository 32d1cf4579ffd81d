"""Batch sources the trainer reads from: one interface for every kind of data.

A source yields `{"input_ids": int64 [B, T], "labels": int64 [B, T] (-100 = ignore)}` per
microbatch, already split by data-parallel rank, and round-trips its position through
`state_dict()` / `load_state_dict()` so a resumed run sees exactly the batches it would have.
"""
from __future__ import annotations

from typing import Protocol

import torch

from stars_scale.config import RunConfig
from stars_scale.data import chains
from stars_scale.data.arithmetic import VOCAB_SIZE, ArithmeticTask
from stars_scale.errors import ConfigError


class BatchSource(Protocol):
    seq_len: int
    vocab_size: int

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ArithmeticSource:
    """The in-memory task stream (arithmetic or chains): global batch i is a pure function of
    (seed, i); data-parallel rank r reads its rows [r * batch_size, (r + 1) * batch_size), so dp
    ranks together see exactly the batch one process sees."""

    def __init__(self, task, batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        self.task = task
        self.batch_size = batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_len = task.seq_len
        self.vocab_size = getattr(task, "vocab_size", VOCAB_SIZE)
        self.kind = getattr(task, "kind", "arithmetic")
        self.index = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        full = self.task.train_batch(self.index, 0, self.batch_size * self.dp_size)
        lo = self.dp_rank * self.batch_size
        batch = {k: v[lo:lo + self.batch_size] for k, v in full.items()}
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "index": self.index, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ConfigError(f"data: checkpoint was written with data of kind {state.get('kind')!r}, "
                              f"not {self.kind}")
        self.index = int(state["index"])


def build_task(cfg: RunConfig, test_difficulty: tuple[int, int] | None = None, test_size: int | None = None):
    """The in-memory task of `data.kind` (arithmetic or chains); chains' test set may be redrawn over
    another difficulty range and size (`stars-eval depth --difficulty`)."""
    d = cfg.data
    if d.kind == "chains":
        try:
            return chains.ChainsTask(statements=d.statements, variables=d.variables, difficulty=tuple(d.difficulty),
                                     test_difficulty=tuple(test_difficulty or d.test_difficulty),
                                     chains=d.chains, order=d.order, dense=d.dense, value_first=d.value_first,
                                     names=d.names, matched=d.matched, seed=cfg.seed,
                                     test_size=test_size or d.test_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return ArithmeticTask(digits=d.digits, seed=cfg.seed, test_size=d.test_size, train_size=d.train_size,
                          reverse_answer=d.reverse_answer, reverse_operands=d.reverse_operands)


def _local_batch(cfg: RunConfig, dp_size: int) -> int:
    if cfg.data.batch_size % dp_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the data-parallel size {dp_size}")
    return cfg.data.batch_size // dp_size


def _shard_datasets(cfg: RunConfig):
    d = cfg.data
    return d.path if d.path else [(m.path, m.weight) for m in d.mixture]


def build_train_source(cfg: RunConfig, dp_rank: int = 0, dp_size: int = 1) -> BatchSource:
    local = _local_batch(cfg, dp_size)
    if cfg.data.kind == "shards":
        from stars_scale.data.loader import ShardSource

        src = ShardSource(_shard_datasets(cfg), local, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed,
                          num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer)
    else:
        src = ArithmeticSource(build_task(cfg), local, dp_rank, dp_size)
    check_model_fits(cfg, src)
    return src


def build_eval_batch(cfg: RunConfig, samples: int, dp_rank: int = 0, dp_size: int = 1
                     ) -> tuple[dict[str, torch.Tensor], bool]:
    """The fixed evaluation set and whether it has exact-match answers.

    Arithmetic: the first `samples` test problems; chains: `samples` test problems spread evenly
    over the test difficulties (with a "difficulty" row per problem). Shards: `data.val_batches`
    batches of the val split, read from its start every time (the same tokens at every evaluation); arithmetic shards
    (answer-only labels) are scored by exact match too.
    """
    if cfg.data.kind != "shards":
        return build_task(cfg).test_batch(limit=samples), True
    from stars_scale.data.loader import ShardSource
    from stars_scale.data.shards import Manifest

    datasets = _shard_datasets(cfg)
    paths = [datasets] if isinstance(datasets, str) else [p for p, _ in datasets]
    has_answers = all(Manifest.load(p).kind in ("arithmetic", "chains") for p in paths)
    src = ShardSource(datasets, _local_batch(cfg, dp_size), dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed,
                      split="val")
    batches = [src.next_batch() for _ in range(cfg.data.val_batches)]
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}, has_answers


def check_model_fits(cfg: RunConfig, src: BatchSource) -> None:
    if cfg.model.vocab_size < src.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({src.vocab_size})")
    if cfg.model.max_seq_len < src.seq_len:
        raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the data's sequences "
                          f"({src.seq_len} tokens)")
