"""Tokens/s of a training step with and without the STARS regulariser, per estimator.

    python bench/step.py [--depth 8] [--hidden 128] [--batch 64] [--digits 5] [--steps 15]

Fixed depth, 5-digit addition (20 tokens per sequence), batch 64: the scale of the issue's
reference figure (the paper's code costs 1.20x a plain step at depth 8 on this machine).
Settings are interleaved over several rounds so drift in machine load hits them alike; the
ratio column is each setting's median step time over the plain step's, in this one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from stars_scale.config import config_from_dict
from stars_scale.data.sources import build_task
from stars_scale.model.looped import LoopedLM
from stars_scale.stars.depth import Depth
from stars_scale.train.optim import build_optimizer
from stars_scale.train.step import forward_backward

SETTINGS = {
    "plain": {"lam": 0.0, "estimate_every": 0},
    "vjp 1 iter (faithful)": {"lam": 0.1, "method": "vjp", "iters": 1},
    "fd 1 iter": {"lam": 0.1, "method": "fd", "iters": 1},
    "fd 1 iter, 25% of sequences (scalable)": {"lam": 0.1, "method": "fd", "iters": 1, "sample_fraction": 0.25},
    "jvp 1 iter": {"lam": 0.1, "method": "jvp", "iters": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--digits", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    base = {"model": {"vocab_size": 15, "hidden": args.hidden, "heads": 4, "mlp_hidden": 2 * args.hidden,
                      "max_seq_len": 3 * args.digits + 5},
            "data": {"digits": args.digits, "batch_size": args.batch}}
    cfg0 = config_from_dict(base)
    task = build_task(cfg0)
    batch = task.train_batch(0, 0, args.batch)
    depth = Depth(0, args.depth)
    torch.manual_seed(0)
    model = LoopedLM(cfg0.model)
    opt = build_optimizer(model, cfg0.optim)
    stars = {name: config_from_dict({**base, "stars": s}).stars for name, s in SETTINGS.items()}
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}

    def step(name: str, i: int) -> float:
        t0 = time.perf_counter()
        forward_backward(model, batch, depth, stars[name], step=i, micro=0, seed=0, loss_scale=1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in SETTINGS:  # warm-up
        for i in range(2):
            step(name, i)
    for r in range(args.rounds):
        for name in SETTINGS:
            times[name] += [step(name, r * args.steps + i) for i in range(args.steps)]
    tokens = args.batch * task.seq_len
    plain = statistics.median(times["plain"])
    print(f"depth {args.depth}, d={args.hidden}, batch {args.batch}x{task.seq_len}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds}x{args.steps} steps per setting")
    print(f"{'setting':42s} {'ms/step':>8s} {'tokens/s':>9s} {'x plain':>8s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:42s} {1000 * med:8.1f} {tokens / med:9.0f} {med / plain:8.2f}")


if __name__ == "__main__":
    main()
