"""Rollout records: a `Trajectory` is one attempt at a task; a `TrajectoryGroup` is N attempts at the same task.

`messages_and_choices` mixes two kinds of items:
- plain message dicts (`{"role": ..., "content": ...}`) are *context*: they are rendered with the chat
  template and never trained on, even when their role is "assistant";
- OpenAI `Choice` objects (as returned by `client.chat.completions.create`) are the *trainable* assistant
  turns. They carry the exact sampled token ids and logprobs that the backend returned, and training uses
  those ids, never a re-tokenization of the text.

Their wire form (`to_dict`/`from_dict`) is `advantage.wire.records`. `check_groups` is the one check of
what training and logging take (finite rewards and metrics, well-formed sampled ids); the backends run it
where groups come in, and the layers below trust it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from openai.types.chat.chat_completion import Choice

from advantage.wire.records import GroupRecord, TrajectoryRecord

Message = dict[str, Any]
MessageOrChoice = Message | Choice
MAX_ABS_REWARD = 1e12  # the reward statistics square rewards: far below this, they never overflow


def choice_to_message(choice: Choice) -> Message:
    """The assistant message a Choice stands for, in the OpenAI request shape."""
    msg = choice.message
    out: Message = {"role": "assistant", "content": msg.content or ""}
    if msg.tool_calls:
        out["tool_calls"] = [tc.model_dump(include={"id", "type", "function"}) for tc in msg.tool_calls]
    return out


@dataclass
class Trajectory:
    messages_and_choices: list[MessageOrChoice]
    tools: list[dict[str, Any]] | None = None
    reward: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    # Why the episode ended ("answered", "max_turns", "error", ...), recorded by the rollout.
    finish_reason: str | None = None

    def messages(self) -> list[Message]:
        """The conversation as plain OpenAI request messages (Choices turned into assistant messages)."""
        return [choice_to_message(m) if isinstance(m, Choice) else m for m in self.messages_and_choices]

    def choices(self) -> list[Choice]:
        return [m for m in self.messages_and_choices if isinstance(m, Choice)]

    def weight_steps(self) -> list[int]:
        """The step of the weights that produced each Choice (from the backend's `weights` field)."""
        steps = []
        for c in self.choices():
            w = (c.model_extra or {}).get("weights") or {}
            if "step" in w:
                steps.append(int(w["step"]))
        return steps

    def to_record(self) -> TrajectoryRecord:
        items = [
            {"choice": m.model_dump()} if isinstance(m, Choice) else {"message": m}
            for m in self.messages_and_choices
        ]
        return TrajectoryRecord(
            messages_and_choices=items,
            tools=self.tools,
            reward=self.reward,
            metrics=self.metrics,
            metadata=self.metadata,
            logs=self.logs,
            finish_reason=self.finish_reason,
        )

    @classmethod
    def from_record(cls, r: TrajectoryRecord) -> Trajectory:
        """Raises ValueError naming the item that is neither a message nor a Choice."""
        items: list[MessageOrChoice] = []
        for k, item in enumerate(r.messages_and_choices):
            if set(item) == {"choice"}:
                items.append(Choice.model_validate(item["choice"]))
            elif set(item) == {"message"} and isinstance(item["message"], dict):
                items.append(item["message"])
            else:
                raise ValueError(
                    f'messages_and_choices[{k}] is neither {{"message": {{...}}}} nor {{"choice": {{...}}}}.'
                )
        return cls(
            messages_and_choices=items,
            tools=r.tools,
            reward=r.reward,
            metrics=dict(r.metrics),
            metadata=dict(r.metadata),
            logs=list(r.logs),
            finish_reason=r.finish_reason,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.to_record().model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        return cls.from_record(TrajectoryRecord.model_validate(d))


@dataclass
class TrajectoryGroup:
    """N attempts at the same task, plus the exceptions raised by the rollouts that failed."""

    trajectories: list[Trajectory]
    exceptions: list[str] = field(default_factory=list)  # formatted tracebacks

    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    def validate_rewards(self) -> None:
        """Deprecated (one release): use `check_groups([group])`, which checks everything training takes."""
        warnings.warn(
            "TrajectoryGroup.validate_rewards() is deprecated; use advantage.trajectory.check_groups.",
            DeprecationWarning,
            stacklevel=2,
        )
        check_group(self)

    def to_record(self) -> GroupRecord:
        return GroupRecord(
            trajectories=[t.to_record() for t in self.trajectories], exceptions=self.exceptions
        )

    @classmethod
    def from_record(cls, r: GroupRecord) -> TrajectoryGroup:
        return cls([Trajectory.from_record(t) for t in r.trajectories], list(r.exceptions))

    def to_dict(self) -> dict[str, Any]:
        return self.to_record().model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrajectoryGroup:
        return cls.from_record(GroupRecord.model_validate(d))


class InvalidGroups(ValueError):
    """Groups that training or logging cannot take; `param` names the part of the request ("groups.3")."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def read_groups(records: list[GroupRecord]) -> list[TrajectoryGroup]:
    """Groups from their wire form; an item that does not read raises InvalidGroups naming the group."""
    groups = []
    for gi, r in enumerate(records):
        try:
            groups.append(TrajectoryGroup.from_record(r))
        except ValueError as exc:
            raise InvalidGroups(
                f"Group {gi} does not read as TrajectoryGroup.to_dict(): {type(exc).__name__}: {exc}",
                f"groups.{gi}",
            ) from exc
    return groups


def check_groups(groups: list[TrajectoryGroup], action: str, vocab_size: int | None = None) -> None:
    """Refuse groups that `action` ("train", "log", ...) would choke on, saying which and what to send:
    no groups, an empty group, and what `check_group` refuses."""
    if not groups:
        raise InvalidGroups(f"{action}() got no trajectory groups; gather some rollouts first.", "groups")
    for gi, g in enumerate(groups):
        if not g.trajectories:
            raise InvalidGroups(
                f"Group {gi} has no trajectories; drop groups whose rollouts all failed before sending them.",
                f"groups.{gi}.trajectories",
            )
        try:
            check_group(g, vocab_size)
        except ValueError as exc:
            raise InvalidGroups(f"Group {gi}: {exc}", f"groups.{gi}") from exc


def check_group(group: TrajectoryGroup, vocab_size: int | None = None) -> None:
    """Refuse a group that training or logging would choke on, saying which trajectory and what to send:
    rewards that are not finite or beyond ±MAX_ABS_REWARD, metrics that are not finite, and Choices whose
    `token_ids` are not ids of the vocabulary (of `vocab_size` ids, when given) or whose `token_logprobs`
    are not finite numbers."""
    for ti, t in enumerate(group.trajectories):
        if (
            not isinstance(t.reward, (int, float))
            or not math.isfinite(t.reward)
            or abs(t.reward) > MAX_ABS_REWARD
        ):
            raise ValueError(
                f"Trajectory {ti} has reward {t.reward!r}; rewards must be finite numbers within "
                f"±{MAX_ABS_REWARD:g}. Fix or rescale the reward function, or drop the trajectory."
            )
        bad = [k for k, v in t.metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"Trajectory {ti}: metrics {bad} are not finite numbers; fix or drop them.")
        for k, item in enumerate(t.messages_and_choices):
            if isinstance(item, Choice):
                _check_choice(
                    item.model_extra or {}, f"Trajectory {ti}, messages_and_choices[{k}]", vocab_size
                )


def _check_choice(extra: dict[str, Any], where: str, vocab_size: int | None) -> None:
    ids, lps = extra.get("token_ids"), extra.get("token_logprobs")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise ValueError(
                f"{where}: token_ids must be a list of integer token ids, as the backend sent them."
            )
        bad = [x for x in ids if vocab_size is not None and not 0 <= x < vocab_size]
        if bad:
            raise ValueError(
                f"{where}: token_ids has {bad[0]}, outside the vocabulary [0, {vocab_size}); send the ids the "
                "backend sampled."
            )
    if lps is not None:
        if not isinstance(lps, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lps
        ):
            raise ValueError(
                f"{where}: token_logprobs must be a list of finite numbers (no NaN or infinity); send the "
                "logprobs the backend returned."
            )
    if isinstance(ids, list) and isinstance(lps, list) and len(ids) != len(lps):
        raise ValueError(
            f"{where}: {len(ids)} token_ids but {len(lps)} token_logprobs; send one logprob per id."
        )
    forced = extra.get("forced_token_indices")
    if forced is not None and not (
        isinstance(forced, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(ids or []) for i in forced)
    ):
        raise ValueError(
            f"{where}: forced_token_indices must be a list of indices into token_ids, as the backend sent it."
        )
