"""Group advantages against hand-computed numbers, plus the invariants (zero-sum groups, zero variance), and
the sampler-vs-trainer drift metrics by hand."""

from __future__ import annotations

import math
import random

import pytest

from advantage.training.advantages import group_advantages, prefix_tree_advantages
from advantage.training.grpo import drift_metrics


def test_group_scale_by_hand() -> None:
    # mean = 2; population var = (1 + 0 + 1) / 3 = 2/3; std = sqrt(2/3) = 0.816497
    # A = (−1, 0, 1) / 0.816497 = (−1.224745, 0, 1.224745)   (sqrt(1.5) = 1.224745)
    adv, metrics = group_advantages([[1.0, 2.0, 3.0]], scale="group", eps=0.0)
    assert adv[0] == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert metrics["reward_mean"] == pytest.approx(2.0)
    assert metrics["reward_std"] == pytest.approx(math.sqrt(2 / 3))


def test_group_scale_adds_eps() -> None:
    # [0, 1]: mean 0.5, std 0.5, A = ±0.5 / (0.5 + 0.5) = ±0.5 with eps = 0.5
    adv, _ = group_advantages([[0.0, 1.0]], scale="group", eps=0.5)
    assert adv[0] == pytest.approx([-0.5, 0.5])


def test_batch_scale_by_hand() -> None:
    # all rewards [0, 1, 2, 2]: mean 1.25; deviations −1.25, −0.25, 0.75, 0.75
    # squares 1.5625 + 0.0625 + 0.5625 + 0.5625 = 2.75; var = 2.75 / 4 = 0.6875; std = 0.829156
    # group 0: mean 0.5, A = ±0.5 / 0.829156 = ±0.603023; group 1 has zero variance → [0, 0]
    adv, metrics = group_advantages([[0.0, 1.0], [2.0, 2.0]], scale="batch", eps=0.0)
    assert adv[0] == pytest.approx([-0.603023, 0.603023], abs=1e-6)
    assert adv[1] == [0.0, 0.0]
    assert metrics == pytest.approx(
        {"reward_mean": 1.25, "reward_std": 0.829156, "n_groups": 2.0, "frac_zero_variance_groups": 0.5},
        abs=1e-6,
    )


