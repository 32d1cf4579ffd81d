"""20 bf16 training steps of a small Huginn-shaped model on CUDA with model.kernels cuda vs torch:
the same losses within bf16 tolerance (2% relative per step), fd penalty on, loop checkpointing."""
from __future__ import annotations

import dataclasses
import math

import torch

from stars_scale.config import config_from_dict
from stars_scale.model.looped import LoopedLM
from stars_scale.stars.depth import Depth
from stars_scale.parallel.optim import build_optimizer
from stars_scale.stars.objective import forward_backward

CFG = {"model": {"vocab_size": 512, "hidden": 256, "heads": 4, "kv_heads": 2, "mlp": "swiglu", "norm": "rmsnorm",
                 "positions": "rope", "max_seq_len": 128, "n_prelude": 1, "n_core": 2, "n_coda": 1,
                 "injection": "concat-linear", "init_state": "random", "embed_scale": 16.0, "bias": False,
                 "init_std": math.sqrt(2 / (5 * 256))},
       "stars": {"lam": 0.1, "method": "fd", "sample_fraction": 0.25},
       "optim": {"lr": 1e-3}, "train": {"dtype": "bf16", "checkpointing": "loop"}}


def _losses(native, kernels: str) -> list[float]:
    cfg = config_from_dict(CFG)
    torch.manual_seed(0)
    model = LoopedLM(dataclasses.replace(cfg.model, kernels=kernels)).cuda()
    model.checkpointing = "loop"
    opt = build_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(20):
        ids = torch.randint(0, 512, (8, 128), generator=gen)
        r = forward_backward(model, {"input_ids": ids, "labels": ids.roll(-1, 1)}, Depth(2, 2), cfg.stars, step=step,
                             micro=0, seed=0, loss_scale=1.0, dtype="bf16")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(r.loss)
    return losses


def test_twenty_steps_kernels_cuda_vs_torch(native):
    a, b = _losses(native, "torch"), _losses(native, "cuda")
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 0.02 * abs(x), (i, a, b)
    assert b[-1] < b[0]
