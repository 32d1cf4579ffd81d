"""Does the loop state still carry its input? The spread of the states of different problems.

    python bench/state_spread.py RUN [RUN ...] [--depths 1,2,4,8,16,32,64] [--samples 200]

Runs each model's loop on the same `--samples` held-out problems of its task and prints, per
test-time depth r, spread(r) = ‖S_r − mean_b S_r‖ / ‖S_r‖ over the batch of loop states S_r
(problems × tokens × hidden). With no input injection the state is the only carrier of the
problem, so spread → 0 means every problem has reached the same state: the loop has forgotten its
input and can only answer one thing — the shape of the depth collapse in docs/arith_results.md
(a fixed-depth model past its depth, or a core map that the penalty made a global contraction).
A loop that is stable *and* right keeps a constant, non-zero spread.
"""
from __future__ import annotations

import argparse
import sys

import torch


def spread_by_depth(traj: torch.Tensor, depths: list[int]) -> dict[int, float]:
    """spread(r) for each r in `depths`, from trajectories (problems, iterations, state), as
    `stars_scale.eval.trajectories.state_trajectories` records them (index r = after r iterations)."""
    out: dict[int, float] = {}
    for r in depths:
        s = traj[:, r]
        out[r] = float((s - s.mean(0, keepdim=True)).norm() / s.norm().clamp_min(1e-30))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories, checkpoints or converted models")
    ap.add_argument("--depths", default="1,2,4,8,16,32,64")
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args(argv)

    from stars_scale.errors import run_cli
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    from stars_scale.data.sources import build_eval_batch
    from stars_scale.errors import UserError
    from stars_scale.eval.trajectories import state_trajectories
    from stars_scale.generate.load import load_model

    try:
        depths = sorted({int(x) for x in args.depths.split(",")})
    except ValueError:
        raise UserError(f"--depths: expected comma-separated integers, got {args.depths!r}") from None
    if depths[0] < 1 or args.samples < 2:
        raise UserError("--depths must be >= 1 and --samples >= 2 (a spread needs two problems)")
    print(f"spread of the loop state over {args.samples} problems, ||S - mean S|| / ||S||, against depth")
    print("| run | " + " | ".join(f"r={r}" for r in depths) + " |")
    print("|---|" + "---|" * len(depths))
    for run in args.runs:
        cfg, model, _ = load_model(run)  # eval mode
        batch, _ = build_eval_batch(cfg, args.samples)
        traj, _ = state_trajectories(model, batch["input_ids"], None, depths[-1])
        spread = spread_by_depth(traj, depths)
        print(f"| {run} | " + " | ".join(f"{spread[r]:.2e}" for r in depths) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
