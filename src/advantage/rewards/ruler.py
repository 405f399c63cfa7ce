"""RULER: a relative LLM judge. It scores the trajectories of one group against each other, so no
hand-written reward function is needed.

The messages every trajectory shares (the longest common prefix) are sent once as context; then each
trajectory's remainder under its own id. The judge answers `{"scores": [{"trajectory_id", "explanation",
"score"}]}`, requested as a strict JSON schema. An answer that cannot be used (empty, bad JSON, wrong count,
missing ids, a score outside [0, 1]) is retried, with the error shown to the judge, then raises `RulerError`:
it is never scored 0, because an outage is not the policy's failure. The judge's tokens and cost are
counted in `RulerJudge.usage`, apart from the policy's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from advantage.files import write_text_atomic
from advantage.model import Model, TrainableModel
from advantage.trajectory import Message, TrajectoryGroup

log = logging.getLogger(__name__)

DEFAULT_RUBRIC = Path(__file__).with_name("ruler_rubric.txt").read_text(encoding="utf-8")
DEFAULT_JUDGE = "o4-mini"

# (input, output) US$ per million tokens: list prices of a few judges, for `cost_usd` when litellm (whose
# cost table is maintained and far larger) is not installed or does not know the model. Pass
# `price_per_mtok` for any other model; an unknown model (a local judge, say) costs 0.0.
# fmt: off
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60),
    "o3": (2.00, 8.00), "o4-mini": (1.10, 4.40), "claude-sonnet-4": (3.00, 15.00),
    "claude-sonnet-4-5": (3.00, 15.00), "claude-opus-4": (15.00, 75.00), "claude-opus-4-1": (15.00, 75.00),
}
# fmt: on
# OpenAI reasoning models reject `temperature`, and their hidden reasoning would eat a `max_tokens` cap.
_REASONING = re.compile(r"^(o\d|gpt-5)")
# Errors that mean the judge was unreachable or unusable this time (dropped with swallow_exceptions=True);
# a misconfiguration (bad key, unknown model, missing litellm) still raises.
_OUTAGES = (
    openai.APIConnectionError,
    openai.RateLimitError,
    openai.InternalServerError,
    httpx.TransportError,
)


class RulerError(RuntimeError):
    """The judge gave no usable verdict after all retries."""


@dataclass
class JudgeVerdict:
    scores: list[float]  # one per trajectory, in input order, each in [0, 1]
    explanations: list[str]
    prompt_tokens: int = 0  # summed over the attempts this verdict took (0 on a cache hit)
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class JudgeUsage:
    """A judge's running totals, kept apart from the policy's."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0  # network calls, retries included
    cache_hits: int = 0


def _bare_name(model: str) -> str:
    return model.rsplit("/", 1)[-1].lower()


def known_price(model: str) -> tuple[float, float] | None:
    """The (input, output) $/Mtok of `model` ("openai/o4-mini", "claude-sonnet-4-20250514"...): litellm's
    cost table when litellm is installed and lists the model, else the built-in PRICES_PER_MTOK."""
    return _litellm_price(model) or _built_in_price(model)


def _litellm_price(model: str) -> tuple[float, float] | None:
    try:
        import litellm  # optional (advantage[litellm]); its table is read only when it is there
    except ImportError:
        return None
    table: dict[str, Any] = litellm.model_cost
    # The table lists some models under their provider ("anthropic/...") and most without it ("o4-mini").
    for key in dict.fromkeys((model, model.rsplit("/", 1)[-1], _bare_name(model))):
        entry = table.get(key)
        if isinstance(entry, dict) and {"input_cost_per_token", "output_cost_per_token"} <= entry.keys():
            return float(entry["input_cost_per_token"]) * 1e6, float(entry["output_cost_per_token"]) * 1e6
    return None


def _built_in_price(model: str) -> tuple[float, float] | None:
    name = _bare_name(model)
    for key, price in PRICES_PER_MTOK.items():
        if re.fullmatch(re.escape(key) + r"(-\d{4}-?\d{2}-?\d{2}|-latest)?", name):
            return price
    return None


