"""One microbatch's training objective, whoever runs the model: the one-process step
(`forward_backward` below, which the parallel engine calls per microbatch) and every stage of the
loop pipeline (`stars_scale.parallel.pipeline`) take its pieces from here, so the loss is
assembled in one place:

    loss = (1 − λ)·CE + λ·P     (stars.combine: convex, the default and the paper's form)
    loss = CE + λ·P             (stars.combine: additive)

CE is the token cross entropy at the sampled depth (`ce`, the model's kernels unless the engine
supplies its vocab-parallel form); P = ‖A v‖² is the STARS penalty at the end state
(`stars.regularizer`), in the loss from `stars.warmup_steps` on while λ > 0 (`Objective.on`);
ρ̂ is also estimated every `stars.estimate_every` steps while P is off (`Objective.wanted`).

Two stability options (one process; `parallel.layout` refuses them under tensor/pipeline parallelism):
- `stars.probe_beyond: k` takes P (and ρ̂) at the state k no-grad iterations past the sampled
  depth r instead of at s_r: constraints at the sampled end states need not carry to deeper ones.
- `stars.progressive: α` is the progressive loss of Bansal et al. 2022,
  (1 − α)·CE(s_r) + α·CE(s_r reached from a no-grad start at n ~ U{0..r−1}), in one pass: the two
  terms have the same forward values, and the sum of their gradients is CE's gradient with the
  part reaching the state s_n (iterations 1..n and below) multiplied by 1 − α (`model.recur`'s
  `grad_scale`). The loop cannot learn to count its iterations from where it started.
Every option of the estimate (method, precision, kernels, normalisation, ε) reaches it through
`Objective`: one process evaluates the map with `estimate`, a pipeline stage evaluates its part of
the map under `evaluation` and the last stage runs the iteration from `fd_iteration`.

Seeds: the estimator's draws and the random initial state of microbatch `micro` of step `step`
are functions of (seed, step, micro), the same on every rank and every layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from stars_scale.config import StarsConfig
from stars_scale.loss import token_ce
from stars_scale.stars.depth import Depth
from stars_scale.stars.jacobian import FiniteDifference, SpectralEstimate, fd_evaluation
from stars_scale.stars.regularizer import combine_loss, core_map_penalty, fd_penalty

CE = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> mean token CE


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


def micro_seed(seed: int, step: int, micro: int, salt: int = 0) -> int:
    """The seed of one random choice of microbatch `micro` of step `step` (`salt` tells the choices apart)."""
    return (seed * 1_000_003 + step * 1009 + micro + salt) % (2**63 - 1)


def estimator_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Random directions and row subsets: a function of (seed, step, micro), equal on every rank."""
    return torch.Generator().manual_seed(micro_seed(seed, step, micro))


def progressive_start(seed: int, step: int, micro: int, total: int) -> int:
    """n ~ U{0, ..., total−1}, the progressive loss's no-grad start: a function of (seed, step, micro)."""
    g = torch.Generator().manual_seed(micro_seed(seed, step, micro, 0x9A0))
    return int(torch.randint(0, max(total, 1), (1,), generator=g))


