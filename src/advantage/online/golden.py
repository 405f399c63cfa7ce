"""The golden set: recorded, known-good answers to real prompts, which the promotion gate scores steps on.

**What is golden.** A recorded completion whose request's `metadata["golden"]` is truthy
(`records.is_golden`: true, a non-zero number, a non-empty string, even "false"; leave the key out for a
normal request). Its choices rated by explicit feedback (never a judge's score) at least
`OnlineConfig.golden_min_reward` are the golden set; the newest `golden_max_choices` ratings are used.

**Never training data.** The traffic store never hands a golden completion (its background samples
included) to the online trainer as untrained traffic, nor to its judge (`TrafficStore.untrained`,
`.unjudged`): golden choices are never trained on, never marked trained, hence never replayed, and never
judged.

**The score** of served weights `name@step` is the mean log-probability per token of the golden choices'
sampled tokens under those weights, pooled over all choices (a long answer counts by its length), tokens a
grammar forced excluded (nothing was chosen there, as in training). Each sequence is `prompt_token_ids +
token_ids` as recorded, scored whole by the backend's `logprobs` op (`TrainingClient.compute_logprobs`), so
no text is ever re-tokenized. Higher is better, 0 at most (every golden token certain). With
`OnlineConfig(golden_set=True)` the gate's `tolerance` is therefore in nats per token: 0.01 lets a step
through under which the golden answers are at most 1 - e^-0.01 ≈ 1% less likely per token than under the
default.

The set is read once, when the trainer starts: the default and every new step are scored on the same
answers. Golden answers rated later join it at the trainer's next start. An empty golden set is an error
(there would be nothing to compare): the trainer does not start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from advantage.online.records import RewardedChoice, rewarded_from_dict
from advantage.wire.ops import LogprobsRequest, OnlineTrafficRequest

if TYPE_CHECKING:
    from advantage.config import OnlineConfig
    from advantage.model import TrainableModel

SCORE_BATCH = 16  # sequences per `logprobs` call: bounds one request's size


@dataclass
class GoldenSet:
    keys: list[tuple[str, int]]  # (completion id, choice index) of each golden choice
    sequences: list[list[int]]  # prompt ids + sampled ids, one per golden choice
    scored: list[list[int]]  # the positions in each sequence that count: the sampled, unforced tokens

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.scored)


def golden_set(rows: list[RewardedChoice]) -> GoldenSet:
    """The sequences and scored positions of golden rows (choices with no unforced token are left out)."""
    out = GoldenSet([], [], [])
    for r in rows:
        prompt, forced = len(r.choice.prompt_token_ids), set(r.choice.forced_token_indices)
        positions = [prompt + k for k in range(len(r.choice.token_ids)) if k not in forced]
        if positions:
            out.keys.append((r.completion.id, r.choice.index))
            out.sequences.append([*r.choice.prompt_token_ids, *r.choice.token_ids])
            out.scored.append(positions)
    return out


def mean_token_logprob(logprobs: list[list[float]], scored: list[list[int]]) -> float:
    """Σ logprobs[i][j] over every scored position j of every sequence i, over the number of those positions
    (pooled, not a mean of per-sequence means). `logprobs[i][j]` = log p(ids[j] | ids[:j])."""
    total = sum(lps[j] for lps, positions in zip(logprobs, scored, strict=True) for j in positions)
    count = sum(len(p) for p in scored)
    if count == 0:
        raise ValueError("mean_token_logprob needs at least one scored position.")
    return total / count


async def read_golden(model: TrainableModel, config: OnlineConfig) -> GoldenSet:
    """The model's golden set (module docstring); a ValueError when it is empty."""
    req = OnlineTrafficRequest(
        kind="golden", min_reward=config.golden_min_reward, limit=config.golden_max_choices
    )
    answer = await model.backend.online_traffic(model.spec, req)
    if not answer.recording:
        raise RuntimeError(
            f"{model.name!r} has no recorded traffic, so no golden set: register it with "
            "`TrainableModel(..., record_traffic=True)` (or serve with `advantage serve --record`)."
        )
    golden = golden_set([rewarded_from_dict(d) for d in answer.rows])
    if not golden.sequences:
        raise ValueError(
            f"golden_set=True, but {model.name!r} has no golden set: send requests with "
            'metadata={"golden": true} and rate their good answers with feedback of at least '
            f"golden_min_reward ({config.golden_min_reward}) before starting the trainer."
        )
    return golden


async def golden_score(model: TrainableModel, golden: GoldenSet, served: str) -> float:
    """The golden set's mean log-probability per token under the served weights `served` (`name@step`)."""
    logprobs: list[list[float]] = []
    for start in range(0, len(golden.sequences), SCORE_BATCH):
        req = LogprobsRequest(sequences=golden.sequences[start : start + SCORE_BATCH], model=served)
        logprobs += (await model.backend.logprobs(model.spec, req)).logprobs
    return mean_token_logprob(logprobs, golden.scored)
