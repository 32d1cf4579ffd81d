"""Batch sources the trainer reads from: one interface for every kind of data.

A source yields `{"input_ids": int64 [B, T], "labels": int64 [B, T] (-100 = ignore)}` per
microbatch, already split by data-parallel rank, and round-trips its position through
`state_dict()` / `load_state_dict()` so a resumed run sees exactly the batches it would have.
"""
from __future__ import annotations

from typing import Protocol

import torch

from stars_scale.config import RunConfig
from stars_scale.data.arithmetic import VOCAB_SIZE, ArithmeticTask
from stars_scale.errors import ConfigError


class BatchSource(Protocol):
    seq_len: int
    vocab_size: int

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ArithmeticSource:
    """The in-memory arithmetic stream: batch i is a pure function of (seed, i, dp_rank)."""

    def __init__(self, task: ArithmeticTask, batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        self.task = task
        self.batch_size = batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_len = task.seq_len
        self.vocab_size = VOCAB_SIZE
        self.index = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.task.train_batch(self.index, 0, self.batch_size, self.dp_rank)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "arithmetic", "index": self.index, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "arithmetic":
            raise ConfigError(f"data: checkpoint was written with data of kind {state.get('kind')!r}, "
                              "not arithmetic")
        self.index = int(state["index"])


def build_task(cfg: RunConfig) -> ArithmeticTask:
    d = cfg.data
    return ArithmeticTask(digits=d.digits, seed=cfg.seed, test_size=d.test_size, train_size=d.train_size,
                          reverse_answer=d.reverse_answer)


def build_train_source(cfg: RunConfig, dp_rank: int = 0, dp_size: int = 1) -> BatchSource:
    if cfg.data.batch_size % dp_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the data-parallel size {dp_size}")
    local = cfg.data.batch_size // dp_size
    src = ArithmeticSource(build_task(cfg), local, dp_rank, dp_size)
    check_model_fits(cfg, src)
    return src


def check_model_fits(cfg: RunConfig, src: BatchSource) -> None:
    if cfg.model.vocab_size < src.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({src.vocab_size})")
    if cfg.model.max_seq_len < src.seq_len:
        raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the data's sequences "
                          f"({src.seq_len} tokens)")
