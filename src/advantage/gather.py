"""Run rollouts concurrently and collect them into `TrajectoryGroup`s.

A rollout that raises is data, not a crash: its traceback is kept in `TrajectoryGroup.exceptions` and the
trajectory is left out. So are a rollout that returns something other than a `Trajectory` and one whose
reward is not a finite number. Only when the failures exceed `max_exceptions` does the whole gather stop,
with a `RolloutError` that shows the first traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tqdm import tqdm

from advantage.trajectory import Trajectory, TrajectoryGroup

log = logging.getLogger(__name__)

AfterEach = Callable[[TrajectoryGroup], Awaitable[TrajectoryGroup | None]]


class RolloutError(RuntimeError):
    """More rollouts (or `after_each` calls) failed than `max_exceptions` allows."""


def exception_budget(max_exceptions: int | float, n_rollouts: int) -> float:
    """How many failures are tolerated: an int is a count; a float in [0, 1] is a fraction of all rollouts.

    `math.inf` tolerates every failure.
    """
    if isinstance(max_exceptions, bool) or not isinstance(max_exceptions, (int, float)):
        raise TypeError(f"max_exceptions must be an int or a float, got {max_exceptions!r}")
    if isinstance(max_exceptions, int):
        if max_exceptions < 0:
            raise ValueError(f"max_exceptions must be >= 0, got {max_exceptions}")
        return float(max_exceptions)
    if max_exceptions == math.inf:
        return math.inf
    if 0.0 <= max_exceptions <= 1.0:
        return max_exceptions * n_rollouts
    raise ValueError(
        f"max_exceptions={max_exceptions!r}: pass an int count, a float fraction in [0, 1] of all rollouts, "
        "or math.inf"
    )


def completion_tokens(traj: Trajectory) -> int:
    """Tokens the backend sampled for this trajectory (0 for choices that carry no `token_ids`)."""
    n = 0
    for choice in traj.choices():
        token_ids = (choice.model_extra or {}).get("token_ids")
        if token_ids is not None:
            n += len(token_ids)
    return n


def _discard(aw: Awaitable[Any]) -> None:
    """Release an awaitable that will never be awaited (avoids 'coroutine was never awaited' warnings)."""
    if inspect.iscoroutine(aw):
        aw.close()
    elif isinstance(aw, asyncio.Future):
        aw.cancel()


class _Gather:
    """Shared state of one `gather_trajectory_groups` call: the semaphore, the budget and the progress bar."""

    def __init__(
        self, n_rollouts: int, budget: float, max_exceptions: int | float, concurrency: int, bar: tqdm
    ) -> None:
        self.n_rollouts = n_rollouts
        self.budget = budget
        self.max_exceptions = max_exceptions
        self.semaphore = asyncio.Semaphore(concurrency)
        self.bar = bar
        self.failures: list[str] = []
        self.reward_sum = 0.0
        self.n_ok = 0
        self.tokens = 0

    def record_failure(self, tb: str) -> None:
        self.failures.append(tb)
        self._update_postfix()
        if len(self.failures) > self.budget:
            raise RolloutError(
                f"{len(self.failures)} failures among {self.n_rollouts} rollouts, more than "
                f"max_exceptions={self.max_exceptions!r} allows ({self.budget:g}). First failure:\n\n"
                f"{self.failures[0]}\n"
                "Fix the rollout, or raise max_exceptions (an int count, or a float fraction of all "
                "rollouts) to tolerate failures."
            )

    def record_success(self, traj: Trajectory) -> None:
        self.n_ok += 1
        self.reward_sum += traj.reward
        self.tokens += completion_tokens(traj)
        self._update_postfix()

    def _update_postfix(self) -> None:
        reward = self.reward_sum / self.n_ok if self.n_ok else float("nan")
        n_exc = len(self.failures)
        self.bar.set_postfix(reward=f"{reward:.3f}", exc=n_exc, tokens=self.tokens, refresh=False)

    async def rollout(self, aw: Awaitable[Any]) -> Trajectory | str:
        """One rollout: its Trajectory, or the formatted traceback of why it failed."""
        tb: str | None
        try:
            async with self.semaphore:
                result = await aw
        except Exception:
            result = None
            tb = traceback.format_exc()
        else:
            tb = _invalid_result(result)
        self.bar.update(1)
        if tb is not None:
            self.record_failure(tb)
            return tb
        assert isinstance(result, Trajectory)
        self.record_success(result)
        return result

    async def group(
        self,
        tasks: list[asyncio.Task[Trajectory | str]],
        after_each: AfterEach | None,
    ) -> TrajectoryGroup | None:
        """Wait for one group's rollouts, then apply `after_each`. None means the group is dropped."""
        results = await asyncio.gather(*tasks)
        group = TrajectoryGroup(
            trajectories=[r for r in results if isinstance(r, Trajectory)],
            exceptions=[r for r in results if isinstance(r, str)],
        )
        if not group.trajectories or after_each is None:
            return group
        try:
            replaced = await after_each(group)
            if replaced is not None and not isinstance(replaced, TrajectoryGroup):
                kind = type(replaced).__name__
                raise TypeError(f"after_each returned {kind}, not a TrajectoryGroup or None")
        except Exception:
            # The group is dropped: its trajectories lack whatever after_each was meant to add (e.g. scores).
            self.record_failure(traceback.format_exc())
            return None
        return replaced


