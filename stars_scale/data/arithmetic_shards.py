"""`stars-data arithmetic` / `stars-data chains`: an in-memory task written as shards in the common format.

The trainer then reads tasks and text through one loader. A problem of `T` tokens
(`ArithmeticTask.encode`: `T = 3n + 5`; `ChainsTask.encode`: `T = 2S + 4`) becomes one block of
`block_len = T`, so `seq_len = T - 1`: the loader's `input_ids = block[:-1]` drops only the final
EOS, whose label is always ignored, and the answer-only labels are kept as a loss mask (`mask[t] = 1`
where the task's `labels[t]` is a target; then `labels[t] == block[t + 1]`). Causal attention makes
the logits at positions 0..T-2 identical to those of the full sequence, so accuracy and loss are
unchanged.

Training problems are the task's fresh draws (`train_batch(step=i, ...)`, chunk by chunk),
which never hit the test set; the `val` split is the task's fixed test set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stars_scale.data import shards as fmt
from stars_scale.errors import UserError

CHUNK = 4096  # problems per train_batch call; part of the definition of the sample stream


@dataclass
class ChainsOptions:
    out: str
    statements: int = 12
    variables: int = 16
    difficulty: tuple[int, int] = (1, 6)
    test_difficulty: tuple[int, int] = (1, 6)
    chains: int = 3
    order: str = "program"
    value_first: bool = False
    names: str = "random"
    matched: bool = False
    samples: int = 100_000
    test_size: int = 512
    seed: int = 0
    shard_size: int = 64 * 10**6
    blocks_per_shard: int | None = None
    overwrite: bool = False


@dataclass
class ArithmeticOptions:
    out: str
    digits: int = 3
    samples: int = 100_000
    test_size: int = 512
    seed: int = 0
    reverse_answer: bool = True
    shard_size: int = 64 * 10**6
    blocks_per_shard: int | None = None
    overwrite: bool = False


def _blocks(batch) -> tuple[np.ndarray, np.ndarray]:
    from stars_scale.loss import IGNORE

    tokens = batch["input_ids"].numpy()
    labels = batch["labels"].numpy()
    mask = labels[:, :-1] != IGNORE
    if (labels[:, -1] != IGNORE).any() or not (labels[:, :-1][mask] == tokens[:, 1:][mask]).all():
        raise AssertionError("the task's labels are not next-token targets; the shard layout needs updating")
    return tokens, mask.astype(np.uint8)


def write_arithmetic(opts: ArithmeticOptions) -> fmt.Manifest:
    from stars_scale.data.arithmetic import VOCAB, ArithmeticTask

    _check_counts(opts)
    try:
        task = ArithmeticTask(digits=opts.digits, seed=opts.seed, test_size=opts.test_size,
                              reverse_answer=opts.reverse_answer)
    except ValueError as e:
        raise UserError(str(e).replace("data.test_size", "--test-size").replace("data.digits", "--digits")) from None
    return _write_task(task, "arithmetic", VOCAB, opts, {
        "digits": opts.digits, "seed": opts.seed, "test_size": opts.test_size, "reverse_answer": opts.reverse_answer})


def write_chains(opts: ChainsOptions) -> fmt.Manifest:
    from stars_scale.data.chains import VOCAB, ChainsTask

    _check_counts(opts)
    try:
        task = ChainsTask(statements=opts.statements, variables=opts.variables, difficulty=opts.difficulty,
                          test_difficulty=opts.test_difficulty, chains=opts.chains, order=opts.order,
                          value_first=opts.value_first, names=opts.names, matched=opts.matched, seed=opts.seed,
                          test_size=max(opts.test_size, 1))
    except ValueError as e:
        raise UserError(str(e).replace("data.", "--").replace("_", "-")) from None
    return _write_task(task, "chains", VOCAB, opts, {
        "statements": opts.statements, "variables": opts.variables, "difficulty": list(task.difficulty),
        "test_difficulty": list(task.test_difficulty), "chains": task.chains, "order": opts.order,
        "value_first": opts.value_first, "names": opts.names, "matched": opts.matched,
        "seed": opts.seed, "test_size": opts.test_size})


def _check_counts(opts) -> None:
    if opts.blocks_per_shard is not None and opts.blocks_per_shard < 1:
        raise UserError(f"--blocks-per-shard must be >= 1, got {opts.blocks_per_shard}")
    if opts.samples < 1:
        raise UserError(f"--samples must be >= 1, got {opts.samples}")


def _write_task(task, kind: str, vocab: list[str], opts, settings: dict) -> fmt.Manifest:
    """The task's training draws (`opts.samples`) and its test set (`opts.test_size`, the val split)."""
    block_len = task.seq_len
    dtype = fmt.dtype_for_vocab(len(vocab))
    per_block = fmt.block_tar_bytes(block_len, dtype, has_mask=True)
    bps = opts.blocks_per_shard or max(1, opts.shard_size // per_block)
    with fmt.StagedOutput(opts.out, overwrite=opts.overwrite) as staged:
        splits: dict[str, fmt.SplitInfo] = {}
        w = fmt.ShardWriter(staged.path, "train", block_len=block_len, dtype=dtype, has_mask=True, blocks_per_shard=bps)
        for step, start in enumerate(range(0, opts.samples, CHUNK)):
            tokens, mask = _blocks(task.train_batch(step=step, micro=0, batch_size=min(CHUNK, opts.samples - start)))
            w.write(tokens, mask)
        splits["train"] = fmt.SplitInfo(w.finish(), opts.samples * block_len, 0, opts.samples)
        if opts.test_size:
            w = fmt.ShardWriter(staged.path, "val", block_len=block_len, dtype=dtype, has_mask=True, blocks_per_shard=bps)
            tokens, mask = _blocks(task.test_batch())
            w.write(tokens, mask)
            splits["val"] = fmt.SplitInfo(w.finish(), len(tokens) * block_len, 0, len(tokens))
        vocab_blob = json.dumps(vocab).encode()
        manifest = fmt.Manifest(
            kind=kind, seq_len=block_len - 1, dtype=dtype, vocab_size=len(vocab), eos_id=vocab.index("<eos>"),
            has_mask=True, tokenizer={"name": kind, "vocab": vocab, "sha256": hashlib.sha256(vocab_blob).hexdigest()},
            splits=splits,
            extra={kind: {**settings, "chunk": CHUNK}, "settings": {"blocks_per_shard": bps}})
        fmt.write_manifest(staged.path, manifest)
    manifest.directory = Path(opts.out)
    return manifest
