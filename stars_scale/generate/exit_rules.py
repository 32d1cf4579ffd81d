"""Per-token exit rules for the loop of a looped model at generation time.

Every rule looks at h_t, the state of the position being predicted (the last one) after core
iteration t, and says per batch row whether to stop after t iterations (never later than the
generator's max_depth):

- `fixed`:       stop at t = depth.
- `delta`:       ‖h_t − h_{t−1}‖ / ‖h_t‖ < tol.
- `kl`:          KL(p_t ‖ p_{t−1}) < tol between the next-token distributions decoded from h_t
                 and h_{t−1} (Huginn's criterion). Costs one extra coda pass per iteration.
- `confidence`:  1 − max_v p_t(v) < tol: the next-token distribution decoded from h_t puts all but
                 tol of its mass on one token (the confidence exit of Schuster et al. 2022, CALM).
                 Costs one extra coda pass per iteration, may stop after one, and trusts the
                 model's calibration: where that fails (problems harder than any trained on) it
                 stops confident and wrong.
- `contraction`: treat the core map as a contraction near its fixed point h*. With L the local
                 Lipschitz constant of f, the a-posteriori bound of Banach's theorem is
                     ‖h_t − h*‖ ≤ L / (1 − L) · ‖h_t − h_{t−1}‖.
                 L is estimated by L̂ = ‖h_t − h_{t−1}‖ / ‖h_{t−1} − h_{t−2}‖ (the observed
                 contraction of the last step), and with `rho_iters > 0` also by ρ̂, finite-
                 difference power iteration on ∂f/∂h at h_{t−1} started from the previous
                 direction; the rule uses max(L̂, ρ̂). It stops when L̂ < 1 and the bound falls
                 below tol · ‖h_t‖; while L̂ ≥ 1 (or before two steps exist) it falls back to
                 `delta`. The bound is exact only if f is a contraction with constant L on a
                 region holding the remaining iterates; L̂ and ρ̂ are estimates of that constant
                 from one step / a few Jacobian-vector products, so the bound is an estimate too.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

RULES = ("fixed", "delta", "kl", "confidence", "contraction")
ADAPTIVE = RULES[1:]  # the rules that decide per token when to stop (all but `fixed`)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).norm(dim=1)


@dataclass
class StepView:
    """What a rule may look at after iteration t (1-based) for the T positions being computed."""
    t: int
    h: torch.Tensor  # s_t of the last position, [B, D]
    h_prev: torch.Tensor  # s_{t-1} of the last position, [B, D]
    decode: Callable[[torch.Tensor], torch.Tensor]  # s (all positions) -> logits of the last position
    core_map: Callable[[torch.Tensor], torch.Tensor]  # s_{t-1} (last position) -> f(s_{t-1}), [B, D]
    s: torch.Tensor  # s_t, all positions [B, T, D]


class ExitRule(abc.ABC):
    name = "?"

    def reset(self, batch: int) -> None:
        self.probe_evals = 0  # extra batched coda (kl) or core (contraction ρ̂) passes

    @abc.abstractmethod
    def converged(self, v: StepView) -> torch.Tensor:  # bool [B]
        """True where the position has converged after iteration v.t."""


class Fixed(ExitRule):
    name = "fixed"

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"fixed depth must be >= 1, got {depth}")
        self.depth = depth

    def converged(self, v: StepView) -> torch.Tensor:
        return torch.full((v.h.shape[0],), v.t >= self.depth, device=v.h.device)


class Delta(ExitRule):
    name = "delta"

    def __init__(self, tol: float):
        self.tol = tol

    def converged(self, v: StepView) -> torch.Tensor:
        return _norm(v.h - v.h_prev) < self.tol * _norm(v.h).clamp_min(1e-30)


class KL(ExitRule):
    name = "kl"

    def __init__(self, tol: float):
        self.tol = tol

    def reset(self, batch: int) -> None:
        super().reset(batch)
        self._logp_prev: Optional[torch.Tensor] = None

    def converged(self, v: StepView) -> torch.Tensor:
        logp = F.log_softmax(v.decode(v.s).float(), dim=-1)
        self.probe_evals += 1
        prev, self._logp_prev = self._logp_prev, logp
        if prev is None:
            return torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
        kl = (logp.exp() * (logp - prev)).sum(-1)
        return kl < self.tol


class Confidence(ExitRule):
    name = "confidence"

    def __init__(self, tol: float):
        if not tol < 1:
            raise ValueError(f"exit rule confidence needs a tolerance in (0, 1), got {tol}")
        self.tol = tol

    def converged(self, v: StepView) -> torch.Tensor:
        p = F.softmax(v.decode(v.s).float(), dim=-1)
        self.probe_evals += 1
        return 1 - p.amax(-1) < self.tol


class Contraction(ExitRule):
    name = "contraction"

    def __init__(self, tol: float, rho_iters: int = 0, fd_eps: float = 1e-3):
        self.tol, self.rho_iters, self.fd_eps = tol, rho_iters, fd_eps

    def reset(self, batch: int) -> None:
        super().reset(batch)
        self._d_prev: Optional[torch.Tensor] = None
        self._dir: Optional[torch.Tensor] = None
        self.last_L: Optional[torch.Tensor] = None

    def _rho(self, v: StepView) -> torch.Tensor:
        """‖J u‖ after a few power-iteration steps on J = ∂f/∂h at h_{t−1} (finite differences)."""
        step = v.h - v.h_prev
        u = self._dir if self._dir is not None else step
        u = u / _norm(u).clamp_min(1e-30)[:, None]
        eps = self.fd_eps * _norm(v.h_prev).clamp_min(1e-6)[:, None]
        rho = torch.zeros(u.shape[0], device=u.device)
        for _ in range(self.rho_iters):
            ju = (v.core_map(v.h_prev + eps * u) - v.h) / eps
            self.probe_evals += 1
            rho = _norm(ju)
            u = ju / rho.clamp_min(1e-30)[:, None]
        self._dir = u
        return rho

    def converged(self, v: StepView) -> torch.Tensor:
        d = _norm(v.h - v.h_prev)
        hn = _norm(v.h).clamp_min(1e-30)
        delta_ok = d < self.tol * hn
        prev, self._d_prev = self._d_prev, d
        if prev is None:
            return delta_ok
        L = d / prev.clamp_min(1e-30)
        if self.rho_iters > 0:
            L = torch.maximum(L, self._rho(v))
        self.last_L = L
        contracting = L < 1
        bound = L / (1 - L).clamp_min(1e-30) * d
        return torch.where(contracting, bound < self.tol * hn, delta_ok)


def make_rule(name: str, *, depth: int | None = None, tol: float | None = None, rho_iters: int = 0) -> ExitRule:
    if name == "fixed":
        if depth is None:
            raise ValueError("exit rule fixed needs a depth")
        return Fixed(depth)
    if name not in RULES:
        raise ValueError(f"unknown exit rule {name!r} (expected one of {', '.join(RULES)})")
    if tol is None or not tol > 0:
        raise ValueError(f"exit rule {name} needs a tolerance > 0, got {tol}")
    if name == "delta":
        return Delta(tol)
    if name == "kl":
        return KL(tol)
    if name == "confidence":
        return Confidence(tol)
    return Contraction(tol, rho_iters)
