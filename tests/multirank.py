"""Multi-process test support: spawn gloo ranks on CPU (one thread each) and run a function.

`spawn(fn, world, *args)` starts `world` processes with the torchrun environment set, runs
`fn(rank, world, *args)` in each, and returns every rank's return value (or raises with the
failing rank's traceback). `fn` must be importable by the spawned ranks (a module-level function
of a test module or of this one). Used by the multi-rank tests and bench/pipeline_schedule.py,
bench/zero_memory.py (which put tests/ on sys.path).
"""
from __future__ import annotations

import copy
import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from stars_scale.config import RunConfig, config_from_dict

STEPS = 5
BASE = {
    "seed": 3,
    "model": {"vocab_size": 15, "hidden": 32, "heads": 2, "max_seq_len": 16, "mlp_hidden": 64, "n_core": 2,
              "bias": False, "injection": "concat-linear", "init_state": "random"},
    # depth 3..5 with gradients through the last 2 iterations: free iterations on every layout
    "depth": {"dist": "lognormal", "mu": 1.0, "sigma": 0.5, "max": 5, "backprop": 2},
    "stars": {"lam": 0.1, "method": "fd", "iters": 2, "warmup_steps": 1, "fd_eps": 0.5},
    "data": {"digits": 2, "batch_size": 8, "test_size": 32},
    "optim": {"lr": 0.003, "warmup_steps": 1, "grad_clip": 0.5},
    "train": {"steps": STEPS, "progress": False},
    "tracking": {"mlflow": False},
}


def make_cfg(parallel: dict, train: dict | None = None, sections: dict | None = None) -> RunConfig:
    """The tiny looped model of the multi-rank tests with `parallel`, `train` and other sections'
    overrides (e.g. {"model": {"n_core": 3}})."""
    d = copy.deepcopy(BASE)
    d["parallel"] = dict(parallel)
    for name, values in {"train": train or {}, **(sections or {})}.items():
        d[name].update(values)
    return config_from_dict(d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    import torch

    torch.set_num_threads(1)
    path = Path(outdir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with the traceback
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        try:
            import torch.distributed as dist

            from stars_scale.parallel import state

            if dist.is_initialized():
                if result[0] == "ok":
                    state.destroy_parallel()
        except Exception:
            pass
    path.write_bytes(pickle.dumps(result))
    if result[0] == "error":
        os._exit(1)  # peers blocked in a collective die with the process group


def spawn(fn, world: int, *args, timeout: float | None = None) -> list:
    with tempfile.TemporaryDirectory(prefix="stars-spawn-") as outdir:
        port = _free_port()
        ctx = mp.start_processes(_entry, args=(world, port, outdir, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
        failed = None
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as e:  # a rank exited non-zero
            failed = e
        results, errors = [], []
        for r in range(world):
            p = Path(outdir) / f"rank{r}.pkl"
            if p.is_file():
                status, value = pickle.loads(p.read_bytes())
                (results if status == "ok" else errors).append(value)
            else:
                errors.append(f"rank {r}: no result")
        if errors and (failed is not None or len(results) < world):
            real = [e for e in errors if "no result" not in e]
            raise RuntimeError("\n".join(real or errors))
        return results


def fail_saves_of(monkeypatch, checkpoint_name: str) -> None:
    """Make `dcp.save` raise ENOSPC for one checkpoint (tests of failed saves)."""
    from stars_scale.checkpoint import dcp

    real = dcp.save

    def save(state, path, group=None):
        if checkpoint_name in str(path):
            raise OSError(28, "No space left on device")
        real(state, path, group)

    monkeypatch.setattr(dcp, "save", save)
