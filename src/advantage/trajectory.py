"""Rollout records: a `Trajectory` is one attempt at a task; a `TrajectoryGroup` is N attempts at the same task.

`messages_and_choices` mixes two kinds of items:
- plain message dicts (`{"role": ..., "content": ...}`) are *context*: they are rendered with the chat
  template and never trained on, even when their role is "assistant";
- OpenAI `Choice` objects (as returned by `client.chat.completions.create`) are the *trainable* assistant
  turns. They carry the exact sampled token ids and logprobs that the backend returned, and training uses
  those ids, never a re-tokenization of the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from openai.types.chat.chat_completion import Choice

Message = dict[str, Any]
MessageOrChoice = Message | Choice


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

    def to_dict(self) -> dict[str, Any]:
        items = [
            {"choice": m.model_dump()} if isinstance(m, Choice) else {"message": m}
            for m in self.messages_and_choices
        ]
        return {
            "messages_and_choices": items,
            "tools": self.tools,
            "reward": self.reward,
            "metrics": self.metrics,
            "metadata": self.metadata,
            "logs": self.logs,
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        items: list[MessageOrChoice] = [
            Choice.model_validate(i["choice"]) if "choice" in i else i["message"]
            for i in d["messages_and_choices"]
        ]
        return cls(
            messages_and_choices=items,
            tools=d.get("tools"),
            reward=float(d.get("reward", 0.0)),
            metrics=dict(d.get("metrics") or {}),
            metadata=dict(d.get("metadata") or {}),
            logs=list(d.get("logs") or []),
            finish_reason=d.get("finish_reason"),
        )


@dataclass
class TrajectoryGroup:
    """N attempts at the same task, plus the exceptions raised by the rollouts that failed."""

    trajectories: list[Trajectory]
    exceptions: list[str] = field(default_factory=list)  # formatted tracebacks

    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    def validate_rewards(self) -> None:
        for i, t in enumerate(self.trajectories):
            if not isinstance(t.reward, (int, float)) or not math.isfinite(t.reward):
                raise ValueError(
                    f"Trajectory {i} has reward {t.reward!r}; rewards must be finite numbers. "
                    "Fix the reward function, or drop the trajectory before training."
                )

    def to_dict(self) -> dict[str, Any]:
        return {"trajectories": [t.to_dict() for t in self.trajectories], "exceptions": self.exceptions}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrajectoryGroup:
        return cls([Trajectory.from_dict(t) for t in d["trajectories"]], list(d.get("exceptions") or []))
