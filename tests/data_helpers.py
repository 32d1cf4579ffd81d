"""Shared helpers for the data tests: tiny corpora, tiny tokenizers, datasets, shard surgery.
"""
from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega loop depth shard rank token block epoch état naïve 日本 ").split()


def make_docs(n: int, seed: int = 0, max_words: int = 60, words: tuple[str, ...] = WORDS) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(3, max_words)
        text = f"doc {i} " + " ".join(rng.choice(words) for _ in range(k))
        if i % 7 == 3:
            text += "\nsecond line,  with  spaces\tand tabs"
        docs.append(text)
    return docs


def write_corpus(root: Path, docs: list[str]) -> list[str]:
    """Spread `docs` over .txt / .jsonl / .jsonl.gz files whose sorted order is the doc order.

    Returns the documents in the order the reader will see them (== `docs`).
    """
    root.mkdir(parents=True, exist_ok=True)
    third = len(docs) // 3
    (root / "a_first.txt").write_text(docs[0], encoding="utf-8")  # one .txt file = one document
    with open(root / "b_second.jsonl", "w", encoding="utf-8") as f:
        for d in docs[1:third]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    sub = root / "c_sub"
    sub.mkdir(exist_ok=True)
    with gzip.open(sub / "part.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[third:]:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def train_tokenizer(path: Path, docs: list[str], vocab_size: int = 300) -> Path:
    from stars_scale.data.tokenizer import train_bpe

    tok = train_bpe(docs, vocab_size)
    tok.save(str(path))
    return path


def make_dataset(tmp: Path, *, n_docs: int = 60, seq_len: int = 16, blocks_per_shard: int = 6,
                 val_fraction: float = 0.0, seed: int = 0, name: str = "ds", words: tuple[str, ...] = WORDS,
                 tokenizer: Path | None = None) -> Path:
    """A small text dataset built through the library (fast; the CLI is tested separately)."""
    from stars_scale.data.prepare import PrepareOptions, prepare

    docs = make_docs(n_docs, seed, words=words)
    corpus = write_corpus(tmp / f"{name}_corpus", docs)
    tok = tokenizer or train_tokenizer(tmp / f"{name}_tok.json", corpus)
    out = tmp / name
    prepare(PrepareOptions(inputs=[str(tmp / f"{name}_corpus")], out=str(out), tokenizer=str(tok), seq_len=seq_len,
                           blocks_per_shard=blocks_per_shard, val_fraction=val_fraction, workers=1, progress=False))
    return out


def all_blocks(directory: Path, split: str = "train") -> list[tuple[int, ...]]:
    """Every block of a split, in shard order, read with tarfile (independent of the loader)."""
    from stars_scale.data.shards import Manifest

    m = Manifest.load(directory)
    out = []
    for sh in m.split(split).shards:
        with tarfile.open(directory / sh.name) as tf:
            for ti in tf:
                if ti.name.endswith(".tokens"):
                    out.append(tuple(np.frombuffer(tf.extractfile(ti).read(), dtype=m.np_dtype).tolist()))
    return out


def batch_blocks(batch) -> list[tuple[int, ...]]:
    """Rebuild the stored blocks from a text batch: input_ids plus the last label."""
    ids, labels = batch["input_ids"], batch["labels"]
    return [tuple(ids[i].tolist() + [int(labels[i, -1])]) for i in range(len(ids))]


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a shard through `edit(members) -> members`, members = [(name, bytes)] in order."""
    with tarfile.open(path) as tf:
        members = [(ti.name, tf.extractfile(ti).read()) for ti in tf]
    members = edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def stars_data(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stars_scale.cli.data", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
