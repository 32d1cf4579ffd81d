"""The run directory's checkpoints: atomic, verifiable, resumable, never executing code on load.

Layout of a run directory:

    DIR/config.yaml                      resolved config of the run (first line: RUN_CONFIG_HEADER;
                                         a config.yaml the project did not write is never replaced)
    DIR/metrics.jsonl                    one JSON object per logged step
    DIR/checkpoints/step_00000020/       one complete checkpoint
        dcp/                             model and optimizer: every rank's pieces (checkpoint/dcp.py)
        ranks/rank_00000.json            per rank: RNG, data position
        trainer_state.json  config.yaml
        manifest.json                    written last: every file's size and sha256
    (versions before DCP wrote model.pt + rank_*.pt instead of dcp/ and ranks/; they still load
    on the layout that wrote them)
    DIR/checkpoints/latest               name of the newest complete checkpoint

Safety. Tensor files are read by `checkpoint.files` (`torch.load(weights_only=True)` with an
explicit allow-list), DCP's metadata by `checkpoint.dcp`'s restricted unpickler; trainer and rank
state is JSON.

Integrity. A checkpoint is written into a hidden temporary directory; `manifest.json` is written
last, then the directory is renamed into place, so a crash never leaves a half checkpoint under a
real name. On load every file is checked against the manifest (size, sha256): a flipped bit is
reported in one line, and a resume from a run directory falls back to the newest checkpoint that
verifies (and says so). A file in the checkpoint that the manifest does not list (a distcp, a
`tokenizer.json` or `model.safetensors` dropped in) is refused the same way, and so is a step
directory whose manifest was deleted. `verify_checkpoint` is the one check of every reader:
`--resume`, `stars-eval`, `stars-generate`, `stars-convert export`, `init.from`. Trainer and rank
state fields are checked for type and range before use (`load_state`, `read_rank_state`).
Checkpoints written before manifests existed ("legacy": no manifest.json) still load, through
the same safe loader, with a one-line note that they are unverified.

Ownership. `--out` may be a new or an existing directory; a `config.yaml` there that the project
did not write (a user's own config passed as `--config DIR/config.yaml --out DIR`) is refused
rather than replaced, and `--resume` on a directory of another run (another seed, task, model,
schedule or learning rate: `RUN_IDENTITY`) is refused unless `--allow-config-change` is given.

Crash safety. Old checkpoints beyond `keep_last` are renamed aside (`.step_*.deleting`) and then
deleted, so a kill mid-prune never leaves a half checkpoint that looks complete; stale temporaries
of a dead run are removed before the next save. A save that fails (disk full, I/O error) removes
its temporary directory and raises `CheckpointSaveError`; `SaveRetry` turns that into a warning
and a retry at the next interval, and stops after `train.max_failed_saves` failures in a row.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from stars_scale.checkpoint.files import CheckpointError
from stars_scale.errors import UserError
from stars_scale.utils import _fsync_dir, atomic_write_text, sha256_file

STATE_FILE = "trainer_state.json"
RANKS_DIR = "ranks"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
MAX_COUNT = 2**62  # steps and tokens beyond any real run (config's bound on counts): int64-safe
_STEP_RE = re.compile(r"^step_(\d{8})$")
_STALE_RE = re.compile(r"^\.(step_\d{8}\.(tmp|old|deleting)|latest\..*\.tmp)$")


RUN_CONFIG = "config.yaml"
RUN_CONFIG_HEADER = "# stars_scale: the resolved config of the run in this directory (stars-train rewrites it)\n"
# the sections of a config that define a run: a resume that changes one of them continues another
# run. Not part of it (a user may change them on resume): train (steps, intervals, dtype, ...),
# eval, tracking, parallel (resume on another layout), init (read only at a fresh start).
RUN_IDENTITY = ("seed", "model", "depth", "stars", "data", "optim")


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, I/O error); the previous ones are intact."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(_STEP_RE.match(Path(path).name).group(1))


def _say(msg: str) -> None:
    """Progress notes from checkpoint handling: once per job (rank 0), on stderr."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr)


# --------------------------------------------------------------------------- listing


