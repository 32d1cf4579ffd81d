"""The on-disk shard format: manifest, deterministic tar writer, sample decoding.

A dataset directory holds webdataset tar shards plus ``manifest.json``. Every sample is one
packed block of ``block_len = seq_len + 1`` token ids (little-endian uint16 when the vocabulary
fits, else uint32) in a member ``<key>.tokens``; datasets whose loss covers only part of each
block (the arithmetic task) also carry ``<key>.mask``: ``seq_len`` bytes, 1 where the next
token is a training target. The loader turns a block into ``input_ids = block[:-1]`` and
``labels = block[1:]`` (masked to -100 where the mask is 0).

Why one block per member and raw bytes (not .npy): the reader needs no decoder and can check
a block's size from the tar header alone, and members of fixed size make every shard's block
count a pure function of its byte size, which the manifest records.

Shards are written with fixed tar metadata (mtime 0, uid/gid 0, no user names, ustar format)
so the same inputs give byte-identical shards. Everything is first written under a temporary
name and renamed into place by the caller.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stars_scale.errors import UserError
from stars_scale.utils import (StagedDir, atomic_write_json, current_umask, looks_like_url,  # noqa: F401
                               only_own_files, resolve_member, sha256_file)

FORMAT = "stars-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens"
MASK = "mask"
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_TAR_BLOCK = 512


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest stored dtype that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def numpy_dtype(name: str) -> np.dtype:
    return _DTYPES[name]


def member_bytes(n: int) -> int:
    """Bytes a tar member of `n` data bytes occupies: a 512-byte header plus padded data."""
    return _TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK


def block_tar_bytes(block_len: int, dtype: str, has_mask: bool) -> int:
    """Bytes one sample (block, and mask when present) occupies inside a shard."""
    n = member_bytes(block_len * numpy_dtype(dtype).itemsize)
    return n + (member_bytes(block_len - 1) if has_mask else 0)


def parse_size(text: str) -> int:
    """'256MB' / '1GiB' / '64k' / '12345' -> bytes. Used by --shard-size."""
    s = str(text).strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
             "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}
    num = s.rstrip("kmgib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise UserError(f"size {text!r}: expected a positive number with an optional unit (KB, MB, GB, KiB, MiB, GiB)")
    return int(value * units[unit])


# ---------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    name: str
    blocks: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    tokens: int = 0  # real tokens (documents and their EOS), padding excluded
    padding_tokens: int = 0  # EOS tokens that fill the final block
    documents: int = 0

    @property
    def blocks(self) -> int:
        return sum(s.blocks for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"shards": [vars(s).copy() for s in self.shards], "blocks": self.blocks,
                "tokens": self.tokens, "padding_tokens": self.padding_tokens, "documents": self.documents}


@dataclass
class Manifest:
    """What a dataset directory holds; `load` checks every field and names the bad one."""
    kind: str  # "text" or "arithmetic"
    seq_len: int
    dtype: str
    vocab_size: int
    eos_id: int
    has_mask: bool
    tokenizer: dict[str, Any]  # {"file": "tokenizer.json", "sha256": ...} or {"name": "arithmetic", ...}
    splits: dict[str, SplitInfo]
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: inputs, settings
    directory: Path | None = None

    @property
    def block_len(self) -> int:
        return self.seq_len + 1

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    @property
    def fingerprint(self) -> str:
        """Identifies the data (not the path): resume refuses a dataset that changed under it."""
        shards = {k: [(s.name, s.sha256) for s in v.shards] for k, v in sorted(self.splits.items())}
        blob = json.dumps([self.seq_len, self.dtype, self.tokenizer.get("sha256"), shards], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "seq_len": self.seq_len,
            "block_len": self.block_len, "dtype": self.dtype, "vocab_size": self.vocab_size,
            "eos_id": self.eos_id, "has_mask": self.has_mask, "tokenizer": self.tokenizer,
            "total_tokens": self.total_tokens,
            "splits": {k: v.to_json() for k, v in self.splits.items()},
        }
        out.update(self.extra)
        return out

    def shard_path(self, shard: ShardInfo) -> Path:
        """The shard's file: a plain file name resolved inside the dataset directory (never a URL,
        a pipe, a path or a link leading out of it; see `utils.resolve_member`)."""
        return self.member_path(shard.name, "shard")

    def member_path(self, name: Any, what: str) -> Path:
        assert self.directory is not None
        return resolve_member(self.directory, name, f"{self.directory / MANIFEST}: {what}")

    def tokenizer_path(self) -> Path | None:
        """The tokenizer file the manifest names (text datasets), resolved like a shard."""
        return self.member_path(self.tokenizer["file"], "tokenizer.file") if "file" in self.tokenizer else None

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        if looks_like_url(str(directory)):
            raise UserError(f"dataset {str(directory)[:80]!r}: a URL or pipe; expected a local dataset directory "
                            "(write ./NAME for a directory whose name holds a ':')")
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise UserError(f"{directory}: not a directory (expected a dataset written by `stars-data prepare`)")
        if not path.is_file():
            raise UserError(f"{path}: missing; {directory} is not a dataset written by `stars-data prepare`/`arithmetic`")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(raw, path, directory)

    @classmethod
    def from_json(cls, raw: Any, path: Path, directory: Path) -> "Manifest":
        def need(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise UserError(f"{path}: field {where}{key} is missing")
            val = obj[key]
            if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
                names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                raise UserError(f"{path}: field {where}{key} should be {names}, got {val!r}")
            return val

        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a JSON object")
        if raw.get("format") != FORMAT:
            raise UserError(f"{path}: field format is {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise UserError(f"{path}: field version is {raw.get('version')!r}; this reader understands version {VERSION}")
        kind = need(raw, "kind", str, "")
        seq_len = need(raw, "seq_len", int, "")
        dtype = need(raw, "dtype", str, "")
        vocab = need(raw, "vocab_size", int, "")
        eos = need(raw, "eos_id", int, "")
        has_mask = need(raw, "has_mask", bool, "")
        tok = need(raw, "tokenizer", dict, "")
        if seq_len < 1:
            raise UserError(f"{path}: field seq_len must be >= 1, got {seq_len}")
        if dtype not in _DTYPES:
            raise UserError(f"{path}: field dtype is {dtype!r}, expected one of {sorted(_DTYPES)}")
        if vocab < 1 or vocab > np.iinfo(_DTYPES[dtype]).max + 1:
            raise UserError(f"{path}: field vocab_size={vocab} does not fit dtype {dtype}")
        if raw.get("block_len", seq_len + 1) != seq_len + 1:
            raise UserError(f"{path}: field block_len={raw.get('block_len')} disagrees with seq_len+1={seq_len + 1}")
        splits_raw = need(raw, "splits", dict, "")
        splits: dict[str, SplitInfo] = {}
        for name, s in splits_raw.items():
            if name not in SPLITS:
                raise UserError(f"{path}: unknown split {name!r} (expected {'/'.join(SPLITS)})")
            where = f"splits.{name}."
            shards = []
            for i, sh in enumerate(need(s, "shards", list, where)):
                w = f"{where}shards[{i}]."
                info = ShardInfo(need(sh, "name", str, w), need(sh, "blocks", int, w),
                                 need(sh, "bytes", int, w), need(sh, "sha256", str, w))
                resolve_member(directory, info.name, f"{path}: field {w}name")
                if info.blocks < 1:
                    raise UserError(f"{path}: field {w}blocks must be >= 1, got {info.blocks}")
                shards.append(info)
            split = SplitInfo(shards, need(s, "tokens", int, where), need(s, "padding_tokens", int, where),
                              need(s, "documents", int, where))
            if "blocks" in s and s["blocks"] != split.blocks:
                raise UserError(f"{path}: field {where}blocks={s['blocks']} disagrees with the sum over its shards ({split.blocks})")
            splits[name] = split
        known = {"format", "version", "kind", "seq_len", "block_len", "dtype", "vocab_size", "eos_id",
                 "has_mask", "tokenizer", "total_tokens", "splits"}
        extra = {k: v for k, v in raw.items() if k not in known}
        if "file" in tok:
            resolve_member(directory, tok["file"], f"{path}: field tokenizer.file")
        return cls(kind, seq_len, dtype, vocab, eos, has_mask, tok, splits, extra, directory)

    def split(self, name: str) -> SplitInfo:
        s = self.splits.get(name)
        if s is None or not s.shards:
            have = ", ".join(k for k, v in self.splits.items() if v.shards) or "none"
            raise UserError(f"{self.directory}: has no {name!r} shards (splits present: {have})")
        return s

    def check_files(self, split: str) -> None:
        """Cheap start-up check (stat only): every shard exists with the size the manifest lists."""
        expected = block_tar_bytes(self.block_len, self.dtype, self.has_mask)
        for sh in self.split(split).shards:
            p = self.shard_path(sh)
            if not p.is_file():
                raise UserError(f"shard {p}: missing (listed in {self.directory / MANIFEST})")
            size = p.stat().st_size
            if size != sh.bytes:
                raise UserError(f"shard {p}: {size} bytes on disk, but the manifest lists {sh.bytes} (truncated or replaced?)")
            if size < sh.blocks * expected:
                raise UserError(f"shard {p}: {size} bytes cannot hold the {sh.blocks} blocks the manifest lists")
        self.check_unlisted()

    def check_unlisted(self) -> None:
        """A `*.tar` in the directory that the manifest does not list (a shard dropped in by hand, a
        leftover of another dataset) is refused: training reads only listed shards, so it would be
        silently ignored."""
        assert self.directory is not None
        listed = {sh.name for split in self.splits.values() for sh in split.shards}
        unlisted = sorted(p.name for p in self.directory.glob("*.tar") if p.name not in listed)
        if unlisted:
            raise UserError(f"shard {self.directory / unlisted[0]}: in the directory but not in the manifest "
                            f"({len(unlisted)} unlisted shard(s)); training reads only listed shards: remove it "
                            "or write the dataset again with stars-data")


# ---------------------------------------------------------------------------- writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


class ShardWriter:
    """Writes blocks into numbered tar shards of at most `blocks_per_shard` blocks each.

    The caller owns the directory (a temporary one that is renamed when complete); the writer
    only appends shards to it and reports what it wrote as `ShardInfo`s.
    """

    def __init__(self, directory: Path, split: str, *, block_len: int, dtype: str, has_mask: bool,
                 blocks_per_shard: int, key_offset: int = 0) -> None:
        self.directory = Path(directory)
        self.split = split
        self.block_len = block_len
        self.dtype = numpy_dtype(dtype)
        self.has_mask = has_mask
        self.blocks_per_shard = max(1, int(blocks_per_shard))
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._key = key_offset

    def write(self, blocks: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Append blocks [n, block_len] (and masks [n, block_len - 1] of 0/1 when has_mask)."""
        blocks = np.asarray(blocks)
        assert blocks.ndim == 2 and blocks.shape[1] == self.block_len, blocks.shape
        assert (masks is not None) == self.has_mask
        data = blocks.astype(self.dtype, copy=False)
        for i in range(len(data)):
            if self._tar is None:
                self._open()
            assert self._tar is not None
            key = f"{self._key:010d}"
            payload = data[i].tobytes()
            self._tar.addfile(_tarinfo(f"{key}.{TOKENS}", len(payload)), io.BytesIO(payload))
            if masks is not None:
                m = np.asarray(masks[i], dtype=np.uint8).tobytes()
                assert len(m) == self.block_len - 1
                self._tar.addfile(_tarinfo(f"{key}.{MASK}", len(m)), io.BytesIO(m))
            self._key += 1
            self._count += 1
            if self._count == self.blocks_per_shard:
                self._close()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._path = self.directory / name
        self._tar = tarfile.open(self._path, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        p = self._path
        self.shards.append(ShardInfo(p.name, self._count, p.stat().st_size, sha256_file(p)))

    def finish(self) -> list[ShardInfo]:
        self._close()
        return self.shards


# ---------------------------------------------------------------------------- reading


def decode_sample(sample: dict[str, Any], manifest: Manifest, shard: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A webdataset sample dict -> (block [block_len], mask [seq_len] or None); errors name the shard."""
    key = sample.get("__key__", "?")
    members = {k for k in sample if not k.startswith("__")}
    expected = {TOKENS, MASK} if manifest.has_mask else {TOKENS}
    if members != expected:
        missing = sorted(expected - members)
        extra = sorted(members - expected)
        what = (f"lacks member {', '.join(missing)}" if missing else "") + \
               ("; " if missing and extra else "") + (f"has unexpected member {', '.join(extra)}" if extra else "")
        raise UserError(f"shard {shard}: sample {key} {what} (expected {', '.join(sorted(expected))})")
    raw = sample[TOKENS]
    itemsize = manifest.np_dtype.itemsize
    if len(raw) != manifest.block_len * itemsize:
        raise UserError(f"shard {shard}: sample {key} block has {len(raw)} bytes, expected "
                        f"{manifest.block_len} {manifest.dtype} tokens ({manifest.block_len * itemsize} bytes)")
    block = np.frombuffer(raw, dtype=manifest.np_dtype)
    mask = None
    if manifest.has_mask:
        rawm = sample[MASK]
        if len(rawm) != manifest.seq_len:
            raise UserError(f"shard {shard}: sample {key} mask has {len(rawm)} bytes, expected {manifest.seq_len}")
        mask = np.frombuffer(rawm, dtype=np.uint8)
    return block, mask


# ---------------------------------------------------------------------------- publishing


def StagedOutput(out: str | Path, overwrite: bool = False) -> StagedDir:
    """A dataset directory staged and published atomically; never replaces a non-dataset directory."""
    return StagedDir(out, overwrite=overwrite, what="a previous dataset",
                     replaceable=only_own_files(MANIFEST, (MANIFEST, "tokenizer.json", *(f"{s}-*.tar" for s in SPLITS)),
                                                "a dataset"))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Written last: a directory with a manifest is complete."""
    path = Path(directory) / MANIFEST
    atomic_write_json(path, manifest.to_json())
    os.chmod(path, 0o666 & ~current_umask())
