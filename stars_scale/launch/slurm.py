"""Render the sbatch script of a stars_scale job from ``launch/sbatch.template``; talk to Slurm.

The rendered script starts ``launch/stars-srun.sh`` through srun (one task per node in torchrun
mode, one per device in srun mode); see docs/launch.md for the environment it sets.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from stars_scale.errors import UserError
from stars_scale.launch.layout import Layout
from stars_scale.launch.sweep import SweepTask

MODES = ("torchrun", "srun")
DEFAULT_MODULE = "stars_scale.cli.train"
WRAPPER = "stars-srun.sh"
TEMPLATE = "sbatch.template"
PARENT_PLACEHOLDER = "(created at submission)"

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_PARTITIONS = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
_UNSAFE_PATH = re.compile(r"[\s'\"\\$`]")


def launch_dir() -> Path:
    """The folder holding sbatch.template and stars-srun.sh (STARS_LAUNCH_DIR overrides)."""
    env = os.environ.get("STARS_LAUNCH_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "launch"
    for name in (TEMPLATE, WRAPPER):
        if not (d / name).is_file():
            raise UserError(f"{d / name}: launch file not found (run from a stars_scale checkout, "
                            "or set STARS_LAUNCH_DIR to its launch/ folder)")
    return d.resolve()


# --------------------------------------------------------------------------- argument checks


def check_name(flag: str, value: str) -> str:
    if not _NAME.match(value):
        raise UserError(f"{flag} {value!r}: expected letters, digits and _ . + - only")
    return value


def check_partition_syntax(value: str) -> str:
    if not _PARTITIONS.match(value):
        raise UserError(f"--partition {value!r}: expected a partition name (or a comma-separated "
                        "list) of letters, digits and _ . -")
    return value


def time_seconds(value: str) -> int | None:
    """Seconds of a Slurm --time value; None for UNLIMITED/INFINITE. UserError when malformed."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if not m:
        raise UserError(f"--time {value!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                        "D-HH:MM:SS (Slurm's formats)")
    d, h, mi, s, m1, m2, m3 = (int(g) if g else 0 for g in m.groups())
    if m.group(1) is not None:  # D-H[:M[:S]]
        return ((d * 24 + h) * 60 + mi) * 60 + s
    if m.group(7) is not None:  # H:M:S
        return (m1 * 60 + m2) * 60 + m3
    return m1 * 60 + m2  # M or M:S


def check_path(flag: str, path: Path) -> Path:
    if _UNSAFE_PATH.search(str(path)):
        raise UserError(f"{flag} {str(path)!r}: the path must not contain whitespace, quotes, "
                        "backslashes, $ or ` (it goes into #SBATCH lines)")
    return path


def check_module(value: str) -> str:
    if not _MODULE.match(value):
        raise UserError(f"--module {value!r}: expected a dotted Python module name")
    return value


# One sbatch option as it goes on an #SBATCH line: --long-name[=value] or -X[value], the value
# from a conservative character set (node lists, times, sizes, emails, paths; no spaces, quotes,
# ';', '$', backticks or '#').
_SBATCH_VALUE = r"[A-Za-z0-9_.,:@%/+=\[\]*-]+"
_SBATCH_OPT = re.compile(rf"^(--[A-Za-z][A-Za-z0-9-]*(={_SBATCH_VALUE})?|-[A-Za-z]({_SBATCH_VALUE})?)$")


def check_sbatch_arg(value: str) -> str:
    if not _SBATCH_OPT.match(value):
        raise UserError(f"--sbatch {value[:80]!r}: expected one sbatch option such as --qos=high "
                        "(--name=value or -Xvalue; letters, digits and _.,:@%/+=[]*- only, no spaces)")
    return value


# --------------------------------------------------------------------------- cluster queries


# Where Slurm clients find slurm.conf when SLURM_CONF is unset (packaged, source builds,
# configless caches of sackd/slurmd).
_CONF_PATHS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf",
               "/run/slurm/conf/slurm.conf", "/var/spool/slurmd/conf-cache/slurm.conf")


def slurm_configured() -> bool:
    """Whether a Slurm client here has a config to read (sinfo retries for 60 s without one)."""
    conf = os.environ.get("SLURM_CONF")
    if conf:
        return Path(conf).is_file()
    return any(Path(p).is_file() for p in _CONF_PATHS)


def cluster_partitions(timeout: float = 20.0) -> list[str] | None:
    """Partition names from sinfo, or None when no Slurm cluster is reachable from here."""
    if shutil.which("sinfo") is None or not slurm_configured():
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def check_partition(value: str) -> str:
    """Syntax always; membership when sinfo reaches a cluster."""
    check_partition_syntax(value)
    known = cluster_partitions()
    if known is not None:
        for part in value.split(","):
            if part not in known:
                raise UserError(f"--partition {part!r}: no such partition on this cluster "
                                f"(sinfo lists: {', '.join(known) or 'none'})")
    return value


def submit(script: Path, timeout: float = 60.0) -> str:
    """sbatch the script; return the job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch: not found on PATH (is this a Slurm login node? Use --dry-run "
                        "to only print the script)")
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch {script}: no answer from Slurm within {timeout:.0f} s") from None
    if out.returncode != 0:
        msg = " ".join((out.stderr or out.stdout).split()) or f"exit status {out.returncode}"
        raise UserError(f"sbatch {script}: {msg}")
    first = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.match(r"^(\d+)(?:;\S+)?$", first)
    if not m:
        raise UserError(f"sbatch {script}: unexpected answer {out.stdout.strip()!r}")
    return m.group(1)


# --------------------------------------------------------------------------- rendering


@dataclass
class SlurmJob:
    job_name: str
    layout: Layout
    mode: str
    run_dir: Path  # absolute; array tasks use run_dir/<task.name>
    config_path: Path  # the resolved config the job reads (written at submission)
    chdir: Path
    python: str
    module: str = DEFAULT_MODULE
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    exclusive: bool = False
    signal_seconds: int = 300
    extra_sbatch: list[str] = field(default_factory=list)
    sweep: list[SweepTask] = field(default_factory=list)
    task_run_names: list[str] | None = None  # per array task: tracking.run_name override
    exports: dict[str, str] = field(default_factory=dict)  # extra environment for the job
    resume: bool = False

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.log_dir / "job.sbatch"


def _directives(job: SlurmJob) -> list[str]:
    lay = job.layout
    tasks_per_node = 1 if job.mode == "torchrun" else lay.procs_per_node
    out = [f"--job-name={job.job_name}", f"--nodes={lay.nodes}", f"--ntasks-per-node={tasks_per_node}"]
    if lay.gpus_per_node:
        out.append(f"--gpus-per-node={lay.gpus_per_node}")
    if job.cpus_per_task:
        out.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.exclusive:
        out.append("--exclusive")
    if job.partition:
        out.append(f"--partition={job.partition}")
    if job.account:
        out.append(f"--account={job.account}")
    if job.time:
        out.append(f"--time={job.time}")
    if job.sweep:
        out.append(f"--array=0-{len(job.sweep) - 1}")
    pattern = "%x-%A_%a.out" if job.sweep else "%x-%j.out"
    out += [
        f"--output={job.log_dir}/{pattern}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{job.signal_seconds}",
        f"--chdir={job.chdir}",
    ]
    out += job.extra_sbatch
    return ["#SBATCH " + d for d in out]


def _exports(job: SlurmJob, wrapper: Path) -> list[str]:
    lay = job.layout
    env = {
        "STARS_RUN_DIR": str(job.run_dir),
        "STARS_CONFIG": str(job.config_path),
        "STARS_PYTHON": job.python,
        "STARS_MODULE": job.module,
        "STARS_WRAPPER": str(wrapper),
        "STARS_LAUNCH_MODE": job.mode,
    }
    if job.mode == "torchrun":
        env["STARS_NPROC_PER_NODE"] = str(lay.procs_per_node)
    if job.resume:
        env["STARS_RESUME"] = "1"
    env.update(job.exports)
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def _sweep_block(job: SlurmJob) -> str:
    if not job.sweep:
        return ""
    lines = [
        "# Sweep: array task i runs with the overrides of case i (also in $STARS_RUN_DIR/sweep.json)",
        "# in its own run directory $STARS_RUN_DIR/<i>_<overrides>.",
        'case "${SLURM_ARRAY_TASK_ID:-}" in',
    ]
    for t in job.sweep:
        args = []
        for o in t.overrides:
            args += ["--set", shlex.quote(o)]
        if job.task_run_names:
            args += ["--set", shlex.quote(f"tracking.run_name={job.task_run_names[t.index]}")]
        lines.append(f"    {t.index})")
        lines.append(f"        SWEEP_ARGS=({' '.join(args)})")
        lines.append(f"        STARS_SWEEP_OVERRIDES={shlex.quote(' '.join(t.overrides))}")
        lines.append(f"        STARS_TASK_DIR={shlex.quote(t.name)} ;;")
    lines += [
        '    *) echo "stars: array task ${SLURM_ARRAY_TASK_ID:-(none)} is not in the sweep" >&2; exit 2 ;;',
        "esac",
        'export STARS_SWEEP_INDEX="$SLURM_ARRAY_TASK_ID" STARS_SWEEP_OVERRIDES',
        'export STARS_RUN_DIR="$STARS_RUN_DIR/$STARS_TASK_DIR"',
    ]
    return "\n".join(lines)


def _srun_command(job: SlurmJob) -> str:
    per_node = 1 if job.mode == "torchrun" else job.layout.procs_per_node
    return ('srun --nodes="$SLURM_JOB_NUM_NODES" '
            f"--ntasks-per-node={per_node} --kill-on-bad-exit=1 "
            '${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"}')


def render(job: SlurmJob, directory: Path | None = None) -> str:
    """The sbatch script text for `job` (no side effects)."""
    d = directory or launch_dir()
    if job.mode not in MODES:
        raise UserError(f"--mode {job.mode!r}: expected one of {', '.join(MODES)}")
    text = (d / TEMPLATE).read_text()
    parts = {
        "directives": "\n".join(_directives(job)),
        "signal_seconds": str(job.signal_seconds),
        "exports": "\n".join(_exports(job, d / WRAPPER)),
        "train_args": '--config "$STARS_CONFIG" --out "$STARS_RUN_DIR"',
        "sweep": _sweep_block(job),
        "srun": _srun_command(job),
    }
    if not parts["sweep"]:
        text = text.replace("{{sweep}}\n", "")
    for key, value in parts.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise UserError(f"{d / TEMPLATE}: unknown placeholders {', '.join(sorted(set(left)))}")
    return text if text.endswith("\n") else text + "\n"
