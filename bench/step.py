"""Tokens/s of a training step with and without the STARS regulariser, per estimator.

    python bench/step.py [--depth 8] [--hidden 128] [--batch 64] [--digits 5] [--steps 10]
                         [--malloc tuned|system] [--arch ours|reference] [--dtype fp32|bf16]
                         [--compile none|block|model]

Fixed depth, 5-digit addition (20 tokens per sequence), batch 64: the scale of the issue's
reference figure (the paper's code costs 1.20x a plain step at depth 8 on this machine).
Settings are interleaved over several rounds so drift in machine load hits them alike; the
`x plain` column is each setting's median step time over the plain step's, in this one run.

`FLOPs x plain` counts the step's matmul and attention FLOPs (torch's flop registry, every op
the step dispatches, double backward included) over the plain step's: the floor that the time
ratio could reach if every op ran as efficiently as the plain step's do.

`--dtype bf16` runs the step under bf16 autocast (train.dtype: bf16) and adds the scalable
setting with its probe kept in bf16 (`stars.probe_precision: autocast`), so the table shows the
cost of the default fp32 probe (accurate, see bench/bf16_probe.py) against the bf16 one.

`--malloc` picks the host allocator setting (`train.host_malloc`; the trainer's default is
tuned). `--compile` applies `train.compile` (the vjp probe runs eager; the first steps, untimed,
pay the compilation). `--arch reference` runs the model with the reference code's choices that cost time
(math attention, dropout 0.1) for an apples-to-apples reading of its figure.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from stars_scale.config import config_from_dict
from stars_scale.data.sources import build_task
from stars_scale.model.looped import LoopedLM
from stars_scale.parallel.compile import apply_compile
from stars_scale.stars.depth import Depth
from stars_scale.train.host_malloc import keep_freed_memory
from stars_scale.parallel.optim import build_optimizer
from stars_scale.stars.objective import forward_backward

SETTINGS = {
    "plain": {"lam": 0.0, "estimate_every": 0},
    "vjp 1 iter (faithful)": {"lam": 0.1, "method": "vjp", "iters": 1},
    "fd 1 iter": {"lam": 0.1, "method": "fd", "iters": 1},
    "fd 1 iter, 25% of sequences (scalable)": {"lam": 0.1, "method": "fd", "iters": 1, "sample_fraction": 0.25},
    "jvp 1 iter": {"lam": 0.1, "method": "jvp", "iters": 1},
}


class CountFlops(TorchDispatchMode):
    """Sum of the registered FLOP formulas (mm, addmm, bmm, attention, ...) over dispatched ops.
    (torch's FlopCounterMode tracks modules, which autograd.grad inside the step does not allow.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--digits", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--malloc", choices=("tuned", "system"), default="tuned",
                    help="host allocator: the trainer's default (tuned) or glibc's defaults")
    ap.add_argument("--arch", choices=("ours", "reference"), default="ours",
                    help="reference: math attention and dropout 0.1, as the paper's code")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="train.dtype of the step")
    ap.add_argument("--compile", choices=("none", "block", "model"), default="none",
                    help="train.compile: compiled blocks or loop regions (stars_scale/parallel/compile.py)")
    args = ap.parse_args()
    settings = dict(SETTINGS)
    if args.dtype == "bf16":
        settings["fd 1 iter, 25%, probe in bf16 (inaccurate)"] = {
            **SETTINGS["fd 1 iter, 25% of sequences (scalable)"], "probe_precision": "autocast"}
    if args.malloc == "tuned":
        keep_freed_memory()
    extra = {"attention": "math", "dropout": 0.1} if args.arch == "reference" else {}

    base = {"model": {"vocab_size": 15, "hidden": args.hidden, "heads": 4, "mlp_hidden": 2 * args.hidden,
                      "max_seq_len": 3 * args.digits + 5, **extra},
            "data": {"digits": args.digits, "batch_size": args.batch}}
    cfg0 = config_from_dict(base)
    task = build_task(cfg0)
    batch = task.train_batch(0, 0, args.batch)
    depth = Depth(0, args.depth)
    torch.manual_seed(0)
    model = LoopedLM(cfg0.model)
    apply_compile(model, args.compile)
    opt = build_optimizer(model, cfg0.optim)
    stars = {name: config_from_dict({**base, "stars": s}).stars for name, s in settings.items()}
    times: dict[str, list[float]] = {name: [] for name in settings}

    def step(name: str, i: int) -> float:
        t0 = time.perf_counter()
        forward_backward(model, batch, depth, stars[name], step=i, micro=0, seed=0, loss_scale=1.0, dtype=args.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    flops = {}
    for name in settings:  # warm-up, then one counted step
        for i in range(2):
            step(name, i)
        with CountFlops() as counter, torch.compiler.set_stance("force_eager"):  # same ops as eager
            step(name, 2)
        flops[name] = counter.total
    for r in range(args.rounds):
        for name in settings:
            times[name] += [step(name, r * args.steps + i) for i in range(args.steps)]
    tokens = args.batch * task.seq_len
    plain = statistics.median(times["plain"])
    print(f"depth {args.depth}, d={args.hidden}, batch {args.batch}x{task.seq_len}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds}x{args.steps} steps per setting, malloc {args.malloc}, "
          f"arch {args.arch}, dtype {args.dtype}, compile {args.compile}")
    print(f"{'setting':42s} {'ms/step':>8s} {'tokens/s':>9s} {'x plain':>8s} {'FLOPs x plain':>14s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:42s} {1000 * med:8.1f} {tokens / med:9.0f} {med / plain:8.2f} "
              f"{flops[name] / flops['plain']:14.3f}")


if __name__ == "__main__":
    main()
