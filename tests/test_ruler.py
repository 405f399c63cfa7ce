"""RULER without a real judge: `RulerJudge._complete` (the one network call) is replaced by a script of
answers, so these tests check the prompt, the parsing, the retries, the cache and the bookkeeping. The
judge against the real server is tested elsewhere."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat.chat_completion import Choice

import advantage as adv
from advantage.rewards import RulerError, RulerJudge, ruler, ruler_score_group
from advantage.rewards.ruler import known_price, parse_scores, shared_prefix_len

SYSTEM = {"role": "system", "content": "You are a weather agent."}
USER = {"role": "user", "content": "What is the weather in Paris?"}


def answer(*scores: float, ids: list[str] | None = None) -> str:
    ids = ids or [str(i) for i in range(1, len(scores) + 1)]
    items = [
        {"trajectory_id": i, "explanation": f"why {i}", "score": s} for i, s in zip(ids, scores, strict=True)
    ]
    return json.dumps({"scores": items})


class Script:
    """Stands in for `_complete`: returns the next reply (or raises it) and records each request."""

    def __init__(self, *replies: str | Exception, tokens: tuple[int, int] = (100, 20)) -> None:
        self.replies = list(replies)
        self.tokens = tokens
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: dict[str, Any]) -> tuple[str, int, int]:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply, *self.tokens


def scripted(*replies: str | Exception, **judge_kwargs: Any) -> tuple[RulerJudge, Script]:
    judge = RulerJudge("judge-model", base_url="http://127.0.0.1:9/v1", **judge_kwargs)
    script = Script(*replies)
    judge._complete = script  # type: ignore[method-assign]
    return judge, script


def assistant_choice(text: str) -> Choice:
    return Choice.model_validate(
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    )


def group_of(*answers: str, rewards: list[float] | None = None) -> adv.TrajectoryGroup:
    rewards = rewards or [0.0] * len(answers)
    trajs = [
        adv.Trajectory(messages_and_choices=[SYSTEM, USER, assistant_choice(a)], reward=r, logs=["rollout"])
        for a, r in zip(answers, rewards, strict=True)
    ]
    return adv.TrajectoryGroup(trajs, exceptions=["Traceback: a failed rollout"])


def user_text(request: dict[str, Any]) -> str:
    return request["messages"][1]["content"]


# --- the prompt: shared prefix once, each remainder under its id --------------------------------------


async def test_shared_system_and_user_are_sent_once() -> None:
    judge, script = scripted(answer(0.9, 0.1, 0.5))
    group = group_of("Sunny, 21C.", "I don't know.", "Let me check... cloudy.")
    await ruler_score_group(group, judge=judge)
    text = user_text(script.requests[0])
    assert text.count("You are a weather agent.") == 1 and text.count("What is the weather in Paris?") == 1
    assert text.index("<context>") < text.index("What is the weather") < text.index("</context>")
    ids = [int(part.split('"')[0]) for part in text.split('<trajectory id="')[1:]]
    assert ids == [1, 2, 3]
    for i, reply in enumerate(["Sunny, 21C.", "I don't know.", "Let me check... cloudy."], start=1):
        block = text.split(f'<trajectory id="{i}">')[1].split("</trajectory>")[0]
        assert reply in block and "weather agent" not in block
    assert script.requests[0]["messages"][0]["role"] == "system"  # the rubric


async def test_identical_trajectories_each_get_an_id_and_a_note() -> None:
    msgs = [SYSTEM, USER, {"role": "assistant", "content": "Sunny."}]
    assert shared_prefix_len([msgs, list(msgs)]) == 3
    judge, script = scripted(answer(0.5, 0.5))
    verdict = await judge.score([msgs, list(msgs)])
    text = user_text(script.requests[0])
    assert text.count("Sunny.") == 1  # in the context only
    for i in (1, 2):
        assert "identical" in text.split(f'<trajectory id="{i}">')[1].split("</trajectory>")[0]
    assert verdict.scores == [0.5, 0.5]


async def test_no_common_prefix_sends_each_trajectory_whole() -> None:
    a = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "A"}]
    b = [{"role": "user", "content": "beta"}, {"role": "assistant", "content": "A"}]
    assert shared_prefix_len([a, b]) == 0
    judge, script = scripted(answer(1.0, 0.0))
    await judge.score([a, b])
    text = user_text(script.requests[0])
    assert "<context>" not in text
    assert "alpha" in text.split('<trajectory id="1">')[1].split("</trajectory>")[0]
    assert "beta" in text.split('<trajectory id="2">')[1].split("</trajectory>")[0]


async def test_a_group_of_one_is_scored_with_its_whole_conversation() -> None:
    judge, script = scripted(answer(0.7))
    scored = await ruler_score_group(group_of("Sunny."), judge=judge)
    assert scored is not None and scored.rewards() == [0.7]
    text = user_text(script.requests[0])
    assert "<context>" not in text and "Paris" in text.split('<trajectory id="1">')[1]


def test_schema_enforces_the_count_and_the_ids() -> None:
    judge = RulerJudge("judge-model", base_url="http://127.0.0.1:9/v1")
    request = judge.build_request([[USER]] * 3)
    fmt = request["response_format"]
    assert fmt["type"] == "json_schema"
    scores = fmt["json_schema"]["schema"]["properties"]["scores"]
    assert scores["minItems"] == scores["maxItems"] == 3 and scores["items"] is False
    assert [it["properties"]["trajectory_id"]["const"] for it in scores["prefixItems"]] == ["1", "2", "3"]
    # max_tokens fits any valid answer, even one token per character: 32 + 3 * (240 + 40) = 872.
    assert request["temperature"] == 0.0 and request["max_tokens"] == 872
    assert scores["prefixItems"][0]["properties"]["explanation"]["maxLength"] == 240
    assert (
        RulerJudge("m", base_url="http://127.0.0.1:9/v1", max_tokens=99).build_request([[USER]])["max_tokens"]
        == 99
    )
    reasoning = RulerJudge("o4-mini").build_request([[USER]])
    assert "temperature" not in reasoning and "max_tokens" not in reasoning


# --- parsing, retries and failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        "",
        "   ",
        "not json",
        json.dumps({"score": 1}),
        answer(0.5, 0.5),  # 2 of 3
        answer(0.5, 0.5, 0.5, ids=["1", "1", "2"]),
        answer(0.5, 0.5, 0.5, ids=["1", "2", "4"]),
        answer(0.5, 1.5, 0.5),
        answer(0.5, -0.1, 0.5),
        answer(0.5, float("nan"), 0.5),
        json.dumps(
            {"scores": [{"trajectory_id": str(i), "explanation": "", "score": "0.5"} for i in (1, 2, 3)]}
        ),
        json.dumps(
            {"scores": [{"trajectory_id": str(i), "explanation": "", "score": True} for i in (1, 2, 3)]}
        ),
    ],
)
def test_unusable_answers_are_rejected(content: str) -> None:
    with pytest.raises(ValueError):
        parse_scores(content, 3)


def test_answers_are_returned_in_id_order_and_fences_are_tolerated() -> None:
    content = "```json\n" + answer(0.25, 1, 0, ids=["2", "3", "1"]) + "\n```"
    scores, explanations = parse_scores(content, 3)
    assert scores == [0.0, 0.25, 1.0]  # ids 1, 2, 3
    assert explanations == ["why 1", "why 2", "why 3"]


async def test_a_wrong_count_is_retried_then_raises_with_the_answer() -> None:
    judge, script = scripted(*[answer(0.5, 0.5)] * 3, max_retries=2)
    with pytest.raises(RulerError, match="expected 3") as info:
        await judge.score([[USER, {"role": "assistant", "content": c}] for c in "abc"])
    assert len(script.requests) == 3 and judge.usage.calls == 3
    assert "trajectory_id" in str(info.value)  # the last raw answer is in the message
    retry = script.requests[1]["messages"]
    assert retry[-2] == {"role": "assistant", "content": answer(0.5, 0.5)}
    assert retry[-1]["role"] == "user" and "expected 3" in retry[-1]["content"]


async def test_a_long_bad_answer_is_truncated_in_the_error() -> None:
    judge, _ = scripted("x" * 5000, max_retries=0)
    with pytest.raises(RulerError) as info:
        await judge.score([[USER]])
    assert "truncated" in str(info.value) and len(str(info.value)) < 1000


async def test_an_empty_answer_goes_to_retry_then_raises() -> None:
    judge, script = scripted("", "", max_retries=1)
    with pytest.raises(RulerError, match="empty"):
        await judge.score([[USER]])
    assert len(script.requests) == 2
    assert script.requests[1]["messages"][-1]["role"] == "user"  # no empty assistant turn echoed back


async def test_bad_json_then_a_good_answer_succeeds() -> None:
    judge, script = scripted("{oops", answer(0.2, 0.8))
    verdict = await judge.score([[USER, {"role": "assistant", "content": c}] for c in "ab"])
    assert verdict.scores == [0.2, 0.8] and verdict.explanations == ["why 1", "why 2"]
    assert len(script.requests) == 2
    assert (verdict.prompt_tokens, verdict.completion_tokens) == (200, 40)  # both attempts count


async def test_swallowing_drops_the_group_instead_of_raising() -> None:
    group = group_of("a", "b", "c")
    judge, _ = scripted(*[answer(0.5)] * 3, max_retries=2)
    with pytest.raises(RulerError):
        await ruler_score_group(group, judge=judge)
    judge, _ = scripted(*[answer(0.5)] * 3, max_retries=2)
    assert await ruler_score_group(group, judge=judge, swallow_exceptions=True) is None
    outage = openai.APIConnectionError(
        request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    )
    judge, _ = scripted(outage)
    assert await ruler_score_group(group, judge=judge, swallow_exceptions=True) is None


async def test_a_misconfigured_judge_raises_even_when_swallowing() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    bad_key = openai.AuthenticationError("bad key", response=httpx.Response(401, request=request), body=None)
    judge, _ = scripted(bad_key)
    with pytest.raises(openai.AuthenticationError):
        await ruler_score_group(group_of("a", "b"), judge=judge, swallow_exceptions=True)


async def test_gather_drops_the_groups_the_judge_cannot_score() -> None:
    judge, _ = scripted(answer(0.9, 0.1), "garbage", max_retries=0)

    async def rollout(text: str) -> adv.Trajectory:
        return adv.Trajectory(messages_and_choices=[USER, {"role": "assistant", "content": text}])

    groups = await adv.gather_trajectory_groups(
        [[rollout("a"), rollout("b")], [rollout("c"), rollout("d")]],
        after_each=lambda g: ruler_score_group(g, judge=judge, swallow_exceptions=True),
        concurrency=1,
        progress=False,
    )
    assert len(groups) == 1 and sorted(groups[0].rewards()) == [0.1, 0.9]


async def test_a_provider_model_without_litellm_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)  # makes `import litellm` raise ImportError
    judge = RulerJudge("anthropic/claude-sonnet-4-20250514")
    assert judge.use_litellm and not RulerJudge("Qwen/Qwen3-32B", base_url="http://h/v1").use_litellm
    with pytest.raises(ImportError, match=r"advantage\[litellm\]"):
        await judge.score([[USER]])


async def test_the_openai_call_sends_the_schema_and_reads_usage() -> None:
    """`_complete` itself, against an in-process fake HTTP transport (no socket)."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = {
            "id": "x", "object": "chat.completion", "created": 0, "model": "judge-model",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer(0.3)}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }  # fmt: skip
        return httpx.Response(200, json=body)

    judge = RulerJudge("judge-model", base_url="http://judge.test/v1", api_key="k")
    judge._client = openai.AsyncOpenAI(
        base_url=judge.base_url,
        api_key="k",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    verdict = await judge.score([[USER]])
    assert verdict.scores == [0.3] and (verdict.prompt_tokens, verdict.completion_tokens) == (11, 7)
    assert seen[0]["response_format"]["json_schema"]["name"] == "ruler_scores"
    assert seen[0]["model"] == "judge-model"
    await judge._client.close()


# --- cost, cache and the scored group ----------------------------------------------------------------


async def test_cost_is_counted_per_verdict_and_in_the_judge_totals() -> None:
    judge, script = scripted("nope", answer(0.5), answer(0.5), price_per_mtok=(2.0, 8.0))
    script.tokens = (1000, 500)
    v1 = await judge.score([[USER]])
    await judge.score([[SYSTEM, USER]])
    # one attempt: (1000 * $2 + 500 * $8) / 1e6 = $0.006; the first verdict took two attempts
    assert v1.cost_usd == pytest.approx(0.012)
    assert judge.usage.cost_usd == pytest.approx(0.018)
    assert (judge.usage.prompt_tokens, judge.usage.completion_tokens, judge.usage.calls) == (3000, 1500, 3)


def test_built_in_prices_without_litellm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)  # `import litellm` raises ImportError, as uninstalled
    assert known_price("openai/o4-mini") == (1.10, 4.40)
    assert known_price("gpt-4o-2024-08-06") == (2.50, 10.00)
    assert known_price("anthropic/claude-sonnet-4-20250514") == (3.00, 15.00)
    assert known_price("o3-pro") is None and known_price("smollm2-135m-instruct") is None
    assert RulerJudge("gpt-4o-mini").price_per_mtok is None  # resolved when scoring, not stored


