"""The loop pipeline's schedules measured: bubble against its formula, and per-stage memory
against the number of microbatches (flat under 1f1b, growing under gpipe).

    python bench/pipeline_schedule.py [--pp 2] [--micro 2 4 8 16] [--depth 4] [--schedule 1f1b gpipe]

Spawns `pp` gloo ranks on CPU (one thread each) and runs training steps of a looped model with
one core block per stage, no activation checkpointing.

Memory: the most bytes autograd holds for backward at once on a stage (the saved tensors of a
round: unique storages, parameters excluded, measured with a saved-tensors hook), the largest
over the stages. 1f1b runs rounds of min(P, M) microbatches, gpipe one round of all M.

Bubble: each stage's busy time is its step span minus the time it was blocked in a receive;
bubble = 1 - Σ busy / (P · span), span = first start to last end over the stages (perf_counter
is system-wide); median over the steps after the first. Formula (pipeline module docstring):
with r loop iterations, all carrying gradients and no estimator passes, a round of G microbatches
runs pass k of microbatch m on stage s at tick k·W + m + s with W = max(G, P), forward and
(mirrored) backward alike; a stage works r·G ticks of a span of (r-1)·W + G + P - 1 per round:

    bubble = 1 - r·G / ((r - 1)·W + G + P - 1),   = (P - 1) / (r·G + P - 1) when G >= P.

Encode/decode on the end stages and the communication are not in the formula; they show up as
the difference. Timing on a shared CPU is noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stars_scale.config import config_from_dict  # noqa: E402
from stars_scale.parallel.layout import round_size  # noqa: E402
from stars_scale.parallel.testing import spawn  # noqa: E402


def formula(pp: int, micro: int, depth: int, schedule: str) -> float:
    g = round_size(schedule, pp, micro)
    w = max(g, pp)
    span = (depth - 1) * w + g + pp - 1
    return 1.0 - depth * g / span


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
            dist.all_gather_object(gathered, (st.start, st.end, st.busy_s, st.peak_saved_bytes))
            span = max(g[1] for g in gathered) - min(g[0] for g in gathered)
            bubbles.append(1.0 - sum(g[2] for g in gathered) / (world * span))
            peaks.append([g[3] for g in gathered])
        rows_out.append({"pp": world, "schedule": schedule, "microbatches": micro, "depth": depth,
                         "peak_mib_per_stage": [b / 2**20 for b in peaks[-1]],
                         "measured": statistics.median(bubbles[1:] or bubbles),
                         "formula": formula(world, micro, depth, schedule)})
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--depth", type=int, nargs="+", default=[4])
    ap.add_argument("--schedule", nargs="+", default=["1f1b", "gpipe"], choices=["1f1b", "gpipe"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=16, help="rows per microbatch")
    args = ap.parse_args()
    settings = [(s, m, d) for s in args.schedule for m in args.micro for d in args.depth]
    with tempfile.TemporaryDirectory() as out:
        results = spawn(_worker, args.pp, settings, args.steps, args.hidden, args.rows, out)[0]
    print(f"{'schedule':>8} {'pp':>3} {'M':>3} {'depth':>5} {'peak MiB per stage':>20} {'bubble':>7} {'formula':>8}")
    for r in results:
        peaks = " ".join(f"{p:6.1f}" for p in r["peak_mib_per_stage"])
        print(f"{r['schedule']:>8} {r['pp']:>3} {r['microbatches']:>3} {r['depth']:>5} {peaks:>20} "
              f"{r['measured']:>7.3f} {r['formula']:>8.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
