"""Feedback on served completions: a reward (or a label mapped to one) for a recorded choice.

Rules, the ones `POST /v1/feedback` and `TrainableModel.feedback` document:
- **One of `reward` or `label`.** `reward` is a finite number (NaN, infinities and anything past ±1e12 are
  refused). A `label` maps to a reward by `LABEL_REWARDS`, case-insensitively: "up", "thumbs_up", "good",
  "positive", "correct" and "1" give 1.0; "down", "thumbs_down", "bad", "negative", "wrong" and "0" give 0.0.
  Any other label is refused; send a `reward` instead. A comment (at most 4,000 characters) may come with
  either.
- **Idempotent.** A choice holds at most one feedback: a second call for the same choice replaces the first.
- **Episodes.** When the named completion's request carried `metadata={"episode": E}`, the feedback applies
  to the whole episode: it is written to the named choice, and to every choice of every other completion of
  the same model recorded with the same `episode` value (compared as JSON: `"7"` and `7` differ), earlier or
  later. Send it after the episode's last turn: turns recorded after the call get nothing until a call
  comes again. An agent samples its turns with n=1; a turn sampled with n>1 gets the reward on all of its
  choices, since the store cannot tell which one the agent went on with.
- **Background samples are not the caller's to rate.** A model served with `background_samples=k` records k
  more choices per request that the caller never saw (indices n..n+k-1); feedback on one is a 400. The
  online trainer's judge (`OnlineConfig.judge_model`) scores them; explicit feedback on a returned choice
  always wins over the judge's score for it, whichever came first (`online/judging.py`).
- **Errors.** An unknown completion id is a 404; a choice index out of range (or a background sample's), a
  non-finite reward, an unknown label, or neither/both of reward and label is a 400. Each message says what
  to send instead.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from advantage.online.records import Feedback, RecordedCompletion
from advantage.online.store import TrafficStore
from advantage.trajectory import MAX_ABS_REWARD  # the bound on trajectory rewards, too

MAX_COMMENT_CHARS = 4000
LABEL_REWARDS: dict[str, float] = {
    **dict.fromkeys(["up", "thumbs_up", "good", "positive", "correct", "1"], 1.0),
    **dict.fromkeys(["down", "thumbs_down", "bad", "negative", "wrong", "0"], 0.0),
}


class FeedbackError(ValueError):
    """Feedback refused: `status` is the HTTP status it answers (400 or 404), `param` the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class FeedbackResult:
    completion_id: str
    choice: int
    reward: float
    label: str | None
    episode: str | None  # the episode tag (as JSON) when the feedback covered an episode
    choices: int  # how many choices now carry this feedback (1, or the episode's)


def reward_for(reward: float | None, label: str | None) -> float:
    """The reward a feedback call gives: `reward` itself, or the label's (`LABEL_REWARDS`)."""
    if (reward is None) == (label is None):
        raise FeedbackError(
            400,
            "Send either `reward` (a number) or `label` (e.g. 'up' or 'down'), not "
            + ("both." if reward is not None else "neither."),
            "reward",
        )
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise FeedbackError(400, f"reward must be a number, got {reward!r}.", "reward")
        if not math.isfinite(reward) or abs(reward) > MAX_ABS_REWARD:
            raise FeedbackError(
                400, f"reward must be a finite number within ±{MAX_ABS_REWARD:g}, got {reward!r}.", "reward"
            )
        return float(reward)
    assert label is not None
    value = LABEL_REWARDS.get(label.strip().lower())
    if value is None:
        raise FeedbackError(
            400,
            f"Unknown label {label!r}: use one of {', '.join(repr(k) for k in LABEL_REWARDS)} (up/good -> 1.0, "
            "down/bad -> 0.0), or send a numeric `reward`.",
            "label",
        )
    return value


def give_feedback(
    stores: Iterable[TrafficStore],
    completion_id: str,
    *,
    choice: int = 0,
    reward: float | None = None,
    label: str | None = None,
    comment: str | None = None,
) -> FeedbackResult:
    """Write feedback on `choice` of the completion `completion_id`, found in the first of `stores` that
    holds it (and on its episode, see the module docstring). Raises `FeedbackError`."""
    value = reward_for(reward, label)
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise FeedbackError(
            400, f"comment is {len(comment)} characters; at most {MAX_COMMENT_CHARS}.", "comment"
        )
    found = _find(stores, completion_id)
    if found is None:
        raise FeedbackError(
            404,
            f"No recorded completion {completion_id!r}. Feedback needs a completion of a trainable model "
            "served with recording on (`TrainableModel(..., record_traffic=True)` or `advantage serve "
            "--record`), still within the store's retention.",
            "completion_id",
        )
    store, record = found
    n = len(record.returned)
    if not isinstance(choice, bool) and n <= choice < len(record.choices):
        raise FeedbackError(
            400,
            f"Choice {choice} of completion {completion_id!r} is a background sample, which the caller never "
            f"saw: rate the returned choices (0..{n - 1}); the online trainer's judge scores the others.",
            "choice",
        )
    if isinstance(choice, bool) or not 0 <= choice < n:
        raise FeedbackError(
            400,
            f"Completion {completion_id!r} has {n} choice{'s' if n != 1 else ''} (0..{n - 1}); "
            f"choice {choice!r} is out of range.",
            "choice",
        )
    now = time.time()

    def row(cid: str, idx: int) -> Feedback:
        return Feedback(cid, idx, value, label, comment, source_id=completion_id, updated=now)

    rows = [row(completion_id, choice)]
    episode = record.episode
    if episode is not None:
        for cid, count in store.episode(record.model, episode):
            if cid != completion_id:
                rows += [row(cid, i) for i in range(count)]
    store.set_feedback(rows)
    return FeedbackResult(completion_id, choice, value, label, episode, len(rows))


def _find(
    stores: Iterable[TrafficStore], completion_id: str
) -> tuple[TrafficStore, RecordedCompletion] | None:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", completion_id):  # not the shape of an id we hand out
        return None
    for store in stores:
        record = store.get(completion_id)
        if record is not None:
            return store, record
    return None