def test_litellm_cost_table_first_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake `litellm` module (litellm is not installed here), with the shape of its `model_cost` table:
    $ per token, under the bare name or the provider's prefix."""
    fake = types.ModuleType("litellm")
    fake.model_cost = {  # type: ignore[attr-defined]
        "o4-mini": {"input_cost_per_token": 1e-6, "output_cost_per_token": 5e-6},
        "mistral/mistral-large-latest": {"input_cost_per_token": 2e-6, "output_cost_per_token": 6e-6},
        "no-prices": {"max_tokens": 100},
    }
    monkeypatch.setitem(sys.modules, "litellm", fake)
    # litellm's price, not the built-in (1.10, 4.40):
    assert known_price("openai/o4-mini") == pytest.approx((1.0, 5.0))
    assert known_price("mistral/mistral-large-latest") == pytest.approx((2.0, 6.0))
    assert known_price("gpt-4o") == (2.50, 10.00)  # not in litellm's table: the built-in price
    assert known_price("no-prices") is None and known_price("smollm2-135m-instruct") is None


async def test_unknown_models_cost_nothing() -> None:
    judge, _ = scripted(answer(0.5))
    assert (await judge.score([[USER]])).cost_usd == 0.0


async def test_a_cache_hit_skips_the_call(tmp_path: Path) -> None:
    lists = [[USER, {"role": "assistant", "content": c}] for c in "ab"]
    judge, script = scripted("bad", answer(0.4, 0.6), cache_dir=tmp_path / "cache")
    first = await judge.score(lists)
    again = await judge.score(lists)
    assert len(script.requests) == 2  # the bad answer and the good one; none for the second score
    assert again.scores == first.scores == [0.4, 0.6] and again.prompt_tokens == 0
    assert (judge.usage.calls, judge.usage.cache_hits) == (2, 1)
    assert len(list((tmp_path / "cache").glob("*.txt"))) == 1  # only the usable answer is cached
    other, other_script = scripted(answer(0.1, 0.2), cache_dir=tmp_path / "cache", rubric="Be harsh.")
    assert (await other.score(lists)).scores == [0.1, 0.2] and len(other_script.requests) == 1