def shared_prefix_len(message_lists: list[list[Message]]) -> int:
    """How many leading messages every list has in common (compared as JSON); 0 for fewer than 2 lists."""
    if len(message_lists) < 2:
        return 0
    keys = [[json.dumps(m, sort_keys=True, default=str) for m in msgs] for msgs in message_lists]
    n = 0
    while all(n < len(k) for k in keys) and all(k[n] == keys[0][n] for k in keys):
        n += 1
    return n


def _render(messages: list[Message]) -> str:
    return "\n".join(json.dumps(m, ensure_ascii=False, default=str) for m in messages)


def user_prompt(message_lists: list[list[Message]]) -> str:
    """The judge's user message: the shared context once, each remainder under its id, then the format."""
    n = len(message_lists)
    k = shared_prefix_len(message_lists)
    all_identical = n > 1 and all(len(msgs) == k for msgs in message_lists)
    parts = []
    if k:
        parts.append(
            f"All {n} trajectories begin with these messages (one JSON message per line):\n"
            f"<context>\n{_render(message_lists[0][:k])}\n</context>\n\n"
            "Each trajectory below continues from that context."
        )
    else:
        parts.append(f"The {n} trajectories (one JSON message per line):")
    for i, msgs in enumerate(message_lists, start=1):
        rest = msgs[k:]
        if rest:
            body = _render(rest)
        elif all_identical:
            body = "(All trajectories are identical: each is exactly the context above. Score them equally.)"
        else:
            body = "(No messages after the shared context: the trajectory ended there.)"
        parts.append(f'<trajectory id="{i}">\n{body}\n</trajectory>')
    parts.append(
        f"Score every trajectory, ids 1 to {n}. Answer with only a JSON object of the form "
        '{"scores": [{"trajectory_id": "1", "explanation": "...", "score": 0.0}, ...]}, '
        f"with exactly {n} entries, one per trajectory, each score between 0 and 1."
    )
    return "\n\n".join(parts)


EXPLANATION_CHARS = 240  # per trajectory; bounds the answer so a default max_tokens always fits it


def answer_token_budget(n: int) -> int:
    """max_tokens that fits any schema-valid answer for n trajectories, even at one token per character of
    explanation: a small judge that writes every explanation to its maximum length must not be cut off
    (a cut answer is invalid JSON, and each retry costs a whole new answer)."""
    return 32 + n * (EXPLANATION_CHARS + 40)


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def response_format(n: int) -> dict[str, Any]:
    """A JSON schema for exactly n scores, ids "1".."n" in order, so a constrained-decoding server (ours)
    enforces the count and the ids. `strict` is off: hosted APIs reject keywords such as prefixItems in
    strict mode, and the answer is validated here anyway."""

    def item(i: int) -> dict[str, Any]:
        return _object(
            {
                "trajectory_id": {"type": "string", "const": str(i)},
                "explanation": {"type": "string", "maxLength": EXPLANATION_CHARS},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
            }
        )

    scores = {"type": "array", "prefixItems": [item(i) for i in range(1, n + 1)], "items": False,
              "minItems": n, "maxItems": n}  # fmt: skip
    schema = _object({"scores": scores})
    return {"type": "json_schema", "json_schema": {"name": "ruler_scores", "strict": False, "schema": schema}}


