"""Converting q/k projections between interleaved and rotate-half RoPE layouts.

Huginn rotates adjacent pairs (2i, 2i+1) of each head ("complex-like"); `layers.apply_rope`
rotates (i, i + D/2) (Llama). Both use frequency i for pair i, so permuting the output rows of
Wq and Wk (and their biases) inside every head, by the same permutation, turns one into the
other exactly: attention scores are dot products over the head dimension, which a shared
permutation of q and k leaves unchanged. No model option is needed, and the permutation is
exact in any dtype, so export undoes it bit for bit.
"""
from __future__ import annotations

import torch


def _perm(head_dim: int) -> torch.Tensor:
    # half-layout position j takes interleaved position 2j (first half) or 2(j - D/2) + 1
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def interleaved_to_half(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection weight [H*D, in] or bias [H*D] from interleaved to half layout."""
    lead = t.shape[0]
    rows = t.reshape(lead // head_dim, head_dim, *t.shape[1:])
    return rows[:, _perm(head_dim)].reshape(t.shape)


def half_to_interleaved(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    lead = t.shape[0]
    rows = t.reshape(lead // head_dim, head_dim, *t.shape[1:])
    inv = torch.argsort(_perm(head_dim))
    return rows[:, inv].reshape(t.shape)
