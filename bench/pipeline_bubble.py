"""Measured bubble of the loop-aware ring pipeline against its formula.

    python bench/pipeline_bubble.py [--pp 2] [--micro 1 2 4] [--depth 1 4 8] [--steps 3]

Spawns `pp` gloo ranks on CPU (one thread each), runs training steps of a looped model with one
core block per stage, and measures each stage's busy time (its step span minus the time it was
blocked in a receive). Bubble = 1 - Σ busy / (P · span), span = first start to last end over the
stages (perf_counter is system-wide). Median over the steps after the first.

Formula (pipeline module docstring): with r loop iterations, all carrying gradients and no
estimator passes, pass k of microbatch m runs on stage s at tick k·W + m + s with W = max(M, P),
forward and (mirrored) backward alike. A stage works r·M ticks of a span of (r-1)·W + M + P - 1:

    bubble = 1 - r·M / ((r - 1)·W + M + P - 1),   = (P - 1) / (r·M + P - 1) when M >= P,

so the loop's depth multiplies the microbatches. Encode/decode on the end stages and the
communication are not in the formula; they show up as the difference.
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
from stars_scale.parallel.testing import spawn  # noqa: E402


def formula(pp: int, micro: int, depth: int) -> float:
    w = max(micro, pp)
    span = (depth - 1) * w + micro + pp - 1
    return 1.0 - depth * micro / span


def make_cfg(pp: int, micro: int, depth: int, hidden: int, rows: int):
    return config_from_dict({
        "seed": 0,
        "model": {"vocab_size": 15, "hidden": hidden, "heads": 4, "max_seq_len": 32, "mlp_hidden": 4 * hidden,
                  "n_core": pp, "bias": False},
        "depth": {"dist": "fixed", "value": depth},
        "stars": {"lam": 0.0, "estimate_every": 0, "method": "fd"},
        "data": {"digits": 8, "batch_size": rows * micro, "test_size": 16},
        "train": {"steps": 100, "progress": False},
        "tracking": {"mlflow": False},
        "parallel": {"pp": pp, "microbatches": micro},
    })


def _worker(rank: int, world: int, settings: list, steps: int, hidden: int, rows: int, out: str):
    import torch.distributed as dist

    from stars_scale.train.trainer import Trainer

    rows_out = []
    for i, (micro, depth) in enumerate(settings):
        t = Trainer(make_cfg(world, micro, depth, hidden, rows), f"{out}/s{i}")
        bubbles = []
        for _ in range(steps):
            t.train_step()
            st = t.engine.pipeline.stats
            gathered = [None] * world
            dist.all_gather_object(gathered, (st.start, st.end, st.busy_s))
            span = max(g[1] for g in gathered) - min(g[0] for g in gathered)
            bubbles.append(1.0 - sum(g[2] for g in gathered) / (world * span))
        rows_out.append({"pp": world, "microbatches": micro, "depth": depth,
                         "measured": statistics.median(bubbles[1:] or bubbles),
                         "formula": formula(world, micro, depth)})
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--depth", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=16, help="rows per microbatch")
    args = ap.parse_args()
    settings = [(m, d) for m in args.micro for d in args.depth]
    with tempfile.TemporaryDirectory() as out:
        results = spawn(_worker, args.pp, settings, args.steps, args.hidden, args.rows, out)[0]
    print(f"{'pp':>3} {'M':>3} {'depth':>5} {'measured':>9} {'formula':>8}")
    for r in results:
        print(f"{r['pp']:>3} {r['microbatches']:>3} {r['depth']:>5} {r['measured']:>9.3f} {r['formula']:>8.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
