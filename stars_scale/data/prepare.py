"""`stars-data prepare`: text files -> token ids -> packed blocks -> webdataset shards + manifest.

The main process reads documents in input order and cuts them into tasks of about
`task_chars` characters; worker processes tokenise tasks (`encode_batch`, no special tokens,
EOS appended after every document); the main process takes results back *in task order*,
packs them into blocks of `seq_len + 1` ids and writes shards. Only the tokenisation is
parallel, and results are consumed in submission order, so the shards do not depend on the
number of workers: re-running on the same inputs gives byte-identical output.

Documents go to the validation split by a hash of their index (`val_fraction`), so a document
is never cut between splits. Each split's final partial block is filled with EOS
(`padding_tokens` in the manifest): every token of the corpus lands in a block, in order.
"""
from __future__ import annotations

import collections
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from stars_scale.data import shards as fmt
from stars_scale.data.text import find_inputs, iter_documents
from stars_scale.data.tokenizer import find_eos, load_tokenizer, tokenizer_sha256
from stars_scale.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class PrepareOptions:
    inputs: list[str]
    out: str
    tokenizer: str
    seq_len: int = 1024
    shard_size: int = 256 * 10**6  # target bytes per shard
    blocks_per_shard: int | None = None  # overrides shard_size (tests, exact layouts)
    val_fraction: float = 0.0
    text_field: str = "text"
    txt_docs: str = "file"
    eos_token: str | None = None
    workers: int = 0  # 0: one per available core
    overwrite: bool = False
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    task_chars: int = 1 << 19


