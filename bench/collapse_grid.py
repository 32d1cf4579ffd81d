"""Grid search for a depth-collapse setting: where does fixed-depth training fall apart past its depth?

    python bench/collapse_grid.py --grid arch [--out runs/collapse_grid] [--seeds 0] [--json docs/collapse_grid.json]

Each grid point is a set of `--set` overrides on a base config (fixed training depth, no
penalty). Every run trains with `stars-train` and sweeps the test-time depth at the end; the
table reports, per run, the peak exact match, the depth where it peaks, the exact match at the
training depth and at 4x and 8x it, and their ratio to the peak ("retained"). A run whose
`depth_scaling.json` exists is reused, so the grid can be extended and rerun. Runs are trained
one after another (run two grids at once at most on a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A narrow, short base: 2-digit addition, d = 64, fixed depth 4, no penalty.
BASE = {
    "config": "configs/arith_tiny_fixed.yaml",
    "set": ["data.digits=2", "model.max_seq_len=12", "model.hidden=64", "model.mlp_hidden=128",
            "data.batch_size=128", "train.steps=800", "optim.warmup_steps=100", "depth.value=4",
            "train.ckpt_every=0", "train.eval_every=0", "eval.samples=1000", "data.test_size=1000",
            "eval.depths=[1,2,3,4,6,8,12,16,24,32,64]", "eval.rho_iters=10", "stars.estimate_every=50",
            "tracking.mlflow=false", "train.progress=false"],
}


def _arch_grid() -> dict[str, list[str]]:
    grid = {}
    for inj in ("none", "add"):
        for pc in (0, 1):
            for norm in ("pre", "sandwich", "post"):
                grid[f"inj={inj},pc={pc},norm={norm}"] = [
                    f"model.injection={inj}", f"model.n_prelude={pc}", f"model.n_coda={pc}",
                    f"model.norm_placement={norm}"]
    return grid


# Depth during training at the same mean (about 4): fixed, log-normal, log-normal + STARS penalty.
LOGNORMAL = ["depth.dist=lognormal", "depth.mu=1.2", "depth.sigma=0.5", "depth.min=1", "depth.max=16"]


def _depth_grid() -> dict[str, list[str]]:
    return {"fixed": [], "lognormal": LOGNORMAL,
            "stars": LOGNORMAL + ["stars.lam=0.1", "stars.warmup_steps=200"]}


GRIDS = {"arch": _arch_grid, "depth": _depth_grid}


def summarize(r: dict, train_depth: int) -> dict:
    acc, depths = r["accuracy"], r["depths"]
    peak = max(acc)
    at = {d: a for d, a in zip(depths, acc)}
    out = {"peak": peak, "peak_depth": depths[acc.index(peak)], "at_train": at.get(train_depth)}
    for k in (4, 8):
        v = at.get(k * train_depth)
        out[f"at_{k}x"] = v
        out[f"retained_{k}x"] = (v / peak) if (v is not None and peak > 0) else None
    out["final_loss"] = r.get("final_loss")
    return out


def run_one(name: str, overrides: list[str], out: Path, seed: int) -> dict:
    rdir = out / name.replace("=", "-").replace(",", "_") / f"seed{seed}"
    if not (rdir / "depth_scaling.json").is_file():
        cmd = [sys.executable, "-m", "stars_scale.cli.train", "--config", str(ROOT / BASE["config"]),
               "--out", str(rdir)]
        for o in BASE["set"] + overrides + [f"seed={seed}"]:
            cmd += ["--set", o]
        t0, c0 = time.time(), _child_cpu()
        subprocess.run(cmd, check=True)
        (rdir / "wall_time.json").write_text(json.dumps({"seconds": time.time() - t0, "cpu_seconds": _child_cpu() - c0}))
    r = json.loads((rdir / "depth_scaling.json").read_text())
    lines = (rdir / "metrics.jsonl").read_text().splitlines()
    r["final_loss"] = json.loads(lines[-1]).get("loss") if lines else None
    return r


def _child_cpu() -> float:
    import os

    t = os.times()
    return t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=sorted(GRIDS), default="arch")
    ap.add_argument("--only", default=None, help="';'-separated grid point names to run, in this order")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra overrides for every point")
    ap.add_argument("--out", default="runs/collapse_grid")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--json", default=None, help="write the table here (e.g. docs/collapse_grid.json)")
    args = ap.parse_args()
    grid = GRIDS[args.grid]()
    if args.only:
        unknown = [k for k in args.only.split(";") if k not in grid]
        if unknown:
            sys.exit(f"--only: no grid point {unknown[0]!r} in grid {args.grid!r} (have: {'; '.join(grid)})")
        grid = {k: grid[k] for k in args.only.split(";")}  # in the order given
    train_depth = int(next(o for o in args.extra[::-1] + BASE["set"][::-1] if o.startswith("depth.value="))
                      .split("=")[1])
    rows = {}
    for name, overrides in grid.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_one(name, overrides + args.extra, Path(args.out), seed)
            rows[f"{name} seed={seed}"] = {"overrides": overrides + args.extra, **summarize(r, train_depth),
                                           "accuracy": r["accuracy"], "rho": r["rho"], "delta_h": r["delta_h"],
                                           "depths": r["depths"]}
            s = rows[f"{name} seed={seed}"]
            print(f"| {name} | {seed} | {s['final_loss']:.3f} | {100 * s['peak']:.1f} @ {s['peak_depth']} | "
                  f"{100 * (s['at_train'] or 0):.1f} | {100 * (s['at_4x'] or 0):.1f} | "
                  f"{100 * (s['at_8x'] or 0):.1f} | {(s['retained_4x'] or 0):.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": BASE, "train_depth": train_depth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
