"""Rendezvous probe: the trainer's command line and signal contract, without the training.

    stars-launch slurm --config CFG --nodes 2 --module stars_scale.launch.probe ...

Each rank initialises torch.distributed (env://, gloo unless STARS_PROBE_BACKEND says nccl),
checks an all_reduce, and writes ``<out>/probe/attempt<k>-rank<r>.json`` (k = the job's restart
count) with its rank, world size, host, Slurm node and the launch environment it saw. Use it to
check a cluster's launch path before a long run.

With ``STARS_PROBE_HOLD=<seconds>`` it then behaves like a preemptible trainer: it waits that
long for USR1 or TERM (the ranks agree through an all_reduce every 0.2 s); on a signal rank 0
writes ``<out>/probe/checkpoint.json`` and every rank exits 0. A run started with ``--resume``
that finds that "checkpoint" records it and does not wait again.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from stars_scale.config import load_config
from stars_scale.errors import run_cli
from stars_scale.utils import atomic_write_json, flatten_dict

_signals: list[str] = []


def _on_signal(signum, _frame) -> None:
    _signals.append(signal.Signals(signum).name)


def _env(*names: str) -> dict[str, str | None]:
    return {n: os.environ.get(n) for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stars_scale.launch.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", nargs="?", const=True, default=None)  # as stars-train: --resume [auto|CKPT]
    args = ap.parse_args(argv)

    def body() -> int:
        signal.signal(signal.SIGUSR1, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        cfg = load_config(args.config, args.set)

        import torch
        import torch.distributed as dist

        backend = os.environ.get("STARS_PROBE_BACKEND", "gloo")
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else None
        if device is not None:
            torch.cuda.set_device(device)
        x = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(x)
        expected = world * (world + 1) / 2

        out = Path(args.out) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        marker = out / "checkpoint.json"
        found = json.loads(marker.read_text()) if (args.resume and marker.is_file()) else None
        record = {
            "rank": rank,
            "world_size": world,
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            "hostname": socket.gethostname(),
            "node": os.environ.get("SLURMD_NODENAME"),
            "attempt": attempt,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "resume": args.resume,
            "checkpoint_found": found,
            "allreduce": x.item(),
            "allreduce_ok": x.item() == expected,
            "config": flatten_dict(cfg.to_dict()),
            "env": _env("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                        "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "STARS_LAUNCH_MODE", "STARS_RUN_DIR",
                        "STARS_MLFLOW_PARENT_RUN_ID", "STARS_SWEEP_INDEX", "STARS_SWEEP_OVERRIDES",
                        "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS"),
        }
        atomic_write_json(out / f"attempt{attempt}-rank{rank}.json", record)

        hold = float(os.environ.get("STARS_PROBE_HOLD") or 0)
        stopped = False
        if hold > 0 and found is None:
            deadline = time.monotonic() + hold
            while time.monotonic() < deadline:
                flag = torch.tensor([1.0 if _signals else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() > 0:
                    stopped = True
                    break
                time.sleep(0.2)
        if stopped and rank == 0:
            atomic_write_json(marker, {"attempt": attempt, "world_size": world,
                                       "signals": list(_signals)})
        dist.barrier()
        record["signals"] = list(_signals)
        record["stopped_on_signal"] = stopped
        atomic_write_json(out / f"attempt{attempt}-rank{rank}.json", record)
        dist.destroy_process_group()
        return 0 if record["allreduce_ok"] else 1

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