@dataclass
class PrepareResult:
    out: Path
    text_bytes: int
    documents: int
    tokens: int
    shards: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def is_val_document(index: int, fraction: float) -> bool:
    """Deterministic, uniform-looking choice of validation documents by their index."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


# ---------------------------------------------------------------------------- workers

_TOKENIZER = None
_EOS = -1


def _init_worker(tokenizer_path: str, eos: int, limit_threads: bool) -> None:
    global _TOKENIZER, _EOS
    if limit_threads:  # one process per core: the tokenizer's own thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = load_tokenizer(tokenizer_path)
    _EOS = eos


def _tokenize_task(task: list[tuple[str, int, bool]]) -> tuple[list[np.ndarray], list[int], int]:
    """[(text, split, ends_document)] -> per split the concatenated ids, documents per split, text bytes."""
    assert _TOKENIZER is not None
    encodings = _TOKENIZER.encode_batch([t for t, _, _ in task], add_special_tokens=False)
    parts: list[list[np.ndarray]] = [[], []]
    docs = [0, 0]
    eos = np.array([_EOS], dtype=np.uint32)
    nbytes = 0
    for (text, split, ends), enc in zip(task, encodings):
        parts[split].append(np.asarray(enc.ids, dtype=np.uint32))
        if ends:
            parts[split].append(eos)
            docs[split] += 1
        nbytes += len(text.encode("utf-8"))
    out = [np.concatenate(p) if p else np.zeros(0, np.uint32) for p in parts]
    return out, docs, nbytes


# ---------------------------------------------------------------------------- packing


class _Packer:
    """Cuts a token stream into blocks of `block_len` and hands them to a ShardWriter."""

    def __init__(self, writer: fmt.ShardWriter, block_len: int, pad_id: int) -> None:
        self.writer = writer
        self.block_len = block_len
        self.pad_id = pad_id
        self.carry = np.zeros(0, np.uint32)
        self.tokens = 0
        self.padding = 0
        self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        self.tokens += len(ids)
        buf = np.concatenate([self.carry, ids]) if len(self.carry) else ids
        n = len(buf) // self.block_len
        if n:
            self.writer.write(buf[: n * self.block_len].reshape(n, self.block_len))
        self.carry = buf[n * self.block_len:].copy()

    def finish(self) -> fmt.SplitInfo:
        if len(self.carry):
            self.padding = self.block_len - len(self.carry)
            pad = np.full(self.padding, self.pad_id, np.uint32)
            self.writer.write(np.concatenate([self.carry, pad])[None, :])
            self.carry = np.zeros(0, np.uint32)
        return fmt.SplitInfo(self.writer.finish(), self.tokens, self.padding, self.documents)


# ---------------------------------------------------------------------------- driver


def _tasks(files: list[Path], opts: PrepareOptions, progress) -> Iterator[list[tuple[str, int, bool]]]:
    task: list[tuple[str, int, bool]] = []
    chars = 0
    index = 0
    split = None
    for f in files:
        for doc in iter_documents(f, text_field=opts.text_field, txt_docs=opts.txt_docs,
                                  max_doc_chars=opts.task_chars):
            if split is None:  # first piece of a document decides its split
                split = 1 if is_val_document(index, opts.val_fraction) else 0
            ends = not doc.continues
            task.append((doc.text, split, ends))
            chars += len(doc.text)
            progress.update(doc.source_bytes)
            if ends:
                index += 1
                split = None
            if chars >= opts.task_chars:
                yield task
                task, chars = [], 0
    if task:
        yield task


def _input_list(inputs: list[str], files: list[Path]) -> list[dict]:
    roots = [Path(p) for p in inputs]
    out = []
    for f in files:
        rel = f.name
        for r in roots:
            if r.is_dir():
                try:
                    rel = f.relative_to(r).as_posix()
                    break
                except ValueError:
                    continue
        out.append({"file": rel, "bytes": f.stat().st_size})
    return out


def prepare(opts: PrepareOptions) -> PrepareResult:
    """Tokenise `opts.inputs` into shards under `opts.out` (see the module docstring)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    if opts.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {opts.seq_len}")
    if opts.blocks_per_shard is not None and opts.blocks_per_shard < 1:
        raise UserError(f"--blocks-per-shard must be >= 1, got {opts.blocks_per_shard}")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    files = find_inputs(opts.inputs)
    tok_path = Path(opts.tokenizer)
    tok = load_tokenizer(tok_path)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = find_eos(tok, tok_path, opts.eos_token)
    dtype = fmt.dtype_for_vocab(vocab)
    block_len = opts.seq_len + 1
    per_block = fmt.block_tar_bytes(block_len, dtype, has_mask=False)
    blocks_per_shard = opts.blocks_per_shard or max(1, opts.shard_size // per_block)
    workers = opts.workers or default_workers()

    staged = fmt.StagedOutput(opts.out, overwrite=opts.overwrite)
    pool = None
    try:
        packers = [_Packer(fmt.ShardWriter(staged.path, name, block_len=block_len, dtype=dtype, has_mask=False,
                                           blocks_per_shard=blocks_per_shard), block_len, eos)
                   for name in fmt.SPLITS]
        total = sum(f.stat().st_size for f in files)
        text_bytes = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True,
                  disable=None if opts.progress is None else not opts.progress) as bar:
            tasks = _tasks(files, opts, bar)
            if workers == 1:
                _init_worker(str(tok_path), eos, limit_threads=False)
                results: Iterator = map(_tokenize_task, tasks)
            else:
                pool = _pool(workers, str(tok_path), eos)
                results = _ordered(pool, tasks, window=2 * workers)
            for ids, docs, nbytes in results:
                text_bytes += nbytes
                for split in (0, 1):
                    if len(ids[split]):
                        packers[split].add(ids[split])
                    packers[split].documents += docs[split]
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        splits = {name: p.finish() for name, p in zip(fmt.SPLITS, packers)}
        ndocs = sum(s.documents for s in splits.values())
        if not splits["train"].shards:
            raise UserError(f"inputs {', '.join(opts.inputs)}: no text found (all {len(files)} files are empty)"
                            if ndocs == 0 else
                            f"all {ndocs} documents went to the val split; lower --val-fraction")
        if opts.val_fraction > 0 and not splits["val"].shards:
            raise UserError(f"no document was drawn for the val split ({ndocs} documents, --val-fraction "
                            f"{opts.val_fraction}); raise the fraction or add documents")
        if opts.val_fraction == 0:
            splits.pop("val")
        shutil.copyfile(tok_path, staged.path / TOKENIZER_FILE)
        manifest = fmt.Manifest(
            kind="text", seq_len=opts.seq_len, dtype=dtype, vocab_size=vocab, eos_id=eos, has_mask=False,
            tokenizer={"file": TOKENIZER_FILE, "sha256": tokenizer_sha256(tok_path)}, splits=splits,
            extra={"text_bytes": text_bytes,
                   "settings": {"blocks_per_shard": blocks_per_shard, "val_fraction": opts.val_fraction,
                                "text_field": opts.text_field, "txt_docs": opts.txt_docs},
                   "inputs": _input_list(opts.inputs, files)})
        fmt.write_manifest(staged.path, manifest)
        staged.publish()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        staged.discard()
        raise
    return PrepareResult(Path(opts.out), text_bytes, ndocs, manifest.total_tokens,
                         {k: len(v.shards) for k, v in splits.items()}, time.perf_counter() - t0)


def _pool(workers: int, tokenizer_path: str, eos: int):
    """Tokeniser processes. Forked where possible: they start at once and, unlike spawned ones,
    never re-import the caller's __main__ (which fails for stdin scripts and notebooks)."""
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited: no "forked after parallelism" warning
    try:
        return mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, eos, True))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _ordered(pool, tasks: Iterator, window: int) -> Iterator:
    """pool.imap with back-pressure: at most `window` tasks in flight (imap reads its input eagerly)."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_tokenize_task, (task,)))
        while len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
