"""The STARS regulariser as training uses it: ρ̂ of the core map h ↦ f(h, e) at the end state.

The end state s_r and the conditioning e are detached (the penalty's gradient reaches the core's
weights and the injection adapter, nothing upstream), optionally on a random subset of the
batch's sequences, and the map runs without activation checkpointing (one iteration's worth of
activations) and with dropout masks held fixed across the estimator's evaluations.
"""
from __future__ import annotations

import contextlib

import torch

from stars_scale.config import StarsConfig
from stars_scale.stars.jacobian import SpectralEstimate, sample_rows, spectral_penalty


@contextlib.contextmanager
def _no_checkpointing(model):
    saved = model.checkpointing
    model.checkpointing = "none"
    try:
        yield
    finally:
        model.checkpointing = saved


def core_map(model, e: torch.Tensor, seed: int | None = None):
    """h ↦ model.core_step(h, e). With dropout active, every call reuses the same masks."""
    if seed is None or not (model.training and model.cfg.dropout > 0):
        return lambda h: model.core_step(h, e)

    def fn(h: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[h.device] if h.is_cuda else []):
            torch.manual_seed(seed)
            return model.core_step(h, e)

    return fn


def core_map_penalty(model, state: torch.Tensor, embedded: torch.Tensor, cfg: StarsConfig, *,
                     create_graph: bool, generator: torch.Generator | None = None,
                     iters: int | None = None) -> SpectralEstimate:
    h, e = sample_rows(cfg.sample_fraction, generator, state.detach(), embedded.detach())
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else None
    with _no_checkpointing(model):
        return spectral_penalty(core_map(model, e, seed), h, cfg.method, iters or cfg.iters,
                                normalize=cfg.normalize, eps=cfg.fd_eps, create_graph=create_graph,
                                generator=generator)


def combine_loss(ce: torch.Tensor, penalty: torch.Tensor | None, cfg: StarsConfig) -> torch.Tensor:
    """(1−λ)·CE + λ·P (convex, the paper's form) or CE + λ·P (additive); CE alone when P is off."""
    if penalty is None or cfg.lam == 0:
        return ce
    if cfg.combine == "convex":
        return (1.0 - cfg.lam) * ce + cfg.lam * penalty
    return ce + cfg.lam * penalty
