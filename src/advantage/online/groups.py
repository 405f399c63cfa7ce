"""GRPO groups from recorded, rewarded traffic: a pure function of the store's rows, no I/O.

A group is N attempts at the same task. In traffic, the same task is the same prompt: the choices of one
request with n > 1, and the choices of requests whose rendered prompts are token for token the same
(`prompt_token_ids`, which covers the system prompt, the tools and the whole conversation so far), from any
step's weights. Each rated choice becomes a `Trajectory`: the request's messages as context, then a `Choice`
carrying the exact sampled ids and logprobs as recorded (`token_ids`, `token_logprobs`, `prompt_token_ids`,
`forced_token_indices`, `weights`), the request's tools, and the feedback's reward. So training uses the
sampled ids, never a re-tokenization, exactly as for rollouts.

The rated choices include background samples (`server/background.py`) and choices the online trainer's
judge scored (`judging.py`); each trajectory's metadata says which (`background`, `judge`).

Skipped, and counted (as `model.train` counts zero-variance groups): a prompt with fewer than `min_size`
rated choices (nothing to compare against), and a group whose rewards are all equal (zero advantage).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from openai.types.chat.chat_completion import Choice

from advantage.online.records import RecordedChoice, RecordedCompletion, RewardedChoice
from advantage.trajectory import MessageOrChoice, Trajectory, TrajectoryGroup


@dataclass
class TrafficGroups:
    groups: list[TrajectoryGroup] = field(default_factory=list)
    too_small: int = 0  # prompts with fewer than min_size rated choices
    zero_variance: int = 0  # groups whose rewards were all equal
    tied: list[tuple[tuple[str, int], ...]] = field(
        default_factory=list
    )  # those groups' (completion, choice)


def trajectory_from_traffic(row: RewardedChoice) -> Trajectory:
    """One rated choice as a trajectory: its request's messages, then the choice with its sampled ids."""
    t = recorded_trajectory(row.completion, row.choice, row.feedback.reward)
    if row.feedback.judge is not None:
        t.metadata["judge"] = row.feedback.judge
    return t


def recorded_trajectory(rec: RecordedCompletion, ch: RecordedChoice, reward: float) -> Trajectory:
    """A recorded choice as a trajectory with `reward`: its request's messages, then the choice."""
    choice = Choice.model_validate(
        {
            "index": ch.index,
            "message": ch.message,
            "finish_reason": ch.finish_reason or "stop",
            "logprobs": None,
            "token_ids": ch.token_ids,
            "token_logprobs": ch.logprobs,
            "prompt_token_ids": ch.prompt_token_ids,
            "forced_token_indices": ch.forced_token_indices,
            "weights": {"model": rec.model, "step": rec.step},
        }
    )
    items: list[MessageOrChoice] = [*rec.request.get("messages", []), choice]
    # The caller's tags (task, episode, ...) first; where the completion came from cannot be overridden.
    metadata = {
        **rec.metadata,
        "completion_id": rec.id,
        "choice": ch.index,
        "step": rec.step,
        "user": rec.user,
        "background": ch.background,
    }
    return Trajectory(items, tools=rec.request.get("tools"), reward=reward, metadata=metadata)


def groups_from_traffic(rows: Iterable[RewardedChoice], min_size: int = 2) -> TrafficGroups:
    """Rated choices grouped by prompt (first seen first), small and zero-variance groups skipped."""
    if min_size < 2:
        raise ValueError(f"min_size must be at least 2 (a group compares attempts), got {min_size}.")
    by_prompt: dict[tuple[int, ...], list[RewardedChoice]] = {}
    for row in rows:
        by_prompt.setdefault(tuple(row.choice.prompt_token_ids), []).append(row)
    out = TrafficGroups()
    for members in by_prompt.values():
        if len(members) < min_size:
            out.too_small += 1
            continue
        rewards = [m.feedback.reward for m in members]
        if max(rewards) == min(rewards):
            out.zero_variance += 1
            out.tied.append(tuple((m.completion.id, m.choice.index) for m in members))
            continue
        out.groups.append(TrajectoryGroup([trajectory_from_traffic(m) for m in members]))
    return out
