"""Learning-rate schedules: a pure function of the step.

    warm-up   step < W:          lr * (step + 1) / (W + 1)
    constant  step >= W:         lr
    linear    W <= step <= T:    lr * (m + (1 - m) * (1 - p)),          p = (step - W) / (T - W)
    cosine    W <= step <= T:    lr * (m + (1 - m) * (1 + cos(pi p)) / 2)
    after T:                     lr * m

W = warmup_steps, T = total_steps, m = min_lr_ratio. `step` counts the optimizer steps taken before this one
(the first step is step 0), so a warm-up of W steps reaches the full rate at step W.
"""

from __future__ import annotations

import math

from advantage.config import LRSchedule, TrainConfig


def lr_at(schedule: LRSchedule, lr: float, step: int) -> float:
    """The learning rate for the optimizer step that starts from `step` completed steps."""
    w = schedule.warmup_steps
    if step < w:
        return lr * (step + 1) / (w + 1)
    if schedule.kind == "constant" or schedule.total_steps is None:
        return lr
    m = schedule.min_lr_ratio
    p = min(1.0, (step - w) / (schedule.total_steps - w))
    if schedule.kind == "linear":
        return lr * (m + (1 - m) * (1 - p))
    return lr * (m + (1 - m) * (1 + math.cos(math.pi * p)) / 2)


def step_lr(config: TrainConfig, step: int, trained: int, batch: int) -> float:
    """A GRPO step's learning rate: the schedule's, times trained / batch sequences with `lr_by_signal`."""
    lr = lr_at(config.schedule, config.learning_rate, step)
    return lr * trained / max(batch, 1) if config.lr_by_signal else lr
