"""gather_trajectory_groups: concurrency, failures as data, the exception budget, after_each, order."""

from __future__ import annotations

import asyncio
import inspect
import math

import pytest
from openai.types.chat.chat_completion import Choice

from advantage.gather import (
    RolloutError,
    completion_tokens,
    exception_budget,
    gather_informative_groups,
    gather_trajectory_groups,
    is_informative,
)
from advantage.trajectory import Trajectory, TrajectoryGroup


def _traj(reward: float, tag: str = "") -> Trajectory:
    return Trajectory(messages_and_choices=[{"role": "user", "content": tag}], reward=reward)


async def _ok(reward: float, tag: str = "", delay: float = 0.0) -> Trajectory:
    await asyncio.sleep(delay)
    return _traj(reward, tag)


async def _boom(msg: str = "boom", delay: float = 0.0) -> Trajectory:
    await asyncio.sleep(delay)
    raise RuntimeError(msg)


async def test_concurrency_limit_respected() -> None:
    running = peak = 0

    async def rollout(i: int) -> Trajectory:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return _traj(float(i))

    groups = await gather_trajectory_groups(
        [[rollout(g * 4 + i) for i in range(4)] for g in range(5)], concurrency=3, progress=False
    )
    assert peak == 3
    assert [len(g.trajectories) for g in groups] == [4] * 5


async def test_order_preserved_across_and_within_groups() -> None:
    # Later items finish first, so completion order is the reverse of input order.
    groups = await gather_trajectory_groups(
        [[_ok(0.0, f"{g}.{i}", delay=0.002 * (10 - g * 3 - i)) for i in range(3)] for g in range(3)],
        progress=False,
    )
    tags = [[t.messages()[0]["content"] for t in g.trajectories] for g in groups]
    assert tags == [["0.0", "0.1", "0.2"], ["1.0", "1.1", "1.2"], ["2.0", "2.1", "2.2"]]


async def test_exceptions_recorded_as_data() -> None:
    groups = await gather_trajectory_groups(
        [[_ok(1.0), _boom("first bad"), _ok(0.0)], [_ok(0.5), _ok(0.5)]], max_exceptions=1, progress=False
    )
    assert groups[0].rewards() == [1.0, 0.0]
    assert len(groups[0].exceptions) == 1
    assert "RuntimeError: first bad" in groups[0].exceptions[0]
    assert "Traceback" in groups[0].exceptions[0]
    assert groups[1].exceptions == []


async def test_non_trajectory_return_is_an_error() -> None:
    async def bad() -> Trajectory:
        return {"reward": 1.0}  # type: ignore[return-value]

    groups = await gather_trajectory_groups([[bad(), _ok(1.0)]], max_exceptions=1, progress=False)
    assert len(groups[0].trajectories) == 1
    assert "not an advantage.Trajectory" in groups[0].exceptions[0]


@pytest.mark.parametrize("reward", [math.nan, math.inf, -math.inf])
async def test_non_finite_reward_is_an_error(reward: float) -> None:
    groups = await gather_trajectory_groups([[_ok(reward), _ok(1.0)]], max_exceptions=1, progress=False)
    assert groups[0].rewards() == [1.0]
    assert "Fix the reward function" in groups[0].exceptions[0]

    with pytest.raises(RolloutError, match="Fix the reward function"):
        await gather_trajectory_groups([[_ok(reward), _ok(1.0)]], progress=False)


async def test_budget_as_count() -> None:
    two_failures = lambda: [[_ok(1.0), _boom()], [_boom(), _ok(1.0)]]  # noqa: E731
    groups = await gather_trajectory_groups(two_failures(), max_exceptions=2, progress=False)
    assert sum(len(g.exceptions) for g in groups) == 2
    with pytest.raises(RolloutError, match="2 failures among 4 rollouts"):
        await gather_trajectory_groups(two_failures(), max_exceptions=1, progress=False)


