"""Which kinds of task a step draws: more of those the policy still fails, fewer of those it has learnt.

A task with several kinds of question (tools, topics, difficulty levels) usually draws them in fixed shares.
Once the policy solves one kind, its groups tie (every rollout succeeds), carry no GRPO signal, and the
step's few informative groups come from the kinds still failed. `TaskMix` moves the share instead: it keeps
a running failure rate per kind from the step's own rollouts and apportions the next step's groups in
proportion to it, with a floor so that no kind is dropped.

    mix = TaskMix(["weather", "units", "currency"])
    for step in range(steps):
        counts = mix.counts(8)                     # {"weather": 1, "units": 4, "currency": 3}
        ...gather groups of those kinds, train...
        mix.update({"units": [1, 0, 0, 1], ...})   # per-rollout success (or any score in [0, 1])

The same idea as prioritised level replay or online difficulty filtering, at the granularity of a task's
kinds: cheap, deterministic for a given sequence of results, and it never sees held-out data.

Give it extra groups rather than the whole step. A solved kind's groups tie, so nothing in a step pushes
back when the others' updates generalise onto it: on the tool-use demo, steps of 6 conversion groups in 8
sent weather questions to the conversion tools (train success on them 1.0 -> 0.0 in four steps). The demo
draws 8 groups in equal shares and `TaskMix.counts(4)` more (`DemoConfig.focus_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


def apportion(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """`n` slots shared in proportion to `weights` by largest remainder (Hamilton's method).

    Ties in the remainder go to the kind listed first, so the result is deterministic.
    weights {a: 1, b: 1, c: 2}, n = 5 -> quotas 1.25, 1.25, 2.5 -> floors 1, 1, 2 (4) -> the largest
    remainder (c's 0.5) takes the fifth slot: {a: 1, b: 1, c: 3}."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not weights:
        raise ValueError("weights is empty: name at least one kind of task")
    bad = {k: w for k, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"weights must be finite and >= 0, got {bad}")
    total = sum(weights.values())
    if total == 0:
        raise ValueError("weights are all 0: at least one kind needs a positive weight")
    quotas = {k: n * w / total for k, w in weights.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    order = sorted(quotas, key=lambda k: -(quotas[k] - counts[k]))  # stable: ties keep the listed order
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


class TaskMix:
    """A running failure rate per kind of task, and the next step's share of groups by it.

    - `decay`: the weight of the previous estimate in each update (0: only the last step counts).
    - `floor`: the least weight a kind keeps, so a learnt kind is still drawn now and then (a policy can
      unlearn it) and a kind with no results yet is not starved.
    - `prior`: every kind's failure rate before any result (equal shares at the start).
    """

    def __init__(
        self, kinds: Iterable[str], *, decay: float = 0.5, floor: float = 0.1, prior: float = 0.5
    ) -> None:
        self.kinds = list(dict.fromkeys(kinds))
        if not self.kinds:
            raise ValueError("TaskMix needs at least one kind of task")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        if not 0 <= prior <= 1:
            raise ValueError(f"prior must be in [0, 1], got {prior}")
        self.decay, self.floor = decay, floor
        self.failure = dict.fromkeys(self.kinds, prior)

    def update(self, results: Mapping[str, Sequence[float]]) -> None:
        """Fold in one step's results: per kind, the rollouts' success or score in [0, 1]. A kind the step
        did not draw keeps its estimate."""
        for kind, scores in results.items():
            if kind not in self.failure:
                raise KeyError(f"unknown kind of task {kind!r}; this mix has {self.kinds}")
            if not scores:
                continue
            if not all(math.isfinite(s) and 0 <= s <= 1 for s in scores):
                raise ValueError(f"scores of {kind!r} must be in [0, 1], got {list(scores)}")
            rate = 1 - sum(scores) / len(scores)
            self.failure[kind] = self.decay * self.failure[kind] + (1 - self.decay) * rate

    def weights(self) -> dict[str, float]:
        return {k: max(self.floor, f) for k, f in self.failure.items()}

    def counts(self, n: int) -> dict[str, int]:
        """How many of the next step's `n` groups each kind gets."""
        return apportion(self.weights(), n)
