"""The tool-use example task: scenarios, tools, reward, and the rollout loop.

The rollout runs against a small scripted stand-in for the server's OpenAI endpoint, which returns canned
Choices; the real server (rendering, tool-call parsing, token ids) is tested elsewhere.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `examples` imports

from advantage import Trajectory  # noqa: E402
from advantage.tasks.tool_use import env, reward, rollout  # noqa: E402
from advantage.tasks.tool_use.env import (  # noqa: E402
    Scenario,
    answer_facts,
    canonical_arguments,
    execute_tool,
    make_scenarios,
)
from advantage.tasks.tool_use.reward import states_fact  # noqa: E402

# ------------------------------------------------------------------------------------------- scenarios


def test_scenarios_are_deterministic() -> None:
    assert make_scenarios(20, seed=3, split="val") == make_scenarios(20, seed=3, split="val")
    assert make_scenarios(20, seed=3) != make_scenarios(20, seed=4)
    assert len(make_scenarios(7, seed=0)) == 7


def test_every_tool_is_asked_about() -> None:
    tools = [s.tool for s in make_scenarios(8, seed=0)]
    assert sorted(tools) == sorted(env.TOOL_NAMES * 2)


def test_a_mix_sets_each_tools_share() -> None:
    mix = {"convert_units": 4, "convert_currency": 3, "get_events": 1}
    tools = [s.tool for s in make_scenarios(8, seed=0, mix=mix)]
    assert {t: tools.count(t) for t in mix} == mix and "get_weather" not in tools
    assert make_scenarios(8, seed=0, mix=mix) == make_scenarios(8, seed=0, mix=mix)
    # equal counts draw exactly what the default turn-taking draws
    assert make_scenarios(8, seed=5, mix=dict.fromkeys(env.TOOL_NAMES, 2)) == make_scenarios(8, seed=5)
    with pytest.raises(ValueError, match="add up to n=8"):
        make_scenarios(8, mix={"convert_units": 7})
    with pytest.raises(ValueError, match="unknown tools"):
        make_scenarios(1, mix={"get_stock_price": 1})


def test_train_and_val_never_share_an_instance() -> None:
    train = {s.question for seed in range(5) for s in make_scenarios(200, seed=seed, split="train")}
    val = {s.question for seed in range(5) for s in make_scenarios(200, seed=seed, split="val")}
    assert train and val and not train & val
    assert all(env.split_of(q) == "val" for q in val)


def test_val_is_the_same_distribution_not_held_out_entities() -> None:
    train = make_scenarios(400, seed=0, split="train")
    val = make_scenarios(400, seed=0, split="val")

    def templates(ss: Sequence[Scenario]) -> set[str]:
        return {s.question.split(" ")[0] for s in ss}

    assert templates(val) == templates(train)
    cities = lambda ss: {s.arguments["city"] for s in ss if s.tool == "get_weather"}  # noqa: E731
    assert cities(val) & cities(train)  # the same cities appear in both, asked differently


def test_scenario_facts_come_from_the_right_call() -> None:
    for s in make_scenarios(40, seed=1, split="val"):
        result = execute_tool(s.tool, json.dumps(s.arguments))
        assert not result.startswith("Error"), result
        assert all(f in result for f in s.answer_facts)
        assert Scenario.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_the_prompt_example_is_outside_the_scenario_space() -> None:
    parts = [q for q, _, _ in rollout._EXAMPLE_CALLS]
    questions = {s.question for split in ("train", "val") for s in make_scenarios(400, seed=0, split=split)}
    assert not questions & set(parts)


# ---------------------------------------------------------------------------------------------- tools


def test_tools_are_consistent() -> None:
    assert execute_tool("get_weather", '{"city": "lisbon"}') == execute_tool(
        "get_weather", '{"city": "Lisbon"}'
    )
    assert execute_tool(
        "convert_currency", '{"amount": 100, "from_currency": "usd", "to_currency": "EUR"}'
    ) == ("100 USD = 92.00 EUR")
    assert execute_tool("convert_units", '{"value": 5, "from_unit": "miles", "to_unit": "kilometers"}') == (
        "5 mi = 8.05 km"
    )
    assert execute_tool("get_events", '{"date": "2025-01-15"}').startswith("2025-01-15: ")


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("get_stock_price", '{"ticker": "ACME"}', "unknown tool 'get_stock_price'"),
        ("get_weather", '{"city": "Paris"', "not valid JSON"),
        ("get_weather", '["Paris"]', "must be a JSON object"),
        ("get_weather", "", "missing argument 'city'"),
        ("get_weather", '{"town": "Paris"}', "missing argument 'city'"),
        ("get_weather", '{"city": "Atlantis"}', "no weather data"),
        (
            "convert_currency",
            '{"amount": "lots", "from_currency": "USD", "to_currency": "EUR"}',
            "must be a number",
        ),
        (
            "convert_currency",
            '{"amount": NaN, "from_currency": "USD", "to_currency": "EUR"}',
            "must be a number",
        ),
        (
            "convert_currency",
            '{"amount": 5, "from_currency": "USD", "to_currency": "XYZ"}',
            "unknown currency",
        ),
        ("convert_units", '{"value": 5, "from_unit": "km", "to_unit": "kg"}', "cannot convert km to kg"),
        ("convert_units", '{"value": 5, "from_unit": "parsec", "to_unit": "km"}', "unknown unit"),
        ("get_events", '{"date": "15/01/2025"}', "YYYY-MM-DD"),
        ("get_events", '{"date": "2031-01-15"}', "only covers 2025"),
    ],
)
def test_execute_tool_returns_errors_instead_of_raising(name: str, args: str, says: str) -> None:
    out = execute_tool(name, args)
    assert out.startswith("Error: ") and says in out, out


# --------------------------------------------------------------------------------------------- reward

SCENARIO = Scenario(
    id="convert_currency-test",
    question="Convert 120 USD to EUR.",
    tool="convert_currency",
    arguments={"amount": 120.0, "from_currency": "USD", "to_currency": "EUR"},
    answer_facts=("110.40",),
)


def _call(name: str, args: dict[str, Any] | str) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }


def _episode(*turns: dict[str, Any]) -> list[dict[str, Any]]:
    """The real prompt (system, the worked example with its own tool calls, the question) plus the turns."""
    return rollout.initial_messages(SCENARIO) + list(turns)


def _tool(content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": "call_1", "content": content}


def _say(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


GOOD_ARGS = {"amount": 120, "from_currency": "usd", "to_currency": "EUR"}


def test_reward_perfect() -> None:
    msgs = _episode(
        _call("convert_currency", GOOD_ARGS), _tool("120 USD = 110.40 EUR"), _say("<answer>110.4</answer>")
    )
    grade = reward.score(msgs, SCENARIO)
    assert grade == reward.RewardBreakdown(True, True, True, True)
    assert grade.total == pytest.approx(1.0)


def test_reward_wrong_tool() -> None:
    msgs = _episode(
        _call("convert_units", {"value": 120, "from_unit": "USD", "to_unit": "EUR"}),
        _tool("Error: unknown unit 'USD'"),
        _say("I could not convert it."),
    )
    assert reward.reward(msgs, SCENARIO) == pytest.approx(0.1)  # format only


def test_reward_wrong_args() -> None:
    msgs = _episode(
        _call("convert_currency", {**GOOD_ARGS, "to_currency": "GBP"}),
        _tool("120 USD = 94.80 GBP"),
        _say("It is 94.80 GBP."),
    )
    assert reward.reward(msgs, SCENARIO) == pytest.approx(0.3)  # format + tool


def test_reward_args_not_an_object_is_not_a_valid_call() -> None:
    msgs = _episode(_call("convert_currency", '"120 USD"'), _tool("Error"), _say("?"))
    assert reward.reward(msgs, SCENARIO) == 0.0


def test_reward_no_call_even_with_the_example_in_context() -> None:
    # The worked example in the prompt holds tool calls and results; only the agent's turns count.
    assert reward.reward(_episode(_say("It is 110.40 EUR.")), SCENARIO) == 0.0


def test_reward_answer_without_the_number() -> None:
    msgs = _episode(
        _call("convert_currency", GOOD_ARGS), _tool("120 USD = 110.40 EUR"), _say("Done, converted.")
    )
    assert reward.reward(msgs, SCENARIO) == pytest.approx(0.5)


def test_reward_no_final_answer_after_the_tool_result() -> None:
    msgs = _episode(_call("convert_currency", GOOD_ARGS), _tool("120 USD = 110.40 EUR"))
    assert reward.reward(msgs, SCENARIO) == pytest.approx(0.5)


def test_reward_answer_cut_off_at_max_tokens_earns_no_answer_credit() -> None:
    msgs = _episode(
        _call("convert_currency", GOOD_ARGS),
        _tool("120 USD = 110.40 EUR"),
        _say("<tool_response>\n110.40 EUR, 1.86, 5"),
    )
    assert reward.reward(msgs, SCENARIO) == pytest.approx(1.0)
    assert reward.reward(msgs, SCENARIO, cut_off=True) == pytest.approx(0.5)


def test_reward_number_that_no_tool_returned_earns_nothing() -> None:
    msgs = _episode(
        _call("convert_currency", {**GOOD_ARGS, "amount": 12}),
        _tool("12 USD = 11.04 EUR"),
        _say("110.40 EUR"),
    )  # a guess that happens to be right
    assert reward.score(msgs, SCENARIO).answered is False


@pytest.mark.parametrize(
    ("text", "fact", "ok"),
    [
        ("It is 11,830 MXN.", "11830.00", True),
        ("about 52.6 AUD", "52.56", True),
        ("53 AUD", "52.56", False),
        ("It is 16°C.", "16", True),
        ("It is 160°C.", "16", False),
        ("Dentist at 9:00.", "09:00", True),
        ("Dentist at 9.00", "09:00", True),
        ("Dentist at 19:00", "09:00", False),
        ("on 2025-01-16", "16", False),
    ],
)
def test_states_fact(text: str, fact: str, ok: bool) -> None:
    assert reward.states_fact(text, fact) is ok


# -------------------------------------------------------------------------------------------- rollout


def _completion(
    content: str, tool_calls: list[dict[str, Any]] | None = None, finish_reason: str = "stop"
) -> ChatCompletion:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
        finish_reason = "tool_calls"
    return ChatCompletion.model_validate(
        {
            "id": "cmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "agent@3",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish_reason,
                    "message": message,
                    "token_ids": [1, 2, 3],
                    "token_logprobs": [-0.1, -0.2, -0.3],
                    "prompt_token_ids": [7, 8],
                    "weights": {"model": "agent", "step": 3},
                }
            ],
        }
    )


def _call_completion(name: str, args: dict[str, Any]) -> ChatCompletion:
    tc = {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    return _completion("", [tc])


class ScriptedCompletions:
    def __init__(self, script: list[ChatCompletion]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []

    async def create(self, **kwargs: Any) -> ChatCompletion:
        self.requests.append(kwargs)
        return self.script.pop(0)


class ScriptedClient:
    """Stands in for `openai.AsyncOpenAI`: `client.chat.completions.create(...)` replays a script."""

    def __init__(self, script: list[ChatCompletion]) -> None:
        self.completions = ScriptedCompletions(script)
        self.chat = self


class ScriptedModel:
    def __init__(self, script: list[ChatCompletion]) -> None:
        self.client = ScriptedClient(script)

    def openai_client(self) -> Any:
        return self.client

    def get_inference_name(self) -> str:
        return "agent"


async def test_rollout_success() -> None:
    model = ScriptedModel(
        [_call_completion("convert_currency", GOOD_ARGS), _completion("<answer>110.40</answer>")]
    )
    traj = await rollout.rollout(model, SCENARIO, temperature=0.7)

    assert isinstance(traj, Trajectory)
    assert traj.reward == pytest.approx(1.0) and reward.success(traj)
    assert traj.finish_reason == "answered"
    assert (
        traj.metrics["success"] == 1.0 and traj.metrics["n_turns"] == 2 and traj.metrics["n_tool_calls"] == 1
    )
    assert traj.metadata["scenario_id"] == SCENARIO.id
    assert traj.weight_steps() == [3, 3]
    assert len(traj.choices()) == 2  # the two sampled turns are the trainable ones

    first, second = model.client.completions.requests
    assert first["model"] == "agent" and first["tools"] == env.TOOLS and first["temperature"] == 0.7
    assert first["max_tokens"] == rollout.MAX_TOKENS
    assert first["messages"][-1] == {"role": "user", "content": SCENARIO.question + rollout.CALL_HINT}
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_convert_currency",
        "content": "120 USD = 110.40 EUR",
    }


async def test_rollout_executes_bad_calls_and_records_the_error() -> None:
    model = ScriptedModel([_call_completion("get_weather", {"city": "Atlantis"}), _completion("No idea.")])
    traj = await rollout.rollout(model, SCENARIO)
    assert traj.messages()[-2]["content"].startswith("Error: ")
    assert traj.reward == pytest.approx(0.1) and not reward.success(traj)
    assert traj.metrics["right_tool"] == 0.0


async def test_rollout_stops_at_max_turns() -> None:
    model = ScriptedModel([_call_completion("convert_currency", GOOD_ARGS) for _ in range(2)])
    traj = await rollout.rollout(model, SCENARIO, max_turns=2)
    assert traj.finish_reason == "max_turns"
    assert traj.metrics["n_turns"] == 2 and traj.metrics["n_tool_calls"] == 2
    assert traj.reward == pytest.approx(0.5)  # a right call, but never an answer


async def test_rollout_answer_cut_off() -> None:
    model = ScriptedModel([_completion("The answer is", finish_reason="length")])
    traj = await rollout.rollout(model, SCENARIO)
    assert traj.finish_reason == "length" and traj.reward == 0.0


def test_prompt_is_the_documented_shape() -> None:
    msgs = rollout.initial_messages(SCENARIO)
    assert msgs[0] == {"role": "system", "content": rollout.SYSTEM_PROMPT}
    assert msgs[1:-1] == rollout.EXAMPLE
    assert sum(1 for m in msgs if m["role"] == "user") == 2  # the example's question and the real one
    # The example's answer states each of its tool results.
    results = [m["content"] for m in rollout.EXAMPLE if m["role"] == "tool"]
    assert not any(r.startswith("Error") for r in results)
    answer = rollout.EXAMPLE[-1]["content"]
    assert answer == (
        "<answer>Project review at 09:00. 3 km is 1.86 mi. 12 USD is 11.04 EUR. Paris is 5°C and windy.</answer>"
    )
    for (_, tool, args), result in zip(rollout._EXAMPLE_CALLS, results, strict=True):
        (fact,) = answer_facts(tool, canonical_arguments(tool, args))
        assert states_fact(answer, fact) and states_fact(result, fact)


def test_single_turn_reward_by_hand() -> None:
    from advantage.tasks.tool_use import single_turn

    s = Scenario("w", "What's the weather in Oslo?", "get_weather", {"city": "Oslo"}, ("7",))

    def call(name: str, args: object) -> str:
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"

    # Credits 0.1 valid + 0.2 tool + 0.2 args, over their sum 0.5.
    assert single_turn.reward(call("get_weather", {"city": "oslo"}), s) == pytest.approx(1.0)  # case ignored
    assert single_turn.reward(call("get_weather", {"city": "Paris"}), s) == pytest.approx(0.6)
    assert single_turn.reward(call("get_events", {"date": "2025-01-01"}), s) == pytest.approx(0.2)
    assert single_turn.reward(call("get_weather", "not json"), s) == 0.0  # arguments not an object
    assert single_turn.reward("<tool_call>\n{broken\n</tool_call>", s) == 0.0
    assert single_turn.reward("It is sunny.", s) == 0.0


def test_every_right_call_fits_the_tool_schemas() -> None:
    """The schemas' enums admit every scenario's canonical arguments (a right call is never ruled out by
    the grammar), and the example's calls."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in env.TOOLS}
    calls = [
        (s.tool, s.arguments) for split in ("train", "val") for s in make_scenarios(200, seed=3, split=split)
    ]
    calls += [(name, args) for _, name, args in rollout._EXAMPLE_CALLS]
    for tool, args in calls:
        schema = schemas[tool]
        assert set(args) == set(schema["required"]) == set(schema["properties"])
        for key, value in args.items():
            prop = schema["properties"][key]
            if "enum" in prop:
                assert value in prop["enum"], (tool, key, value)
            elif prop["type"] == "number":
                assert isinstance(value, (int, float))