async def test_budget_as_fraction() -> None:
    # 10 rollouts, 2 fail: a fraction of 0.2 allows 2 failures, 0.1 allows only 1.
    def batch() -> list[list]:
        return [[_boom() if (g, i) in {(0, 1), (1, 3)} else _ok(1.0) for i in range(5)] for g in range(2)]

    groups = await gather_trajectory_groups(batch(), max_exceptions=0.2, progress=False)
    assert [len(g.exceptions) for g in groups] == [1, 1]
    with pytest.raises(RolloutError):
        await gather_trajectory_groups(batch(), max_exceptions=0.1, progress=False)


def test_exception_budget_rules() -> None:
    assert exception_budget(3, 100) == 3
    assert exception_budget(0.25, 8) == 2.0
    assert exception_budget(math.inf, 8) == math.inf
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises((TypeError, ValueError)):
            exception_budget(bad, 8)  # type: ignore[arg-type]


async def test_error_message_shows_first_traceback_and_the_fix() -> None:
    with pytest.raises(RolloutError) as info:
        await gather_trajectory_groups(
            [[_boom("the first one"), _boom("the second one", delay=0.05)]], progress=False
        )
    msg = str(info.value)
    assert "the first one" in msg and "the second one" not in msg
    assert "Traceback" in msg
    assert "raise max_exceptions" in msg


async def test_outstanding_rollouts_cancelled_on_error() -> None:
    cancelled: list[int] = []
    finished: list[int] = []

    async def slow(i: int) -> Trajectory:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        finished.append(i)
        return _traj(1.0)

    with pytest.raises(RolloutError):
        await gather_trajectory_groups([[slow(0), _boom()], [slow(1), slow(2)]], progress=False)
    assert sorted(cancelled) == [0, 1, 2]
    assert finished == []


async def test_queued_rollouts_are_closed_not_leaked() -> None:
    # With concurrency 1, the coroutines behind the failing one never start: they must be closed, or Python
    # warns "coroutine was never awaited" when they are collected.
    queued = [_ok(1.0, delay=5), _ok(1.0, delay=5), _ok(1.0, delay=5)]
    with pytest.raises(RolloutError):
        await gather_trajectory_groups([[_boom(), *queued]], concurrency=1, progress=False)
    assert [inspect.getcoroutinestate(c) for c in queued] == [inspect.CORO_CLOSED] * 3


async def test_after_each_replaces_and_drops() -> None:
    async def judge(group: TrajectoryGroup) -> TrajectoryGroup | None:
        if group.rewards()[0] < 0:
            return None
        return TrajectoryGroup([_traj(r * 10) for r in group.rewards()], group.exceptions)

    groups = await gather_trajectory_groups(
        [[_ok(1.0), _ok(2.0)], [_ok(-1.0)], [_ok(3.0)]], after_each=judge, progress=False
    )
    assert [g.rewards() for g in groups] == [[10.0, 20.0], [30.0]]


async def test_after_each_failures_count_against_budget() -> None:
    async def flaky_judge(group: TrajectoryGroup) -> TrajectoryGroup | None:
        if group.rewards()[0] == 0.0:
            raise ConnectionError("judge down")
        return group

    groups = await gather_trajectory_groups(
        [[_ok(0.0)], [_ok(1.0)]], after_each=flaky_judge, max_exceptions=1, progress=False
    )
    assert [g.rewards() for g in groups] == [[1.0]]
    with pytest.raises(RolloutError, match="judge down"):
        await gather_trajectory_groups([[_ok(0.0)], [_ok(1.0)]], after_each=flaky_judge, progress=False)


async def test_empty_groups_dropped_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    called: list[int] = []

    async def judge(group: TrajectoryGroup) -> TrajectoryGroup:
        called.append(len(group.trajectories))
        return group

    groups = await gather_trajectory_groups(
        [[_boom(), _boom()], [_ok(1.0)]], max_exceptions=2, after_each=judge, progress=False
    )
    assert [g.rewards() for g in groups] == [[1.0]]
    assert called == [1]  # after_each is not called on a group with nothing left in it
    assert "dropped 1 of 2 groups" in caplog.text


async def test_empty_input() -> None:
    assert await gather_trajectory_groups([], progress=False) == []


