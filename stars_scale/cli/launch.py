"""stars-launch: start stars_scale training on a cluster.

    stars-launch slurm --config CFG --nodes N [--gpus-per-node G] [--partition P] [--time T]
                       [--account A] [--array KEY=V1,V2,...] [--set KEY=VALUE] [--out DIR]
                       [--dry-run]

Renders an sbatch script from launch/sbatch.template (resources, the parallel layout checked
against nodes x devices, the run directory), prints it with --dry-run, otherwise writes the
resolved config and the script under <out>/slurm/, submits it and prints the job id on stdout.
See docs/launch.md.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from stars_scale.config import load_config, parse_overrides, save_config
from stars_scale.errors import UserError, run_cli
from stars_scale.launch import parent_run, slurm
from stars_scale.launch.layout import check_layout
from stars_scale.launch.sweep import parse_sweep
from stars_scale.utils import atomic_write_json, atomic_write_text


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < (0 if name == "--gpus-per-node" else 1):
            raise argparse.ArgumentTypeError(f"must be >= {0 if name == '--gpus-per-node' else 1}, got {v}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError-style single line, exit 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="stars-launch", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="backend", required=True, metavar="{slurm}", parser_class=_Parser)
    s = sub.add_parser("slurm", help="render and submit an sbatch job (or a job array)",
                       description="Render and submit a stars_scale sbatch job; see docs/launch.md.")
    s.add_argument("--config", required=True, help="run config (YAML)")
    s.add_argument("--nodes", required=True, type=_positive("--nodes"), help="number of nodes")
    s.add_argument("--gpus-per-node", type=_positive("--gpus-per-node"), default=0,
                   help="GPUs per node, one process each (0: CPU job with gloo; default 0)")
    s.add_argument("--procs-per-node", type=_positive("--procs-per-node"), default=None,
                   help="CPU jobs only: processes per node (default 1)")
    s.add_argument("--mode", choices=slurm.MODES, default="torchrun",
                   help="torchrun: one torchrun per node with c10d rendezvous (default); "
                        "srun: one Slurm task per device, ranks from SLURM_PROCID")
    s.add_argument("--partition", help="Slurm partition(s); checked against sinfo when reachable")
    s.add_argument("--time", help="time limit in Slurm's format, e.g. 2-00:00:00")
    s.add_argument("--account", help="Slurm account")
    s.add_argument("--cpus-per-task", type=_positive("--cpus-per-task"), default=None,
                   help="CPUs per Slurm task (torchrun mode: per node)")
    s.add_argument("--shared", action="store_true",
                   help="GPU jobs: do not ask for whole nodes (--exclusive is the default)")
    s.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="sweep as a job array: task i gets --set KEY=<value i>; repeat for a "
                        "Cartesian product")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, baked into the job's resolved config")
    s.add_argument("--out", help="run directory (default runs/<run name>); array tasks use "
                                 "<out>/<i>_<overrides>")
    s.add_argument("--job-name", help="Slurm job name (default stars-<run name>)")
    s.add_argument("--signal-seconds", type=_positive("--signal-seconds"), default=300,
                   help="USR1 warning this many seconds before the time limit (default 300)")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch=--qos=high (repeatable)")
    s.add_argument("--resume", action="store_true", help="pass --resume from the first run on")
    s.add_argument("--python", default=sys.executable,
                   help="python interpreter on the compute nodes (default: this one)")
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    # Hidden: the module torchrun/srun runs (tests and cluster checks use stars_scale.launch.probe).
    s.add_argument("--module", default=slurm.DEFAULT_MODULE, help=argparse.SUPPRESS)
    return ap


def _run_name(cfg, config_path: Path) -> str:
    name = cfg.tracking.run_name or config_path.stem
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-") or "run"


def _slurm(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    cfg = load_config(config_path, args.set)
    set_keys = {k for k, _ in parse_overrides(args.set)}
    sweep = parse_sweep(args.array, set_keys)

    # Every task of the sweep must be a valid config with a layout that fits the allocation.
    task_cfgs = [cfg]
    for t in sweep:
        try:
            task_cfgs.append(load_config(config_path, args.set + list(t.overrides)))
        except UserError as e:
            raise UserError(f"--array task {t.index} ({' '.join(t.overrides)}): {e}") from None
    layout = None
    for i, c in enumerate(task_cfgs):
        where = "" if i == 0 else f"--array task {i - 1} ({' '.join(sweep[i - 1].overrides)})"
        lay = check_layout(c, args.nodes, args.gpus_per_node, args.procs_per_node, where)
        layout = layout or lay
    for w in layout.warnings():
        print(f"warning: {w}", file=sys.stderr)

    if args.partition:
        slurm.check_partition(args.partition)
    if args.account:
        slurm.check_name("--account", args.account)
    if args.time:
        limit = slurm.time_seconds(args.time)
        if limit is not None and limit <= args.signal_seconds:
            raise UserError(f"--time {args.time}: the job must run longer than the preemption "
                            f"warning (--signal-seconds {args.signal_seconds})")
    module = slurm.check_module(args.module)
    extra = [slurm.check_sbatch_arg(a) for a in args.sbatch]

    run_name = _run_name(cfg, config_path)
    job_name = slurm.check_name("--job-name", args.job_name or f"stars-{run_name}")
    cwd = slurm.check_path("working directory", Path.cwd())
    run_dir = slurm.check_path("--out", (cwd / (args.out or f"runs/{run_name}")).resolve())
    python = args.python
    if not Path(python).is_absolute():
        raise UserError(f"--python {python!r}: expected an absolute path (compute nodes run it)")

    uri = parent_run.tracking_uri(cfg)
    exports: dict[str, str] = {}
    if uri and not cfg.tracking.tracking_uri:
        exports["MLFLOW_TRACKING_URI"] = uri
    want_parent = bool(sweep) and uri is not None
    task_run_names = None
    if sweep and cfg.tracking.mlflow and not any(o.startswith("tracking.run_name=")
                                                 for o in sweep[0].overrides):
        task_run_names = [f"{run_name}-{t.name}" for t in sweep]
    if want_parent:
        exports[parent_run.PARENT_ENV] = slurm.PARENT_PLACEHOLDER

    job = slurm.SlurmJob(
        job_name=job_name, layout=layout, mode=args.mode, run_dir=run_dir,
        config_path=run_dir / "slurm" / "config.yaml", chdir=cwd, python=python, module=module,
        partition=args.partition, time=args.time, account=args.account,
        cpus_per_task=args.cpus_per_task, exclusive=layout.gpus_per_node > 0 and not args.shared,
        signal_seconds=args.signal_seconds, extra_sbatch=extra, sweep=sweep,
        task_run_names=task_run_names, exports=exports, resume=args.resume,
    )
    ldir = slurm.launch_dir()
    if args.dry_run:
        sys.stdout.write(slurm.render(job, ldir))
        print(f"# {layout.describe()}" + (f"; {len(sweep)} array tasks" if sweep else ""),
              file=sys.stderr)
        return 0

    job.log_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, job.config_path)
    if sweep:
        atomic_write_json(run_dir / "sweep.json", {
            "array": args.array,
            "tasks": [{"index": t.index, "overrides": list(t.overrides),
                       "run_dir": str(run_dir / t.name)} for t in sweep],
        })
    parent_id = None
    if want_parent:
        parent_id = parent_run.create_parent(uri, cfg, f"{run_name}-sweep", sweep, args.array)
        job.exports[parent_run.PARENT_ENV] = parent_id
    script = slurm.render(job, ldir)
    atomic_write_text(job.script_path, script)
    try:
        job_id = slurm.submit(job.script_path)
    except UserError as e:
        if parent_id:
            try:
                parent_run.finish_parent(uri, parent_id, None, error=str(e))
            except UserError:
                pass
        raise
    if parent_id:
        try:
            parent_run.finish_parent(uri, parent_id, job_id)
        except UserError as e:
            print(f"warning: {e}", file=sys.stderr)
    print(job_id)
    print(f"submitted job {job_id}: {layout.describe()}"
          + (f", {len(sweep)} array tasks" if sweep else "")
          + f"; run directory {run_dir}; logs in {job.log_dir}"
          + (f"; MLflow parent run {parent_id}" if parent_id else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _slurm(args))


if __name__ == "__main__":
    sys.exit(main())
