"""Loop-depth sampling: one draw per optimizer step, identical on every rank and every resume.

The draw for step t comes from an RNG seeded by (seed, t) alone, so no RNG state needs to be
shared or checkpointed. Distributions (r = total iterations):

    fixed              r = value
    lognormal          r = clip(round(LogNormal(mu, sigma)), min, max)                    (STARS)
    poisson-lognormal  r = clip(Poisson(exp(N(ln(mean) - sigma^2/2, sigma))) + 1, min, max) (Huginn)
    uniform            r ~ U{min, ..., max}

A curriculum ramps the *mean* depth from `curriculum.start` to the distribution's own mean over
`curriculum.steps` steps (linear, or `sqrt`: 1 - sqrt(1 - t)), and with `backprop_start` the
backprop depth from there to `backprop` on the same ramp. Truncated BPTT: of the r
iterations only the last `backprop` carry gradient (n_grad = min(r, k), n_free = r - n_grad).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stars_scale.config import DepthConfig

_SALT = 0xDE97


@dataclass(frozen=True)
class Depth:
    n_free: int
    n_grad: int

    @property
    def total(self) -> int:
        return self.n_free + self.n_grad


def base_mean(cfg: DepthConfig) -> float:
    """The distribution's mean depth before clipping (what the curriculum ramps towards)."""
    if cfg.dist == "fixed":
        return float(cfg.value)
    if cfg.dist == "lognormal":
        return math.exp(cfg.mu + cfg.sigma**2 / 2)
    if cfg.dist == "poisson-lognormal":
        return cfg.mean + 1.0
    return (cfg.min + cfg.max) / 2.0


def median_depth(cfg: DepthConfig) -> int:
    """A representative depth for evaluation during training."""
    if cfg.eval_depth is not None:
        return cfg.eval_depth
    if cfg.dist == "fixed":
        return cfg.value
    if cfg.dist == "lognormal":
        return int(min(max(round(math.exp(cfg.mu)), cfg.min), cfg.max))
    if cfg.dist == "poisson-lognormal":
        return int(min(max(round(cfg.mean * math.exp(-cfg.sigma**2 / 2)) + 1, cfg.min), cfg.max))
    return int(round((cfg.min + cfg.max) / 2))


class DepthSampler:
    def __init__(self, cfg: DepthConfig, seed: int):
        self.cfg = cfg
        self.seed = seed

    def ramp(self, step: int) -> float:
        """Curriculum progress in [0, 1] (1 when there is no curriculum)."""
        c = self.cfg.curriculum
        if c.steps <= 0:
            return 1.0
        t = min(max(step / c.steps, 0.0), 1.0)
        return t if c.shape == "linear" else 1.0 - math.sqrt(1.0 - t)

    def mean_at(self, step: int) -> float:
        target = base_mean(self.cfg)
        c = self.cfg.curriculum
        if c.steps <= 0:
            return target
        return c.start + (target - c.start) * self.ramp(step)

    def total_depth(self, step: int) -> int:
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, _SALT, step])
        mean = self.mean_at(step)
        if cfg.dist == "fixed":
            r = round(mean)
        elif cfg.dist == "lognormal":
            mu = math.log(mean) - cfg.sigma**2 / 2  # = cfg.mu when no curriculum
            r = round(rng.lognormal(mu, cfg.sigma))
        elif cfg.dist == "poisson-lognormal":
            rate_mean = max(mean - 1.0, 1e-6)
            rate = rng.lognormal(math.log(rate_mean) - cfg.sigma**2 / 2, cfg.sigma)
            r = int(rng.poisson(rate)) + 1
        else:
            hi = cfg.max if cfg.curriculum.steps <= 0 else max(cfg.min, round(2 * mean - cfg.min))
            r = int(rng.integers(cfg.min, min(hi, cfg.max) + 1))
        return int(min(max(r, cfg.min), cfg.max))

    def backprop_at(self, step: int) -> int | None:
        """Truncated-BPTT depth at `step` (ramped with the curriculum when backprop_start is set)."""
        k, start = self.cfg.backprop, self.cfg.curriculum.backprop_start
        if k is None or start is None:
            return k
        return max(1, round(start + (k - start) * self.ramp(step)))

    def sample(self, step: int) -> Depth:
        r = self.total_depth(step)
        k = self.backprop_at(step)
        n_grad = r if k is None else min(r, k)
        return Depth(n_free=r - n_grad, n_grad=n_grad)
