"""`stars-data corpus`: a real text corpus every machine with Python has, Python's own standard library.

The corpus is assembled from the `.py` sources of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`), never downloaded and never committed:

- **Files.** Every `*.py` below the stdlib root, except in directories named `test`, `tests`,
  `idle_test` (test suites), `site-packages`, `dist-packages` (third-party code), `__pycache__`,
  `encodings` (codec tables: generated data, not prose or code) and `pydoc_data` (one generated
  750 kB string), except three generated data modules (`html/entities.py`, an entity table;
  `stringprep.py`, Unicode tables; `_sysconfigdata*.py`, this build's own paths and compiler
  flags, which differ from machine to machine) and except files that are not UTF-8.
- **Cap.** Files are ranked by the BLAKE2b hash of their path relative to the root and taken in
  that order while the running total stays within `max_bytes` (a file that would overflow it is
  skipped, the next ones still tried). The choice is a pure function of the stdlib's file set
  and contents, spread over the whole library rather than its first letters; the chosen files
  are then written in sorted path order, one document each.
- **Split.** Document i (in that order) is a validation document when
  `prepare.is_val_document(i, val_fraction)` says so: exactly the documents `stars-data
  prepare corpus.jsonl --val-fraction F` puts in its val split, so the shards' val split and
  `val.jsonl` hold the same text.

Written to `out/`: `corpus.jsonl` (every document: the input of `stars-data prepare`),
`train.jsonl` (the train documents: the input of `stars-data train-tokenizer`, so the
tokenizer never sees validation text), `val.jsonl` (the validation documents, for
`stars-eval lm` loglikelihood_rolling tasks) and `corpus.json` (the Python version, stdlib root,
settings, file list with sizes and sha256, split counts). Each line is
`{"path": "<relative path>", "text": "<source>"}`. Unless `vocab_size` is None it then trains
`tokenizer.json` (byte-level BPE) on train.jsonl and writes `shards/` from corpus.jsonl with the
same val fraction: exactly `stars-data train-tokenizer` + `stars-data prepare`, one command.
The output is built in a hidden sibling directory and renamed into place; an existing corpus is
replaced only with `overwrite`.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from stars_scale.data.prepare import is_val_document
from stars_scale.errors import UserError

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                           "encodings", "pydoc_data"})
EXCLUDED_FILES = frozenset({"html/entities.py", "stringprep.py"})
EXCLUDED_PREFIX = "_sysconfigdata"
FILES = ("corpus.jsonl", "train.jsonl", "val.jsonl", "corpus.json")
DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_VOCAB = 2048
DEFAULT_SEQ_LEN = 128
DEFAULT_SHARD_SIZE = 1_000_000


@dataclass
class CorpusOptions:
    out: str
    root: str | None = None  # None: this interpreter's stdlib
    max_bytes: int = DEFAULT_MAX_BYTES
    val_fraction: float = DEFAULT_VAL_FRACTION
    overwrite: bool = False
    # then a tokenizer and shards (None: the text only)
    vocab_size: int | None = DEFAULT_VOCAB
    seq_len: int = DEFAULT_SEQ_LEN
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = 0


@dataclass
class CorpusResult:
    out: Path
    root: Path
    python: str
    documents: int
    train_documents: int
    val_documents: int
    train_bytes: int
    val_bytes: int
    skipped_not_utf8: int
    tokens: dict[str, int] | None = None  # per split, when shards were written


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _rank(rel: str) -> bytes:
    return hashlib.blake2b(rel.encode("utf-8"), digest_size=8).digest()


def select_files(root: Path, max_bytes: int) -> tuple[list[tuple[str, str]], int]:
    """[(relative path, text)] in sorted path order, and how many candidates were not UTF-8."""
    candidates = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if (f.is_file() and not any(part in EXCLUDED_DIRS for part in rel.parts[:-1])
                and rel.as_posix() not in EXCLUDED_FILES and not rel.name.startswith(EXCLUDED_PREFIX)):
            candidates.append(rel.as_posix())
    chosen: list[tuple[str, str]] = []
    total = 0
    bad = 0
    for rel in sorted(candidates, key=lambda r: (_rank(r), r)):
        data = (root / rel).read_bytes()
        if total + len(data) > max_bytes:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
            continue
        if not text.strip():
            continue  # an empty __init__.py is no document
        chosen.append((rel, text))
        total += len(data)
    return sorted(chosen), bad


def _jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rel, text in docs:
            f.write(json.dumps({"path": rel, "text": text}, ensure_ascii=False) + "\n")


def write_corpus(opts: CorpusOptions) -> CorpusResult:
    root = Path(opts.root) if opts.root else stdlib_root()
    if not root.is_dir():
        raise UserError(f"stdlib root {root}: no such directory")
    if opts.max_bytes < 1:
        raise UserError(f"--max-bytes: must be >= 1, got {opts.max_bytes}")
    if not 0.0 < opts.val_fraction < 1.0:
        raise UserError(f"--val-fraction: must be in (0, 1), got {opts.val_fraction}")
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not (out.is_dir() and (out / "corpus.json").is_file()):
        raise UserError(f"{out}: exists and is not a corpus written by `stars-data corpus` (no corpus.json); "
                        "not replacing it")
    docs, bad = select_files(root, opts.max_bytes)
    if not docs:
        raise UserError(f"stdlib root {root}: no Python sources found within {opts.max_bytes} bytes")
    split = [is_val_document(i, opts.val_fraction) for i in range(len(docs))]
    train = [d for d, v in zip(docs, split) if not v]
    val = [d for d, v in zip(docs, split) if v]
    if not val or not train:
        raise UserError(f"--val-fraction {opts.val_fraction}: leaves {'no validation' if not val else 'no training'} "
                        f"documents out of {len(docs)}; choose a fraction between the two")
    python = platform.python_version()
    nbytes = lambda ds: sum(len(t.encode("utf-8")) for _, t in ds)  # noqa: E731
    manifest = {
        "kind": "python-stdlib",
        "python": python,
        "implementation": sys.implementation.name,
        "root": str(root),
        "settings": {"max_bytes": opts.max_bytes, "val_fraction": opts.val_fraction,
                     "excluded_dirs": sorted(EXCLUDED_DIRS), "excluded_files": sorted(EXCLUDED_FILES),
                     "excluded_prefix": EXCLUDED_PREFIX},
        "prepare": f"stars-data prepare {out / 'corpus.jsonl'} --val-fraction {opts.val_fraction} ...",
        "documents": len(docs), "skipped_not_utf8": bad,
        "splits": {"train": {"documents": len(train), "bytes": nbytes(train)},
                   "val": {"documents": len(val), "bytes": nbytes(val)}},
        "files": [{"path": rel, "bytes": len(t.encode("utf-8")),
                   "sha256": hashlib.sha256(t.encode("utf-8")).hexdigest(), "split": "val" if v else "train"}
                  for (rel, t), v in zip(docs, split)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _jsonl(tmp / "corpus.jsonl", docs)
        _jsonl(tmp / "train.jsonl", train)
        _jsonl(tmp / "val.jsonl", val)
        (tmp / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
        tokens = _tokenize(tmp, train, opts) if opts.vocab_size else None
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CorpusResult(out, root, python, len(docs), len(train), len(val), nbytes(train), nbytes(val), bad, tokens)


def _tokenize(tmp: Path, train: list[tuple[str, str]], opts: CorpusOptions) -> dict[str, int]:
    """`stars-data train-tokenizer train.jsonl` and `stars-data prepare corpus.jsonl --val-fraction F` in one."""
    from stars_scale.data.prepare import PrepareOptions, prepare
    from stars_scale.data.tokenizer import train_bpe

    tok = train_bpe((t for _, t in train), opts.vocab_size)
    tok.save(str(tmp / "tokenizer.json"))
    prepare(PrepareOptions(inputs=[str(tmp / "corpus.jsonl")], out=str(tmp / "shards"),
                           tokenizer=str(tmp / "tokenizer.json"), seq_len=opts.seq_len, shard_size=opts.shard_size,
                           val_fraction=opts.val_fraction, workers=opts.workers, progress=False))
    m = json.loads((tmp / "shards" / "manifest.json").read_text())
    return {name: split["tokens"] for name, split in m["splits"].items()}
