"""The real server on 127.0.0.1 with the bundled SmolLM2, driven by the official `openai` SDK (sync and async).

Everything here goes over HTTP: auth, OpenAI-shaped errors, SSE streaming, tool calls, n>1, logprobs and the
extension fields (`token_ids`, `token_logprobs`, `prompt_token_ids`, `weights`) that training relies on.
Replies are short (max_tokens <= 32) so the module runs in well under two minutes on two CPU cores.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from helpers import WEATHER_TOOL
from starlette.routing import Route

from advantage.engine.chat import render_prompt
from advantage.server.app import OPEN_PATHS, create_app
from advantage.server.runner import BackgroundServer
from advantage.service import Service

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

MODEL = "smollm2-135m-instruct"
KEY = "test-key-123"
HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]

WEATHER = WEATHER_TOOL
_SHOTS = [
    ("Paris", "Sunny, 22 C"),
    ("Rome", "Cloudy, 18 C"),
    ("Madrid", "Hot, 30 C"),
    ("Oslo", "Snow, -2 C"),
    ("Lima", "Mild, 19 C"),
    ("Cairo", "Dry, 35 C"),
]


def _tool_call_msg(call_id: str, city: str) -> dict:
    fn = {"name": "get_weather", "arguments": json.dumps({"city": city})}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": fn}],
    }


def weather_conversation(city: str) -> list[dict]:
    """System prompt, six few-shot exchanges (question, tool call, tool result, answer), then a new question.

    SmolLM2-135M is small: with one or two shots it greedily writes a made-up `<tool_response>` instead of a
    call. Six short exchanges make the greedy reply a well-formed `<tool_call>` (by a clear logprob margin)."""
    msgs: list[dict] = [{"role": "system", "content": "Use the tools."}]
    for i, (c, result) in enumerate(_SHOTS):
        msgs += [
            {"role": "user", "content": f"What's the weather in {c}?"},
            _tool_call_msg(f"call_{i}", c),
            {"role": "tool", "tool_call_id": f"call_{i}", "content": result},
            {"role": "assistant", "content": f"{result}."},
        ]
    msgs.append({"role": "user", "content": f"What's the weather in {city}?"})
    return msgs


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    svc = Service(tmp_path_factory.mktemp("svc"))
    svc.engine(MODEL)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(service: Service):
    srv = BackgroundServer(service, api_key=KEY).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def root(server: BackgroundServer) -> str:
    return f"http://{server.host}:{server.port}"


@pytest.fixture(scope="module")
def client(server: BackgroundServer):
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def aclient(server: BackgroundServer):
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A random tiny Llama with a 256-token context, on its own Service and server."""
    svc = Service(tmp_path_factory.mktemp("tiny"), engine_kwargs={"max_context": 256})
    svc.engine(str(tiny_model_dir))
    srv = BackgroundServer(svc, api_key=KEY).start()
    yield srv, str(tiny_model_dir)
    srv.stop()
    svc.close()


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def assert_extensions(choice, prompt_len: int | None = None) -> None:
    extra = choice.model_extra
    for key in ("token_ids", "token_logprobs", "prompt_token_ids", "weights"):
        assert key in extra, f"choice {choice.index} lacks {key}"
    assert len(extra["token_ids"]) == len(extra["token_logprobs"]) > 0
    assert all(isinstance(t, int) for t in extra["token_ids"])
    assert all(lp <= 0.0 for lp in extra["token_logprobs"])
    assert extra["weights"] == {"model": MODEL, "step": 0}
    if prompt_len is not None:
        assert len(extra["prompt_token_ids"]) == prompt_len


# ------------------------------------------------------------------------------------------- basic routes


