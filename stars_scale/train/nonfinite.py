"""What a step with a non-finite loss or gradient does: skip it, roll back, or stop.

The engine checks the global gradient norm (over every rank) before the optimizer step and
skips the update when it is not finite, so a NaN or Inf never reaches the weights: zero 0 in our
optimizer step (`parallel.data_parallel.PlainDataParallel.step`), ZeRO 1/2 in DeepSpeed's (it
skips an update whose global norm is not finite: fp32 always, bf16 with `check_grad_overflow`).
This module decides what the run does next, after `train.max_skips` consecutive skipped steps:

    train.nonfinite: skip       keep skipping; stop when max_skips is exceeded
    train.nonfinite: rollback   reload the newest verified checkpoint and scale the learning
                                rate by train.rollback_lr_scale (at most MAX_ROLLBACKS times)
    train.nonfinite: stop       stop at the first non-finite step
"""
from __future__ import annotations

import math

from stars_scale.errors import UserError

MAX_ROLLBACKS = 3


class NonFiniteGuard:
    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.consecutive = self.skipped = self.rollbacks = 0  # non-finite steps in a row, in all; rollbacks

    def after_step(self, step: int, loss: float, grad_norm: float) -> str:
        """'ok', 'skipped' or 'rollback' for the step just taken; raises UserError to stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return "ok"
        what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
        if self.policy == "stop":
            raise UserError(f"{what}: not finite; stopped (train.nonfinite: stop); the last checkpoint holds "
                            "finite weights (lower optim.lr or stars.lam and resume)")
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive <= self.max_skips:
            return "skipped"
        if self.policy == "rollback" and self.rollbacks < MAX_ROLLBACKS:
            self.rollbacks += 1
            self.consecutive = 0
            return "rollback"
        limit = (f"after {self.rollbacks} rollbacks" if self.policy == "rollback"
                 else f"train.max_skips={self.max_skips}")
        raise UserError(f"{what}: {self.consecutive} non-finite steps in a row ({limit}); stopped "
                        "(lower optim.lr or stars.lam, or set train.nonfinite: rollback)")
