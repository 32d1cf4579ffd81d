"""The training loss's conventions, shared by the data sources (which mark positions without a
target) and the step (which skips them): `IGNORE` and the token cross entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stars_scale import kernels

IGNORE = -100  # a label that no loss counts (prompt tokens, padding, the last position)


def token_ce(logits: torch.Tensor, labels: torch.Tensor, kernels_mode: str = "torch") -> torch.Tensor:
    """Mean cross entropy over the tokens whose label is not IGNORE, computed in fp32. Through the
    fused kernel when `kernels_mode` (model.kernels) allows it on these logits: the logits are then
    consumed (their memory receives the gradient during the forward pass)."""
    if kernels.fused(kernels_mode, logits):
        return kernels.cross_entropy(logits, labels, IGNORE)
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE)
