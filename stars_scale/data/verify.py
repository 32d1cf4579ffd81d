"""Full check of a dataset directory against its manifest (`stars-data inspect --verify`).

Reads every shard with `tarfile` directly (not through webdataset) so each problem is reported
precisely: which shard, which member, what was expected. The first problem raises a UserError;
a dataset that passes can be streamed by the loader without surprises.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from stars_scale.data import shards as fmt
from stars_scale.data.tokenizer import tokenizer_sha256
from stars_scale.errors import UserError


@dataclass
class Block:
    key: str
    tokens: np.ndarray
    mask: np.ndarray | None


def iter_shard(manifest: fmt.Manifest, shard: fmt.ShardInfo, *, check_values: bool = True) -> Iterator[Block]:
    """Blocks of one shard in order; any structural problem raises a UserError naming the shard."""
    path = manifest.shard_path(shard)
    expected = {fmt.TOKENS, fmt.MASK} if manifest.has_mask else {fmt.TOKENS}
    nbytes = {fmt.TOKENS: manifest.block_len * manifest.np_dtype.itemsize, fmt.MASK: manifest.seq_len}
    if not path.is_file():
        raise UserError(f"shard {path}: missing (listed in the manifest)")
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"shard {path}: not a readable tar file ({e})") from None
    key: str | None = None
    members: dict[str, bytes] = {}

    def finish() -> Block:
        assert key is not None
        missing = sorted(expected - members.keys())
        if missing:
            raise UserError(f"shard {path}: sample {key} lacks member {', '.join(missing)}")
        tokens = np.frombuffer(members[fmt.TOKENS], dtype=manifest.np_dtype)
        mask = np.frombuffer(members[fmt.MASK], dtype=np.uint8) if manifest.has_mask else None
        if check_values:
            top = int(tokens.max())
            if top >= manifest.vocab_size:
                raise UserError(f"shard {path}: sample {key} holds token id {top}, outside the vocabulary "
                                f"of {manifest.vocab_size} (wrong dtype or tokenizer?)")
            if mask is not None and int(mask.max()) > 1:
                raise UserError(f"shard {path}: sample {key} mask holds values other than 0/1")
        return Block(key, tokens, mask)

    with tf:
        try:
            for ti in tf:
                if not ti.isreg():
                    raise UserError(f"shard {path}: member {ti.name!r} is not a regular file")
                name = ti.name
                k, dot, ext = name.partition(".")
                if not dot or "/" in name or ext not in expected:
                    raise UserError(f"shard {path}: unexpected member {name!r} (expected <key>.{' / <key>.'.join(sorted(expected))})")
                if k != key:
                    if key is not None:
                        yield finish()
                    key, members = k, {}
                if ext in members:
                    raise UserError(f"shard {path}: member {name!r} appears twice")
                if ti.size != nbytes[ext]:
                    what = (f"{manifest.block_len} {manifest.dtype} tokens" if ext == fmt.TOKENS
                            else f"{manifest.seq_len} mask bytes")
                    raise UserError(f"shard {path}: member {name!r} has {ti.size} bytes, expected {nbytes[ext]} ({what})")
                f = tf.extractfile(ti)
                assert f is not None
                data = f.read()
                if len(data) != ti.size:
                    raise UserError(f"shard {path}: member {name!r} is cut short (truncated tar)")
                members[ext] = data
        except tarfile.TarError as e:
            raise UserError(f"shard {path}: truncated or corrupt tar ({e}) after sample {key}") from None
        except OSError as e:
            raise UserError(f"shard {path}: cannot read ({e})") from None
        if key is not None:
            yield finish()


def verify_dataset(directory: str | Path, progress: Callable[[str], None] | None = None) -> fmt.Manifest:
    """Check every shard of every split against the manifest; return the manifest when all is well."""
    manifest = fmt.Manifest.load(directory)
    d = Path(directory)
    tok = manifest.tokenizer
    tpath = manifest.tokenizer_path()
    if tpath is not None:
        if not tpath.is_file():
            raise UserError(f"{tpath}: missing (the manifest names it as the dataset's tokenizer)")
        if tokenizer_sha256(tpath) != tok.get("sha256"):
            raise UserError(f"{tpath}: sha256 differs from the manifest's tokenizer.sha256 (tokenizer replaced?)")
    for split_name, split in manifest.splits.items():
        for shard in split.shards:
            path = manifest.shard_path(shard)
            count = sum(1 for _ in iter_shard(manifest, shard))
            if count != shard.blocks:
                size = path.stat().st_size
                hint = " (truncated?)" if size < shard.bytes else ""
                raise UserError(f"shard {path}: holds {count} blocks, but the manifest lists {shard.blocks}{hint}")
            size = path.stat().st_size
            if size != shard.bytes:
                raise UserError(f"shard {path}: {size} bytes on disk, but the manifest lists {shard.bytes}")
            if fmt.sha256_file(path) != shard.sha256:
                raise UserError(f"shard {path}: sha256 differs from the manifest (the shard was rewritten)")
            if progress is not None:
                progress(shard.name)
        stored = split.blocks * manifest.block_len
        if manifest.kind == "text" and stored != split.tokens + split.padding_tokens:
            raise UserError(f"{d / fmt.MANIFEST}: split {split_name} lists {split.tokens} tokens + "
                            f"{split.padding_tokens} padding, but its {split.blocks} blocks hold {stored}")
    manifest.check_unlisted()
    return manifest


def first_blocks(manifest: fmt.Manifest, split: str, n: int) -> list[Block]:
    out: list[Block] = []
    for shard in manifest.split(split).shards:
        for b in iter_shard(manifest, shard, check_values=False):
            out.append(b)
            if len(out) >= n:
                return out
    return out
