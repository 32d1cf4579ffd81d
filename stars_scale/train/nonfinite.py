"""What a step with a non-finite loss or gradient does: skip it, roll back, or stop.

The engine checks the global gradient norm (over every rank) before the optimizer step and
skips the update when it is not finite (zero 0: our optimizer step; see
`parallel.data_parallel.PlainDataParallel.step`), so a NaN or Inf never reaches the weights.
This module decides what the run does next, after `train.max_skips` consecutive skipped steps:

    train.nonfinite: skip       keep skipping; stop when max_skips is exceeded
    train.nonfinite: rollback   reload the newest verified checkpoint and scale the learning
                                rate by train.rollback_lr_scale (at most MAX_ROLLBACKS times)
    train.nonfinite: stop       stop at the first non-finite step

Under ZeRO (DeepSpeed steps inside its backward) an update cannot be skipped: a non-finite step
stops the run, and nothing after it is checkpointed.
"""
from __future__ import annotations

import math

from stars_scale.errors import UserError

MAX_ROLLBACKS = 3


class NonFiniteGuard:
    def __init__(self, policy: str, max_skips: int, can_skip: bool):
        self.policy, self.max_skips, self.can_skip = policy, max_skips, can_skip
        self.consecutive = self.skipped = self.rollbacks = 0  # non-finite steps in a row, in all; rollbacks

    def after_step(self, step: int, loss: float, grad_norm: float) -> str:
        """'ok', 'skipped' or 'rollback' for the step just taken; raises UserError to stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return "ok"
        what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
        if self.policy == "stop" or not self.can_skip:
            why = "train.nonfinite: stop" if self.policy == "stop" else "ZeRO cannot skip an update"
            raise UserError(f"{what}: not finite; stopped ({why}); the last checkpoint holds finite weights "
                            "(lower optim.lr or stars.lam and resume)")
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