def _invalid_result(result: object) -> str | None:
    """Why a rollout's return value cannot be trained on, as a traceback-like message; None when it can."""
    if not isinstance(result, Trajectory):
        return f"TypeError: the rollout returned {type(result).__name__}, not an advantage.Trajectory\n"
    reward = result.reward
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        return (
            f"ValueError: the rollout returned a trajectory with reward {reward!r}; rewards must be finite "
            "numbers. Fix the reward function (a NaN often comes from 0/0 or the mean of an empty list).\n"
        )
    return None


async def gather_trajectory_groups(
    groups: Iterable[Iterable[Awaitable[Trajectory]]],
    *,
    max_exceptions: int | float = 0,
    after_each: AfterEach | None = None,
    concurrency: int = 32,
    desc: str = "gather",
    progress: bool = True,
) -> list[TrajectoryGroup]:
    """Run every rollout (at most `concurrency` at a time) and return one `TrajectoryGroup` per input group.

    - A failed rollout is recorded in its group's `exceptions` and left out of `trajectories`.
    - `max_exceptions`: failures tolerated, as an int count or a float fraction of all rollouts. Past it,
      the outstanding rollouts are cancelled and a `RolloutError` is raised.
    - `after_each(group)` is awaited once per completed group (e.g. a judge that scores it). It returns the
      group to keep (possibly a new one) or None to drop it; if it raises, the group is dropped and the
      failure counts against `max_exceptions`.
    - Groups left with no trajectories are dropped, with a warning. The rest keep their input order, and
      trajectories keep their order within a group.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    awaitables = [list(g) for g in groups]
    n_rollouts = sum(len(g) for g in awaitables)
    try:
        budget = exception_budget(max_exceptions, n_rollouts)
    except (TypeError, ValueError):
        for g in awaitables:
            for aw in g:
                _discard(aw)
        raise

    bar = tqdm(total=n_rollouts, desc=desc, unit="rollout", disable=not progress)
    state = _Gather(n_rollouts, budget, max_exceptions, concurrency, bar)
    rollout_tasks = [[asyncio.ensure_future(state.rollout(aw)) for aw in g] for g in awaitables]
    group_tasks = [asyncio.ensure_future(state.group(ts, after_each)) for ts in rollout_tasks]
    all_tasks: list[asyncio.Future[Any]] = [*(t for ts in rollout_tasks for t in ts), *group_tasks]
    try:
        if group_tasks:
            await asyncio.wait(group_tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in group_tasks:
            if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
                raise exc
        results = [t.result() for t in group_tasks]
    finally:
        for task in all_tasks:
            task.cancel()
        await asyncio.gather(*all_tasks, return_exceptions=True)
        for g in awaitables:  # the rollouts that never got the semaphore were never started
            for aw in g:
                _discard(aw)
        bar.close()

    n_by_after_each = sum(g is None for g in results)
    kept = [g for g in results if g is not None and g.trajectories]
    n_empty = len(results) - n_by_after_each - len(kept)
    if n_empty:
        log.warning("%s: dropped %d of %d groups left with no trajectories", desc, n_empty, len(results))
    if n_by_after_each:
        log.info("%s: after_each dropped %d of %d groups", desc, n_by_after_each, len(results))
    return kept


def is_informative(group: TrajectoryGroup) -> bool:
    """A group carries a learning signal when its rewards are not all equal (GRPO's advantage is 0 otherwise)."""
    rewards = group.rewards()
    return len(rewards) > 1 and max(rewards) != min(rewards)


async def gather_informative_groups(
    make_group: Callable[[int], Iterable[Awaitable[Trajectory]]],
    *,
    min_informative: int,
    max_groups: int,
    first_round: int | None = None,
    desc: str = "gather",
    **gather_kwargs: Any,
) -> list[TrajectoryGroup]:
    """Dynamic sampling (DAPO): gather groups in rounds until at least `min_informative` of them carry a
    learning signal (`is_informative`), or `max_groups` groups were gathered.

    - `make_group(k)` returns the rollouts of the k-th group; k counts on across rounds (0, 1, 2, ...), so a
      scenario or a sampling seed can follow it.
    - The first round gathers `first_round` groups (default `min_informative`); each later one as many as
      the informative rate so far says are still needed, at least one and never past `max_groups`.
    - `gather_kwargs` go to every round's `gather_trajectory_groups` (`max_exceptions` is per round).
    - Returns every group gathered, in order, tied ones included: the trainer skips them, and the train
      metrics stay those of all the policy's rollouts. Train with `TrainConfig(tied_groups_in_mean=False)`
      for a step as large as one where every group carried signal, as DAPO does.
    """
    if min_informative < 1:
        raise ValueError(f"min_informative must be >= 1, got {min_informative}")
    if max_groups < min_informative:
        raise ValueError(
            f"max_groups ({max_groups}) must be at least min_informative ({min_informative}): "
            "raise max_groups, or ask for fewer informative groups"
        )
    size = min(min_informative if first_round is None else first_round, max_groups)
    if size < 1:
        raise ValueError(f"first_round must be >= 1, got {first_round}")
    groups: list[TrajectoryGroup] = []
    k = n_informative = 0
    rnd = 1
    while True:
        got = await gather_trajectory_groups(
            [make_group(k + j) for j in range(size)],
            desc=desc if rnd == 1 else f"{desc} (round {rnd})",
            **gather_kwargs,
        )
        k += size
        groups += got
        n_informative += sum(is_informative(g) for g in got)
        missing = min_informative - n_informative
        if missing <= 0 or k >= max_groups:
            return groups
        rate = n_informative / k
        size = min(max_groups - k, max(1, math.ceil(missing / rate)) if rate > 0 else size)
        rnd += 1
