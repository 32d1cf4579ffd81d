"""Per-rank bytes of parameters and optimizer state under zero 0 / 1 / 2 at dp2 (CPU, gloo, fp32).

    python bench/zero_memory.py [--hidden 256] [--n-core 4]

Counts tensors, not process RSS: the rank's parameters, and its optimizer state after one step
(zero 0: AdamW's exp_avg and exp_avg_sq of every parameter; ZeRO: DeepSpeed's fp32 master
partition plus AdamW's moments of that partition).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the multi-rank harness

from stars_scale.config import config_from_dict  # noqa: E402
from multirank import spawn  # noqa: E402


def make_cfg(zero: int, hidden: int, n_core: int):
    return config_from_dict({
        "seed": 0,
        "model": {"vocab_size": 15, "hidden": hidden, "heads": 4, "max_seq_len": 32, "mlp_hidden": 4 * hidden,
                  "n_core": n_core, "bias": False},
        "depth": {"dist": "fixed", "value": 2},
        "stars": {"lam": 0.0, "estimate_every": 0},
        "data": {"digits": 3, "batch_size": 8, "test_size": 16},
        "train": {"steps": 10, "progress": False},
        "tracking": {"mlflow": False},
        "parallel": {"zero": zero},
    })


def _worker(rank: int, world: int, hidden: int, n_core: int, out: str):
    from stars_scale.train.trainer import Trainer

    rows = []
    for zero in (0, 1, 2):
        t = Trainer(make_cfg(zero, hidden, n_core), f"{out}/z{zero}")
        t.train_step()
        b = t.engine.opt.state_bytes()
        rows.append({"zero": zero, "rank": rank, **b, "total": b["params"] + b["optimizer"],
                     "n_params": sum(p.numel() for p in t.model.parameters())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--n-core", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        per_rank = spawn(_worker, 2, args.hidden, args.n_core, out)
    mib = 2**20
    print(f"{'zero':>4} {'rank':>4} {'params MiB':>10} {'optim MiB':>9} {'total MiB':>9}")
    for rows in zip(*per_rank):
        for r in rows:
            print(f"{r['zero']:>4} {r['rank']:>4} {r['params'] / mib:>10.2f} {r['optimizer'] / mib:>9.2f} "
                  f"{r['total'] / mib:>9.2f}")
    print(json.dumps(per_rank))


if __name__ == "__main__":
    main()