def init_state_generator(seed: int, step: int, micro: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random initial state (init_state: random) of microbatch `micro`: the same on every layout."""
    return torch.Generator(device=device).manual_seed(micro_seed(seed, step, micro, 0x5EED))


class PenaltyGate:
    """`stars.warmup_ce`: the step from which the penalty is in the loss, resolved from training.

    Past `stars.warmup_steps` the penalty waits until the mean training CE (all ranks' mean, the
    same number everywhere) of the last `WINDOW` steps is <= `warmup_ce`, and then stays on. Measured
    on configs/collapse_paper_stars.yaml: seeds whose loss is still on its first plateau when a
    fixed warm-up ends are held there by the penalty (ρ̂ driven to ~0.1 while the answers are
    guesses), where the same seed without the penalty leaves the plateau later. `config()` is the
    `stars` section the step's objective runs with: the resolved step as `warmup_steps`."""

    WINDOW = 50
    NEVER = 2**62  # warmup_steps while the gate is closed (ρ̂ is still estimated every estimate_every)

    def __init__(self, stars: StarsConfig):
        self.stars = stars
        self.opened_at: int | None = None
        self.recent: deque[float] = deque(maxlen=self.WINDOW)

    def config(self) -> StarsConfig:
        if self.stars.warmup_ce is None:
            return self.stars
        return dataclasses.replace(self.stars, warmup_steps=self.NEVER if self.opened_at is None else self.opened_at)

    def update(self, next_step: int, ce: float) -> bool:
        """After a step: its mean CE; True when the penalty enters from `next_step` on."""
        if self.stars.warmup_ce is None or self.opened_at is not None or not math.isfinite(ce):
            return False
        self.recent.append(ce)
        if (next_step >= self.stars.warmup_steps and len(self.recent) == self.WINDOW
                and sum(self.recent) / self.WINDOW <= self.stars.warmup_ce):
            self.opened_at = next_step
            return True
        return False

    def state_dict(self) -> dict:
        return {"opened_at": self.opened_at, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.opened_at = state.get("opened_at")
        self.recent = deque((float(x) for x in state.get("recent", [])), maxlen=self.WINDOW)


class Objective:
    """The objective of one step's microbatches: the CE, whether the penalty is in the loss and
    whether ρ̂ is estimated, the estimate with every option of `stars` and the model's kernels,
    and their combination."""

    def __init__(self, stars: StarsConfig, step: int, kernels: str, ce: CE | None = None):
        self.stars, self.step, self.kernels = stars, step, kernels
        self.ce = ce if ce is not None else functools.partial(token_ce, kernels_mode=kernels)
        self.on = penalty_active(stars, step)  # P in the loss (the estimate then carries a graph)
        self.wanted = rho_wanted(stars, step)  # ρ̂ estimated this step

    def estimate(self, model, state: torch.Tensor, embedded: torch.Tensor,
                 generator: torch.Generator) -> SpectralEstimate | None:
        """One process: the estimate at the end state (`stars.probe_beyond` no-grad iterations past
        it), the whole core map evaluated here."""
        if not self.wanted:
            return None
        if self.stars.probe_beyond:
            state = model.recur(state.detach(), embedded.detach(), self.stars.probe_beyond, 0)
        return core_map_penalty(model, state, embedded, self.stars, create_graph=self.on, generator=generator)

    def fd_iteration(self, h: torch.Tensor, generator: torch.Generator) -> FiniteDifference:
        """A pipeline's last stage: the `fd` estimate at h (rows already selected) as a sequence of
        evaluations that the stages run under `evaluation`."""
        return fd_penalty(h, self.stars, create_graph=self.on, generator=generator, kernels=self.kernels)

    def evaluation(self, grad: bool):
        """The context of one evaluation of the map (or a stage's part of it) for the `fd` estimate."""
        return fd_evaluation(grad, self.stars.probe_precision)

    def loss(self, ce: torch.Tensor, est: SpectralEstimate | None) -> torch.Tensor:
        return combine_loss(ce, est.penalty if (est is not None and self.on) else None, self.stars)

    @staticmethod
    def result(loss: torch.Tensor, ce: torch.Tensor, est: SpectralEstimate | None, tokens: int) -> MicroResult:
        return MicroResult(loss=float(loss.detach()), ce=float(ce.detach()),
                           penalty=None if est is None else float(est.penalty.detach()),
                           rho=None if est is None else float(est.rho), tokens=tokens)


def forward_backward(model, batch: dict[str, torch.Tensor], depth: Depth, stars: StarsConfig, *, step: int,
                     micro: int, seed: int, loss_scale: float, dtype: str = "fp32", ce_fn: CE | None = None,
                     backward=None) -> MicroResult:
    """One microbatch's forward and backward through the whole (unsplit) model. `micro` is the
    microbatch's index in the global step (it seeds the estimator and the initial state);
    `ce_fn(logits, labels)` and `backward(scaled_loss)` let a parallel engine swap in the
    vocab-parallel loss and its own backward (DeepSpeed's)."""
    objective = Objective(stars, step, model.cfg.kernels, ce_fn)
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    init_gen = init_state_generator(seed, step, micro, device) if model.cfg.init_state == "random" else None
    scale = None
    if stars.progressive > 0:
        scale = (progressive_start(seed, step, micro, depth.total), 1.0 - stars.progressive)
    with autocast_context(dtype, device):
        out = model(ids, n_free=depth.n_free, n_grad=depth.n_grad, generator=init_gen, grad_scale=scale)
        ce = objective.ce(out.logits, labels)
        est = objective.estimate(model, out.state, out.embedded, estimator_generator(seed, step, micro))
        loss = objective.loss(ce, est)
    (backward or torch.Tensor.backward)(loss * loss_scale)
    return objective.result(loss, ce, est, ids.numel())
