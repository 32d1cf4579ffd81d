"""Atomic, resumable checkpoints.

Layout of a run directory:

    DIR/config.yaml                      resolved config of the run
    DIR/metrics.jsonl                    one JSON object per logged step
    DIR/checkpoints/step_00000020/       one complete checkpoint
        model.pt  optimizer.pt  trainer_state.json  config.yaml  [rank files under parallelism]
    DIR/checkpoints/latest               name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place when every
file is on disk, so a crash mid-save never leaves a half checkpoint under a real name; `latest`
is replaced atomically after the rename. Only complete checkpoints (with trainer_state.json) are
ever resumed from. Older checkpoints beyond `keep_last` are removed after a successful save.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from stars_scale.errors import UserError
from stars_scale.utils import _fsync_dir, atomic_write_text

STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append(p)
    return sorted(out, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (-> its latest complete checkpoint). Clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: checkpoint not found (no such file or directory)")
    if (p / STATE_FILE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise UserError(f"{p}: no complete checkpoint here (expected {STATE_FILE} or checkpoints/step_*/)")
    return latest


def save_checkpoint(run_dir: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any],
                    keep_last: int, is_writer: bool = True, barrier: Callable[[], None] | None = None) -> Path:
    """Write checkpoint `step`: `write_files(tmp_dir)` puts the tensors, then the state is added.

    Under parallelism every rank calls this with its own `write_files` (rank-suffixed files); the
    writer rank creates the temporary dir, all ranks write, and the writer renames it after the
    barrier.
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if barrier:
        barrier()
    write_files(tmp)
    if barrier:
        barrier()
    if is_writer:
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            old = root / f".{step_dir_name(step)}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def save_tensor_file(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def load_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt / STATE_FILE}: unreadable checkpoint state ({e})") from None


def load_tensor_file(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: cannot be read as a checkpoint file ({type(e).__name__}: {e})") from None
