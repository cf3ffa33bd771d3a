"""Learning-rate schedules, as multipliers of the peak LR (for ``torch.optim.lr_scheduler.LambdaLR``).

- ``cosine`` (tokenizers, router; paper: 1e-4 -> 1e-6): optional linear warmup, then a half cosine
  from ``lr`` down to ``min_lr`` at ``steps``; held at ``min_lr`` after that.
- ``wsd`` (AR; paper: "constant for 80 %, annealed to 0 over the last 20 %"): optional warmup,
  constant peak until ``0.8 * steps``, then a linear anneal to exactly 0 at ``steps``. [I] The paper
  does not name the anneal shape; linear is the common WSD choice.

The schedule is a pure function of the optimizer step, so resuming restores it exactly from the
step count (DeepSpeed also checkpoints the scheduler's state).
"""
from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("cosine", "wsd", "constant")
WSD_STABLE_FRACTION = 0.8


def lr_multiplier(step: int, steps: int, schedule: str = "cosine", lr: float = 1e-4,
                  min_lr: float = 1e-6, warmup_steps: int = 0) -> float:
    """LR at optimizer step ``step`` (0-based) divided by the peak ``lr``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        floor = min_lr / lr if lr > 0 else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    # wsd: stable until 80 % of all steps, then linear to zero at the last step.
    decay_start = max(warmup_steps, int(WSD_STABLE_FRACTION * steps))
    if step < decay_start:
        return 1.0
    span = max(1, steps - decay_start)
    return max(0.0, 1.0 - (step - decay_start) / span)


def lr_lambda(steps: int, schedule: str, lr: float, min_lr: float, warmup_steps: int = 0) -> Callable[[int], float]:
    """A picklable-enough closure for ``LambdaLR`` (not pickled: DeepSpeed saves the scheduler's
    ``state_dict``, which for LambdaLR holds ``last_epoch`` and no lambdas)."""
    def f(step: int) -> float:
        return lr_multiplier(step, steps, schedule, lr, min_lr, warmup_steps)
    return f
