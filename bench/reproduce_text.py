"""Depth on real text: STARS, log-normal depth alone and fixed depth on the same tiny text LM, over seeds.

    python bench/reproduce_text.py [--seeds 0,1,2] [--data data/pystdlib] [--out runs/text] [--docs docs] [--set k=v ...]

Builds the corpus if `--data` has none (`stars-data corpus --out DATA`: Python's standard-library
sources, tokenizer, shards), then trains configs/text_tiny.yaml (log-normal depth + STARS
penalty), text_tiny_lognormal.yaml (log-normal depth, no penalty) and text_tiny_fixed.yaml
(fixed depth 4, no penalty), identical otherwise, once per seed, one after another on one torch
thread each (unless OMP_NUM_THREADS says otherwise; a finished run is reused). Writes into --docs:
- text_depth_scaling.png: validation loss, ||dh|| and rho against test-time depth 1..64, each
  config as its seed mean with a min-max band (`stars_scale.eval.compare`);
- text_results.json: per config and seed the sweep (loss, perplexity, ||dh||, rho), wall and CPU
  time and machine load of the run; per config the seed mean, its best depth, and the loss at
  the training depth, at 2x, 4x and 16x it.
A markdown table of validation loss per depth goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

# bench/ is this script's directory: one config x seed trained and timed, the reuse check, the figure
from reproduce_collapse import refuse_other_runs, train, write_results

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"STARS (log-normal depth + penalty)": "text_tiny", "log-normal depth, no penalty": "text_tiny_lognormal",
        "fixed depth 4, no penalty": "text_tiny_fixed"}
TRAIN_DEPTH = 4  # fixed: its depth; log-normal(1.2, 0.5): mean 3.8


def ensure_data(data: Path) -> None:
    if (data / "shards" / "manifest.json").is_file():
        print(f"data: reusing {data}", file=sys.stderr)
        return
    subprocess.run([sys.executable, "-m", "stars_scale.cli.data", "corpus", "--out", str(data)], check=True)


def mean_sweep(runs: list[dict]) -> dict:
    n = len(runs)
    loss = [sum(r["loss"][i] for r in runs) / n for i in range(len(runs[0]["depths"]))]
    return {"depths": runs[0]["depths"], "loss": loss, "perplexity": [math.exp(x) for x in loss]}


def at_depths(m: dict) -> dict:
    loss = dict(zip(m["depths"], m["loss"]))
    best = min(loss, key=loss.get)
    out = {"best_depth": best, "best_loss": loss[best]}
    for k in (1, 2, 4, 16):
        d = k * TRAIN_DEPTH
        out[f"loss_at_{k}x_train_depth"] = loss.get(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default="data/pystdlib")
    ap.add_argument("--out", default="runs/text")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = Path(args.data)
    overrides = [f"data.path={data / 'shards'}"] + args.overrides
    out = Path(args.out)
    from stars_scale.errors import UserError

    try:
        refuse_other_runs([(name, s) for s in seeds for name in RUNS.values()], out, overrides)
        ensure_data(data)
        runs: dict[str, list[dict]] = {name: [] for name in RUNS.values()}
        for s in seeds:  # seed by seed: a cut-short reproduction still has every config for the seeds done
            for name in RUNS.values():
                runs[name].append(train(name, s, out, overrides))
    except UserError as e:  # a bad --set or config: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    means = {name: mean_sweep(rs) for name, rs in runs.items()}
    table = {
        "seeds": seeds, "overrides": overrides, "train_depth": TRAIN_DEPTH,
        "corpus": {k: v for k, v in json.loads((data / "corpus.json").read_text()).items() if k != "files"},
        "configs": {name: {"label": label, "config": f"configs/{name}.yaml", "seed_mean": means[name],
                           "on_seed_mean": at_depths(means[name]),
                           "seeds": [{"seed": s, **at_depths(r),
                                      **{k: r[k] for k in ("depths", "loss", "perplexity", "rho", "delta_h",
                                                           "timing", "run_dir")}}
                                     for s, r in zip(seeds, runs[name])]}
                    for label, name in RUNS.items()},
    }
    write_results(runs, RUNS, Path(args.docs), "text", table,
                  f"Python stdlib text, seeds {args.seeds}: validation loss against test-time depth (mean, min-max)")
    depths = means["text_tiny"]["depths"]
    print("| config | seed | " + " | ".join(f"r={d}" for d in depths) + " | best r | CPU min |")
    print("|---|---|" + "---|" * (len(depths) + 2))
    for label, name in RUNS.items():
        for s, r in zip(seeds, runs[name]):
            t = r.get("timing") or {}
            cpu = f"{t['cpu_seconds'] / 60:.1f}" if "cpu_seconds" in t else "n/a"
            print(f"| {label} | {s} | " + " | ".join(f"{x:.3f}" for x in r["loss"]) +
                  f" | {at_depths(r)['best_depth']} | {cpu} |")
        m = means[name]
        print(f"| {label} | mean | " + " | ".join(f"{x:.3f}" for x in m["loss"]) +
              f" | {at_depths(m)['best_depth']} | |")


if __name__ == "__main__":
    main()
