"""The wire form of rollout records: `Trajectory.to_dict()` and `TrajectoryGroup.to_dict()`, written once.

`advantage.trajectory` turns these into its records and back; the server reads request bodies with them,
and the same checks (`trajectory.check_groups`) then run on `/train`, `/log` and `/datums` alike.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrajectoryRecord(_Wire):
    """`Trajectory.to_dict()`: message items are `{"message": {...}}` (context) or `{"choice": {...}}` (an
    OpenAI `Choice`, trained on)."""

    messages_and_choices: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    reward: float = 0.0
    metrics: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    logs: list[str] = Field(default_factory=list)
    finish_reason: str | None = None


class GroupRecord(_Wire):
    """`TrajectoryGroup.to_dict()`."""

    trajectories: list[TrajectoryRecord]
    exceptions: list[str] = Field(default_factory=list)