def test_none_scale_is_dr_grpo() -> None:
    # mean(1, 2, 6) = 3; A = (−2, −1, 3), not divided
    adv, _ = group_advantages([[1.0, 2.0, 6.0]], scale="none")
    assert adv[0] == pytest.approx([-2.0, -1.0, 3.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_groups_are_exact_zeros_and_counted(scale: str) -> None:
    # 0.1 is not exact in binary: r − mean(r) could leave rounding noise; it must be exactly 0.
    rewards = [[0.1, 0.1, 0.1], [1.0], [0.0, 1.0], [5.0, 5.0]]
    adv, metrics = group_advantages(rewards, scale=scale)  # type: ignore[arg-type]
    assert adv[0] == [0.0, 0.0, 0.0]
    assert adv[1] == [0.0]
    assert adv[3] == [0.0, 0.0]
    assert adv[2][0] < 0 < adv[2][1]
    assert metrics["n_groups"] == 4.0
    assert metrics["frac_zero_variance_groups"] == 0.75


def test_all_groups_zero_variance_does_not_crash() -> None:
    adv, metrics = group_advantages([[1.0, 1.0], [1.0, 1.0]], scale="batch")
    assert adv == [[0.0, 0.0], [0.0, 0.0]]
    assert metrics["frac_zero_variance_groups"] == 1.0
    assert metrics["reward_std"] == 0.0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_sum_to_zero_per_group(scale: str) -> None:
    rng = random.Random(0)
    rewards = [[rng.uniform(-3, 3) for _ in range(rng.randint(1, 9))] for _ in range(20)]
    adv, _ = group_advantages(rewards, scale=scale)  # type: ignore[arg-type]
    assert [len(a) for a in adv] == [len(r) for r in rewards]
    for a in adv:
        assert sum(a) == pytest.approx(0.0, abs=1e-9)


def test_group_scale_gives_unit_population_std() -> None:
    adv, _ = group_advantages([[0.0, 3.0, 4.0, 10.0]], scale="group", eps=0.0)
    a = adv[0]
    assert math.sqrt(sum(x * x for x in a) / len(a)) == pytest.approx(1.0)


def test_empty_batch_raises() -> None:
    with pytest.raises(ValueError, match="no groups"):
        group_advantages([])


def test_empty_group_raises() -> None:
    with pytest.raises(ValueError, match="group 1 has no rewards"):
        group_advantages([[1.0, 0.0], []])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_raises_with_location(bad: float) -> None:
    with pytest.raises(ValueError, match=r"group 1, index 2 is not finite.*finite reward"):
        group_advantages([[0.0, 1.0], [0.0, 1.0, bad]])


def test_unknown_scale_raises() -> None:
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages([[0.0, 1.0]], scale="std")  # type: ignore[arg-type]


def test_drift_metrics_by_hand() -> None:
    # new (0, 1, 2), old (0, 2, 1): mean |diff| = (0 + 1 + 1) / 3 = 2/3. Both means 1, so
    # cov = (-1)(-1) + 0(1) + 1(0) = 1 and var = 2 each: correlation 1 / sqrt(2 * 2) = 0.5.
    m = drift_metrics([0.0, 1.0, 2.0], [0.0, 2.0, 1.0])
    assert m == pytest.approx({"logprob_drift_mean_abs": 2 / 3, "logprob_drift_corr": 0.5})
    # One token, or one constant side, has no correlation to measure: it reads as agreement (1.0).
    assert drift_metrics([-1.0], [-1.5]) == pytest.approx(
        {"logprob_drift_mean_abs": 0.5, "logprob_drift_corr": 1.0}
    )
    assert drift_metrics([1.0, 1.0], [0.0, 2.0])["logprob_drift_corr"] == 1.0
    assert drift_metrics([], []) == {} and drift_metrics([1.0], [1.0, 2.0]) == {}


def test_prefix_tree_advantages_by_hand() -> None:
    # Tokens 1, 2 are shared by all three: the mean (1 - 1 + 3) / 3 = 1. Token 3 by A and B: (1 - 1) / 2 = 0.
    # C parts at position 2, and A from B at position 3: each then has its own.
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7]]
    assert prefix_tree_advantages(seqs, [1.0, -1.0, 3.0]) == [
        [1.0, 1.0, 0.0, 1.0],
        [1.0, 1.0, 0.0, -1.0],
        [1.0, 1.0, 3.0, 3.0],
    ]
    # One sequence a prefix of the other: the shared part gets the mean, the rest its own.
    assert prefix_tree_advantages([[1, 2], [1, 2, 3]], [2.0, -2.0]) == [[0.0, 0.0], [0.0, 0.0, -2.0]]
    assert prefix_tree_advantages([[5]], [0.5]) == [[0.5]]
    with pytest.raises(ValueError, match="2 sequences but 1 advantages"):
        prefix_tree_advantages([[1], [2]], [0.0])


def test_prefix_tree_advantages_against_the_node_baseline_by_hand() -> None:
    # The same tree as above. Position 0: every sequence at the root (V = 1), all wrote 1 (Q = 1): 0.
    # Position 2: the node [1, 2] holds all three (V = 1); A and B wrote 3 (Q = 0): -1; C wrote 6 (Q = 3): +2.
    # Position 3: A's and B's node [1, 2, 3] holds A and B (V = 0); A wrote 4 (Q = 1): +1, B 5 (Q = -1): -1;
    # C's node [1, 2, 6] holds C alone (V = Q = 3): 0.
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7]]
    assert prefix_tree_advantages(seqs, [1.0, -1.0, 3.0], baseline="node") == [
        [0.0, 0.0, -1.0, 1.0],
        [0.0, 0.0, -1.0, -1.0],
        [0.0, 0.0, 2.0, 0.0],
    ]
    # Two failures that share a fatal choice and then differ (a wrong target unit, then either source) are
    # not told apart: their second choice gets 0, where the group baseline pushes both down by -1.
    seqs = [[7, 1, 3], [7, 2, 3], [7, 2, 4]]  # success, then two failures after token 2
    group = prefix_tree_advantages(seqs, [2.0, -1.0, -1.0])
    node = prefix_tree_advantages(seqs, [2.0, -1.0, -1.0], baseline="node")
    assert group[1][2] == group[2][2] == -1.0 and node[1][2] == node[2][2] == 0.0
    assert node == [[0.0, 2.0, 0.0], [0.0, -1.0, 0.0], [0.0, -1.0, 0.0]]
    # One sequence a prefix of the other: only where the longer one goes on is it credited (V = 0, Q = -2).
    assert prefix_tree_advantages([[1, 2], [1, 2, 3]], [2.0, -2.0], "node") == [[0.0, 0.0], [0.0, 0.0, -2.0]]
    with pytest.raises(ValueError, match="baseline must be one of"):
        prefix_tree_advantages([[1]], [0.0], baseline="root")  # type: ignore[arg-type]
