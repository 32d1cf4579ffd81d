"""Dropout whose masks can be held fixed across several evaluations of the same map.

The STARS estimators evaluate the core map f(h) more than once at one step (fd: f(h) and
f(h + εv); jvp: every power iteration) and need the *same* f each time, dropout included.
Inside `masks.replay()` every dropout site of the model draws its mask from the masks'
own generator on the first evaluation and reuses it on every later one, in call order. The
global RNG is neither read nor reseeded (the previous way, `fork_rng` + `manual_seed` per
evaluation, cost a generator state copy per call and tied the masks to global state).

Attention dropout cannot be replayed through SDPA (it draws its mask inside the kernel), so
under replay the attention with dropout is written out on the math path with an explicit mask
(`attention_with_mask`); the estimators that need replay run the math path anyway.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

import torch
import torch.nn as nn

_state = threading.local()


class DropoutMasks:
    """Masks drawn once from a dedicated generator (seeded by the caller) and replayed."""

    def __init__(self, seed: int):
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}
        self._masks: list[torch.Tensor] = []
        self._next = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[device]

    def mask(self, shape: torch.Size, p: float, like: torch.Tensor) -> torch.Tensor:
        """The next site's scaled keep-mask (1/(1-p) or 0), drawn on first use."""
        i, self._next = self._next, self._next + 1
        if i == len(self._masks):
            keep = torch.empty(shape, device=like.device).bernoulli_(1.0 - p, generator=self._generator(like.device))
            self._masks.append(keep.div_(1.0 - p).to(like.dtype))
        m = self._masks[i]
        if m.shape != shape:
            raise RuntimeError(f"dropout replay: site {i} has shape {tuple(shape)}, its mask {tuple(m.shape)} "
                               "(the map must make the same dropout calls on every evaluation)")
        return m

    @contextlib.contextmanager
    def replay(self) -> Iterator["DropoutMasks"]:
        """Evaluate the model with these masks (drawn on the first evaluation)."""
        saved = getattr(_state, "masks", None)
        _state.masks, self._next = self, 0
        try:
            yield self
        finally:
            _state.masks = saved


def active_masks() -> DropoutMasks | None:
    return getattr(_state, "masks", None)


class Dropout(nn.Dropout):
    """nn.Dropout that uses the replayed masks inside `DropoutMasks.replay()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = active_masks()
        if masks is None or not self.training or self.p == 0:
            return super().forward(x)
        return x * masks.mask(x.shape, self.p, x)


def attention_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                        masks: DropoutMasks) -> torch.Tensor:
    """Causal softmax attention with dropout p on the weights, mask from `masks` (math path)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return (weights * masks.mask(weights.shape, p, weights)) @ v
