"""Group-relative advantages: how much better each completion did than its siblings on the same prompt.

For a group of rewards r_1..r_G (G completions of one prompt) the advantage is A_i = r_i − mean(r), then
scaled by `scale`:

- "group": divided by std(r) + eps, the group's own spread (the GRPO paper);
- "batch": divided by the std of every reward in the batch + eps, so that a group with a tiny spread is
  not blown up to unit scale (group mean, batch std, as in Lite PPO and ScaleRL);
- "none": not divided at all (Dr. GRPO), which removes the difficulty bias that per-group scaling adds.

Every std here is the *population* std (divide by G, not G − 1): the advantages are a property of the
group we sampled, not an estimate of a wider population, and it keeps G = 2 well-defined.

A group whose rewards are all equal (including a group of one) carries no learning signal: its advantages
are exactly zero whatever `scale` is, and it is counted in `frac_zero_variance_groups`. The trainer skips
such groups rather than feeding them to the loss, where they would only dilute the averages.
"""

from __future__ import annotations

import math
from statistics import fmean, pstdev
from typing import Literal

Scale = Literal["group", "batch", "none"]
SCALES: tuple[Scale, ...] = ("group", "batch", "none")


def _validate(rewards: list[list[float]], scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not rewards:
        raise ValueError("group_advantages got no groups: pass at least one group of rewards")
    for g, group in enumerate(rewards):
        if not group:
            raise ValueError(
                f"group {g} has no rewards: every group needs at least one completion "
                "(drop empty groups before computing advantages)"
            )
        for i, r in enumerate(group):
            if not math.isfinite(r):
                raise ValueError(
                    f"reward {r!r} at group {g}, index {i} is not finite: rewards must be finite numbers. "
                    "Fix the reward function, or give failed rollouts an explicit finite reward "
                    "(for example 0.0) and record the failure in the trajectory's metrics."
                )


def group_advantages(
    rewards: list[list[float]],
    scale: Scale = "group",
    eps: float = 1e-6,
) -> tuple[list[list[float]], dict[str, float]]:
    """Advantages for each group of rewards, and batch metrics.

    `rewards[g][i]` is the reward of completion i of group g. Returns advantages of the same nesting and
    the metrics `reward_mean`, `reward_std` (population, over the whole batch), `n_groups` and
    `frac_zero_variance_groups`. Raises ValueError on an empty batch, an empty group or a non-finite
    reward.
    """
    _validate(rewards, scale)
    flat = [float(r) for group in rewards for r in group]
    batch_std = pstdev(flat)  # population: divides by len(flat)

    advantages: list[list[float]] = []
    n_zero_var = 0
    for group in rewards:
        if max(group) == min(group):
            # Exact zeros: r − mean(r) could otherwise leave rounding noise like 1e-17.
            advantages.append([0.0] * len(group))
            n_zero_var += 1
            continue
        mu = fmean(group)
        if scale == "group":
            denom = pstdev(group) + eps
        elif scale == "batch":
            denom = batch_std + eps
        else:
            denom = 1.0
        advantages.append([(r - mu) / denom for r in group])

    metrics = {
        "reward_mean": fmean(flat),
        "reward_std": batch_std,
        "n_groups": float(len(rewards)),
        "frac_zero_variance_groups": n_zero_var / len(rewards),
    }
    return advantages, metrics
