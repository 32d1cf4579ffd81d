"""Small shared helpers: atomic writes, seeding, flattening."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file in the same directory, then rename it into place.

    A reader never sees a half-written file; a crash leaves the previous version intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def looks_like_url(text: str) -> bool:
    """`pipe:cmd`, `http://...`, `s3://...`, `file:...`: a scheme that a URL opener (webdataset's
    gopen, fsspec) would act on instead of opening a local file."""
    return bool(_SCHEME.match(text))


def resolve_member(directory: str | Path, name: Any, where: str) -> Path:
    """The file that a name stored in a data file (a manifest's shard list, an HF `weight_map`)
    refers to: `directory / name`, resolved, inside `directory` and a regular file (when present).

    Such names come from disk, not from the user, so they may only be plain file names: a URL or
    pipe (`pipe:...`), an absolute path, `..`, a path with `/` or `\\`, a hidden name, and a link
    that leads out of the directory or to something other than a regular file are refused with a
    UserError naming `where` (e.g. "data/manifest.json: field splits.train.shards[0].name").
    A missing file is returned as is: callers say what it was listed as."""
    from stars_scale.errors import UserError

    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: expected a file name, got {name!r}")
    shown = name if len(name) <= 80 else name[:77] + "..."
    if looks_like_url(name):
        raise UserError(f"{where}={shown!r} is a URL or pipe; only plain file names inside {directory} are read")
    if "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise UserError(f"{where}={shown!r} must be a plain file name inside {directory} "
                        "(no '/', '..', absolute or hidden paths)")
    base = Path(directory).resolve()
    path = Path(directory) / name
    if not os.path.lexists(path):
        return path
    real = path.resolve()
    if real.parent != base and base not in real.parents:
        raise UserError(f"{where}={shown!r} is a link to {real}, outside {directory}; refusing to read it")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return path  # a dangling link inside the directory: missing
    if not stat.S_ISREG(mode):
        raise UserError(f"{where}={shown!r} is not a regular file ({real})")
    return path if real == base / name else real


def open_member(path: Path) -> Any:
    """Open a file returned by `resolve_member` for reading, never following a link swapped in
    since and never blocking on a FIFO: a regular file or a UserError."""
    from stars_scale.errors import UserError

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_dict(v, key))
        else:
            out[key] = v
    return out


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def only_own_files(marker: str, patterns: tuple[str, ...], what: str) -> Callable[[Path], str | None]:
    """A `StagedDir(replaceable=...)` rule: a directory may be replaced only when it is `what`
    (holds `marker`) and holds nothing else than names matching `patterns` (what this project
    writes there), so `--overwrite` never deletes a file the project did not write."""
    import fnmatch

    def check(d: Path) -> str | None:
        foreign = sorted(p.name for p in d.iterdir() if not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            return f"holds {foreign[0]!r}{more}, which is not part of {what}"
        return None if (d / marker).is_file() else f"is not {what} (no {marker})"

    return check


class StagedDir:
    """An output directory built under a hidden sibling name and renamed into place when complete.

    Readers of `out` never see a half-written directory, and a failure (bad input, Ctrl-C) leaves
    `out` exactly as it was. A non-empty `out` is replaced only with `overwrite=True`, and then only
    if `replaceable(out)` returns None (else the reason it may not be replaced). Use as a context
    manager (publish on success, discard on error) or call `publish()` / `discard()` yourself.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, what: str = "it",
                 replaceable: Callable[[Path], str | None] | None = None) -> None:
        from stars_scale.errors import UserError

        self.out = Path(out)
        if self.out.exists():
            if not self.out.is_dir():
                raise UserError(f"{self.out}: exists and is not a directory")
            if any(self.out.iterdir()):
                if not overwrite:
                    raise UserError(f"{self.out}: exists and is not empty; pass --overwrite to replace {what}")
                reason = replaceable(self.out) if replaceable else None
                if reason:
                    raise UserError(f"{self.out}: {reason}; refusing to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        os.chmod(self.path, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared directory

    def publish(self) -> None:
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        _fsync_dir(self.out.parent)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StagedDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.discard()
