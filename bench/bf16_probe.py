"""STARS estimators under bf16 autocast against fp32, at the same state.

    python bench/bf16_probe.py [--checkpoint RUN_OR_STEP_DIR] [--iters 20] [--batch 64] [--loops 8]

For the trained main-job model (`--checkpoint`, e.g. the run dir of
`stars-train --config configs/arith_tiny.yaml`) and a tiny Huginn-shaped core (RMSNorm
sandwich blocks, SwiGLU, RoPE, concat-linear injection, random initial state; 4 core blocks,
random init): the end state after `--loops` iterations is computed once in fp32, then ρ̂ of
each estimator is taken in fp32, under bf16 autocast with the estimator's default
`precision="fp32"`, and under bf16 autocast with `precision="autocast"` (the step's dtype), for
three random starts each. Also the cosine between the penalty's gradient (one iteration, the
training form) in the core's parameters under bf16 and in fp32.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from stars_scale.config import config_from_dict, load_config
from stars_scale.data.sources import build_task
from stars_scale.model.looped import LoopedLM
from stars_scale.checkpoint.dcp import read_model_state
from stars_scale.stars.jacobian import METHODS, spectral_penalty
from stars_scale import checkpoint as ckpt

HUGINN_TINY = {"vocab_size": 64, "hidden": 64, "heads": 4, "mlp": "swiglu", "norm": "rmsnorm",
               "norm_placement": "sandwich", "positions": "rope", "max_seq_len": 32, "n_prelude": 2,
               "n_core": 4, "n_coda": 2, "injection": "concat-linear", "init_state": "random",
               "embed_scale": 8.0, "bias": False, "init_std": math.sqrt(2 / (5 * 64))}


def huginn_tiny(seed: int = 0, batch: int = 16, seq: int = 32):
    torch.manual_seed(seed)
    model = LoopedLM(config_from_dict({"model": HUGINN_TINY}).model).eval()
    ids = torch.randint(0, HUGINN_TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    return model, ids


def trained(path: str, batch: int):
    step = ckpt.resolve_checkpoint(path)
    cfg = load_config(step / "config.yaml")
    model = LoopedLM(cfg.model)
    model.load_state_dict(read_model_state(step, cfg.model))
    ids = build_task(cfg).train_batch(0, 0, batch)["input_ids"]
    return model.eval(), ids


def end_state(model, ids, loops: int):
    with torch.no_grad():
        out = model(ids, n_free=loops, n_grad=0, generator=torch.Generator().manual_seed(0))
    return out.state.float(), out.embedded.float()


def rho(model, h, e, method, iters, seed, bf16: bool, precision: str) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        est = spectral_penalty(lambda x: model.core_step(x, e), h, method, iters, create_graph=False,
                               generator=torch.Generator().manual_seed(seed), precision=precision)
    return float(est.rho)


def penalty_grad(model, h, e, method, seed, bf16: bool, precision: str) -> torch.Tensor:
    params = [p for p in model.core.parameters()] + ([] if model.adapter is None else list(model.adapter.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        est = spectral_penalty(lambda x: model.core_step(x, e), h, method, 1, create_graph=True,
                               generator=torch.Generator().manual_seed(seed), precision=precision)
    grads = torch.autograd.grad(est.penalty, params, allow_unused=True)  # e.g. a norm the map skips
    return torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten() for p, g in zip(params, grads)])


def compare(model, h, e, iters: int, seeds=(0, 1, 2), methods=METHODS) -> dict:
    """{method: {fp32: [...], bf16/fp32-probe: [...], bf16/autocast-probe: [...], cos_*: float}}"""
    res = {}
    for method in methods:
        r = {"fp32": [rho(model, h, e, method, iters, s, False, "fp32") for s in seeds],
             "bf16, fp32 probe": [rho(model, h, e, method, iters, s, True, "fp32") for s in seeds],
             "bf16, autocast probe": [rho(model, h, e, method, iters, s, True, "autocast") for s in seeds]}
        g32 = penalty_grad(model, h, e, method, 0, False, "fp32")
        for prec in ("fp32", "autocast"):
            g = penalty_grad(model, h, e, method, 0, True, prec)
            r[f"cos, {prec} probe"] = float(torch.nn.functional.cosine_similarity(g, g32, dim=0))
        res[method] = r
        print(f"  {method}: {r}", flush=True)
    return res


def report(name: str, res: dict) -> None:
    print(f"\n{name}")
    print(f"{'method':6s} {'fp32 rho (3 starts)':28s} {'bf16 fp32-probe max dev':>24s} {'bf16 autocast max dev':>22s}"
          f" {'grad cos fp32-probe':>20s} {'grad cos autocast':>18s}")
    for method, r in res.items():
        ref = r["fp32"]
        dev = {k: max(abs(a / b - 1) for a, b in zip(r[k], ref)) for k in ("bf16, fp32 probe", "bf16, autocast probe")}
        print(f"{method:6s} {' '.join(f'{x:.4f}' for x in ref):28s} {100 * dev['bf16, fp32 probe']:23.2f}% "
              f"{100 * dev['bf16, autocast probe']:21.2f}% {r['cos, fp32 probe']:20.4f} {r['cos, autocast probe']:18.4f}")
        print(f"{'':6s} autocast-probe rho: {' '.join(f'{x:.4f}' for x in r['bf16, autocast probe'])}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="a stars-train run dir or step dir (the main job)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--loops", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in this order")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    print(f"torch threads {torch.get_num_threads()}, {args.iters} power iterations, end state after {args.loops} loops")
    if args.checkpoint:
        model, ids = trained(args.checkpoint, args.batch)
        report(f"main-job model {Path(args.checkpoint)} (batch {args.batch})",
               compare(model, *end_state(model, ids, args.loops), args.iters, methods=methods))
    model, ids = huginn_tiny()
    report("tiny Huginn-shaped core (h 64, 4 core blocks, random init, batch 16 x 32)",
           compare(model, *end_state(model, ids, args.loops), args.iters, methods=methods))


if __name__ == "__main__":
    main()
