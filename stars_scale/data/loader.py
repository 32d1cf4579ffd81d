"""Streaming batches from pre-tokenised shards, split by data-parallel rank, with exact resume.

One `ShardSource` per process. Which blocks a process sees depends on its *data-parallel* rank
only, never on the global rank, so tensor- and pipeline-parallel peers (same dp_rank) get
identical batches. (webdataset's own `split_by_node` reads the global RANK; it is not used.)

The stream, per dataset and per (dp_rank, worker) "slot":
  * epoch e: the shards are permuted by an RNG seeded with (seed, dataset, e), identical on
    every process, and dealt round-robin to the dp_size * workers slots, so in every epoch each
    shard belongs to exactly one slot: the dp ranks see disjoint blocks covering the dataset.
  * a slot reads its shards in order through webdataset's tar reader and draws from a shuffle buffer
    of `shuffle_buffer` blocks; the buffer is drained at the end of the epoch (an epoch is
    exact), then the next epoch starts with a fresh permutation.
  * with several datasets, each sample comes from dataset d with probability weight_d.
All randomness is counter-based (a generator seeded with (seed, ..., draw // 4096)), so the
stream's state is a few integers: (epoch, blocks read, blocks drawn, the positions held in the
shuffle buffer). Resume re-reads the current shard up to the oldest buffered position and
continues: the next batch is exactly the one the uninterrupted run would have produced.

Workers: each DataLoader worker owns one slot and yields whole batches; the DataLoader takes
them round-robin, so batch i comes from worker (i + rotation) % workers. Every batch carries its
worker's state; the state of the source is the state of the last batch *consumed* from each
worker (prefetched batches are not counted) plus the worker whose turn is next. Resuming with a
different dp_size or worker count would change the stream and is refused.

The validation split is read in order (no shuffle, in the calling process): dp rank r takes
blocks r, r + dp_size, ... of the datasets' val shards, looping. `reset()` restarts it, so
every evaluation can see the same batches.
"""
from __future__ import annotations

import copy
import os
import multiprocessing as mp
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from stars_scale.data import shards as fmt
from stars_scale.errors import UserError
from stars_scale.loss import IGNORE
from stars_scale.utils import open_member

STATE_VERSION = 1
_CHUNK = 4096
_SHARD_SALT = 0x5A4D
_SHUFFLE_SALT = 0x5B0F
_MIX_SALT = 0x313C


# ---------------------------------------------------------------------------- configuration


@dataclass
class _Config:
    """Everything a worker needs; pickled into DataLoader workers."""
    manifests: list[fmt.Manifest]
    weights: list[float]
    batch_size: int
    dp_rank: int
    dp_size: int
    workers: int  # logical streams per dp rank: max(1, num_workers); 1 for val
    seed: int
    shuffle_buffer: int
    split: str
    vocab_size: int
    seq_len: int


class _Counter:
    """Uniform draws u(n) for n = 0, 1, 2, ... from RNGs keyed by (key, n // _CHUNK): no hidden state."""

    def __init__(self, *key: int) -> None:
        self.key = [int(k) for k in key]
        self._chunk = -1
        self._u = np.zeros(0)

    def __call__(self, n: int) -> float:
        c = n // _CHUNK
        if c != self._chunk:
            self._u = np.random.default_rng(self.key + [c]).random(_CHUNK)
            self._chunk = c
        return float(self._u[n % _CHUNK])


# ---------------------------------------------------------------------------- reading shards


def _clean(e: BaseException) -> str:
    msg = str(e.args[0]) if e.args else type(e).__name__
    return msg.split(" @ ")[0]


_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verify_shard(shard: fmt.ShardInfo, path: str) -> None:
    """The shard's sha256 against the manifest, once per process and file version, before any of
    its blocks is used: a flipped bit that still decodes (an id inside the vocabulary, a mask
    byte) is refused instead of trained on."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, shard.sha256)
    if key in _VERIFIED:
        return
    if fmt.sha256_file(Path(path)) != shard.sha256:
        raise UserError(f"shard {path}: sha256 differs from the manifest (corrupt or rewritten); "
                        "stars-data inspect --verify checks the whole dataset")
    _VERIFIED.add(key)


def _tar_samples(paths: list[str]) -> Iterator[dict[str, Any]]:
    """webdataset samples ({"__key__", "__url__", member: bytes}) of the shard files `paths`, in
    order; each file opened here (regular files only, no link followed), one at a time."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def opened() -> Iterator[dict[str, Any]]:
        for p in paths:
            with open_member(Path(p)) as f:
                yield {"url": p, "stream": f}

    return group_by_keys(tar_file_expander(opened()))


