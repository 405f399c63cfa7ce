"""Is training healthy? Bands on the per-step diagnostics, and a guard that rolls back a collapsing run.

A policy collapse has a signature before the reward shows it: the sampler-trainer drift climbs (the policy
moves further per step than its samples can follow), the entropy of the sampled tokens falls to near zero or
blows up, the importance weights leave the clip range, gradients spike, and sampled turns start running
until they are cut off. `health_warnings` turns one step's metrics (and the steps before) into plain
warnings for the progress line; the bands are `HealthBands`' fields, documented there.

`CollapseGuard` watches held-out scores: it remembers the best step, and when the score falls well below
the best for `patience` evaluations in a row it says to roll back to the best step and lower the learning
rate (`model.restore(step)` does the roll-back). Both are pure: no I/O, no model.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class HealthBands:
    """Where a metric leaves the healthy band. Measured on the demo: healthy steps have a drift of 0.01-0.03,
    an entropy of 0.3-0.9 nats, a clip fraction under 0.05 and no truncated turns."""

    max_drift: float = 0.05  # logprob_drift_mean_abs, nats per token
    # ... plus this much per update the samples lag behind (policy_lag_mean): the drift of a step trained on
    # older samples also holds how far the policy moved since. The demo with --overlap (lag ~1) ran at
    # 0.02-0.13 and did not collapse.
    max_drift_per_lag: float = 0.15
    min_entropy_ratio: float = 0.25  # entropy below this fraction of the first step's: collapsing to a mode
    max_entropy_ratio: float = 3.0  # entropy above this multiple of the first step's: falling apart
    max_clip_frac: float = 0.2  # loss/clip_frac: tokens whose importance weight was clipped
    max_grad_norm_ratio: float = 5.0  # grad_norm above this multiple of the median so far
    max_truncated: float = 0.25  # frac_truncated_completions: sampled turns cut off at max_tokens


def health_warnings(
    metrics: dict[str, float], history: list[dict[str, float]], bands: HealthBands | None = None
) -> list[str]:
    """Warnings for one step's `metrics`, given the earlier steps' metrics in `history` (oldest first)."""
    b = bands or HealthBands()
    out: list[str] = []
    drift = metrics.get("logprob_drift_mean_abs")
    max_drift = b.max_drift + b.max_drift_per_lag * metrics.get("policy_lag_mean", 0.0)
    if drift is not None and drift > max_drift:
        out.append(f"drift {drift:.3f} > {max_drift:.3g}")
    first_entropy = next((h["entropy"] for h in history if h.get("entropy")), None)
    entropy = metrics.get("entropy")
    if entropy is not None and first_entropy:
        if entropy < b.min_entropy_ratio * first_entropy:
            out.append(f"entropy {entropy:.3f} < {b.min_entropy_ratio:g}x first ({first_entropy:.3f})")
        elif entropy > b.max_entropy_ratio * first_entropy:
            out.append(f"entropy {entropy:.3f} > {b.max_entropy_ratio:g}x first ({first_entropy:.3f})")
    clip = metrics.get("loss/clip_frac")
    if clip is not None and clip > b.max_clip_frac:
        out.append(f"clip frac {clip:.2f} > {b.max_clip_frac}")
    norms = [h["grad_norm"] for h in history if "grad_norm" in h]
    norm = metrics.get("grad_norm")
    if norm is not None and len(norms) >= 2:
        median = statistics.median(norms)
        if median > 0 and norm > b.max_grad_norm_ratio * median:
            out.append(f"grad norm {norm:.3g} > {b.max_grad_norm_ratio:g}x median ({median:.3g})")
    cut = metrics.get("frac_truncated_completions")
    if cut is not None and cut > b.max_truncated:
        out.append(f"{cut:.0%} of turns cut off at max_tokens")
    return out


Action = Literal["continue", "rollback", "stop"]


@dataclass
class CollapseGuard:
    """Keeps the best held-out score and says when to roll back to it.

    `update(step, score)` after each evaluation returns "continue", "rollback" (the score stayed more than
    `tolerance` below the best for `patience` evaluations: restore `best_step`, multiply the learning rate by
    `lr_factor`), or "stop" (that happened `max_rollbacks` times already). Ties keep the later step."""

    tolerance: float = 0.1
    patience: int = 1
    lr_factor: float = 0.5
    max_rollbacks: int = 2
    best_step: int = 0
    best_score: float = float("-inf")
    rollbacks: int = 0
    _bad: int = 0

    def update(self, step: int, score: float) -> Action:
        if score >= self.best_score:
            self.best_step, self.best_score, self._bad = step, score, 0
            return "continue"
        if score >= self.best_score - self.tolerance:
            self._bad = 0
            return "continue"
        self._bad += 1
        if self._bad < self.patience:
            return "continue"
        self._bad = 0
        if self.rollbacks >= self.max_rollbacks:
            return "stop"
        self.rollbacks += 1
        return "rollback"

    def end_step(self, last_step: int, last_score: float) -> int:
        """The step to end a run on: the last one, unless its score is more than `tolerance` below the best
        (the drop `update` counts as a collapse); then the best. A smaller drop is within the noise of a
        small evaluation set, and the last step has trained the most. Call `update` with the last step's
        score first."""
        return last_step if last_score >= self.best_score - self.tolerance else self.best_step
