"""Train the three collapse configs over several seeds: fixed-depth training's depth collapse, and
what log-normal depth and STARS do about it.

    python bench/reproduce_collapse.py [--family collapse] [--extra NAME,...] [--seeds 0,1,2] [--jobs 2]
                                       [--out runs/<family>] [--docs docs] [--set key=value ...]

Trains configs/<family>_fixed.yaml (fixed depth, no penalty), <family>_lognormal.yaml (log-normal
depth, no penalty) and <family>_stars.yaml (log-normal depth + STARS penalty), identical
otherwise, and each --extra config (configs/NAME.yaml: a stability option, checked like STARS),
once per seed (--jobs at a time, each on one torch thread unless OMP_NUM_THREADS says
otherwise; a finished run of the same resolved config is reused, one of another refused),
then writes into --docs:
- <family>_depth_scaling.png: exact match, ||dh|| and rho against test-time depth, the three
  configs as mean lines with min-max bands over the seeds (`stars_scale.eval.compare`);
- <family>_results.json: per config and seed the sweep, the wall and CPU time of the run, the
  machine load, and the issue's targets checked per seed and on the seed mean:
  fixed: exact match at 4x its training depth <= 50% of its own peak;
  STARS (and each extra): exact match at every swept depth from its training mean to 8x it >= 95%
  of its own peak, and its peak >= the fixed baseline's peak - 2 points.
Families: `collapse` (log-normal(1.2, 0.5) <= 16, mean 3.8; fixed 4) and `collapse_paper` (the STARS
paper's clip(round(LogNormal(2, 0.7)), 1, 100), mean 9.4; fixed 9).
A markdown table of the per-seed figures goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"fixed depth, no penalty": "fixed", "log-normal depth, no penalty": "lognormal",
        "STARS (log-normal depth + penalty)": "stars"}


def run_names(family: str, extra: list[str]) -> dict[str, str]:
    """label -> config name: the family's three configs, then the extras (labelled by their name)."""
    runs = {label: f"{family}_{suffix}" for label, suffix in BASE.items()}
    runs.update({name: name for name in extra})
    for name in runs.values():
        if not (ROOT / "configs" / f"{name}.yaml").is_file():
            print(f"configs/{name}.yaml: no such config (--family/--extra name configs/<name>.yaml)", file=sys.stderr)
            sys.exit(2)
    return runs


def train(name: str, seed: int, out: Path, overrides: list[str], quiet: bool = False, threads: int | None = None,
          rdir: Path | None = None) -> dict:
    """Train one config/seed (or reuse it); returns its sweep plus wall/CPU time and load.
    `threads`: torch threads (default: $OMP_NUM_THREADS, else 1); `rdir`: default out/name/seed<seed>."""
    rdir = rdir or out / name / f"seed{seed}"
    timing = rdir / "timing.json"
    if not (rdir / "depth_scaling.json").is_file():
        cmd = [sys.executable, "-m", "stars_scale.cli.train", "--config", str(ROOT / "configs" / f"{name}.yaml"),
               "--out", str(rdir), "--set", f"seed={seed}"] + [x for o in overrides for x in ("--set", o)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.environ.get("OMP_NUM_THREADS", "1"))}
        load0, t0 = os.getloadavg()[0], time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, also with --jobs > 1
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        rdir.joinpath("timing.json").write_text(json.dumps({
            "wall_seconds": time.time() - t0, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "user_seconds": usage.ru_utime,
            "load_avg_1min_start": load0, "load_avg_1min_end": os.getloadavg()[0],
            "torch_threads": env["OMP_NUM_THREADS"]}))
    r = json.loads((rdir / "depth_scaling.json").read_text())
    r["timing"] = json.loads(timing.read_text()) if timing.is_file() else None
    r["run_dir"] = str(rdir)
    return r


def refuse_other_runs(work: list[tuple[str, int]], out: Path, overrides: list[str]) -> None:
    """Before anything trains: exit 2 if a finished run in `out` has another config (never mix two settings)."""
    from stars_scale.config import load_config

    for name, seed in work:
        rdir = out / name / f"seed{seed}"
        want = load_config(ROOT / "configs" / f"{name}.yaml", [f"seed={seed}"] + overrides)
        if (rdir / "depth_scaling.json").is_file() and load_config(rdir / "config.yaml") != want:
            print(f"{rdir}: holds a run of another config than configs/{name}.yaml with these --set; "
                  "pass another --out (or remove that run)", file=sys.stderr)
            sys.exit(2)


def write_results(runs: dict[str, list[dict]], labels: dict[str, str], docs: Path, stem: str, table: dict,
                  title: str) -> None:
    """docs/<stem>_depth_scaling.png (per config, label -> name: the seed mean and min-max band of its
    sweeps) and docs/<stem>_results.json (`table`)."""
    from stars_scale.eval.compare import plot_groups, summarize_group
    from stars_scale.utils import atomic_write_json

    docs.mkdir(parents=True, exist_ok=True)
    for r in (r for rs in runs.values() for r in rs):
        r["source"] = r["run_dir"]
    plot_groups([(label, summarize_group(runs[name])) for label, name in labels.items()],
                docs / f"{stem}_depth_scaling.png", title)
    atomic_write_json(docs / f"{stem}_results.json", table)