def read_blocks(manifest: fmt.Manifest, shards: list[fmt.ShardInfo], start: int
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """(position, block, mask) for positions >= start of the concatenation of `shards`.

    Streams through webdataset's tar reader (sequential reads, no index) from files this
    function opens itself: a shard is a plain file resolved inside the dataset directory
    (`Manifest.shard_path`), never a URL handed to webdataset's opener (which would run `pipe:`
    names as shell commands). Every block is checked (members, size, ids below vocab_size) and
    every shard's count against the manifest; a problem raises a UserError naming the shard.
    """

    base = 0
    first = len(shards)
    for i, sh in enumerate(shards):
        if start < base + sh.blocks:
            first = i
            break
        base += sh.blocks
    if first == len(shards):
        return
    todo = shards[first:]
    paths = [str(manifest.shard_path(s)) for s in todo]
    it = _tar_samples(paths)
    idx, count, skip, pos = 0, 0, start - base, start
    vocab = manifest.vocab_size

    def mismatch(i: int, n: int) -> UserError:
        return UserError(f"shard {paths[i]}: holds {'at least ' if n > todo[i].blocks else ''}{n} blocks, "
                         f"but the manifest lists {todo[i].blocks}")

    while True:
        try:
            sample = next(it)
        except StopIteration:
            break
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            bad = idx if count < todo[idx].blocks or idx + 1 == len(todo) else idx + 1
            raise UserError(f"shard {paths[bad]}: unreadable, truncated or corrupt tar ({_clean(e)})") from None
        url = sample.get("__url__")
        while url != paths[idx]:
            if count != todo[idx].blocks:
                raise mismatch(idx, count)
            idx, count = idx + 1, 0
            if idx == len(todo):
                raise UserError(f"shard {url}: read outside the manifest's shard list")
        count += 1
        if count > todo[idx].blocks:
            raise mismatch(idx, count)
        if count == 1:
            _verify_shard(todo[idx], paths[idx])
        if idx == 0 and count <= skip:
            continue
        block, mask = fmt.decode_sample(sample, manifest, paths[idx])
        if vocab < 2 ** (8 * block.itemsize) and int(block.max()) >= vocab:
            raise UserError(f"shard {paths[idx]}: sample {sample.get('__key__')} holds token id {int(block.max())}, "
                            f"outside the vocabulary of {vocab}")
        yield pos, block, mask
        pos += 1
    if count != todo[idx].blocks:
        raise mismatch(idx, count)
    if idx + 1 < len(todo):
        raise mismatch(idx + 1, 0)


# ---------------------------------------------------------------------------- streams


def slot_shards(cfg: _Config, ds: int, epoch: int, worker: int) -> list[fmt.ShardInfo]:
    """The shards of dataset `ds` that (cfg.dp_rank, worker) reads in `epoch`, in reading order."""
    shards = cfg.manifests[ds].split(cfg.split).shards
    order = np.random.default_rng([cfg.seed, _SHARD_SALT, ds, epoch]).permutation(len(shards))
    slots = cfg.dp_size * cfg.workers
    slot = cfg.dp_rank * cfg.workers + worker
    return [shards[i] for i in order[slot::slots]]


def _fresh_train_state() -> dict[str, Any]:
    return {"epoch": 0, "read": 0, "drawn": 0, "buffer": []}


class _TrainStream:
    """One dataset's shuffled block stream for one slot. `state` is current after every yield."""

    def __init__(self, cfg: _Config, ds: int, worker: int, state: dict[str, Any] | None) -> None:
        self.cfg, self.ds, self.worker = cfg, ds, worker
        self.state = copy.deepcopy(state) if state else _fresh_train_state()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        st = self.state
        cap = max(1, self.cfg.shuffle_buffer)
        man = self.cfg.manifests[self.ds]
        while True:
            shards = slot_shards(self.cfg, self.ds, st["epoch"], self.worker)
            total = sum(s.blocks for s in shards)
            rand = _Counter(self.cfg.seed, _SHUFFLE_SALT, self.ds, st["epoch"], self.cfg.dp_rank, self.worker)
            buf: list[int] = st["buffer"]
            data: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
            reader = read_blocks(man, shards, min(buf + [st["read"]]))
            if buf:  # resume: fetch the buffered blocks again, skip the ones already drawn
                need = set(buf)
                for pos, block, mask in reader:
                    if pos in need:
                        data[pos] = (block, mask)
                    if pos + 1 == st["read"]:
                        break
                if len(data) != len(need):
                    raise UserError(f"loader state: buffered positions {sorted(need - data.keys())[:5]} of "
                                    f"epoch {st['epoch']} are not in this dataset ({man.directory})")
            while True:
                while len(buf) < cap and st["read"] < total:
                    pos, block, mask = next(reader)
                    assert pos == st["read"], (pos, st["read"])
                    buf.append(pos)
                    data[pos] = (block, mask)
                    st["read"] += 1
                if not buf:
                    break
                i = int(rand(st["drawn"]) * len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                pos = buf.pop()
                st["drawn"] += 1
                yield data.pop(pos)
            reader.close()
            st["epoch"] += 1
            st["read"] = st["drawn"] = 0


class _ValStream:
    """The val split in order: dp rank r takes every dp_size-th block (from r), looping."""

    def __init__(self, cfg: _Config, state: dict[str, Any] | None) -> None:
        self.cfg = cfg
        self.state = copy.deepcopy(state) if state else {"epoch": 0, "drawn": 0}

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        st = self.state
        while True:
            skip, seen, g = st["drawn"], 0, 0
            for man in self.cfg.manifests:
                for _, block, mask in read_blocks(man, man.split("val").shards, 0):
                    mine = g % self.cfg.dp_size == self.cfg.dp_rank
                    g += 1
                    if not mine:
                        continue
                    seen += 1
                    if seen <= skip:
                        continue
                    st["drawn"] = seen
                    yield block, mask
            st["epoch"] += 1
            st["drawn"] = 0


class _WorkerStream:
    """The batches of one logical worker: mixture draws over its datasets' streams."""

    def __init__(self, cfg: _Config, worker: int, state: dict[str, Any] | None) -> None:
        self.cfg, self.worker = cfg, worker
        if cfg.split == "val":
            self.streams: list[Any] = [_ValStream(cfg, state["streams"][0] if state else None)]
        else:
            self.streams = [_TrainStream(cfg, d, worker, state["streams"][d] if state else None)
                            for d in range(len(cfg.manifests))]
        self.mix = int(state["mix"]) if state else 0
        w = np.asarray(cfg.weights if cfg.split != "val" else [1.0], dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.rand = _Counter(cfg.seed, _MIX_SALT, cfg.dp_rank, worker)

    def state(self) -> dict[str, Any]:
        return {"mix": self.mix, "streams": [copy.deepcopy(s.state) for s in self.streams]}

    def batches(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        its = [iter(s) for s in self.streams]
        B, T = self.cfg.batch_size, self.cfg.seq_len
        while True:
            tokens = np.empty((B, T + 1), dtype=np.int64)
            labels_mask = np.ones((B, T), dtype=bool)
            for b in range(B):
                d = 0
                if len(its) > 1:
                    d = min(int(np.searchsorted(self.cum, self.rand(self.mix), side="right")), len(its) - 1)
                self.mix += 1
                block, mask = next(its[d])
                tokens[b] = block
                if mask is not None:
                    labels_mask[b] = mask.astype(bool)
            labels = tokens[:, 1:].copy()
            labels[~labels_mask] = IGNORE
            batch = {"input_ids": torch.from_numpy(tokens[:, :-1].copy()), "labels": torch.from_numpy(labels)}
            yield batch, self.state()


class _WorkerDataset(torch.utils.data.IterableDataset):
    """DataLoader worker k runs logical stream (k + rotation) % workers and yields whole batches."""

    def __init__(self, cfg: _Config, states: list[dict[str, Any] | None], rotation: int) -> None:
        super().__init__()
        self.cfg, self.states, self.rotation = cfg, states, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k = info.id if info is not None else 0
        logical = (k + self.rotation) % self.cfg.workers
        try:
            for batch, state in _WorkerStream(self.cfg, logical, self.states[logical]).batches():
                yield logical, batch, state
        except UserError as e:  # re-raised in the main process as the same one-line error
            yield "error", str(e), None


# ---------------------------------------------------------------------------- public API


def _as_datasets(data_dir: str | Path | list) -> list[tuple[str, float]]:
    if isinstance(data_dir, (str, Path)):
        return [(str(data_dir), 1.0)]
    out = []
    for i, item in enumerate(data_dir):
        try:
            path, weight = item
            weight = float(weight)
        except (TypeError, ValueError):
            raise UserError(f"data mixture entry {i}: expected (directory, weight), got {item!r}") from None
        if not weight > 0:
            raise UserError(f"data mixture entry {i} ({path}): weight must be > 0, got {weight}")
        out.append((str(path), weight))
    if not out:
        raise UserError("data mixture: no datasets given")
    return out


class ShardSource:
    """Batches for one process: {"input_ids": int64 [B, seq_len], "labels": int64 [B, seq_len], -100 = ignore}.

    `data_dir` is one dataset directory or a mixture [(directory, weight), ...] (same
    tokenizer and seq_len). `state_dict()` after any batch, restored with `load_state_dict`
    into a fresh ShardSource of the same arguments, makes the next batch exactly the one the
    uninterrupted run would have seen. See the module docstring for the stream's definition.
    """

    def __init__(self, data_dir: str | list[tuple[str, float]], batch_size: int, *, dp_rank: int, dp_size: int,
                 seed: int, num_workers: int = 0, shuffle_buffer: int = 1024, split: str = "train",
                 pin_memory: bool = False) -> None:
        if split not in fmt.SPLITS:
            raise UserError(f"split {split!r}: expected one of {', '.join(fmt.SPLITS)}")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if seed < 0:
            raise UserError(f"data seed must be >= 0, got {seed}")
        if num_workers < 0 or shuffle_buffer < 0:
            raise UserError(f"num_workers ({num_workers}) and shuffle_buffer ({shuffle_buffer}) must be >= 0")
        datasets = _as_datasets(data_dir)
        manifests = [fmt.Manifest.load(p) for p, _ in datasets]
        first = manifests[0]
        for m in manifests[1:]:
            if m.seq_len != first.seq_len:
                raise UserError(f"data mixture: {m.directory} has seq_len {m.seq_len}, {first.directory} has {first.seq_len}")
            if m.tokenizer.get("sha256") != first.tokenizer.get("sha256"):
                raise UserError(f"data mixture: {m.directory} and {first.directory} were tokenised with different tokenizers")
        workers = 1 if split == "val" else max(1, num_workers)
        for m in manifests:
            sp = m.split(split)
            m.check_files(split)
            if split == "train" and len(sp.shards) < dp_size * workers:
                raise UserError(f"{m.directory}: {len(sp.shards)} train shards cannot feed dp_size={dp_size} x "
                                f"{workers} loader worker(s) (each needs its own shard); re-run prepare with a "
                                f"smaller --shard-size or use fewer workers")
        if split == "val" and sum(m.split("val").blocks for m in manifests) < dp_size:
            raise UserError(f"val split: fewer blocks than dp_size={dp_size}; every rank needs at least one")
        self.seq_len = first.seq_len
        self.vocab_size = first.vocab_size
        self.batch_size = batch_size
        self.num_workers = 0 if split == "val" else num_workers
        self.pin_memory = pin_memory
        self._datasets = datasets
        self._cfg = _Config(manifests, [w for _, w in datasets], batch_size, dp_rank, dp_size, workers, seed,
                            shuffle_buffer if split == "train" else 0, split, self.vocab_size, self.seq_len)
        self.tokens_seen = 0
        self._batches = 0
        self._states: list[dict[str, Any] | None] = [None] * workers
        self._next = 0
        self._iter: Iterator | None = None

    # -- stream

    def _start(self) -> Iterator:
        cfg = self._cfg
        if self.num_workers == 0:
            return ((0, b, s) for b, s in _WorkerStream(cfg, 0, self._states[0]).batches())
        # fork even where the process default is spawn (e.g. under torch.multiprocessing.spawn): a
        # spawned worker re-imports torch, seconds per worker; the workers never touch CUDA.
        context = "fork" if "fork" in mp.get_all_start_methods() else None
        loader = torch.utils.data.DataLoader(
            _WorkerDataset(cfg, list(self._states), self._next), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory, multiprocessing_context=context,
            generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG
        return iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        worker, batch, state = next(self._iter)
        if worker == "error":
            self.close()
            raise UserError(batch)
        self._states[worker] = state
        self._next = (worker + 1) % self._cfg.workers
        self._batches += 1
        self.tokens_seen += int(batch["input_ids"].numel())
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """Stop the worker processes (they are restarted by the next `next_batch`)."""
        self._iter = None

    def reset(self) -> None:
        """Restart from the very beginning (e.g. to evaluate the same val batches every time)."""
        self.close()
        self._states = [None] * self._cfg.workers
        self._next = 0

    # -- introspection

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this process's streams is in (0 before the first batch)."""
        eps = [st["epoch"] for s in self._states if s for st in s["streams"]]
        return min(eps) if eps and all(self._states) else 0

    def epoch_blocks(self, epoch: int = 0, dataset: int = 0) -> int:
        """Blocks this dp rank reads from `dataset` in `epoch` (all its workers together)."""
        cfg = self._cfg
        if cfg.split == "val":
            n = sum(m.split("val").blocks for m in cfg.manifests)
            return len(range(cfg.dp_rank, n, cfg.dp_size))
        return sum(s.blocks for w in range(cfg.workers) for s in slot_shards(cfg, dataset, epoch, w))

    # -- checkpointing

    def _identity(self) -> dict[str, Any]:
        c = self._cfg
        return {"split": c.split, "dp_rank": c.dp_rank, "dp_size": c.dp_size, "workers": c.workers,
                "batch_size": c.batch_size, "seed": c.seed, "shuffle_buffer": c.shuffle_buffer,
                "datasets": [{"path": p, "weight": w, "fingerprint": m.fingerprint}
                             for (p, w), m in zip(self._datasets, c.manifests)]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; everything needed to continue the stream exactly."""
        return {"version": STATE_VERSION, **self._identity(), "next_worker": self._next,
                "batches": self._batches, "tokens_seen": self.tokens_seen,
                "worker_states": copy.deepcopy(self._states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuse (UserError) anything that would silently change the data."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise UserError(f"loader state: version {state.get('version') if isinstance(state, dict) else None!r} "
                            f"is not {STATE_VERSION} (saved by a different stars_scale?)")
        mine = self._identity()
        if (state.get("dp_size"), state.get("workers")) != (mine["dp_size"], mine["workers"]):
            raise UserError(
                f"loader state was saved with dp_size={state.get('dp_size')} and {state.get('workers')} loader "
                f"stream(s) per rank (num_workers, 0 counts as 1); this run has dp_size={mine['dp_size']} and "
                f"{mine['workers']}. The data order depends on both: resume with the same data-parallel size and "
                f"num_workers, or start the data stream afresh (without its saved state)")
        names = {"split": "split", "dp_rank": "dp rank", "batch_size": "per-rank batch size", "seed": "data seed",
                 "shuffle_buffer": "shuffle buffer"}
        for key, what in names.items():
            if state.get(key) != mine[key]:
                raise UserError(f"loader state: {what} was {state.get(key)!r} when saved, is {mine[key]!r} now; "
                                f"resuming would change the data order")
        saved, now = state.get("datasets", []), mine["datasets"]
        if [(d.get("weight"), d.get("fingerprint")) for d in saved] != [(d["weight"], d["fingerprint"]) for d in now]:
            raise UserError(f"loader state: datasets were {[(d.get('path'), d.get('weight')) for d in saved]} "
                            f"(fingerprints {[d.get('fingerprint') for d in saved]}), now "
                            f"{[(d['path'], d['weight']) for d in now]} (fingerprints {[d['fingerprint'] for d in now]}); "
                            f"the data changed since the checkpoint")
        workers = state.get("worker_states")
        if not isinstance(workers, list) or len(workers) != mine["workers"]:
            raise UserError("loader state: worker_states is missing or has the wrong length")
        self.close()
        self._states = copy.deepcopy(workers)
        self._next = int(state.get("next_worker", 0))
        self._batches = int(state.get("batches", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
