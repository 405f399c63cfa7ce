"""Prompt rendering, tool-call parsing and request validation, on SmolLM2's real (tool-less) template."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import WEATHER_TOOL

from advantage.engine.chat import forced_functions, parse_assistant_output, render_prompt, validate_messages

WEATHER = WEATHER_TOOL
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


# ------------------------------------------------------------------------------------------------ render


def test_render_plain_matches_template(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_prompt(tokenizer, msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not render_prompt(tokenizer, msgs, add_generation_prompt=False).endswith("<|im_start|>assistant\n")


def test_render_joins_text_parts(tokenizer):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    text = render_prompt(tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": parts}])
    assert "<|im_start|>user\na\nb<|im_end|>" in text


def test_tools_prepended_to_existing_system_prompt(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    text = render_prompt(tokenizer, msgs, tools=[WEATHER])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n")
    assert f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in system
    assert "<tool_call>" in system
    assert system.endswith("\n\nBe brief.")  # the user's system prompt follows the tool block
    assert text.count("<|im_start|>system") == 1


def test_tools_create_system_prompt_when_missing(tokenizer):
    text = render_prompt(tokenizer, [{"role": "user", "content": "hi"}], tools=[WEATHER, TIME])
    assert text.startswith("<|im_start|>system\nYou may call")
    assert '"get_weather"' in text and '"get_time"' in text
    assert "SmolLM" not in text  # our system message replaces the template's default one


def test_tool_calls_and_results_render_hermes_style(tokenizer):
    msgs = [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "18C"},
        {"role": "tool", "tool_call_id": "b", "content": "12:00"},
        {"role": "assistant", "content": "18C at noon."},
        {"role": "user", "content": "Thanks"},
    ]
    text = render_prompt(tokenizer, msgs, tools=[WEATHER, TIME])
    assert (
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
    ) in text
    # Both results share one user turn.
    assert (
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n18C at noon.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
    ) in text
    assert text.endswith("<|im_start|>assistant\n")


def test_assistant_tool_call_without_content(tokenizer):
    msgs = [
        {"role": "user", "content": "time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
    ]
    text = render_prompt(tokenizer, msgs, tools=[TIME], add_generation_prompt=False)
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_render_is_concatenative(tokenizer):
    """Each render is a prefix of the next one: the trainer relies on it to build sequences incrementally."""
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    for k in range(1, len(msgs)):
        before = render_prompt(tokenizer, msgs[:k], tools=[WEATHER], add_generation_prompt=False)
        assert render_prompt(tokenizer, msgs[: k + 1], tools=[WEATHER]).startswith(before)


@pytest.mark.parametrize(
    ("tool_choice", "forced"),
    [
        ("auto", None),
        (None, None),
        ("required", ["get_weather", "get_time"]),
        ({"type": "function", "function": {"name": "get_time"}}, ["get_time"]),
    ],
)
def test_forcing_a_call_leaves_the_prompt_as_auto_does(tokenizer, tool_choice, forced):
    """A forced call is the sampler's job (a grammar), so every turn of a rollout renders the same prompt."""
    msgs = [{"role": "user", "content": "hi"}]
    text = render_prompt(tokenizer, msgs, tools=[WEATHER, TIME], tool_choice=tool_choice)
    assert "<tools>" in text
    assert text == render_prompt(tokenizer, msgs, tools=[WEATHER, TIME])
    assert forced_functions(tool_choice, [WEATHER, TIME]) == forced