def parse_scores(content: str, n: int) -> tuple[list[float], list[str]]:
    """Scores and explanations in id order 1..n; ValueError saying what is wrong with the answer."""
    text = content.strip()
    if not text:
        raise ValueError("the answer is empty")
    start, end = text.find("{"), text.rfind("}")  # tolerate ```json fences around the object
    try:
        data = json.loads(text[start : end + 1] if 0 <= start < end else text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the answer is not valid JSON ({exc})") from None
    items = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError('the answer has no "scores" list')
    if len(items) != n:
        raise ValueError(f"the answer scores {len(items)} trajectories, expected {n}")
    by_id: dict[str, tuple[float, str]] = {}
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(f"a score entry is not an object: {item!r}")
        tid, score = str(item.get("trajectory_id", "")).strip(), item.get("score")
        if tid in by_id:
            raise ValueError(f"trajectory_id {tid!r} is scored twice")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise ValueError(f"trajectory {tid!r} has score {score!r}, not a number in [0, 1]")
        by_id[tid] = (float(score), str(item.get("explanation", "")))
    missing = [str(i) for i in range(1, n + 1) if str(i) not in by_id]
    if missing:
        raise ValueError(f"trajectory ids {missing} are missing (got {sorted(by_id)})")
    return [by_id[str(i)][0] for i in range(1, n + 1)], [by_id[str(i)][1] for i in range(1, n + 1)]


@dataclass
class RulerJudge:
    """An LLM that scores a group of trajectories relative to each other.

    `model` is served at `base_url` (any OpenAI-compatible server, ours included), or at the OpenAI
    default (OPENAI_BASE_URL / OPENAI_API_KEY) when `base_url` is None. A "provider/model" name with no
    `base_url` ("openai/o4-mini", "anthropic/claude-sonnet-4-20250514") goes through litellm instead.
    For OpenAI reasoning models (o-series, gpt-5) neither `temperature` nor `max_tokens` is sent.
    """

    model: str
    _: KW_ONLY
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    rubric: str | None = None  # None: DEFAULT_RUBRIC (ruler_rubric.txt)
    max_retries: int = 2
    cache_dir: Path | None = None  # a verdict per request, keyed by the request's sha256
    price_per_mtok: tuple[float, float] | None = None  # (input, output) $/Mtok; None: known_price() or 0
    temperature: float = 0.0
    max_tokens: int | None = None  # None: answer_token_budget(group size), enough for any valid answer
    usage: JudgeUsage = field(default_factory=JudgeUsage, init=False)
    _client: openai.AsyncOpenAI | None = field(default=None, init=False, repr=False)

    @property
    def use_litellm(self) -> bool:
        return self.base_url is None and "/" in self.model

    def build_request(self, message_lists: list[list[Message]]) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.rubric or DEFAULT_RUBRIC},
                {"role": "user", "content": user_prompt(message_lists)},
            ],
            "response_format": response_format(len(message_lists)),
        }
        if not _REASONING.match(_bare_name(self.model)):
            request["temperature"] = self.temperature
            request["max_tokens"] = self.max_tokens or answer_token_budget(len(message_lists))
        return request

    async def _complete(self, request: dict[str, Any]) -> tuple[str, int, int]:
        """The one network call: (content, prompt tokens, completion tokens). Tests replace it."""
        if self.use_litellm:
            try:
                import litellm
            except ImportError:
                raise ImportError(
                    f"The judge {self.model!r} names a provider, which needs litellm: "
                    "pip install 'advantage[litellm]'. Or pass base_url= for an OpenAI-compatible server."
                ) from None
            resp = await litellm.acompletion(**request, api_key=self.api_key, num_retries=self.max_retries)
        else:
            if self._client is None:
                key = (
                    self.api_key or os.environ.get("OPENAI_API_KEY") or ("unused" if self.base_url else None)
                )
                self._client = openai.AsyncOpenAI(
                    base_url=self.base_url, api_key=key, max_retries=self.max_retries
                )
            resp = await self._client.chat.completions.create(**request)
        usage = resp.usage
        content = resp.choices[0].message.content if resp.choices else None
        return content or "", usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0

    def _cache_path(self, request: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
        return Path(self.cache_dir) / f"{key}.txt"

    async def score(self, message_lists: list[list[Message]]) -> JudgeVerdict:
        """Score trajectories (as message lists) that attempted the same task; raises RulerError."""
        n = len(message_lists)
        if n == 0:
            raise ValueError("nothing to score: message_lists is empty")
        request = self.build_request(message_lists)
        path = self._cache_path(request)
        if path is not None and path.exists():
            try:
                scores, explanations = parse_scores(path.read_text(encoding="utf-8"), n)
            except ValueError:
                pass  # a corrupt entry is a miss
            else:
                self.usage.cache_hits += 1
                return JudgeVerdict(scores, explanations)
        price_in, price_out = self.price_per_mtok or known_price(self.model) or (0.0, 0.0)
        verdict = JudgeVerdict([], [])
        messages, raw, error = request["messages"], "", ""
        for attempt in range(self.max_retries + 1):
            raw, prompt_tokens, completion_tokens = await self._complete({**request, "messages": messages})
            self.usage.calls += 1
            cost = (prompt_tokens * price_in + completion_tokens * price_out) / 1e6
            for totals in (verdict, self.usage):
                totals.prompt_tokens += prompt_tokens
                totals.completion_tokens += completion_tokens
                totals.cost_usd += cost
            try:
                verdict.scores, verdict.explanations = parse_scores(raw, n)
            except ValueError as exc:
                error = str(exc)
                log.warning("RULER judge %s, attempt %d: %s", self.model, attempt + 1, error)
                hint = f"That answer cannot be used: {error}. Answer again with only the JSON object, ids 1 to {n}."
                answer = [{"role": "assistant", "content": raw}] if raw.strip() else []
                messages = [*request["messages"], *answer, {"role": "user", "content": hint}]
                continue
            if path is not None:
                write_text_atomic(path, raw)
            return verdict
        shown = raw if len(raw) <= 500 else raw[:500] + "...[truncated]"
        raise RulerError(
            f"The judge {self.model!r} gave no usable verdict for {n} trajectories in "
            f"{self.max_retries + 1} attempts: {error}. Last answer: {shown!r}"
        )


def _make_judge(
    judge_model: str | Model, base_url: str | None, api_key: str | None, rubric: str | None, **kwargs: Any
) -> RulerJudge:
    """A judge for a model name or an `advantage.Model` (a TrainableModel is judged by its base model)."""
    if isinstance(judge_model, Model):
        if isinstance(judge_model, TrainableModel):
            if judge_model.base_url is None:
                raise ValueError(
                    f"{judge_model.name!r} is not registered: call `await model.register(backend)`."
                )
            name = judge_model.base_model
        else:
            name = judge_model.get_inference_name()
        base_url, api_key = base_url or judge_model.base_url, api_key or judge_model.api_key
        return RulerJudge(name, base_url=base_url, api_key=api_key, rubric=rubric, **kwargs)
    return RulerJudge(judge_model, base_url=base_url, api_key=api_key, rubric=rubric, **kwargs)


async def ruler(
    message_lists: list[list[Message]],
    judge_model: str | Model = DEFAULT_JUDGE,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    rubric: str | None = None,
    **judge_kwargs: Any,
) -> JudgeVerdict:
    """Score message lists that attempted the same task with a one-off `RulerJudge`."""
    return await _make_judge(judge_model, base_url, api_key, rubric, **judge_kwargs).score(message_lists)


async def ruler_score_group(
    group: TrajectoryGroup,
    judge_model: str | Model = DEFAULT_JUDGE,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    rubric: str | None = None,
    swallow_exceptions: bool = False,
    judge: RulerJudge | None = None,
    **judge_kwargs: Any,
) -> TrajectoryGroup | None:
    """A new group whose rewards are the judge's scores; the input group is left as it was.

    Each trajectory keeps its original reward in `metrics["independent_reward"]`, gets the explanation in
    `logs`, and the judge's usage for the group divided evenly in `metrics["ruler_judge_*"]`. Pass `judge=`
    to share one judge (and its `usage` totals) across groups. With `swallow_exceptions=True`, a judge
    that gives no usable verdict or cannot be reached returns None, which drops the group when used as
    `gather_trajectory_groups(..., after_each=lambda g: ruler_score_group(g, ..., swallow_exceptions=True))`.
    """
    if not group.trajectories:
        return TrajectoryGroup([], list(group.exceptions))
    judge = judge or _make_judge(judge_model, base_url, api_key, rubric, **judge_kwargs)
    try:
        verdict = await judge.score([t.messages() for t in group.trajectories])
    except (RulerError, *_OUTAGES) as exc:
        if not swallow_exceptions:
            raise
        log.warning("RULER dropped a group of %d: %s", len(group.trajectories), exc)
        return None
    n = len(group.trajectories)
    usage = {
        "ruler_judge_prompt_tokens": verdict.prompt_tokens / n,
        "ruler_judge_cost_usd": verdict.cost_usd / n,
        "ruler_judge_completion_tokens": verdict.completion_tokens / n,
    }
    scored = [
        dataclasses.replace(
            t,
            messages_and_choices=list(t.messages_and_choices),
            reward=score,
            metrics={**t.metrics, "independent_reward": t.reward, **usage},
            metadata=dict(t.metadata),
            logs=[*t.logs, f"RULER ({judge.model}) score {score:.3f}: {explanation}"],
        )
        for t, score, explanation in zip(
            group.trajectories, verdict.scores, verdict.explanations, strict=True
        )
    ]
    return TrajectoryGroup(scored, list(group.exceptions))
