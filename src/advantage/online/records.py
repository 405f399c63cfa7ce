"""The records of recorded traffic: a served completion and its choices, the feedback on a choice, and a rated
choice (what the online trainer learns from), with their JSON forms (what the backend's online ops send).
The store that keeps them is `online/store.py`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RecordedChoice:
    index: int
    token_ids: list[int]
    logprobs: list[float]
    prompt_token_ids: list[int]
    forced_token_indices: list[int]
    finish_reason: str | None
    message: dict[str, Any]  # the assistant message as served (content, tool_calls)
    background: bool = False  # a background sample: recorded, never returned to the caller


@dataclass
class RecordedCompletion:
    id: str
    model: str  # the trainable model's name (not name@step)
    step: int  # the weights step that produced it
    created: float  # unix time, seconds
    request: dict[str, Any]  # messages, tools, tool_choice and sampling params, as sent
    choices: list[RecordedChoice]
    metadata: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    pending: int = 0  # background samples still on the way (`add_background` appends them)

    @property
    def episode(self) -> str | None:
        """The episode tag as stored: the JSON of `metadata["episode"]`, or None."""
        return episode_key(self.metadata)

    @property
    def returned(self) -> list[RecordedChoice]:
        """The choices the caller got (not the background samples)."""
        return [c for c in self.choices if not c.background]


@dataclass
class Feedback:
    completion_id: str
    choice: int
    reward: float
    label: str | None = None
    comment: str | None = None
    source_id: str | None = None  # the completion the caller named (another one for an episode's turns)
    updated: float = 0.0
    judge: str | None = None  # the judge model that gave this score; None: explicit feedback


@dataclass
class RewardedChoice:
    """One recorded choice with the feedback on it: what the online trainer learns from."""

    completion: RecordedCompletion
    choice: RecordedChoice
    feedback: Feedback


def rewarded_to_dict(row: RewardedChoice) -> dict[str, Any]:
    """A rated choice as JSON-able data (what the `online_traffic` op sends)."""
    return asdict(row)


def rewarded_from_dict(d: dict[str, Any]) -> RewardedChoice:
    completion = completion_from_dict(d["completion"])
    return RewardedChoice(completion, RecordedChoice(**d["choice"]), Feedback(**d["feedback"]))


def completion_from_dict(d: dict[str, Any]) -> RecordedCompletion:
    """The inverse of `dataclasses.asdict` on a `RecordedCompletion` (the wire form of the ops)."""
    c = dict(d)
    c["choices"] = [RecordedChoice(**ch) for ch in c["choices"]]
    return RecordedCompletion(**c)


def is_golden(metadata: dict[str, Any] | None) -> bool:
    """A golden completion: its request's `metadata["golden"]` is truthy (true, a non-zero number, a
    non-empty string, list or object). Its rated choices are an evaluation set, never training data
    (`online/golden.py`); the store's `golden_sql` is the same test in SQL."""
    return bool(metadata and metadata.get("golden"))


def episode_key(metadata: dict[str, Any] | None) -> str | None:
    if not metadata or metadata.get("episode") is None:
        return None
    return json.dumps(metadata["episode"], sort_keys=True)
