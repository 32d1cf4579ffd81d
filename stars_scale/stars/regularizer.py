"""The STARS regulariser as training uses it: ρ̂ of the core map h ↦ f(h, e) at the end state.

The end state s_r and the conditioning e are detached (the penalty's gradient reaches the core's
weights and the injection adapter, nothing upstream), optionally on a random subset of the
batch's sequences, and the map runs without activation checkpointing (one iteration's worth of
activations) and with dropout masks held fixed across the estimator's evaluations
(`stars_scale.model.dropout.DropoutMasks`: their own generator, the global RNG untouched).
Under `train.compile` the probes that need double backward (vjp; jvp with a graph) run eager.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stars_scale.config import StarsConfig
from stars_scale.model.dropout import DropoutMasks
from stars_scale.stars.jacobian import (FiniteDifference, SpectralEstimate, random_direction, row_subset,
                                        spectral_penalty)


@contextlib.contextmanager
def without_checkpointing(model):
    """The estimator's evaluations keep one iteration's activations: no recomputation."""
    saved = model.checkpointing
    model.checkpointing = "none"
    try:
        yield
    finally:
        model.checkpointing = saved


def core_map(model, e: torch.Tensor | None, seed: int | None = None):
    """h ↦ model.core_step(h, e). With dropout active, every call reuses the same masks, drawn
    from a generator of their own seeded with `seed` (the global RNG is left alone): the same
    seed gives the same masks in every `core_map` made with it, on every stage.

    On a pipeline stage `model` is the stage's part of the model and `core_step` its part of the
    map, so the stages evaluate the map with this same code."""
    if seed is None or not (model.training and model.cfg.dropout > 0):
        return lambda h: model.core_step(h, e)
    masks = DropoutMasks(seed)

    def fn(h: torch.Tensor) -> torch.Tensor:
        with masks.replay(), torch.compiler.set_stance("force_eager"):
            return model.core_step(h, e)

    return fn


@dataclass(frozen=True)
class Probe:
    """The estimator's random choices for one microbatch besides its direction, drawn from the
    microbatch's generator in this order: the row subset, then the seed of the dropout masks."""

    rows: torch.Tensor | None  # the batch rows the estimate uses (None: all)
    seed: int | None  # dropout masks held fixed across the evaluations (None: no generator)

    def select(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(0, self.rows.to(t.device))


def draw_probe(cfg: StarsConfig, generator: torch.Generator | None, rows: int) -> Probe:
    idx = row_subset(cfg.sample_fraction, generator, rows)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else None
    return Probe(idx, seed)


def core_map_penalty(model, state: torch.Tensor, embedded: torch.Tensor, cfg: StarsConfig, *,
                     create_graph: bool, generator: torch.Generator | None = None,
                     iters: int | None = None) -> SpectralEstimate:
    probe = draw_probe(cfg, generator, state.shape[0])
    h, e = probe.select(state.detach()), probe.select(embedded.detach())
    # compiled regions (train.compile) have no double backward: those probes run the eager model
    eager = cfg.method == "vjp" or (cfg.method == "jvp" and create_graph)
    with without_checkpointing(model), (torch.compiler.set_stance("force_eager") if eager
                                        else contextlib.nullcontext()):
        return spectral_penalty(core_map(model, e, probe.seed), h, cfg.method, iters or cfg.iters,
                                normalize=cfg.normalize, eps=cfg.fd_eps, create_graph=create_graph,
                                generator=generator, precision=cfg.probe_precision, kernels=model.cfg.kernels,
                                vjp_graph=cfg.vjp_graph)


def fd_penalty(h: torch.Tensor, cfg: StarsConfig, *, create_graph: bool, generator: torch.Generator | None,
               kernels: str) -> FiniteDifference:
    """The `fd` estimate at h (already `Probe.select`ed) as a sequence of evaluations, for a caller
    that evaluates the map itself (the pipeline, across its stages); the direction is drawn from
    `generator` after the probe, as `core_map_penalty` draws it. `kernels`: the model's mode."""
    return FiniteDifference(h, random_direction(h, generator, cfg.normalize), cfg.iters, create_graph,
                            cfg.normalize, cfg.fd_eps, precision=cfg.probe_precision, kernels=kernels)


def combine_loss(ce: torch.Tensor, penalty: torch.Tensor | None, cfg: StarsConfig) -> torch.Tensor:
    """(1−λ)·CE + λ·P (convex, the paper's form) or CE + λ·P (additive); CE alone when P is off."""
    if penalty is None or cfg.lam == 0:
        return ce
    if cfg.combine == "convex":
        return (1.0 - cfg.lam) * ce + cfg.lam * penalty
    return ce + cfg.lam * penalty