async def test_progress_postfix_counts_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    choice = Choice.model_validate(
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "hi"},
            "token_ids": [5, 6, 7],
            "token_logprobs": [-0.1, -0.2, -0.3],
        }
    )

    async def with_choice() -> Trajectory:
        return Trajectory(messages_and_choices=[{"role": "user", "content": "q"}, choice], reward=0.5)

    traj = await with_choice()
    assert completion_tokens(traj) == 3
    await gather_trajectory_groups([[with_choice(), with_choice()]], desc="demo", progress=True)
    err = capsys.readouterr().err
    assert "demo" in err and "tokens=6" in err and "reward=0.500" in err


# ------------------------------------------------------------------ dynamic sampling


def _rounds(rewards_of: dict[int, list[float]]) -> tuple[list[int], object]:
    """A make_group over fixed per-group rewards that records which groups were asked for."""
    asked: list[int] = []

    def make_group(k: int) -> list:
        asked.append(k)
        return [_ok(r, tag=f"{k}") for r in rewards_of[k]]

    return asked, make_group


async def test_informative_groups_stop_after_first_round_when_enough() -> None:
    asked, make_group = _rounds({0: [0, 1], 1: [1, 1], 2: [0, 1], 3: [0, 0]})
    groups = await gather_informative_groups(
        make_group, min_informative=2, max_groups=8, first_round=4, progress=False
    )
    assert asked == [0, 1, 2, 3]
    assert [is_informative(g) for g in groups] == [True, False, True, False]


async def test_informative_groups_later_rounds_sized_by_the_rate_so_far() -> None:
    # Round 1: 4 groups, 1 informative (rate 1/4); 3 more are wanted -> ceil(3 / 0.25) = 12, capped at
    # max_groups - 4 = 6. Round 2 (groups 4..9) finds 3 more informative ones: 4 in all, stop.
    rewards = {k: [0.0, 0.0] for k in range(10)}
    for k in (2, 5, 7, 9):
        rewards[k] = [0.0, 1.0]
    asked, make_group = _rounds(rewards)
    groups = await gather_informative_groups(
        make_group, min_informative=4, max_groups=10, first_round=4, progress=False
    )
    assert asked == list(range(10))
    assert len(groups) == 10 and sum(is_informative(g) for g in groups) == 4
    assert [g.trajectories[0].messages_and_choices[0]["content"] for g in groups] == [
        str(k) for k in range(10)
    ]


async def test_informative_groups_next_round_is_what_is_missing_at_the_rate() -> None:
    # Round 1: 4 groups, 2 informative (rate 1/2); 1 more wanted -> ceil(1 / 0.5) = 2 groups, then stop.
    rewards = {k: [1.0, 1.0] for k in range(8)}
    for k in (0, 1, 4):
        rewards[k] = [0.0, 0.5]
    asked, make_group = _rounds(rewards)
    groups = await gather_informative_groups(
        make_group, min_informative=3, max_groups=8, first_round=4, progress=False
    )
    assert asked == [0, 1, 2, 3, 4, 5]
    assert sum(is_informative(g) for g in groups) == 3


async def test_informative_groups_give_up_at_max_groups() -> None:
    asked, make_group = _rounds({k: [1.0, 1.0, 1.0] for k in range(6)})
    groups = await gather_informative_groups(make_group, min_informative=2, max_groups=6, progress=False)
    assert asked == list(range(6))  # rounds of 2 (the rate is 0), until 6 were gathered
    assert len(groups) == 6 and not any(is_informative(g) for g in groups)


def test_is_informative_needs_two_different_rewards() -> None:
    assert not is_informative(TrajectoryGroup(trajectories=[_traj(1.0)]))
    assert not is_informative(TrajectoryGroup(trajectories=[_traj(0.5), _traj(0.5)]))
    assert is_informative(TrajectoryGroup(trajectories=[_traj(0.5), _traj(0.6)]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_informative": 0, "max_groups": 4}, "min_informative must be >= 1"),
        ({"min_informative": 5, "max_groups": 4}, "raise max_groups"),
        ({"min_informative": 2, "max_groups": 4, "first_round": 0}, "first_round must be >= 1"),
    ],
)
async def test_informative_groups_reject_bad_sizes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        await gather_informative_groups(lambda k: [_ok(1.0)], progress=False, **kwargs)
