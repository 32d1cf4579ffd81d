"""One microbatch's forward and backward: CE at the sampled depth plus the STARS penalty.

Kept apart from the trainer's bookkeeping so that a parallel engine (pipeline schedule,
DeepSpeed) can call or replace exactly this piece.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from stars_scale.config import StarsConfig
from stars_scale.loss import token_ce
from stars_scale.stars.depth import Depth
from stars_scale.stars.regularizer import combine_loss, core_map_penalty


@dataclass
class MicroResult:
    loss: float
    ce: float
    penalty: float | None
    rho: float | None
    tokens: int


def autocast_context(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def penalty_active(stars: StarsConfig, step: int) -> bool:
    return stars.lam > 0 and step >= stars.warmup_steps


def rho_wanted(stars: StarsConfig, step: int) -> bool:
    return penalty_active(stars, step) or (stars.estimate_every > 0 and step % stars.estimate_every == 0)


def estimator_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Random directions and row subsets: a function of (seed, step, micro), equal on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro) % (2**63 - 1))


def init_state_generator(seed: int, step: int, micro: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random initial state (init_state: random) of microbatch `micro`: the same on every layout."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 1009 + micro + 0x5EED) % (2**63 - 1))


def split_microbatches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """`n` equal microbatches of consecutive rows (the batch's rows must divide by n)."""
    rows = batch["input_ids"].shape[0]
    if rows % n:
        raise ValueError(f"a batch of {rows} rows does not split into {n} microbatches")
    return [{k: v[i * rows // n:(i + 1) * rows // n] for k, v in batch.items()} for i in range(n)]


def forward_backward(model, batch: dict[str, torch.Tensor], depth: Depth, stars: StarsConfig, *, step: int,
                     micro: int, seed: int, loss_scale: float, dtype: str = "fp32", ce_fn=None,
                     backward=None) -> MicroResult:
    """`micro` is the microbatch's index in the global step (it seeds the estimator and the initial
    state); `ce_fn(logits, labels)` and `backward(scaled_loss)` let a parallel engine swap in the
    vocab-parallel loss and its own backward (DeepSpeed's)."""
    if ce_fn is None:  # the token CE, through the fused kernel where model.kernels allows it
        ce_fn = functools.partial(token_ce, kernels_mode=model.cfg.kernels)
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    on = penalty_active(stars, step)
    init_gen = init_state_generator(seed, step, micro, device) if model.cfg.init_state == "random" else None
    with autocast_context(dtype, device):
        out = model(ids, n_free=depth.n_free, n_grad=depth.n_grad, generator=init_gen)
        ce = ce_fn(out.logits, labels)
        est = None
        if rho_wanted(stars, step):
            est = core_map_penalty(model, out.state, out.embedded, stars, create_graph=on,
                                   generator=estimator_generator(seed, step, micro))
        loss = combine_loss(ce, est.penalty if (est is not None and on) else None, stars)
    if backward is None:
        (loss * loss_scale).backward()
    else:
        backward(loss * loss_scale)
    return MicroResult(loss=float(loss.detach()), ce=float(ce.detach()),
                       penalty=None if est is None else float(est.penalty.detach()),
                       rho=None if est is None else float(est.rho),
                       tokens=ids.numel())
