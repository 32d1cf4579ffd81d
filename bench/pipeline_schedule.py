"""The loop pipeline's schedules measured: per-stage memory against the number of microbatches
(flat under 1f1b, growing under gpipe), and the bubble, counted from the task lists and timed.

    python bench/pipeline_schedule.py [--pp 2] [--micro 2 4 8 16] [--depth 4] [--schedule 1f1b gpipe]
    python bench/pipeline_schedule.py --ticks    # the schedules only (no processes): P = 2..4

`--ticks` prints, from the task lists alone, for P = 2, 3, 4, r = 1, 2, 4, 8 gradient-carrying
iterations and M = P, 2P, 4P: each order's idle ticks on the busiest stage and span, the most
gradient-carrying passes a stage holds (stage 0, the fullest) and the most microbatches in flight.

Spawns `pp` gloo ranks on CPU (one thread each) and runs training steps of a looped model with
one core block per stage, no activation checkpointing, every iteration carrying gradients.

Memory: the most bytes autograd holds for backward at once on a stage (unique storages,
parameters excluded, measured with a saved-tensors hook: `pipeline.HeldBytes`), per stage.

Schedule bubble (`ticks`): the schedule's task lists replayed in unit ticks (every forward and
backward of a pass one tick, `schedule.simulated_ticks`): the stages' idle ticks over P · span.
gpipe's is (P - 1) / (r·M + P - 1); 1f1b's is the same (one fill, one drain per step).

Measured bubble (`timed`): each stage's busy time is its step span minus the time it was blocked
in a receive; bubble = 1 - Σ busy / (P · span), span = first start to last end over the stages
(perf_counter is system-wide); median over the steps after the first. Encode/decode on the end
stages and the communication are not in the tick count; they show up as the difference. Timing
on a shared CPU is noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the multi-rank harness

from stars_scale.config import config_from_dict  # noqa: E402
from multirank import spawn  # noqa: E402


def formula(pp: int, micro: int, depth: int) -> float:
    """gpipe's bubble with r = depth gradient-carrying iterations and unit-tick passes."""
    return (pp - 1) / (depth * micro + pp - 1)


def make_cfg(pp: int, micro: int, depth: int, hidden: int, rows: int, schedule: str):
    return config_from_dict({
        "seed": 0,
        "model": {"vocab_size": 15, "hidden": hidden, "heads": 4, "max_seq_len": 32, "mlp_hidden": 4 * hidden,
                  "n_core": pp, "bias": False},
        "depth": {"dist": "fixed", "value": depth},
        "stars": {"lam": 0.0, "estimate_every": 0, "method": "fd"},
        "data": {"digits": 8, "batch_size": rows * micro, "test_size": 16},
        "train": {"steps": 100, "progress": False},
        "tracking": {"mlflow": False},
        "parallel": {"pp": pp, "microbatches": micro, "schedule": schedule},
    })


def _worker(rank: int, world: int, settings: list, steps: int, hidden: int, rows: int, out: str):
    import torch.distributed as dist

    from stars_scale.train.trainer import Trainer

    rows_out = []
    for i, (schedule, micro, depth) in enumerate(settings):
        t = Trainer(make_cfg(world, micro, depth, hidden, rows, schedule), f"{out}/s{i}")
        t.engine.measure = True
        bubbles, peaks = [], []
        for _ in range(steps):
            t.train_step()
            st = t.engine.pipeline.stats
            gathered = [None] * world
            dist.all_gather_object(gathered, (st.start, st.end, st.busy_s, st.peak_saved_bytes, st.ticks[1],
                                              st.ticks[0], st.in_flight))
            span = max(g[1] for g in gathered) - min(g[0] for g in gathered)
            bubbles.append(1.0 - sum(g[2] for g in gathered) / (world * span))
            peaks.append([g[3] for g in gathered])
        rows_out.append({"pp": world, "schedule": schedule, "microbatches": micro, "depth": depth,
                         "peak_mib_per_stage": [b / 2**20 for b in peaks[-1]],
                         "in_flight": max(g[6] for g in gathered),
                         "ticks": sum(g[4] for g in gathered) / (world * gathered[0][5]),
                         "timed": statistics.median(bubbles[1:] or bubbles),
                         "formula_gpipe": formula(world, micro, depth)})
    return rows_out


def ticks() -> None:
    from stars_scale.parallel import schedule

    print(f"{'P':>2} {'r':>2} {'M':>3} | {'idle/span gpipe':>15} {'1f1b':>9} | {'held gpipe':>10} {'1f1b':>5} "
          f"| {'in flight gpipe':>15} {'1f1b':>4}")
    for P in (2, 3, 4):
        for r in (1, 2, 4, 8):
            for M in (P, 2 * P, 4 * P):
                grads = (True,) * r
                cols = {}
                for order in ("gpipe", "1f1b"):
                    sched = schedule.build(P, M, grads, grads, order)
                    span, idle = schedule.simulated_ticks(P, sched, grads, grads)
                    cols[order] = (f"{max(idle)}/{span}", max(schedule.peak_held(P, M, grads, grads, order)),
                                   max(schedule.max_in_flight(tasks, r, r) for tasks in sched))
                g, f = cols["gpipe"], cols["1f1b"]
                print(f"{P:>2} {r:>2} {M:>3} | {g[0]:>15} {f[0]:>9} | {g[1]:>10} {f[1]:>5} | {g[2]:>15} {f[2]:>4}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", action="store_true", help="the schedules' idle ticks and held passes only")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--depth", type=int, nargs="+", default=[4])
    ap.add_argument("--schedule", nargs="+", default=["1f1b", "gpipe"], choices=["1f1b", "gpipe"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=16, help="rows per microbatch")
    args = ap.parse_args()
    if args.ticks:
        return ticks()
    settings = [(s, m, d) for s in args.schedule for m in args.micro for d in args.depth]
    with tempfile.TemporaryDirectory() as out:
        results = spawn(_worker, args.pp, settings, args.steps, args.hidden, args.rows, out)[0]
    print(f"{'schedule':>8} {'pp':>3} {'M':>3} {'depth':>5} {'in flight':>9} {'peak MiB per stage':>20} "
          f"{'ticks':>6} {'gpipe formula':>13} {'timed':>6}")
    for r in results:
        peaks = " ".join(f"{p:6.1f}" for p in r["peak_mib_per_stage"])
        print(f"{r['schedule']:>8} {r['pp']:>3} {r['microbatches']:>3} {r['depth']:>5} {r['in_flight']:>9} {peaks:>20} "
              f"{r['ticks']:>6.3f} {r['formula_gpipe']:>13.3f} {r['timed']:>6.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
