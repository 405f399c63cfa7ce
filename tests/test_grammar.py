"""The forced tool call's grammar, token by token, with the bundled tokenizer (no model needed).

A string enum among a call's arguments is admitted only as the tokens the tokenizer writes each value with,
so the first token of a value decides it: with SmolLM2's tokenizer "Beijing" is `Be` + `ijing` and "Bangkok"
is `B` + `ang` + `kok`, and after `B` only "Bangkok" may follow."""

from __future__ import annotations

import json

import pytest

from advantage.engine.grammar import (
    Constraint,
    GrammarCompiler,
    allowed_tokens,
    enum_values,
    grammar_for_tool_choice,
)
from advantage.tasks.tool_use.env import TOOLS

CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Beijing", "Bangkok", "Paris"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
OPEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def one(tokenizer, text: str) -> int:
    (token,) = ids(tokenizer, text)
    return token


def fed(compiler: GrammarCompiler, grammar: str, tokens: list[int]) -> Constraint:
    c = compiler.matcher(grammar)
    for t in tokens:
        c.consume(t)
    return c


def allowed(compiler: GrammarCompiler, c: Constraint) -> set[int]:
    return set(allowed_tokens([c], compiler.vocab_size)[0].nonzero().flatten().tolist())


def accepts(compiler: GrammarCompiler, grammar: str, tokens: list[int]) -> bool:
    c = compiler.matcher(grammar)
    m = c._m
    return all(m.consume_token(t) for t in tokens) and (m.is_accepting() or m.is_stopped())


def test_an_enum_value_starts_only_with_its_own_first_token(compiler, tokenizer) -> None:
    assert [tokenizer.decode([t]) for t in ids(tokenizer, "Beijing")] == ["Be", "ijing"]
    grammar = compiler.tool_choice([CITY_TOOL], ["get_weather"])
    c = fed(compiler, grammar, ids(tokenizer, OPEN))
    B, Be, P = one(tokenizer, "B"), one(tokenizer, "Be"), one(tokenizer, "Paris")
    assert allowed(compiler, c) == {B, Be, P}  # not `Ba`, `Ban`, `P`, `Par`: no other spelling of a value
    c.consume(B)
    assert allowed(compiler, c) == {one(tokenizer, "ang")}  # after `B` only Bangkok, never B + e + ijing


def test_the_whole_call_is_accepted_as_the_tokenizer_writes_it(compiler, tokenizer) -> None:
    grammar = compiler.tool_choice([CITY_TOOL], ["get_weather"])
    for city in ("Beijing", "Bangkok", "Paris"):
        call = {"name": "get_weather", "arguments": {"city": city}}
        assert accepts(compiler, grammar, ids(tokenizer, f"<tool_call>\n{json.dumps(call)}\n</tool_call>"))
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>'
    assert not accepts(compiler, grammar, ids(tokenizer, bad))


def test_without_a_tokenizer_values_are_spelled_character_by_character(compiler, tokenizer) -> None:
    grammar = grammar_for_tool_choice([CITY_TOOL], ["get_weather"])  # no token_spans: llguidance's %json
    c = fed(compiler, grammar, ids(tokenizer, OPEN))
    c.consume(one(tokenizer, "B"))
    assert one(tokenizer, "e") in allowed(compiler, c)  # B + e + ... may still become Beijing


@pytest.mark.parametrize("tool", TOOLS, ids=[t["function"]["name"] for t in TOOLS])
def test_every_demo_tool_takes_its_rendered_calls(compiler, tokenizer, tool) -> None:
    """Numbers, free strings and enums side by side, in the schema's key order, with json.dumps's
    separators (as the chat module renders calls in the prompt); a missing or extra key is refused."""
    name = tool["function"]["name"]
    grammar = compiler.tool_choice(TOOLS, [name])
    examples = {
        "get_weather": {"city": "Beijing"},
        "convert_currency": {"amount": 12.5, "from_currency": "USD", "to_currency": "EUR"},
        "convert_units": {"value": -3, "from_unit": "km", "to_unit": "mi"},
        "get_events": {"date": "2025-01-15"},
    }
    args = examples[name]
    text = f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"
    assert accepts(compiler, grammar, ids(tokenizer, text))
    first = next(iter(args))
    missing = {k: v for k, v in args.items() if k != first} | ({"x": 1} if len(args) == 1 else {})
    text = f"<tool_call>\n{json.dumps({'name': name, 'arguments': missing})}\n</tool_call>"
    assert not accepts(compiler, grammar, ids(tokenizer, text))


