"""Train the three arithmetic configs and compare their test-time depth scaling.

    python bench/reproduce_arith.py [--out runs/reproduce] [--docs docs] [--set key=value ...]

Runs `stars-train` on configs/arith_tiny.yaml (STARS: log-normal depth + penalty),
arith_tiny_baseline.yaml (log-normal depth, lambda = 0) and arith_tiny_fixed.yaml (fixed depth,
lambda = 0) one after another, then writes one plot of accuracy, ||dh|| and rho against depth
(docs/arith_depth_scaling.png) and the table of numbers (docs/arith_results.json and a
markdown table on stdout).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "STARS (lognormal depth + penalty)": "arith_tiny",
    "lognormal depth, no penalty": "arith_tiny_baseline",
    "fixed depth, no penalty": "arith_tiny_fixed",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/reproduce")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    from stars_scale.eval.depth_scaling import load_depth_scaling, plot_depth_scaling
    from stars_scale.utils import atomic_write_json

    results, table = [], {}
    for label, name in RUNS.items():
        out = Path(args.out) / name
        if (out / "depth_scaling.json").is_file():
            print(f"{name}: reusing {out}", file=sys.stderr)
            wall = json.loads((out / "wall_time.json").read_text())["seconds"] if (out / "wall_time.json").is_file() else None
        else:
            cmd = [sys.executable, "-m", "stars_scale.cli.train", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                   "--out", str(out)] + [x for o in args.overrides for x in ("--set", o)]
            t0 = time.time()
            subprocess.run(cmd, check=True)
            wall = time.time() - t0
            atomic_write_json(out / "wall_time.json", {"seconds": wall})
        r = load_depth_scaling(out / "depth_scaling.json")
        results.append((label, r))
        table[label] = {"config": f"configs/{name}.yaml", "wall_seconds": wall, **r}
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    plot_depth_scaling(results, docs / "arith_depth_scaling.png", "3-digit addition: test-time depth scaling")
    atomic_write_json(docs / "arith_results.json", table)
    depths = results[0][1]["depths"]
    print("| run | wall | " + " | ".join(f"r={d}" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for label, r in results:
        wall = table[label]["wall_seconds"]
        wall_text = f"{wall:.0f} s" if wall is not None else "n/a"
        print(f"| {label} (accuracy %) | {wall_text} | " + " | ".join(f"{100 * a:.1f}" for a in r["accuracy"]) + " |")
        print(f"| {label} (rho) | | " + " | ".join(f"{x:.2f}" for x in r["rho"]) + " |")
        print(f"| {label} (dh) | | " + " | ".join(f"{x:.1e}" for x in r["delta_h"]) + " |")


if __name__ == "__main__":
    main()
