"""Dropout: cheap masks on CPU, and masks that can be held fixed across several evaluations.

Masks. `keep_mask` draws 16 random bits per element (four elements per 64-bit draw of the
generator) and keeps an element when its bits clear a threshold: P(keep) = 1 − round(p·2¹⁶)/2¹⁶
(p = 0.1 keeps with probability 0.899994), and the kept elements are scaled by the inverse of
that probability, so E[mask] = 1 exactly. On CPU this is about 3–4× cheaper than `bernoulli_`
(one Mersenne-Twister draw and a float conversion per element; the dropout masks were 10–12%
of a step with dropout 0.1, docs/arith_results.md). `dropout(x, p)` uses it on CPU in eager
mode; on CUDA and inside compiled regions it is `F.dropout` (fused kernels, inductor's RNG).

Replay. The STARS estimators evaluate the core map f(h) more than once at one step (fd: f(h)
and f(h + εv); jvp: every power iteration) and need the *same* f each time, dropout included.
Inside `masks.replay()` every dropout site of the model draws its mask from the masks' own
generator on the first evaluation and reuses it on every later one, in call order. The global
RNG is neither read nor reseeded.

Attention dropout cannot be replayed through SDPA (it draws its mask inside the kernel), so
under replay, and on the math path, the attention is written out (`stars_scale.model.attention.
math_attention_weights`) with its dropout through `dropout`.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

_state = threading.local()
_BITS = 16


def keep_mask(shape: torch.Size, p: float, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled Bernoulli keep-mask of `shape` (0 or 1/P(keep)), 16 random bits per element."""
    n = math.prod(shape)
    dropped = round(p * 2**_BITS)  # elements whose bits fall below the threshold are dropped
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2**63, None, generator=generator)  # the full 64-bit range: four int16 lanes
    bits = words.view(torch.int16)[:n].view(shape).to(torch.float32)  # uniform on [-2^15, 2^15)
    threshold = dropped - 2**(_BITS - 1)  # keep where bits >= threshold
    mask = bits.sub_(threshold - 1).clamp_(0.0, 1.0).mul_(2**_BITS / (2**_BITS - dropped))
    return mask.to(dtype)


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
        """The next site's scaled keep-mask, drawn on first use."""
        i, self._next = self._next, self._next + 1
        if i == len(self._masks):
            self._masks.append(keep_mask(shape, p, device=like.device, dtype=like.dtype,
                                         generator=self._generator(like.device)))
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


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout with the replayed masks inside `DropoutMasks.replay()`, `keep_mask` (global RNG) on
    CPU in eager mode, `F.dropout` elsewhere."""
    if not training or p == 0:
        return x
    masks = active_masks()
    if masks is not None:
        return x * masks.mask(x.shape, p, x)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return x * keep_mask(x.shape, p, device=x.device, dtype=x.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (replayed masks under the STARS probe, cheap masks on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