async def test_scored_group_keeps_the_original_rewards_and_leaves_the_input_alone() -> None:
    group = group_of("Sunny.", "No idea.", rewards=[1.0, 0.25])
    before = json.dumps(group.to_dict(), sort_keys=True)
    judge, script = scripted(answer(0.9, 0.2), price_per_mtok=(1.0, 1.0))
    script.tokens = (1000, 200)
    scored = await ruler_score_group(group, judge=judge)
    assert json.dumps(group.to_dict(), sort_keys=True) == before
    assert scored is not None and scored is not group
    assert scored.rewards() == [0.9, 0.2]
    assert [t.metrics["independent_reward"] for t in scored.trajectories] == [1.0, 0.25]
    assert scored.trajectories[0].logs[0] == "rollout" and "why 1" in scored.trajectories[0].logs[-1]
    metrics = scored.trajectories[1].metrics
    assert metrics["ruler_judge_prompt_tokens"] == 500 and metrics["ruler_judge_completion_tokens"] == 100
    assert metrics["ruler_judge_cost_usd"] == pytest.approx(0.0006)  # (1000 + 200) * $1/Mtok / 2
    assert scored.exceptions == group.exceptions
    assert scored.trajectories[0].messages() == group.trajectories[0].messages()


async def test_ruler_wrapper_scores_message_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(answer(0.6, 0.4))

    async def fake(self: RulerJudge, request: dict[str, Any]) -> tuple[str, int, int]:
        return await script(request)

    monkeypatch.setattr(RulerJudge, "_complete", fake)
    verdict = await ruler([[USER], [SYSTEM]], "judge-model", base_url="http://127.0.0.1:9/v1", rubric="R")
    assert verdict.scores == [0.6, 0.4] and script.requests[0]["messages"][0]["content"] == "R"


