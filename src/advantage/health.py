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

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def paired_drop_p(before: Sequence[float], after: Sequence[float]) -> float:
    """One-sided p-value that `after` is worse than `before` on the same items (an exact sign test, the exact
    McNemar test): of the items whose outcome changed, how unlikely it is that at least as many went from
    right to wrong as did, if a change were as likely either way. Outcomes are read as right when >= 0.5.

    On 16 questions, 15 right then 12 (three lost, none gained) gives p = 1/8: three coin flips all landing one
    way. Five lost and none gained gives 1/32."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need the same items: {len(before)} before, {len(after)} after")
    lost = sum(1 for b, a in zip(before, after, strict=True) if b >= 0.5 > a)
    gained = sum(1 for b, a in zip(before, after, strict=True) if a >= 0.5 > b)
    n = lost + gained
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n


@dataclass
class CollapseGuard:
    """Keeps the best held-out score and says when to roll back to it.

    `update(step, score)` after each evaluation returns "continue", "rollback" (the score stayed more than
    `tolerance` below the best for `patience` evaluations: restore `best_step`, multiply the learning rate by
    `lr_factor`), or "stop" (that happened `max_rollbacks` times already). Ties keep the later step.

    Pass each evaluation's per-item outcomes too (`update(step, score, outcomes)`, the same items in the same
    order every time) and `end_step` asks for evidence before it gives up the last step: a drop larger than
    `tolerance` must also be significant in a paired sign test (`paired_drop_p` < `alpha`)."""

    tolerance: float = 0.1
    patience: int = 1
    lr_factor: float = 0.5
    max_rollbacks: int = 2
    alpha: float = 0.05
    best_step: int = 0
    best_score: float = float("-inf")
    rollbacks: int = 0
    _bad: int = 0
    _outcomes: dict[int, list[float]] = field(default_factory=dict, repr=False)

    def update(self, step: int, score: float, outcomes: Sequence[float] | None = None) -> Action:
        if outcomes is not None:
            self._outcomes[step] = list(outcomes)
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
        (the drop `update` counts as a collapse) and, where both steps' outcomes were given, the drop is
        significant (`drop_p` < `alpha`); then the best. A smaller or unproven drop is within the noise of
        a small evaluation set, and the last step has trained the most. Call `update` with the last step's
        score (and outcomes) first."""
        if last_score >= self.best_score - self.tolerance:
            return last_step
        p = self.drop_p(last_step)
        return last_step if p is not None and p >= self.alpha else self.best_step

    def drop_p(self, step: int) -> float | None:
        """`paired_drop_p` from the best step to `step`, or None without both steps' outcomes."""
        best, last = self._outcomes.get(self.best_step), self._outcomes.get(step)
        if best is None or last is None:
            return None
        return paired_drop_p(best, last)