def _is_checkpoint(p: Path) -> bool:
    """Whether the step directory `p` holds a checkpoint, sound or damaged. A save renames it into
    place only when it is complete, so one with a manifest or weights (`dcp/`, or the `model.pt`
    of older formats) is one: if its manifest was deleted it is listed, and then refused in one
    line by `verify_checkpoint`, never skipped silently and later overwritten. A state file without
    weights is what a kill left while an older version deleted a checkpoint in place: not one."""
    if (p / MANIFEST_FILE).is_file() or (p / "dcp").is_dir():
        return True
    return (p / STATE_FILE).is_file() and (p / "model.pt").is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories (not yet verified), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir() and _is_checkpoint(p)]
    return sorted(out, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir` that verifies; newer ones that fail are named on stderr."""
    failed: list[str] = []
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            _say(f"warning: {e}; trying an older checkpoint")
            failed.append(p.name)
            continue
        if failed:
            _say(f"resuming from {p} (the newer {', '.join(failed)} failed verification)")
        return p
    if failed:
        raise CheckpointError(f"{checkpoint_root(run_dir)}: no checkpoint verifies ({', '.join(failed)} failed)")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (verified), or a run dir (-> its newest verified checkpoint). Clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found (no such file or directory)")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint directory (expected a directory with {STATE_FILE})")
    if (p / STATE_FILE).is_file() or (p / MANIFEST_FILE).is_file():
        verify_checkpoint(p)
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: no complete checkpoint here (expected {STATE_FILE} or checkpoints/step_*/)")
    return latest


# --------------------------------------------------------------------------- the run directory


def identity_changes(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for every leaf of the RUN_IDENTITY sections where two configs differ."""
    out: list[str] = []

    def walk(a: Any, b: Any, at: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                walk(a.get(k), b.get(k), f"{at}.{k}" if at else str(k))
        elif a != b:
            out.append(f"{at}: {a!r} -> {b!r}")

    for key in RUN_IDENTITY:
        walk(saved.get(key), now.get(key), key)
    return out


def open_run_dir(run_dir: Path) -> None:
    """Create `run_dir` (or accept an existing directory) and check that files can be written in it."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: --out is not a directory (expected a new or an existing run directory)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{run_dir}: --out is not writable ({e.strerror or type(e).__name__})") from None


def write_run_config(run_dir: Path, body: str) -> None:
    """Write the run's resolved config `body` as DIR/config.yaml, never over a file the project did
    not write: one with RUN_CONFIG_HEADER, one of the same text, or (written before the header
    existed) one in a directory that holds this project's checkpoints may be replaced."""
    path = Path(run_dir) / RUN_CONFIG
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file():
            raise UserError(f"{path}: not a plain file (stars-train writes the run's resolved config there); "
                            "remove it or choose another --out")
        try:
            old = path.read_text(errors="replace")
        except OSError as e:
            raise UserError(f"{path}: unreadable ({e.strerror}); stars-train writes the run's config there") from None
        if not (old.startswith(RUN_CONFIG_HEADER) or old == body or list_checkpoints(run_dir)):
            raise UserError(f"{path}: a file stars-train did not write (your own config?) would be replaced by the "
                            "run's resolved config; choose another --out or move the file")
    try:
        atomic_write_text(path, RUN_CONFIG_HEADER + body)
    except OSError as e:
        raise UserError(f"{path}: cannot write the run's config ({e.strerror or type(e).__name__})") from None


# --------------------------------------------------------------------------- manifest


def _files_under(d: Path) -> Iterable[Path]:
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            yield p


def write_manifest(d: Path, step: int) -> None:
    files = {p.relative_to(d).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _files_under(d)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    atomic_write_text(d / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    """The manifest of `ckpt` (checked for shape), or None for a legacy checkpoint without one."""
    path = Path(ckpt) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    files = m.get("files") if isinstance(m, dict) else None
    if (not isinstance(files, dict) or m.get("format") != MANIFEST_FORMAT or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values())):
        raise CheckpointError(f"{path}: not a stars_scale manifest of format {MANIFEST_FORMAT}")
    return m


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file of `ckpt` against its manifest (size, sha256) and the trainer state's shape."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    if manifest is None:
        if (ckpt / STATE_FILE).is_file() and "checkpoint_format" in load_state(ckpt):
            raise CheckpointError(f"{ckpt / MANIFEST_FILE}: missing (the checkpoint was written with one)")
        if not (ckpt / "model.pt").is_file():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MANIFEST_FILE} and no model.pt)")
        _say(f"note: {ckpt} has no {MANIFEST_FILE} (written before checkpoints carried one): loading it unverified")
    else:
        for rel, meta in manifest["files"].items():
            f = ckpt / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                raise CheckpointError(f"{ckpt / MANIFEST_FILE}: lists a path outside the checkpoint: {rel!r}")
            try:
                size = f.stat().st_size
            except OSError:
                raise CheckpointError(f"{f}: missing from the checkpoint (listed in its manifest)") from None
            if size != meta["size"]:
                raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta['size']} (truncated or replaced)")
            if sha256_file(f) != meta["sha256"]:
                raise CheckpointError(f"{f}: sha256 differs from the manifest (the file is corrupt)")
        unlisted = [p.relative_to(ckpt).as_posix() for p in _files_under(ckpt)
                    if p.relative_to(ckpt).as_posix() not in manifest["files"]]
        if unlisted:
            more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
            raise CheckpointError(f"{ckpt / unlisted[0]}: not listed in the checkpoint's {MANIFEST_FILE}{more}; "
                                  "a file added after the save is refused (remove it)")
        if STATE_FILE not in manifest["files"]:
            raise CheckpointError(f"{ckpt / MANIFEST_FILE}: does not list {STATE_FILE}")
        if manifest.get("step") != load_state(ckpt)["step"]:
            raise CheckpointError(f"{ckpt / MANIFEST_FILE}: step {manifest.get('step')!r} is not the step of "
                                  f"its {STATE_FILE}")
    load_state(ckpt)


# --------------------------------------------------------------------------- saving


def clean_stale(run_dir: Path) -> list[str]:
    """Remove temporaries a killed run left in `checkpoints/` (never a real `step_*` directory)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if _STALE_RE.match(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _all_ok(ok: bool, group=None) -> bool:
    """True on every rank iff every rank's `ok` is True (over `group`, default the world)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


def _save_failure(root: Path, step: int, err: BaseException) -> CheckpointSaveError:
    prev = list_checkpoints(root.parent)
    need = f"the last checkpoint took {_dir_bytes(prev[-1])} bytes" if prev else "no earlier checkpoint to size it by"
    try:
        free = f"{shutil.disk_usage(root).free} bytes are free there"
    except OSError:
        free = "free space unknown"
    reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return CheckpointSaveError(f"{root / step_dir_name(step)}: checkpoint not written ({reason}); {need}, {free}")


def prune(run_dir: Path, keep_last: int, up_to_step: int) -> None:
    """Keep the newest `keep_last` checkpoints at or before `up_to_step`; rename the rest aside, then delete.

    Checkpoints after `up_to_step` (a newer one that failed verification) are left alone: the run
    replaces them when it gets there.
    """
    root = checkpoint_root(run_dir)
    older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= up_to_step]
    for old in older[:-keep_last]:
        aside = root / f".{old.name}.deleting"
        os.replace(old, aside)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(root)


def save_checkpoint(run_dir: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any],
                    keep_last: int, is_writer: bool = True, barrier: Callable[[], None] | None = None,
                    group=None) -> Path:
    """Write checkpoint `step`: `write_files(tmp_dir)` puts the tensors, then the state and the manifest.

    Under parallelism every rank calls this with its own `write_files` (rank-suffixed files); the
    writer rank creates the temporary dir, all ranks write, and the writer adds the state and the
    manifest and renames it after the barrier. If any rank fails to write, every rank raises
    `CheckpointSaveError`, the temporary dir is removed and the previous checkpoints are untouched.
    `group`: the process group of the collectives (an asynchronous save has its own).
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    err: BaseException | None = None
    if is_writer:
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_stale(run_dir)
            tmp.mkdir()
        except OSError as e:
            err = e
    if barrier:
        barrier()
    if _all_ok(err is None, group):
        try:
            write_files(tmp)
        except (OSError, RuntimeError) as e:  # ENOSPC surfaces from torch.save as a RuntimeError
            err = e
        if barrier:
            barrier()
        if _all_ok(err is None, group) and is_writer:
            try:
                state = {**state, "checkpoint_format": MANIFEST_FORMAT}  # a lost manifest is then noticed
                atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
                write_manifest(tmp, step)
                _fsync_dir(tmp)
            except OSError as e:
                err = e
    ok = _all_ok(err is None, group)
    if not ok:
        exc = _save_failure(root, step, err) if err is not None else None
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if barrier:
            barrier()
        raise exc or CheckpointSaveError(f"{final}: checkpoint not written (another rank failed to write its part)")
    if is_writer:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            old = root / f".{step_dir_name(step)}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        try:
            atomic_write_text(root / "latest", final.name + "\n")
        except OSError:
            pass  # `latest` is a convenience for people; resume lists the directories
        prune(run_dir, keep_last, step)
    if barrier:
        barrier()
    return final


class SaveRetry:
    """A failed periodic save warns and lets training go on; `max_failed` failures in a row stop it."""

    def __init__(self, max_failed: int):
        self.max_failed = max_failed
        self.failures = 0

    def __call__(self, save: Callable[[], Path], final: bool = False) -> Path | None:
        try:
            path = save()
        except CheckpointSaveError as e:
            self.failures += 1
            if final:
                raise CheckpointSaveError(f"{e}; the final checkpoint was not saved (free space and run again with "
                                          "--resume: it continues from the last checkpoint)") from None
            if self.failures >= self.max_failed:
                raise CheckpointSaveError(f"{e}; {self.failures} checkpoint saves in a row failed "
                                          f"(train.max_failed_saves={self.max_failed}), stopping") from None
            _say(f"warning: {e}; training continues and the next checkpoint interval retries "
                 f"({self.failures} of train.max_failed_saves={self.max_failed})")
            return None
        self.failures = 0
        return path


class AsyncSave:
    """At most one checkpoint save in flight on a background thread. `start(fn)` runs `fn` (which
    writes the manifest last, after every file); `wait()` joins it and raises what it raised."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, fn: Callable[[], Any]) -> None:
        assert self.thread is None, "wait() for the save in flight first"

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self.error = e

        self.thread = threading.Thread(target=run, name="stars-checkpoint", daemon=False)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is None:
            return
        self.thread.join()
        self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error


# --------------------------------------------------------------------------- loading


def load_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state (JSON) of `ckpt`, with its required fields checked."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key, default in (("step", None), ("tokens_seen", 0)):
        v = state.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
            raise CheckpointError(f"{path}: {key!r} must be an integer in [0, {MAX_COUNT}], got {_short(v)}")
    for key in ("scheduler", "data", "layout"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: {key!r} must be a JSON object, got {type(state[key]).__name__}")
    return state


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- per-rank state


def rank_state_text(rank: int, dp_rank: int, layout: dict, rng: torch.Tensor, data: Any) -> str:
    """ranks/rank_N.json of one rank: its RNG state (base64) and data position, and the layout."""
    return json.dumps({"rank": rank, "dp_rank": dp_rank, "layout": layout,
                       "rng": base64.b64encode(rng.numpy().tobytes()).decode(), "data": data}) + "\n"


def write_rank_state(ckpt: Path, rank: int, text: str) -> None:
    (ckpt / RANKS_DIR).mkdir(exist_ok=True)
    atomic_write_text(ckpt / RANKS_DIR / f"rank_{rank:05d}.json", text)


def read_rank_state(ckpt: Path, rank: int, dp_rank: int) -> dict:
    """{"rng", "data"} for `rank` of the loading layout: from the saved rank of the same
    data-parallel rank (itself if it was saved), else rank 0's."""
    saved = {}
    for f in sorted((ckpt / RANKS_DIR).glob("rank_*.json")):
        try:
            d = json.loads(f.read_text())
            saved[int(d["rank"])] = d
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{f}: unreadable rank state ({type(e).__name__}: {e})") from None
    same = [d for d in saved.values() if d.get("dp_rank") == dp_rank]
    pick = saved.get(rank) if saved.get(rank) in same else (same[0] if same else saved.get(0))
    if pick is None:
        raise UserError(f"{ckpt / RANKS_DIR}: no rank_00000.json")
    where = f"{ckpt / RANKS_DIR}: rank {pick.get('rank')}"
    try:
        rng = torch.frombuffer(bytearray(base64.b64decode(pick["rng"], validate=True)), dtype=torch.uint8)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: bad 'rng' ({e})") from None
    want = torch.get_rng_state().numel()
    if rng.numel() != want:
        raise UserError(f"{where}: 'rng' holds {rng.numel()} bytes, the generator's state is {want}")
    if not isinstance(pick.get("data"), dict):
        raise UserError(f"{where}: 'data' must be a JSON object (the data position), got "
                        f"{type(pick.get('data')).__name__}")
    return {"rng": rng, "data": pick.get("data")}


# --------------------------------------------------------------------------- the run's metrics log


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after `step` (they are logged again) and a torn last line of a killed run."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class MetricsLog:
    """Appends one JSON line per logged step to the run's metrics.jsonl (on the reporting rank). A
    write that fails (disk full, I/O error) is cut back to the last whole line, warned about once
    in one line, and training goes on (its checkpoints have their own handling: SaveRetry); when writing works
    again, one line says how many records are missing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.missed = 0

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        size = self.path.stat().st_size if self.path.is_file() else 0
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:
            try:
                os.truncate(self.path, size)  # never leave half a line for the next one to join
            except OSError:
                pass
            if not self.missed:
                print(f"warning: {self.path}: cannot append ({e.strerror or type(e).__name__}); training continues, "
                      "metric lines are missing until it can be written (MLflow, if on, still gets them)",
                      file=sys.stderr)
            self.missed += 1
            return
        if self.missed:
            print(f"note: {self.path}: writing again; {self.missed} records are missing", file=sys.stderr)
            self.missed = 0


def set_aside_stale_metrics(path: Path) -> None:
    """A fresh start in a directory whose earlier run died before its first checkpoint: keep that
    run's metrics under another name instead of appending to them."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        aside = path.with_name(f"{path.stem}.before-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        os.replace(path, aside)
        _say(f"note: {path} of an earlier run that never checkpointed was moved to {aside.name}")