def test_health_needs_no_key(root: str):
    r = httpx.get(f"{root}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models_lists_base_model(client: openai.OpenAI):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_sync_chat_completion(client: openai.OpenAI, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert choice.message.tool_calls is None
    ids = choice.model_extra["token_ids"]
    expected_prompt = tokenizer.encode(render_prompt(tokenizer, HI), add_special_tokens=False)
    assert choice.model_extra["prompt_token_ids"] == expected_prompt == r.model_extra["prompt_token_ids"]
    assert r.usage.prompt_tokens == len(expected_prompt)
    assert r.usage.completion_tokens == len(ids) <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["weights"] == {"model": MODEL, "step": 0}
    assert_extensions(choice, len(expected_prompt))
    assert decode(tokenizer, ids) == choice.message.content


async def test_async_client(aclient: openai.AsyncOpenAI, client: openai.OpenAI):
    models = await aclient.models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = await aclient.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    same = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    assert r.choices[0].model_extra["token_ids"] == same.choices[0].model_extra["token_ids"]
    assert r.choices[0].message.content == same.choices[0].message.content


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}], ids=["greedy", "seed"]
)
def test_stream_matches_non_stream(client: openai.OpenAI, sampling: dict):
    kw = {"model": MODEL, "messages": HI, "max_tokens": 24, **sampling}
    full = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    deltas: list[str] = []
    finish: list[str] = []
    usage = None
    last_extra: dict = {}
    n_content_chunks = 0
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        [c] = chunk.choices
        assert c.index == 0
        if c.delta.content:
            deltas.append(c.delta.content)
            n_content_chunks += 1
        if c.finish_reason is not None:
            finish.append(c.finish_reason)
            last_extra = c.model_extra
    text = "".join(deltas)
    assert text == full.choices[0].message.content
    assert n_content_chunks > 1  # token by token, not one blob at the end
    assert finish == [full.choices[0].finish_reason]
    assert last_extra["token_ids"] == full.choices[0].model_extra["token_ids"]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI):
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=0, stream=True)
    )
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_async_stream(aclient: openai.AsyncOpenAI):
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=8, temperature=0, stream=True
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts)


# --------------------------------------------------------------------------------------------- tool calls


def test_tool_call_round_trip(client: openai.OpenAI):
    msgs = weather_conversation("Tokyo")
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=32, temperature=0
    )
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert not choice.message.content
    assert_extensions(choice)

    # Send the result back: the SDK's own message objects round-trip as request input.
    follow = [
        *msgs,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Rain, 12 C"},
    ]
    r2 = client.chat.completions.create(
        model=MODEL, messages=follow, tools=[WEATHER], max_tokens=32, temperature=0
    )
    [final] = r2.choices
    assert final.finish_reason == "stop"
    assert final.message.tool_calls is None and final.message.content
    assert "<tool_call>" not in final.message.content
    assert len(final.model_extra["prompt_token_ids"]) > len(choice.model_extra["prompt_token_ids"])


def test_streamed_tool_call(client: openai.OpenAI):
    msgs = weather_conversation("Tokyo")
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=32, temperature=0, stream=True
        )
    )
    last = chunks[-1].choices[0]
    assert last.finish_reason == "tool_calls"
    assert not any("<tool_call>" in (c.choices[0].delta.content or "") for c in chunks)
    [call] = last.delta.tool_calls
    assert call.index == 0 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}


def test_tool_choice_none_never_parses(client: openai.OpenAI):
    r = client.chat.completions.create(
        model=MODEL, messages=HI, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_finish_reasons(client: openai.OpenAI):
    long = [{"role": "user", "content": "Write a long essay about the history of Rome."}]
    r = client.chat.completions.create(model=MODEL, messages=long, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3 == len(r.choices[0].model_extra["token_ids"])

    short = [{"role": "user", "content": "Reply with just the word yes."}]
    r = client.chat.completions.create(model=MODEL, messages=short, max_tokens=32, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].model_extra["token_ids"]) < 32

    r = client.chat.completions.create(model=MODEL, messages=long, max_tokens=6, n=3, seed=1)
    for c in r.choices:
        assert c.finish_reason in ("tool_calls", "stop", "length")


def test_stop_string(client: openai.OpenAI, tokenizer):
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    base = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    text = base.choices[0].message.content
    assert "," in text
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stop=[","])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text.split(",")[0]


