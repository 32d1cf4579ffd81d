"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors).

Why a class and not `safetensors.torch.load_file`: conversions must name the *file* and the
*tensor* when something is wrong (a missing tensor, a wrong shape), read lazily so a 3.5B model
is not loaded twice, and notice tensors that nothing consumed (a sign of a different
architecture). Single files, sharded checkpoints with `model.safetensors.index.json`, and several
un-indexed `*.safetensors` files are all read. Nothing here talks to the hub.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stars_scale.errors import UserError
from stars_scale.utils import atomic_write_json, resolve_member

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return data


def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class HFDir:
    """A local HF checkpoint directory: its config.json and a lazy name -> tensor view.

    `get(name, shape)` checks presence and shape and remembers the name as consumed;
    `unused()` lists what was never asked for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a directory")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path}: file not found (a Hugging Face checkpoint directory "
                            f"needs config.json next to its *.safetensors files)")
        self.config_path = cfg_path
        self.config = read_json(cfg_path)
        self._handles: dict[str, Any] = {}
        self._used: set[str] = set()
        self.files = self._index()  # tensor name -> file name (relative to self.path)

    # ------------------------------------------------------------------ index

    def _index(self) -> dict[str, str]:
        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            index = read_json(index_path)
            wmap = index.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise UserError(f"{index_path}: missing or empty 'weight_map'")
            out = {}
            for name, fname in wmap.items():
                # a plain file inside the directory (no URL, '..', absolute path or outward link)
                path = resolve_member(self.path, fname, f"{index_path}: weight_map[{str(name)[:60]!r}]")
                if not path.is_file():
                    raise UserError(f"{index_path}: tensor {name} points to {fname!r}, "
                                    f"which is not a file in {self.path}")
                out[name] = fname
            return out
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: no *.safetensors files (and no {INDEX_NAME}); "
                            f"only safetensors checkpoints are read")
        out: dict[str, str] = {}
        for fname in files:
            for name in self._open(fname).keys():
                if name in out:
                    raise UserError(f"{self.path}: tensor {name} is in both {out[name]} and "
                                    f"{fname}; add a {INDEX_NAME} to say which one counts")
                out[name] = fname
        return out

    def _open(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = safe_open(str(resolve_member(self.path, fname, f"{self.path}: weights file")), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise UserError(f"{self.path / fname}: not a readable safetensors file: {e}") from None
            self._handles[fname] = h
        return h

    # ------------------------------------------------------------------ access

    def has(self, name: str) -> bool:
        return name in self.files

    def where(self, name: str) -> Path:
        return self.path / self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        fname = self.files[name]
        return tuple(self._open(fname).get_slice(name).get_shape())

    def get(self, name: str, shape: Sequence[int] | None = None, why: str = "") -> torch.Tensor:
        """The tensor `name`, checked against `shape` (a UserError names file and tensor)."""
        if name not in self.files:
            where = INDEX_NAME if (self.path / INDEX_NAME).is_file() else "the *.safetensors files"
            raise UserError(f"{self.path}: tensor {name} not found in {where}"
                            + (f" (expected {why})" if why else ""))
        fname = self.files[name]
        if shape is not None:
            got = self.shape(name)
            if tuple(got) != tuple(int(s) for s in shape):
                raise UserError(f"{self.path / fname}: tensor {name} has shape {_fmt_shape(got)}, "
                                f"expected {_fmt_shape(shape)}" + (f" ({why})" if why else ""))
        self._used.add(name)
        return self._open(fname).get_tensor(name)

    def skip(self, name: str) -> None:
        """Mark a tensor as deliberately not converted (derived buffers, dropped layers)."""
        if name in self.files:
            self._used.add(name)

    def unused(self) -> list[str]:
        return sorted(set(self.files) - self._used)

    def require_all_used(self, fmt: str) -> None:
        left = self.unused()
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise UserError(f"{self.where(left[0])}: tensor(s) {shown} are not part of the {fmt} "
                            f"format (a different architecture or variant?)")

    def cfg(self, key: str, default: Any = ..., types: tuple[type, ...] | type | None = None) -> Any:
        """A config.json value; missing without default, or of the wrong type -> UserError."""
        if key not in self.config or self.config[key] is None:
            if default is ...:
                raise UserError(f"{self.config_path}: missing key {key!r}")
            return default
        value = self.config[key]
        if types is not None:
            tps = types if isinstance(types, tuple) else (types,)
            ok = isinstance(value, tps) and not (isinstance(value, bool) and bool not in tps)
            if not ok:
                raise UserError(f"{self.config_path}: {key}={value!r} has the wrong type "
                                f"(expected {' or '.join(t.__name__ for t in tps)})")
        return value


# ---------------------------------------------------------------------- writing


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      max_shard_bytes: int | None = None) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards plus an index past `max_shard_bytes`.

    Each tensor is cloned contiguous: safetensors refuses views that share storage (the split
    halves of a fused matrix, tied weights). Returns the file names written.
    """
    out_dir = Path(out_dir)
    items = [(k, v.detach().contiguous().clone()) for k, v in tensors.items()]
    total = sum(_tensor_bytes(v) for _, v in items)
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(dict(items), str(out_dir / SINGLE_NAME), metadata=metadata)
        return [SINGLE_NAME]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for k, v in items:
        if shards[-1] and size + _tensor_bytes(v) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((k, v))
        size += _tensor_bytes(v)
    n = len(shards)
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(dict(shard), str(out_dir / fname), metadata=metadata)
        names.append(fname)
        weight_map.update({k: fname for k, _ in shard})
    atomic_write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_NAME]