# --- a Model as the judge -----------------------------------------------------------------------------


class FakeBackend:
    base_url = "http://127.0.0.1:7999/v1"
    api_key = "local-key"

    async def register(self, model: adv.TrainableModel) -> int:
        return 0


async def test_a_model_instance_as_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    async def fake(self: RulerJudge, request: dict[str, Any]) -> tuple[str, int, int]:
        seen.append((request["model"], self.base_url, self.api_key))
        return answer(0.5, 0.5), 1, 1

    monkeypatch.setattr(RulerJudge, "_complete", fake)
    group = group_of("a", "b")
    prompted = adv.Model("qwen3-32b", base_url="http://127.0.0.1:8000/v1", api_key="k")
    await ruler_score_group(group, judge_model=prompted)
    trainable = adv.TrainableModel(name="agent", base_model="smollm2-135m-instruct")
    with pytest.raises(ValueError, match="not registered"):
        await ruler_score_group(group, judge_model=trainable)
    await trainable.register(FakeBackend())  # type: ignore[arg-type]
    await ruler_score_group(group, judge_model=trainable)
    assert seen == [
        ("qwen3-32b", "http://127.0.0.1:8000/v1", "k"),
        ("smollm2-135m-instruct", "http://127.0.0.1:7999/v1", "local-key"),
    ]