def train_all(names: list[str], seeds: list[int], out: Path, overrides: list[str], jobs: int) -> dict[str, list[dict]]:
    """Every config x seed, `jobs` trainings at a time (the longest-running config first)."""
    from concurrent.futures import ThreadPoolExecutor

    work = [(name, s) for name in reversed(names) for s in seeds]
    refuse_other_runs(work, out, overrides)
    if jobs <= 1:
        done = {w: train(*w, out, overrides) for w in work}
    else:
        with ThreadPoolExecutor(jobs) as pool:
            futs = {w: pool.submit(train, *w, out, overrides, True) for w in work}
            done = {w: f.result() for w, f in futs.items()}
    return {name: [done[(name, s)] for s in seeds] for name in names}


def training_depth(name: str) -> int:
    """The config's training depth: the fixed value, or the log-normal's mean rounded."""
    from stars_scale.config import load_config
    from stars_scale.stars.depth import base_mean

    return int(round(base_mean(load_config(ROOT / "configs" / f"{name}.yaml").depth)))


def check(r: dict, depth: int) -> dict:
    """Peak, retention at 4x and over [depth, 8 depth] of one sweep (a run's or the seed mean's)."""
    acc = dict(zip(r["depths"], r["accuracy"]))
    peak = max(acc.values())
    window = [acc[d] for d in acc if depth <= d <= 8 * depth]
    return {"peak": peak, "peak_depth": max(acc, key=acc.get), "train_depth": depth,
            "at_4x": acc.get(4 * depth), "retained_4x": acc[4 * depth] / peak if 4 * depth in acc and peak else None,
            "worst_in_1x_8x": min(window), "retained_1x_8x": min(window) / peak if peak else None}


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"  # None: no peak (nothing learned) or depth not swept


def mean_sweep(runs: list[dict]) -> dict:
    return {"depths": runs[0]["depths"],
            "accuracy": [sum(r["accuracy"][i] for r in runs) / len(runs) for i in range(len(runs[0]["depths"]))]}


def targets(stats: dict, fixed: str, held: list[str]) -> dict:
    """The fixed config collapses; each of `held` (STARS and the extras) holds with the fixed peak."""
    out = {"fixed_collapses (at 4x <= 50% of peak)":
           stats[fixed]["retained_4x"] is not None and stats[fixed]["retained_4x"] <= 0.5}
    for name in held:
        out[f"{name}_holds (>= 95% of peak from mean to 8x)"] = (stats[name]["retained_1x_8x"] or 0.0) >= 0.95
        out[f"{name}_peak_ok (>= fixed peak - 2 points)"] = stats[name]["peak"] >= stats[fixed]["peak"] - 0.02
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="collapse", help="configs/<family>_{fixed,lognormal,stars}.yaml")
    ap.add_argument("--extra", default="", help="more configs to compare, comma-separated names in configs/")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None, help="default runs/<family>")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time (one torch thread each)")
    args = ap.parse_args()
    from stars_scale.errors import UserError

    seeds = [int(s) for s in args.seeds.split(",")]
    labels = run_names(args.family, [x for x in args.extra.split(",") if x])
    fixed, held = f"{args.family}_fixed", [n for n in labels.values() if n not in (f"{args.family}_fixed",
                                                                                  f"{args.family}_lognormal")]
    try:
        runs = train_all(list(labels.values()), seeds, Path(args.out or f"runs/{args.family}"), args.overrides,
                         args.jobs)
    except UserError as e:  # a bad --set or config: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    depth = {name: training_depth(name) for name in labels.values()}
    per_seed = {name: [check(r, depth[name]) for r in rs] for name, rs in runs.items()}
    on_mean = {name: check(mean_sweep(rs), depth[name]) for name, rs in runs.items()}
    table = {
        "seeds": seeds, "overrides": args.overrides,
        "targets_on_seed_mean": targets(on_mean, fixed, held),
        "targets_per_seed": [targets({n: per_seed[n][i] for n in runs}, fixed, held) for i in range(len(seeds))],
        "configs": {name: {"label": label, "config": f"configs/{name}.yaml", "on_seed_mean": on_mean[name],
                           "seeds": [{"seed": s, **c, **{k: r[k] for k in ("depths", "accuracy", "rho", "delta_h",
                                                                        "timing", "run_dir")}}
                                     for s, c, r in zip(seeds, per_seed[name], runs[name])]}
                    for label, name in labels.items()},
    }
    write_results(runs, labels, Path(args.docs), args.family, table,
                  f"depth collapse ({args.family}): 2-digit addition, seeds {args.seeds} (mean, min-max band)"
                  + (f"\n--set {' '.join(args.overrides)}" if args.overrides else ""))
    depths = runs[fixed][0]["depths"]
    print("| config | seed | " + " | ".join(f"r={d}" for d in depths) + " | peak | kept at 4x | worst kept, 1x-8x |")
    print("|---|---|" + "---|" * (len(depths) + 3))
    for label, name in labels.items():
        for s, c, r in zip(seeds, per_seed[name], runs[name]):
            print(f"| {label} | {s} | " + " | ".join(f"{100 * a:.1f}" for a in r["accuracy"]) +
                  f" | {100 * c['peak']:.1f} @ {c['peak_depth']} | {_ratio(c['retained_4x'])} | "
                  f"{_ratio(c['retained_1x_8x'])} |")
    print(json.dumps(table["targets_on_seed_mean"]))


if __name__ == "__main__":
    main()
