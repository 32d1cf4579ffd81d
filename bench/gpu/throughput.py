"""Training-step throughput of a config with the fused kernels on and off: tokens/s, MFU, peak memory.

    python bench/gpu/throughput.py --config configs/looped_1b_1gpu.yaml [--kernels torch,cuda]
        [--steps 10] [--warmup 3] [--device cuda] [--json PATH] [--set model.hidden=256 ...]

Synthetic tokens (no dataset needed), the config's dtype, loop checkpointing, STARS estimator and
sample fraction, the penalty on (steps past stars.warmup_steps), depth fixed at the sampler's mean
(n_grad = depth.backprop). MFU = model FLOPs/token (stars_scale.plan's count: loops included,
recompute and the estimator excluded) × tokens/s over the bf16 matmul peak measured here first
(an 8192³ matmul on CUDA). Settings run interleaved, one step each in turn, so clock and thermal
drift hit them alike. Needs torch only (no megatron-core, DeepSpeed, webdataset or MLflow).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stars_scale.config import load_config
from stars_scale.model.looped import LoopedLM
from stars_scale.plan import depth_stats, flops_per_token, param_counts
from stars_scale.stars.depth import Depth
from stars_scale.parallel.optim import build_optimizer
from stars_scale.stars.objective import forward_backward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype=torch.bfloat16) -> float:
    """Measured dense matmul FLOP/s in `dtype` (8192³ on CUDA, 1024³ on CPU)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def build(cfg, kernels: str, device: torch.device):
    torch.manual_seed(cfg.seed)  # the same initial weights for every setting
    model = LoopedLM(dataclasses.replace(cfg.model, kernels=kernels)).to(device)
    model.checkpointing = cfg.train.checkpointing
    model.train()
    return model, build_optimizer(model, cfg.optim)


def run(args) -> dict:
    device = torch.device(args.device)
    cfg = load_config(args.config, args.set)
    ds = depth_stats(cfg, draws=2000)
    n_grad = cfg.depth.backprop or max(1, round(ds.mean_grad))
    total = max(n_grad, round(ds.mean_total))
    depth = Depth(total - n_grad, n_grad)
    B, T = cfg.data.batch_size, cfg.model.max_seq_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (B, T), generator=gen)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    fpt = flops_per_token(cfg.model, param_counts(cfg.model), T, ds).total
    peak = matmul_peak(device)
    report = {"config": str(args.config), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": cfg.train.dtype, "checkpointing": cfg.train.checkpointing,
              "estimator": {"method": cfg.stars.method, "iters": cfg.stars.iters,
                            "sample_fraction": cfg.stars.sample_fraction, "probe_precision": cfg.stars.probe_precision},
              "depth": {"n_free": depth.n_free, "n_grad": depth.n_grad}, "batch": B, "seq": T,
              "model_flops_per_token": fpt, "bf16_matmul_peak_flops": peak, "settings": {}}
    settings = {}
    for k in args.kernels:
        model, opt = build(cfg, k, device)
        settings[k] = {"model": model, "opt": opt, "times": [], "losses": []}
    step0 = cfg.stars.warmup_steps  # the penalty is on

    def one(name: str, i: int) -> None:
        s = settings[name]
        sync(device)
        t0 = time.perf_counter()
        r = forward_backward(s["model"], batch, depth, cfg.stars, step=step0 + i, micro=0, seed=cfg.seed,
                             loss_scale=1.0, dtype=cfg.train.dtype)
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        sync(device)
        s["times"].append(time.perf_counter() - t0)
        s["losses"].append(r.loss)

    for name in settings:  # warm-up (allocator, cuDNN/SDPA selection, lazy kernel loads)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            one(name, i)
        settings[name]["peak_mem"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        settings[name]["times"].clear()
    for i in range(args.steps):
        for name in settings:
            one(name, args.warmup + i)
    for name, s in settings.items():
        med = statistics.median(s["times"])
        tps = B * T / med
        report["settings"][f"kernels={name}"] = {
            "ms_per_step": 1000 * med, "tokens_per_s": tps, "mfu": fpt * tps / peak,
            "peak_memory_bytes": s["peak_mem"], "losses": s["losses"]}
    base = report["settings"].get("kernels=torch")
    for key, r in report["settings"].items():
        r["speedup_vs_torch"] = base["ms_per_step"] / r["ms_per_step"] if base else None
    return report


def print_report(rep: dict) -> None:
    print(f"{rep['config']} on {rep['device']} (torch {rep['torch']}), {rep['dtype']}, batch {rep['batch']}x{rep['seq']}, "
          f"depth {rep['depth']}, estimator {rep['estimator']}")
    print(f"measured bf16 matmul peak {rep['bf16_matmul_peak_flops'] / 1e12:.1f} TFLOP/s; "
          f"model {rep['model_flops_per_token'] / 1e9:.2f} GFLOP/token")
    print(f"{'setting':16s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'peak mem':>10s} {'x torch':>8s}")
    for name, r in rep["settings"].items():
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f} GiB"
        sp = "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}"
        print(f"{name:16s} {r['ms_per_step']:9.1f} {r['tokens_per_s']:10.0f} {100 * r['mfu']:5.1f}% {mem:>10s} {sp:>8s}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/looped_1b_1gpu.yaml")
    ap.add_argument("--kernels", default="torch,cuda", type=lambda s: [x for x in s.split(",") if x])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)
    rep = run(args)
    print_report(rep)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
