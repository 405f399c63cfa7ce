"""TaskMix and apportion: hand-computed shares, the running failure rate, and bad input."""

import math

import pytest

from advantage import TaskMix, apportion


def test_apportion_by_largest_remainder():
    # quotas 5 * (1, 1, 2) / 4 = 1.25, 1.25, 2.5 -> floors 1, 1, 2 -> c's 0.5 is the largest remainder
    assert apportion({"a": 1, "b": 1, "c": 2}, 5) == {"a": 1, "b": 1, "c": 3}
    # equal remainders (0.5 each for 2 slots... quotas 0.5, 0.5, 1.0 of n=2): the first listed wins
    assert apportion({"a": 1, "b": 1, "c": 2}, 2) == {"a": 1, "b": 0, "c": 1}
    assert apportion({"a": 0.1, "b": 0.9}, 0) == {"a": 0, "b": 0}
    for n in range(20):
        assert sum(apportion({"a": 0.1, "b": 0.25, "c": 0.5, "d": 0.5}, n).values()) == n


@pytest.mark.parametrize(
    "weights, n, match",
    [({}, 3, "empty"), ({"a": 0.0}, 3, "all 0"), ({"a": -1.0, "b": 1.0}, 3, ">= 0"),
     ({"a": math.nan}, 3, "finite"), ({"a": 1.0}, -1, "n must be")],
)  # fmt: skip
def test_apportion_rejects_bad_input(weights, n, match):
    with pytest.raises(ValueError, match=match):
        apportion(weights, n)


def test_task_mix_moves_groups_to_the_kinds_still_failed():
    mix = TaskMix(["weather", "units", "currency", "events"])
    assert mix.counts(8) == {"weather": 2, "units": 2, "currency": 2, "events": 2}  # prior 0.5 each
    mix.update(
        {"weather": [1, 1, 1, 1], "units": [0, 0, 1, 0], "currency": [0, 0, 0, 0], "events": [1, 1, 0, 1]}
    )
    # failure = 0.5 * 0.5 + 0.5 * rate: weather 0.25, units 0.625, currency 0.75, events 0.375
    assert mix.failure == {"weather": 0.25, "units": 0.625, "currency": 0.75, "events": 0.375}
    # quotas 8 * (0.25, 0.625, 0.75, 0.375) / 2 = 1.0, 2.5, 3.0, 1.5 -> floors 1, 2, 3, 1 (7); remainders
    # units 0.5 and events 0.5 tie, units is listed first
    assert mix.counts(8) == {"weather": 1, "units": 3, "currency": 3, "events": 1}
    mix.update({"weather": [1] * 4})  # weather 0.125; kinds not drawn keep their estimate
    mix.update({"weather": [1] * 4})  # 0.0625 -> the floor 0.1 keeps it drawn now and then
    assert mix.weights()["weather"] == 0.1
    assert mix.failure["units"] == 0.625


def test_task_mix_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one kind"):
        TaskMix([])
    mix = TaskMix(["a"])
    with pytest.raises(KeyError, match="unknown kind"):
        mix.update({"b": [1.0]})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        mix.update({"a": [math.nan]})
    mix.update({"a": []})  # nothing drawn: nothing changes
    assert mix.failure == {"a": 0.5}
