"""Does looping longer pay? The main job (variable-binding chains) over seeds and threads, easy-to-hard
generalisation over difficulty x depth, and adaptive exit on mixed difficulty.

    python bench/reproduce_depth.py [--parts main,e2h,exit] [--seeds 0,1,2] [--threads 1,2] [--jobs 2]
                                    [--out runs/depth] [--docs docs] [--set key=value ...]

main: trains configs/chains_tiny.yaml (the main job) once per seed x torch threads (--jobs at a
      time; a finished run is reused) and checks the issue's targets per run from its own
      end-of-training sweep: exact match at r=1 <= 50%, best >= 99%, r=64 >= 97% of the best,
      wall <= 8 min (wall includes the sweep; on a shared machine it is inflated: the user CPU
      time is recorded next to it). Plot: docs/chains_depth_scaling.png.
e2h:  trains configs/chains_e2h.yaml (the main job's task and model, trained on 1..n lookups at the
      mean depth that just suffices for n) and configs/chains_e2h_fixed.yaml (fixed depth, no penalty, otherwise
      the same), seeds as given, threads = the first of --threads, then `stars-eval depth
      --difficulty 1..2n` on each: accuracy per difficulty x depth, the first depth
      reaching 90% per difficulty, and the issue's targets (that depth grows with difficulty;
      on n+1..1.5n the best depth's accuracy >= 2x the accuracy at the training mean depth; >= 80%
      at n+1). Heatmaps: docs/chains_difficulty_{stars,fixed}.png (seed means).
exit: `stars-eval depth --exit contraction,delta,kl,confidence --difficulty LO..n` on the first main-job model:
      a test set mixed evenly over the main job's training difficulties (its scored test set holds
      the hard ones only); each rule against the smallest fixed depth within 0.5 points of the
      best and against the sweep's oracle (each problem at its first right depth), overall and per
      difficulty. Plot: docs/test_time_chains.png.
Everything goes to docs/depth_results.json; markdown tables to stdout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_collapse import train  # noqa: E402  (one trainer driver for the benches: timing, reuse)

ROOT = Path(__file__).resolve().parents[1]
MAIN = "chains_tiny"
E2H, E2H_FIXED = "chains_e2h", "chains_e2h_fixed"
E2H_DEPTHS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64]
EXIT_RULES = "contraction,delta,kl,confidence"
EXIT_TOLS = ("contraction=0.1,contraction=0.03,contraction=0.01,delta=0.1,delta=0.01,kl=1e-2,kl=1e-3,"
             "confidence=0.05,confidence=0.01,confidence=1e-3")


def run_dir(out: Path, name: str, seed: int, threads: int) -> Path:
    return out / name / f"seed{seed}_t{threads}"


def main_targets(r: dict) -> dict:
    acc = dict(zip(r["depths"], r["accuracy"]))
    best = max(acc.values())
    t = r.get("timing") or {}
    return {"r1": acc[1], "best": best, "best_depth": max(acc, key=acc.get), "r64": acc.get(64),
            "wall_seconds": t.get("wall_seconds"), "user_seconds": t.get("user_seconds"),
            "ok_r1_le_50": acc[1] <= 0.5, "ok_rises_with_depth": best > acc[1], "ok_best_ge_99": best >= 0.99,
            "ok_r64_ge_97pct_best": acc.get(64, 0.0) >= 0.97 * best,
            "ok_wall_le_8min": t.get("wall_seconds") is not None and t["wall_seconds"] <= 480}


def eval_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "stars_scale.cli.eval", "depth", *args], check=True,
                   stdout=subprocess.DEVNULL)


def difficulty_sweep(rdir: Path, lo: int, hi: int, samples: int) -> dict:
    out = rdir / "e2h"
    if not (out / "difficulty_depth.json").is_file():
        eval_cli("--checkpoint", str(rdir), "--depths", ",".join(map(str, E2H_DEPTHS)), "--difficulty", f"{lo}..{hi}",
                 "--samples", str(samples), "--out", str(out))
    return json.loads((out / "difficulty_depth.json").read_text())


def e2h_targets(s: dict, n: int, train_depth: int) -> dict:
    """The issue's easy-to-hard checks on one difficulty x depth summary (a run's or the seed mean)."""
    acc, depths = s["accuracy"], s["depths"]
    firsts = [s["first_depth"][str(k)] for k in s["difficulties"]]
    reached = [f for f in firsts if f is not None]
    grows = reached == sorted(reached) and len(set(reached)) > 1
    band = [k for k in s["difficulties"] if n < k <= 1.5 * n]
    ratio = {str(k): max(acc[str(k)]) / max(acc[str(k)][depths.index(train_depth)], 1e-9) for k in band}
    return {"first_depth": s["first_depth"], "first_depth_grows": grows,
            "best_over_train_depth_on_n+1..1.5n": ratio,
            "ok_best_ge_2x_train_depth": all(v >= 2 for v in ratio.values()),
            "acc_best_at_n+1": max(acc[str(n + 1)]), "ok_n+1_ge_80": max(acc[str(n + 1)]) >= 0.8}


def mean_summary(ss: list[dict]) -> dict:
    from stars_scale.eval.difficulty import first_depths

    keys = list(ss[0]["accuracy"])
    acc = {g: [sum(s["accuracy"][g][i] for s in ss) / len(ss) for i in range(len(ss[0]["depths"]))] for g in keys}
    out = {**ss[0], "accuracy": acc, "first_depth": first_depths(
        {"depths": ss[0]["depths"], "accuracy_by_group": acc}, ss[0]["threshold"])}
    out["best_accuracy"] = {g: max(a) for g, a in acc.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="main,e2h,exit")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", default="1,2", help="torch threads per main-job run (each seed at each)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time")
    ap.add_argument("--samples", type=int, default=1200, help="e2h test problems (spread over the difficulties)")
    ap.add_argument("--exit-samples", type=int, default=1000, help="exit: test problems (mixed difficulties)")
    ap.add_argument("--out", default="runs/depth")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    from concurrent.futures import ThreadPoolExecutor

    from stars_scale.config import load_config
    from stars_scale.eval.compare import plot_groups, summarize_group
    from stars_scale.eval.difficulty import markdown_table, plot_heatmap
    from stars_scale.stars.depth import base_mean
    from stars_scale.utils import atomic_write_json

    parts = set(args.parts.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    results_path = docs / "depth_results.json"
    table = json.loads(results_path.read_text()) if results_path.is_file() else {}
    table["overrides"] = args.overrides
    main_cfg = load_config(ROOT / "configs" / f"{MAIN}.yaml", args.overrides)
    (lo, n), (test_lo, test_hi) = main_cfg.data.difficulty, main_cfg.data.test_difficulty
    e2h_lo, e2h_n = load_config(ROOT / "configs" / f"{E2H}.yaml", args.overrides).data.difficulty

    work = []
    if parts & {"main", "exit"}:
        work += [(MAIN, s, t) for s in seeds for t in (threads if "main" in parts else threads[:1])]
    if "e2h" in parts:
        work += [(name, s, threads[0]) for name in (E2H, E2H_FIXED) for s in seeds]
    work = list(dict.fromkeys(work))

    def one(w):
        name, s, t = w
        return train(name, s, out, args.overrides, quiet=args.jobs > 1, threads=t, rdir=run_dir(out, name, s, t))

    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        done = dict(zip(work, pool.map(one, work)))

    if "main" in parts:
        runs = [(s, t, done[(MAIN, s, t)]) for s in seeds for t in threads]
        rows = [{"seed": s, "threads": t, **main_targets(r), "depths": r["depths"], "accuracy": r["accuracy"],
                 "rho": r["rho"], "delta_h": r["delta_h"], "timing": r["timing"]} for s, t, r in runs]
        table["main"] = {"config": f"configs/{MAIN}.yaml", "runs": rows}
        for r in (r for _, _, r in runs):
            r["source"] = r["run_dir"]
        plot_groups([(f"seeds {args.seeds} x threads {args.threads}", summarize_group([r for _, _, r in runs]))],
                    docs / "chains_depth_scaling.png",
                    f"main job: variable-binding chains, trained on {lo}..{n} lookups, test set {test_lo}..{test_hi}")
        depths = runs[0][2]["depths"]
        print("| seed | threads | " + " | ".join(f"r={d}" for d in depths) + " | wall | user CPU |")
        print("|---|---|" + "---|" * (len(depths) + 2))
        for row in rows:
            print(f"| {row['seed']} | {row['threads']} | " + " | ".join(f"{100 * a:.1f}" for a in row["accuracy"]) +
                  f" | {row['wall_seconds']:.0f} s | {row['user_seconds']:.0f} s |")

    if "e2h" in parts:
        t0 = threads[0]
        e2h = {}
        for label, name in (("stars", E2H), ("fixed", E2H_FIXED)):
            c = load_config(ROOT / "configs" / f"{name}.yaml", args.overrides)
            train_depth = int(round(base_mean(c.depth)))
            if train_depth not in E2H_DEPTHS:
                raise SystemExit(f"training depth {train_depth} is not in the e2h sweep {E2H_DEPTHS}")
            ss = [difficulty_sweep(run_dir(out, name, s, t0), 1, 2 * e2h_n, args.samples) for s in seeds]
            mean = mean_summary(ss)
            e2h[label] = {"config": f"configs/{name}.yaml", "train_depth": train_depth,
                          "per_seed": [{"seed": s, **e2h_targets(x, e2h_n, train_depth), "accuracy": x["accuracy"]}
                                       for s, x in zip(seeds, ss)],
                          "seed_mean": {**e2h_targets(mean, e2h_n, train_depth), "accuracy": mean["accuracy"]}}
            plot_heatmap(mean, docs / f"chains_difficulty_{label}.png",
                         f"{name}: trained on difficulty {e2h_lo}..{e2h_n}, mean of seeds {args.seeds}", (e2h_lo, e2h_n))
            print(f"\n{label} ({name}, seed mean, training depth {train_depth}):\n" + markdown_table(mean))
        table["e2h"] = e2h

    if "exit" in parts:
        rdir = run_dir(out, MAIN, seeds[0], threads[0])
        ev = rdir / "exit"
        from stars_scale.eval.exit_accuracy import parse_tols, summarise

        want = sorted(parse_tols(EXIT_TOLS, EXIT_RULES.split(",")))
        done = ev / "depth_scaling.json"
        if done.is_file() and sorted((x["rule"], x["tol"]) for x in
                                     json.loads(done.read_text()).get("exit_rules", [])) != want:
            ev.rename(ev.with_name(f"exit.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))  # other rules: kept, redone
        if not done.is_file():
            eval_cli("--checkpoint", str(rdir), "--depths", "1,2,3,4,5,6,8,16,32,64",
                     "--samples", str(args.exit_samples), "--difficulty", f"{lo}..{n}",
                     "--exit", EXIT_RULES, "--tol", EXIT_TOLS, "--max-depth", "64", "--out", str(ev))

        r = json.loads((ev / "depth_scaling.json").read_text())
        best = max(r["accuracy"])
        r_ref = min(d for d, a in zip(r["depths"], r["accuracy"]) if a >= best - 0.005)
        rows = [{**row, "within_0.5pt": row["accuracy"] >= best - 0.005,
                 "loop_fraction_of_ref": row["mean_loops"] / r_ref} for row in r["exit_rules"]]
        table["exit"] = {"run": str(rdir), "best_fixed": best, "smallest_fixed_within_0.5pt": r_ref,
                         "fixed": dict(zip(r["depths"], r["accuracy"])), "rules": rows,
                         "oracle": r["oracle_exit"], "summary": summarise(r, r["exit_rules"])}
        shutil.copyfile(ev / "test_time.png", docs / "test_time_chains.png")
        print("\n" + (ev / "test_time.md").read_text())
        o = r["oracle_exit"]
        print(f"best fixed {100 * best:.1f}%; smallest fixed depth within 0.5 points: r={r_ref}; oracle "
              f"{100 * o['accuracy']:.1f}% at {o['mean_loops']:.2f} loops/token = {100 * o['mean_loops'] / r_ref:.0f}% of r={r_ref}")
        for row in rows:
            print(f"{row['rule']} tol={row['tol']:g}: {100 * row['accuracy']:.1f}%, "
                  f"{row['mean_loops']:.2f} loops/token = {100 * row['loop_fraction_of_ref']:.0f}% of r={r_ref}; "
                  f"within 0.5 points: {row['within_0.5pt']}")
    atomic_write_json(results_path, table)


if __name__ == "__main__":
    main()