def test_whitespace_kept_verbatim(client: openai.OpenAI, tokenizer):
    """A reply cut right after a newline keeps it, streamed or not, as the sampled ids decode to."""
    msgs = [{"role": "user", "content": "List three colors, one per line."}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    ids = full.choices[0].model_extra["token_ids"]
    cut = next((i + 1 for i, t in enumerate(ids) if decode(tokenizer, [t]).endswith("\n")), None)
    assert cut is not None, full.choices[0].message.content
    kw = {"model": MODEL, "messages": msgs, "max_tokens": cut, "temperature": 0}
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == decode(tokenizer, ids[:cut])
    assert r.choices[0].message.content.endswith("\n")
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
    )
    assert streamed == r.choices[0].message.content


# -------------------------------------------------------------------------- n, logprobs, extension fields


def test_n_choices_and_seed(client: openai.OpenAI, tokenizer):
    kw = {"model": MODEL, "messages": HI, "max_tokens": 12, "n": 4, "seed": 1234, "temperature": 1.0}
    r = client.chat.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for c in r.choices:
        assert_extensions(c, r.usage.prompt_tokens)
        assert decode(tokenizer, c.model_extra["token_ids"]) == c.message.content
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices)
    ids = [c.model_extra["token_ids"] for c in r.choices]
    assert len({tuple(x) for x in ids}) > 1  # four samples, not four copies

    again = client.chat.completions.create(**kw)
    assert [c.model_extra["token_ids"] for c in again.choices] == ids
    other = client.chat.completions.create(**{**kw, "seed": 99})
    assert [c.model_extra["token_ids"] for c in other.choices] != ids


def test_logprobs_shape(client: openai.OpenAI):
    r = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    [c] = r.choices
    content = c.logprobs.content
    ids, lps = c.model_extra["token_ids"], c.model_extra["token_logprobs"]
    assert len(content) == len(ids) == r.usage.completion_tokens
    for entry, lp in zip(content, lps, strict=True):
        assert entry.logprob == pytest.approx(lp)
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy picks the top token
        assert entry.token == entry.top_logprobs[0].token

    plain = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    only = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=4, temperature=0, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)
    # Streamed, the logprobs come with the last chunk of the choice, in the same shape.
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True
        )
    )
    [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    streamed = last.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, pytest.approx(e.logprob)) for e in content]
    assert all(len(e.top_logprobs) == 3 for e in streamed)


async def test_concurrent_requests(aclient: openai.AsyncOpenAI, tokenizer, service: Service):
    questions = [f"Give me one fact about the number {i}." for i in range(16)]
    stats = service.engine(MODEL).stats
    steps_before = stats["decode_steps"]

    async def ask(q: str):
        return await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0
        )

    results = await asyncio.gather(*(ask(q) for q in questions))
    assert len(results) == 16 and len({r.id for r in results}) == 16
    for q, r in zip(questions, results, strict=True):
        [c] = r.choices
        assert c.finish_reason in ("stop", "length")
        assert_extensions(c)
        assert decode(tokenizer, c.model_extra["token_ids"]) == c.message.content
        prompt = render_prompt(tokenizer, [{"role": "user", "content": q}])
        assert c.model_extra["prompt_token_ids"] == tokenizer.encode(prompt, add_special_tokens=False)

    # They were decoded together: far fewer decode steps than tokens. (Their greedy text is not compared
    # with lone requests': in bf16 a batch's matmuls round differently, which can flip a near-tie token.)
    total = sum(r.usage.completion_tokens for r in results)
    assert (stats["decode_steps"] - steps_before) * 4 < total


# ------------------------------------------------------------------------------------------------- errors


