"""Enum values of a forced call chosen by the logprob of all their tokens (`TorchEngine(enum_lookahead=)`),
on the bundled SmolLM2 and the demo's own prompt.

Token by token, the base model names Bangkok for "What's the weather in Beijing?": after `"city": "` it
puts more weight on `B` (only Bangkok starts so) than on `Be`. Scored whole, Beijing wins."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from advantage.engine.chat import encode_prompt
from advantage.engine.sampling import SamplingParams
from advantage.engine.torch_engine import TorchEngine
from advantage.tasks.tool_use.env import CITIES, TOOLS, Scenario
from advantage.tasks.tool_use.rollout import initial_messages

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def engines(smollm_dir: Path) -> Iterator[dict[int, TorchEngine]]:
    made = {k: TorchEngine(smollm_dir, dtype="float32", enum_lookahead=k) for k in (4, 0)}
    yield made
    for e in made.values():
        e.close()


def ask(engine: TorchEngine, city: str, **params: object) -> list:
    scenario = Scenario("x", f"What's the weather in {city}?", "get_weather", {"city": city})
    prompt = encode_prompt(engine.tokenizer, initial_messages(scenario), TOOLS, "required")
    grammar = engine.grammars.tool_choice(TOOLS, ["get_weather"])
    out = engine.submit(prompt, SamplingParams(max_tokens=48, grammar=grammar, **params)).result(timeout=300)
    return [(prompt, c) for c in out]


def called_city(text: str) -> str:
    body = text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>")
    return json.loads(body)["arguments"]["city"]


def test_greedy_names_beijing_scored_whole_and_bangkok_token_by_token(engines) -> None:
    [(_, whole)] = ask(engines[4], "Beijing", temperature=0.0)
    [(_, token_by_token)] = ask(engines[0], "Beijing", temperature=0.0)
    assert called_city(whole.text) == "Beijing"
    assert called_city(token_by_token.text) == "Bangkok"
    assert engines[4].stats["enum_choices"] >= 1 and engines[4].stats["lookahead_rows"] >= 1
    assert engines[0].stats["enum_choices"] == 0


def test_the_choice_is_trained_and_the_logprobs_are_the_models(engines) -> None:
    """The value's first token is the decision (not in `forced`); the rest of it is forced by the grammar.
    Every reported logprob is still the model's own, as a plain forward of prompt + completion gives."""
    engine = engines[4]
    [(prompt, c)] = ask(engine, "Beijing", temperature=0.0)
    be, ijing = engine.tokenizer.encode("Beijing", add_special_tokens=False)
    at = c.token_ids.index(be)
    assert c.token_ids[at + 1] == ijing
    assert at not in c.forced and at + 1 in c.forced
    [scored] = engine.score([prompt + c.token_ids]).result(timeout=120).logprobs
    want = scored[len(prompt) :]
    assert max(abs(a - b) for a, b in zip(c.logprobs, want, strict=True)) < 1e-3


def test_sampled_values_are_valid_and_seeded(engines) -> None:
    engine = engines[4]
    first = [called_city(c.text) for _, c in ask(engine, "Stockholm", temperature=1.0, n=6, seed=3)]
    again = [called_city(c.text) for _, c in ask(engine, "Stockholm", temperature=1.0, n=6, seed=3)]
    assert first == again
    assert all(city in CITIES for city in first)
