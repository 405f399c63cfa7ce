"""Structured outputs and RULER against the real local server and the bundled 135M model: constrained
decoding makes even this small model answer in JSON that fits the schema, every time."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

import advantage as adv
from advantage.server.runner import BackgroundServer
from advantage.service import Service

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
        "sky": {"type": "string", "enum": ["sunny", "cloudy", "rainy"]},
    },
    "required": ["city", "temperature_c", "sky"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    service = Service(tmp_path_factory.mktemp("so"))
    service.engine(MODEL)
    srv = BackgroundServer(service).start()
    yield srv
    srv.stop()
    service.close()


def _valid(obj: dict) -> bool:
    return (
        set(obj) == {"city", "temperature_c", "sky"}
        and isinstance(obj["city"], str)
        and len(obj["city"]) <= 24
        and isinstance(obj["temperature_c"], int)
        and -50 <= obj["temperature_c"] <= 60
        and obj["sky"] in ("sunny", "cloudy", "rainy")
    )


async def test_twenty_requests_all_fit_the_schema(server: BackgroundServer) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}

    async def one(i: int) -> dict:
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Describe the weather in city number {i}."}],
            response_format=fmt, temperature=1.0, seed=i, max_tokens=64,
        )  # fmt: skip
        assert resp.choices[0].finish_reason == "stop"
        return json.loads(resp.choices[0].message.content or "")

    answers = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(_valid(a) for a in answers), answers


def test_streaming_json_object(server: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A JSON object with a name."}],
        response_format={"type": "json_object"}, stream=True, max_tokens=48, temperature=0.0,
    )  # fmt: skip
    parts, finish = [], None
    for c in chunks:
        if c.choices:
            parts.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
    text = "".join(parts)
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)


def test_bad_schema_is_a_400(server: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )  # fmt: skip


async def test_ruler_scores_a_real_group_through_the_local_server(server: BackgroundServer) -> None:
    system = {"role": "system", "content": "Answer the arithmetic question."}
    user = {"role": "user", "content": "What is 2 + 2?"}
    answers = ["2 + 2 = 4.", "It is 5.", "I am not sure, maybe 22."]
    group = adv.TrajectoryGroup(
        [adv.Trajectory([system, user, {"role": "assistant", "content": a}], reward=r)
         for a, r in zip(answers, [1.0, 0.0, 0.0], strict=True)]
    )  # fmt: skip
    judge = adv.RulerJudge(MODEL, base_url=server.base_url, api_key="unused", max_tokens=400)
    scored = await adv.ruler_score_group(group, judge=judge)
    assert scored is not None and len(scored.trajectories) == 3
    for t, original in zip(scored.trajectories, [1.0, 0.0, 0.0], strict=True):
        assert 0.0 <= t.reward <= 1.0
        assert t.metrics["independent_reward"] == original
        assert t.logs and t.metrics["ruler_judge_prompt_tokens"] > 0
    assert judge.usage.calls >= 1 and judge.usage.completion_tokens > 0


CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "to_currency": {"type": "string", "enum": ["EUR", "GBP", "JPY"]},
            },
            "required": ["amount", "to_currency"],
            "additionalProperties": False,
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [
        ("required", {"convert_currency", "get_weather"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
    ],
)
async def test_forced_tool_calls_always_parse_and_fit_their_schema(
    server: BackgroundServer, tool_choice, names
) -> None:
    """Without forcing, this model often answers in prose (or writes <tool_response>); forced, every
    sample at T=1.0 is a well-formed call of an allowed function whose arguments fit its schema."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")
    resp = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "I have 40 dollars. How much is that in euros?"}],
        tools=[CONVERT, WEATHER], tool_choice=tool_choice, temperature=1.0, n=8, seed=3, max_tokens=128,
    )  # fmt: skip
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        call = choice.message.tool_calls[0].function
        args = json.loads(call.arguments)
        assert call.name in names
        if call.name == "convert_currency":
            assert set(args) == {"amount", "to_currency"} and args["to_currency"] in ("EUR", "GBP", "JPY")
            assert isinstance(args["amount"], (int, float))
        else:
            assert isinstance(args["city"], str)


async def test_grammar_forced_tokens_are_reported(server: BackgroundServer, tokenizer) -> None:
    """A forced call of a named function: the call's opening up to the first argument value is fixed by the
    grammar token by token, so those indices come back in `forced_token_indices` (training skips them); an
    unconstrained reply has none."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    forced_call = {"type": "function", "function": {"name": "get_weather"}}
    resp = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice=forced_call, temperature=1.0, max_tokens=64
    )  # fmt: skip
    extra = resp.choices[0].model_extra
    ids, forced = extra["token_ids"], extra["forced_token_indices"]
    assert forced and all(0 <= i < len(ids) for i in forced)
    first_free = next(i for i in range(len(ids)) if i not in forced)
    head = tokenizer.decode(ids[:first_free])
    assert head.startswith('<tool_call>\n{"name": "get_weather"'), head
    free = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert free.choices[0].model_extra["forced_token_indices"] == []