def test_a_schema_with_optional_keys_is_left_to_json(compiler, tokenizer) -> None:
    """Only a schema that fixes its keys is written key by key; an optional key keeps llguidance's %json
    (which may leave it out), enums and all."""
    tool = json.loads(json.dumps(CITY_TOOL))
    params = tool["function"]["parameters"]
    params["properties"]["days"] = {"type": "integer"}
    grammar = compiler.tool_choice([tool], ["get_weather"])
    for args in ({"city": "Paris"}, {"city": "Paris", "days": 3}):
        call = json.dumps({"name": "get_weather", "arguments": args})
        assert accepts(compiler, grammar, ids(tokenizer, f"<tool_call>\n{call}\n</tool_call>"))


def test_values_that_need_escaping_and_repeated_values(compiler, tokenizer) -> None:
    tool = json.loads(json.dumps(CITY_TOOL))
    tool["function"]["parameters"]["properties"]["city"]["enum"] = ['say "hi"', "São Paulo", "Paris", "Paris"]
    grammar = compiler.tool_choice([tool], ["get_weather"])
    for city in ('say "hi"', "São Paulo"):  # strings as llguidance writes them: UTF-8, quotes escaped
        call = json.dumps({"name": "get_weather", "arguments": {"city": city}}, ensure_ascii=False)
        assert accepts(compiler, grammar, ids(tokenizer, f"<tool_call>\n{call}\n</tool_call>"))


def test_the_grammar_is_cached_per_tools(compiler) -> None:
    a = compiler.tool_choice([CITY_TOOL], ["get_weather"])
    assert compiler.tool_choice([CITY_TOOL], ["get_weather"]) is a


def test_the_grammar_lists_its_enums_for_the_engine(compiler, tokenizer) -> None:
    """Each string enum's values, as tokens, ride in a comment line of the grammar; a matcher reads them and
    says where a value opens (after the argument's key, in the call of its own function), nowhere else."""
    grammar = compiler.tool_choice(TOOLS, ["get_weather", "convert_units"])
    table = enum_values(grammar)
    assert set(table) == {
        ("get_weather", "city"),
        ("convert_units", "from_unit"),
        ("convert_units", "to_unit"),
    }
    assert ids(tokenizer, "Beijing") in table[("get_weather", "city")]
    c = compiler.matcher(grammar)
    assert c.values_at(OPEN) == table[("get_weather", "city")]
    units = '<tool_call>\n{"name": "convert_units", "arguments": {"value": 3, "from_unit": "km", "to_unit": "'
    assert c.values_at(units) == table[("convert_units", "to_unit")]
    assert c.values_at(units[:-1]) is None  # the string is not open yet
    assert c.values_at('<tool_call>\n{"name": "get_events", "arguments": {"date": "') is None  # a free string
    assert enum_values(grammar_for_tool_choice(TOOLS, ["get_weather"])) == {}  # %json: character by character


@pytest.mark.parametrize(
    "parameters",
    [
        "x",
        {"type": "object", "properties": {"a": 5}, "required": ["a"], "additionalProperties": False},
        {"type": "object", "properties": ["a"], "required": ["a"], "additionalProperties": False},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": 7, "additionalProperties": False},
    ],
    ids=["not-a-schema", "property-not-a-schema", "properties-a-list", "required-not-a-list"],
)
def test_a_broken_schema_is_a_value_error_not_a_crash(compiler, parameters) -> None:
    """The server answers a ValueError with a 400 naming the tools; anything else would be a 500."""
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    try:
        compiler.validate(compiler.tool_choice([tool], ["f"]))
    except ValueError:
        pass
