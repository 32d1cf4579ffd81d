"""Tensor files that never run code on load, and that say what a failed write needed.

`load_tensor_file` reads with `torch.load(weights_only=True)`: PyTorch's restricted unpickler
builds tensors, containers and numbers only, plus the globals named in an explicit allow-list, so
a file holding a pickle payload is refused in one line instead of run. `check_tensor_files` runs
that check over a directory before a library that unpickles without it (DeepSpeed) reads it.
`save_tensor_file` / `RecordingFile`: a full disk is reported with its errno and the bytes needed
(torch.save alone reports it as a RuntimeError without the cause).
"""
from __future__ import annotations

import io
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import torch

from stars_scale.errors import UserError
from stars_scale.pickle_globals import pickle_globals


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or unsafe. The message names the file."""


class RecordingFile(io.FileIO):
    """torch.save reports a failed write as a RuntimeError without the cause; keep the OSError."""

    error: OSError | None = None

    def write(self, b) -> int:
        try:
            return super().write(b)
        except OSError as e:
            self.error = e
            raise


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages in `obj` (tied weights counted once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def save_tensor_file(obj: Any, path: Path) -> None:
    """torch.save + fsync; a failed write raises the OSError (ENOSPC, EFBIG, EIO) with the bytes needed."""
    f = RecordingFile(path, "wb")
    try:
        with f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        cause = f.error if f.error is not None else e
        if isinstance(cause, OSError):
            raise OSError(cause.errno, f"{cause.strerror}; writing {Path(path).name} needs about "
                                       f"{_tensor_bytes(obj)} bytes") from None
        raise


def load_tensor_file(path: Path, allow: Iterable[Any] = ()) -> Any:
    """Load a tensor file without running code: `torch.load(weights_only=True)`.

    `allow` names the extra globals (classes, functions) the file may reference; anything else in
    the pickle is refused with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    allow = list(allow)
    ctx = torch.serialization.safe_globals(allow) if allow else nullcontext()
    try:
        with ctx:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or unsafe file
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "Unsupported operand" in msg:
            raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain data, "
                                  f"which could run code on load ({refused_objects(path, msg, allow)})") from None
        raise CheckpointError(f"{path}: cannot be read as a checkpoint file "
                              f"({type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''})") from None


def refused_objects(path: Path, msg: str, allow: list[Any]) -> str:
    """What a refused tensor file holds, named: the global torch names, else the ones the pickle
    references beyond tensors (read without unpickling), else torch's own words."""
    named = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
    if named:
        return f"refused: {named.group(1)}"
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allow}
    names = [g for g in pickle_globals(path) if g not in allowed and g != "collections.OrderedDict"
             and not g.startswith("torch.")]
    if names:
        return "refused: " + ", ".join(names[:5])
    first = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln), "").split(". ")[0]
    return first[:160] or (msg.splitlines() or ["an unreadable pickle"])[0][:160]


def check_tensor_files(d: Path, allow: Iterable[Any] = ()) -> None:
    """Before a library that unpickles with `weights_only=False` (DeepSpeed) reads the `*.pt` files
    under `d`: load each with the restricted unpickler and `allow`, so a file that would build
    anything else is refused here, in one line, before it can run."""
    for f in sorted(Path(d).rglob("*.pt")):
        load_tensor_file(f, allow)