def test_tool_choice_none_renders_no_tools(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    with_none = render_prompt(tokenizer, msgs, tools=[WEATHER], tool_choice="none")
    assert with_none == render_prompt(tokenizer, msgs)


@pytest.mark.parametrize(
    ("tool_choice", "match"),
    [("always", "tool_choice must be"), ({"type": "function", "function": {"name": "nope"}}, "not in tools")],
)
def test_bad_tool_choice_raises(tokenizer, tool_choice, match):
    with pytest.raises(ValueError, match=match):
        render_prompt(tokenizer, [{"role": "user", "content": "hi"}], [WEATHER], tool_choice=tool_choice)


def test_bad_tools_raise(tokenizer):
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        render_prompt(tokenizer, [{"role": "user", "content": "hi"}], tools=[{"name": "x"}])


def test_native_tool_template_gets_tools_passed_through():
    """A template that knows `tools` receives them (and dict arguments) instead of our Hermes text."""
    seen: dict = {}

    def apply_chat_template(messages, tokenize, add_generation_prompt, **kwargs):
        seen.update(messages=messages, **kwargs)
        return "rendered"

    tok = SimpleNamespace(chat_template="{{ tools }}", apply_chat_template=apply_chat_template)
    msgs = [
        {"role": "user", "content": "w?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "X"}'}}],
        },
        {"role": "tool", "tool_call_id": "1", "content": "sun"},
    ]
    assert render_prompt(tok, msgs, tools=[WEATHER], tool_choice="required") == "rendered"
    assert seen["tools"] == [WEATHER]
    assert seen["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "X"}
    assert seen["messages"][2]["role"] == "tool"


# ------------------------------------------------------------------------------------------------- parse


def test_parse_plain_text():
    out = parse_assistant_output("  Hello there.\n", tools_enabled=True)
    assert out.content == "Hello there." and out.tool_calls == []


def test_parse_single_call():
    out = parse_assistant_output(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', True
    )
    assert out.content is None
    [call] = out.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert isinstance(call["function"]["arguments"], str)


def test_parse_several_calls_with_text_around():
    text = (
        "Checking both.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nOne moment.'
    )
    out = parse_assistant_output(text, tools_enabled=True)
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_weather", "get_time"]
    assert out.tool_calls[0]["id"] != out.tool_calls[1]["id"]
    assert out.content == "Checking both.\n\n\nOne moment."


def test_parse_arguments_as_json_string_and_missing():
    out = parse_assistant_output(
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
        '<tool_call>{"name": "b"}</tool_call>',
        tools_enabled=True,
    )
    assert [json.loads(c["function"]["arguments"]) for c in out.tool_calls] == [{"x": 1}, {}]


def test_parse_close_tag_inside_an_argument_string():
    # A grammar-forced call admits any string, "</tool_call>" included: the JSON object is read first.
    text = '<tool_call>\n{"name": "note", "arguments": {"text": "a}}</tool_call>b"}}\n</tool_call> done'
    out = parse_assistant_output(text, tools_enabled=True)
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"text": "a}}</tool_call>b"}
    assert out.content == "done"


def test_parse_unclosed_final_tag():
    out = parse_assistant_output('Sure. <tool_call>\n{"name": "get_time", "arguments": {}}\n', True)
    assert out.content == "Sure."
    assert out.tool_calls[0]["function"]["name"] == "get_time"


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>{"name": "get_time", "arguments": {</tool_call>',  # bad JSON
        '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',  # missing name
        '<tool_call>{"name": "get_time", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "get_time", "arguments": "not json"}</tool_call>',  # arguments string not JSON
        "<tool_call>[1, 2]</tool_call>",  # not an object at all
        "<tool_call>get_time()",  # unclosed and not JSON
    ],
)
def test_parse_malformed_call_stays_in_content(bad):
    out = parse_assistant_output(f"Hmm. {bad}", tools_enabled=True)
    assert out.tool_calls == []
    assert out.content == f"Hmm. {bad}"


def test_parse_keeps_good_call_next_to_bad_one():
    text = '<tool_call>{"name": oops}</tool_call>\n<tool_call>{"name": "get_time"}</tool_call>'
    out = parse_assistant_output(text, tools_enabled=True)
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_time"]
    assert out.content == '<tool_call>{"name": oops}</tool_call>'


def test_parse_disabled_tools_never_parses():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    out = parse_assistant_output(text, tools_enabled=False)
    assert out.tool_calls == [] and out.content == text


# ---------------------------------------------------------------------------------------------- validate


def test_validate_accepts_good_conversation():
    validate_messages(
        [
            {"role": "system", "content": "S"},
            {"role": "developer", "content": "D"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "ok"},  # no tool_call_id is tolerated
            {"role": "assistant", "content": "done"},
        ]
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ({"role": "user", "content": "hi"}, "must be a list"),
        ([], "empty"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], "no 'role'"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text part"),
        ([{"role": "assistant", "content": None, "tool_calls": {}}], "tool_calls must be a list"),
        ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "needs a 'function'"),
        ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "non-empty string"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}], "valid"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "object"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant"),
    ],
)
def test_validate_rejects(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)


def test_render_validates(tokenizer):
    with pytest.raises(ValueError, match="unknown role"):
        render_prompt(tokenizer, [{"role": "bot", "content": "hi"}])
