"""The traffic judge: RULER scores a recorded request's sibling choices where no explicit feedback rated them.

A recorded request with at least `group_size` choices (n > 1, or the background samples of a model served
with `background_samples=k`, see `server/background.py`) is a sibling group: attempts at one prompt from one
weights step. With `OnlineConfig.judge_model` set, the online trainer sends each such request whose choices
are not all rated (or trained on) to the judge once, oldest first, at most `judge_max_groups` per look at the
store, and only requests recent enough to train on (`max_steps_off_policy`).

How explicit feedback and the judge combine:
- The judge sees every choice of the request, rated ones too, and scores them relative to each other (RULER,
  `rewards/ruler.py`); the scores are in [0, 1], the scale of the feedback labels (up = 1.0, down = 0.0).
- **Explicit feedback wins.** A choice rated by a caller keeps the caller's reward: the judge's score is
  written only to choices with no feedback, and feedback sent later replaces the judge's score (unless the
  choice was trained on already; nothing is trained twice). So a request whose caller gave a thumbs-up, with
  three background samples, trains as [1.0 (the caller's), judge, judge, judge]. Callers who mix numeric
  rewards with a judge should send them on the judge's [0, 1] scale, or the two scales meet in one group.
- Judge-scored choices are rated choices like any other: they form groups by prompt (`groups.py`), a group
  whose rewards all tie is skipped and counted (`OnlineResult.zero_variance`), and the trainer marks what it
  trained on. Each trajectory's metadata says `judge` (the judge model) and `background`.
- **A judge that fails never stops the trainer.** A verdict that cannot be used after the judge's retries
  (junk, a wrong count, a score out of range: `RulerError`) is counted in `JudgeCounts.failed` and the
  request is marked judged "failed", so it is not sent again (its explicit feedback still trains). A judge
  that cannot be reached (connection errors, rate limits, 5xx) is counted in `unreachable`, and the requests
  wait for the next look. A misconfigured judge (a bad API key, an unknown model) raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from advantage.online.groups import recorded_trajectory
from advantage.online.records import RecordedCompletion, completion_from_dict
from advantage.rewards.ruler import _OUTAGES, RulerError, RulerJudge, ruler_score_group
from advantage.trajectory import TrajectoryGroup
from advantage.wire.ops import JudgeScore, OnlineJudgedRequest, OnlineUnjudgedRequest

if TYPE_CHECKING:
    from advantage.config import OnlineConfig
    from advantage.model import TrainableModel

log = logging.getLogger(__name__)
MAX_COMMENT_CHARS = 4000


@dataclass
class JudgeCounts:
    scored: int = 0  # requests the judge scored
    failed: int = 0  # requests whose verdict could not be used (never sent again)
    unreachable: int = 0  # looks at which the judge could not be reached (tried again later)

    def add(self, other: JudgeCounts) -> None:
        self.scored += other.scored
        self.failed += other.failed
        self.unreachable += other.unreachable


def judge_for(config: OnlineConfig, model: TrainableModel) -> RulerJudge | None:
    """The judge `config` names (None without `judge_model`). A judge served by the model's own backend gets
    the backend's API key; any other, RulerJudge's (OPENAI_API_KEY, or litellm's provider keys)."""
    if config.judge_model is None:
        return None
    url = config.judge_base_url
    own = url is not None and model.base_url is not None and _root(url) == _root(model.base_url)
    return RulerJudge(config.judge_model, base_url=url, api_key=model.api_key if own else None)


def _root(url: str) -> str:
    return url.strip().rstrip("/").removesuffix("/v1").rstrip("/")


def sibling_group(rec: RecordedCompletion) -> TrajectoryGroup:
    """A recorded request's choices (returned and background) as one group for the judge."""
    return TrajectoryGroup([recorded_trajectory(rec, ch, 0.0) for ch in rec.choices])


def judge_scores(rec: RecordedCompletion, scored: TrajectoryGroup) -> list[JudgeScore]:
    """The judge's score for every choice of `rec`, with its explanation (the store keeps explicit
    feedback where a choice has some)."""
    return [
        JudgeScore(
            choice=ch.index, reward=t.reward, comment=(t.logs[-1] if t.logs else "")[:MAX_COMMENT_CHARS]
        )
        for ch, t in zip(rec.choices, scored.trajectories, strict=True)
    ]


async def judge_traffic(
    model: TrainableModel, judge: RulerJudge, *, min_choices: int, min_step: int, limit: int
) -> JudgeCounts:
    """Send the oldest unjudged sibling groups (at most `limit`) to `judge` and record its scores."""
    req = OnlineUnjudgedRequest(min_choices=min_choices, min_step=min_step, limit=limit)
    reply = await model.backend.online_unjudged(model.spec, req)
    counts = JudgeCounts()
    for data in reply.completions:
        rec = completion_from_dict(data)
        try:
            scored = await ruler_score_group(sibling_group(rec), judge=judge)
        except RulerError as exc:
            log.warning("the judge gave no usable verdict on %s: %s", rec.id, exc)
            counts.failed += 1
            await _judged(model, rec.id, judge.model, "failed", [])
            continue
        except _OUTAGES as exc:
            log.warning("the judge %s cannot be reached (%s); trying again later", judge.model, exc)
            counts.unreachable += 1
            break  # the rest would fail alike
        assert scored is not None  # swallow_exceptions is off
        await _judged(model, rec.id, judge.model, "scored", judge_scores(rec, scored))
        counts.scored += 1
    return counts


async def _judged(
    model: TrainableModel, completion_id: str, judge: str, outcome: str, scores: list[JudgeScore]
) -> None:
    req = OnlineJudgedRequest.model_validate(
        {"completion_id": completion_id, "judge": judge, "outcome": outcome, "scores": scores}
    )
    await model.backend.online_judged(model.spec, req)
