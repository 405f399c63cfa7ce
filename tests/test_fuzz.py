"""schemathesis against the server's own OpenAPI schema: no request it can generate gets an HTTP 500.

The real server runs on 127.0.0.1 with the bundled SmolLM2 and one registered trainable model, behind an API
key. Every operation in the schema is fuzzed (chat completions, models, health, the /v1/training/* routes),
in schemathesis' coverage phase (boundary and invalid values of each field) and fuzzing phase (Hypothesis,
derandomized, so a run is reproducible). Besides `not_a_server_error`, the responses are checked against the
schema: status code, content type, and the body (every 4xx must be OpenAI's error shape), and invalid data
must be refused (`negative_data_rejection`). One check is left out: `positive_data_acceptance` (a request
the schema allows must succeed). Some rules are not JSON schema and do not belong in it: cross-field rules
of TrainConfig (eps_high >= eps), names that become directories, non-empty groups, a conversation the chat
template can render; the server answers those with a 400 that says what to fix, which the test asserts.

Hooks steer the generator to where the code is: chat requests name the served model and half of them carry a
valid conversation, so the sampling fields reach the engine; training routes name the registered model.
Generation is bounded (small n and max_tokens where they are valid) so the module runs in about a minute.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import CheckContext
from schemathesis.core.failures import Failure
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from advantage.server.app import create_app
from advantage.server.runner import BackgroundServer
from advantage.service import Service

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

MODEL = "smollm2-135m-instruct"
TRAINABLE = "fuzz"
KEY = "fuzz-key"
HI = [{"role": "user", "content": "Name a color."}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    # A 256-token context keeps every generation the fuzzer can ask for short; a larger max_tokens is a 400.
    service = Service(tmp_path_factory.mktemp("fuzz"), engine_kwargs={"max_context": 256})
    service.engine(MODEL)
    service.register("fuzzproj", TRAINABLE, MODEL)
    srv = BackgroundServer(service, api_key=KEY).start()
    yield srv
    srv.stop()
    service.close()


@pytest.fixture(scope="module")
def root(server: BackgroundServer) -> str:
    return f"http://{server.host}:{server.port}"


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _openapi() -> dict[str, Any]:
    """The app's schema, built at collection time without loading a model (a Service loads engines lazily).

    schemathesis' `from_fixture` would fetch it from the running server, but it does not work with pytest 9;
    `test_schema_is_the_served_one` checks that this is the schema the server serves."""
    service = Service("/nonexistent-advantage-root")
    try:
        return create_app(service).openapi()
    finally:
        service.close()


schema = schemathesis.openapi.from_dict(_openapi())


# ------------------------------------------------------------------------------------------------ steering


def _clamp(value: Any, top: int) -> Any:
    """A valid count is made small (compute stays bounded); an invalid one is left for the server to refuse."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value:
        return min(value, top)
    return value


@schemathesis.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Chat bodies name the served model, and half carry a valid conversation. Only fields that are already
    valid are touched, so a negative case (an invalid body) stays invalid."""
    op = context.operation
    if op is None or op.path != CHAT or not isinstance(body, dict):
        return st.just(body)
    body = dict(body)
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    for key, top in (("n", 2), ("max_tokens", 8), ("max_completion_tokens", 8), ("top_logprobs", 3)):
        if key in body:
            body[key] = _clamp(body[key], top)
    messages = body.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return st.sampled_from([body, {**body, "messages": HI}])
    return st.just(body)


@schemathesis.hook
def map_path_parameters(context: schemathesis.HookContext, path_parameters: Any) -> Any:
    """Training routes name the registered model (an unknown name is a 404 before any of the route's code)."""
    if isinstance(path_parameters, dict) and isinstance(path_parameters.get("name"), str):
        return {**path_parameters, "name": TRAINABLE}
    return path_parameters


# ------------------------------------------------------------------------------------------------ checks


@schemathesis.check
def no_error_event(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A train stream answers 200 before the step runs; a server fault then arrives as an error event."""
    if response.status_code != 200 or not case.path.endswith("/train"):
        return None
    for line in response.content.decode().splitlines():
        event = json.loads(line)
        if event.get("event") == "error" and event.get("status", 500) >= 500:
            raise Failure(
                operation=case.operation.label,
                title="Server error inside the train stream",
                message=json.dumps(event),
            )
    return True


# ------------------------------------------------------------------------------------------------ the test


@schema.parametrize()
@hypothesis.settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_no_server_error(case: Case, root: str) -> None:
    response = case.call_and_validate(
        base_url=root, headers=_auth(), timeout=60, excluded_checks=[positive_data_acceptance]
    )
    assert response.status_code < 500
    if response.status_code >= 400:  # every error says what went wrong, in OpenAI's shape
        assert re.search(r"\w", response.json()["error"]["message"])


def test_schema_is_the_served_one(root: str) -> None:
    served = httpx.get(f"{root}/openapi.json", headers=_auth(), timeout=30).json()
    assert served == schema.raw_schema


# ------------------------------------------------------------------------------------------------ regressions


def test_out_of_range_seed_is_a_400_not_a_hang(root: str) -> None:
    """A seed past 64 bits made torch raise inside the engine's prefill, and the request never finished."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, "seed": 2**64}
    r = httpx.post(f"{root}/v1/chat/completions", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    ok = httpx.post(
        f"{root}/v1/chat/completions", json={**body, "seed": -(2**63)}, headers=_auth(), timeout=30
    )
    assert ok.status_code == 200


def test_routing_errors_are_openai_shaped(root: str) -> None:
    r = httpx.get(f"{root}/v1/chat/completions", headers=_auth(), timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "use POST" in r.json()["error"]["message"]
    r = httpx.post(f"{root}/v1/chat/completion", headers=_auth(), timeout=30)
    assert r.status_code == 404 and "/openapi.json" in r.json()["error"]["message"]
    r = httpx.post(f"{root}/v1/chat/completions", headers=_auth(), timeout=30)  # no body
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_schema_documents_the_errors_the_server_answers() -> None:
    chat = schema.raw_schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"400", "401", "404", "413"} <= set(chat)
    assert set(schema.raw_schema["paths"]["/health"]["get"]["responses"]) == {"200"}