def _assert_openai_error(exc: openai.APIStatusError, status: int) -> dict:
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_unknown_model_404(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=HI, max_tokens=4)
    err = _assert_openai_error(ei.value, 404)
    assert err["param"] == "model" and MODEL in err["message"]


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 65}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": "many"}, "n"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_sampling_params_400(client: openai.OpenAI, kwargs: dict, word: str):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=HI, **{"max_tokens": 4, **kwargs})
    err = _assert_openai_error(ei.value, 400)
    assert err["type"] == "invalid_request_error" and word in err["message"]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "wizard", "content": "hi"}],
        [{"content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": "hi", "tool_calls": []}],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}],
            }
        ],
        ["just a string"],
    ],
)
def test_malformed_messages_400(client: openai.OpenAI, messages: list):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    _assert_openai_error(ei.value, 400)


def test_malformed_body_400(root: str):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b'{"model": "x"}', b'{"model": "x", "messages": "hi"}', b"[]"):
        r = httpx.post(f"{root}/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


def test_bad_tools_400(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, tools=[{"type": "function"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            tools=[WEATHER],
            max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "not_a_tool"}},
        )


def test_context_length_400(tiny_server):
    srv, name = tiny_server
    with openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0) as c:
        assert [m.id for m in c.models.list().data] == [name]
        ok = c.chat.completions.create(model=name, messages=HI, max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason == "length" and ok.usage.completion_tokens == 4

        long = [{"role": "user", "content": "word " * 400}]
        with pytest.raises(openai.BadRequestError) as ei:
            c.chat.completions.create(model=name, messages=long, max_tokens=4)
        err = _assert_openai_error(ei.value, 400)
        assert err["code"] == "context_length_exceeded" and "256" in err["message"]

        # The prompt fits but prompt + max_tokens does not: the message says how far to lower max_tokens.
        with pytest.raises(openai.BadRequestError) as ei:
            c.chat.completions.create(model=name, messages=HI, max_tokens=250)
        err = _assert_openai_error(ei.value, 400)
        assert err["code"] == "context_length_exceeded" and "max_tokens" in err["message"]

        # Without max_tokens the reply is capped by the context, not refused.
        capped = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "word " * 200}])
        assert capped.usage.total_tokens <= 256


# --------------------------------------------------------------------------------------------------- auth


def _all_routes(service: Service) -> list[tuple[str, str]]:
    """(method, path) for every route the app defines, so a route added later is covered too."""
    app = create_app(service, api_key=KEY)
    out = []
    for route in app.routes:
        if not isinstance(route, Route):  # APIRoute is a Route; so are the docs and openapi.json routes
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path)  # any path parameter gets a dummy value
        for method in sorted(route.methods or {"GET"}):
            out.append((method, path))
    return out


def test_every_route_but_health_needs_key(service: Service, root: str):
    routes = _all_routes(service)
    paths = {p for _, p in routes}
    assert {"/health", "/v1/models", "/v1/chat/completions"} <= paths
    checked = 0
    for method, path in routes:
        if path in OPEN_PATHS:
            r = httpx.request(method, f"{root}{path}")
            assert r.status_code == 200, (method, path)
            continue
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": f"Bearer {KEY}x"},
        ):
            r = httpx.request(method, f"{root}{path}", headers=headers, json={})
            assert r.status_code == 401, (method, path, headers)
            if method != "HEAD":
                assert r.json()["error"]["type"] == "authentication_error"
            checked += 1
    assert checked >= 10
    # An unknown path is refused before routing too: no probing of what exists without a key.
    assert httpx.get(f"{root}/v1/nothing-here").status_code == 401


def test_sdk_wrong_key_401(server: BackgroundServer):
    with openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.models.list()
        _assert_openai_error(ei.value, 401)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)


def test_key_is_case_sensitive_but_scheme_is_not(root: str):
    assert httpx.get(f"{root}/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert (
        httpx.get(f"{root}/v1/models", headers={"Authorization": f"Bearer {KEY.upper()}"}).status_code == 401
    )
