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
such groups to save time (their gradient is 0); `TrainConfig.tied_groups_in_mean` says whether they still
count in the loss's mean.

`prefix_tree_advantages` assigns credit per token where a group's completions share a start. Token j of
sequence i is the action "token ids[j] after ids[:j]"; the rollouts that took that same action from the
same context are those that agree with sequence i on ids[:j + 1]. The token gets their mean advantage, a
Monte Carlo estimate of how good that action was, instead of sequence i's own. Where every rollout of a
group wrote the same token (the opening of a tool call, a tool name's first piece) the mean of a group's
advantages is 0 and the token is left alone; where they part, each branch gets its own rollouts' mean.
With a per-sequence advantage, a failed rollout's push down on such shared tokens is cancelled by its
siblings' push up only under a token-count mean; under `seq_mean` the shorter sequences win, and a failure
that called the wrong `get_*` tool pushed down `get` for every `get_*` tool.

That mean is Q(context, token) − V(root): every token after the point where a rollout parted from the
others carries the whole of its branch's advantage. With `baseline="node"` the token gets Q − V(node)
instead, V(node) being the mean over the rollouts that reached the token's context: a token is credited
only where rollouts chose differently from the same context, by how much better its branch did than the
node's average (the per-node advantage of tree-search RL, e.g. TreeRL, Hou et al. 2025). Where one rollout
runs on alone its tokens get 0. This matters after a fatal choice: a unit conversion that took the source
unit as the target fails whatever comes next, and under the group baseline its next argument was pushed
down too, so the policy drifted from one failure to another ("to": "kg", "from": "lb" -> "to": "kg",
"from": "kg"), where under the node baseline only the fatal choice is.
"""

from __future__ import annotations

import math
from statistics import fmean, pstdev
from typing import Literal

Scale = Literal["group", "batch", "none"]
SCALES: tuple[Scale, ...] = ("group", "batch", "none")
TreeBaseline = Literal["group", "node"]
TREE_BASELINES: tuple[TreeBaseline, ...] = ("group", "node")


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


def prefix_tree_advantages(
    sequences: list[list[int]], advantages: list[float], baseline: TreeBaseline = "group"
) -> list[list[float]]:
    """Per-token advantages of a group's sequences (see the module docstring): position j of sequence i
    gets Q_j, the mean advantage of the sequences that agree with sequence i on tokens 0..j (itself
    included). With `baseline="node"` it gets Q_j − V_j instead, V_j being the same mean over the sequences
    that agree on tokens 0..j−1 (the node the token is chosen at): nonzero only where sequences part."""
    if len(sequences) != len(advantages):
        raise ValueError(f"{len(sequences)} sequences but {len(advantages)} advantages")
    if baseline not in TREE_BASELINES:
        raise ValueError(f"baseline must be one of {TREE_BASELINES}, got {baseline!r}")
    n = len(sequences)
    lcp = [[0] * n for _ in range(n)]
    for i in range(n):
        lcp[i][i] = len(sequences[i])
        for k in range(i + 1, n):
            a, b = sequences[i], sequences[k]
            m = min(len(a), len(b))
            j = next((j for j in range(m) if a[j] != b[j]), m)
            lcp[i][k] = lcp[k][i] = j
    out = []
    for i, seq in enumerate(sequences):
        values = [0.0] * len(seq)
        # Sequences drop out of i's node as j passes their common prefix with i; between two such points
        # the set, and so the mean, is constant.
        cuts = sorted({min(lcp[i][k], len(seq)) for k in range(n)} | {0})
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            q = fmean([advantages[k] for k in range(n) if lcp[i][k] > lo])
            if baseline == "group":
                values[lo:hi] = [q] * (hi - lo)
            else:  # only token lo is chosen among siblings; the node of lo + 1 .. hi − 1 is their own
                values[lo] = q - fmean([advantages[k] for k in range(n) if lcp[i][k] >= lo])
        out.append(values)
    return out
