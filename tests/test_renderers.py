"""Each renderer against its family's published chat template (tests/fixtures/templates), and parsing back.

The published template is rendered through transformers' own Jinja environment (the one
`apply_chat_template` uses), on the same conversations: plain chat, multi-turn, tool calls and tool results.
For families whose template has no tools (SmolLM2, Gemma 3), our Hermes convention is applied to the
messages first (`engine.hermes`), which is what the template then sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import WEATHER_TOOL
from transformers.utils.chat_template_utils import render_jinja_template

from advantage.engine.hermes import hermes_messages, tools_system_prompt, with_system_text
from advantage.engine.renderers import (
    ChatMLRenderer,
    Gemma3Renderer,
    HFTemplateRenderer,
    Llama3Renderer,
    Qwen3Renderer,
    Qwen25Renderer,
    gemma3_chat_template,
    renderer_for,
)

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
SPECIAL = json.loads((FIXTURES / "special_tokens.json").read_text())
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]


def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"c-{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


SYSTEM = {"role": "system", "content": "You are a weather bot."}
PLAIN = [SYSTEM, {"role": "user", "content": "Hi there"}]
NO_SYSTEM = [{"role": "user", "content": "Hi there"}]
MULTI = [
    SYSTEM,
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Which city?"},
    {"role": "user", "content": "Paris"},
]
ONE_CALL = [  # one call per turn: the most Llama 3's template takes
    SYSTEM,
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "tool_call_id": "c-get_weather", "content": '{"temp_c": 18}'},
    {"role": "assistant", "content": "It is 18C in Paris."},
    {"role": "user", "content": "Thanks! And the time?"},
]
TWO_CALLS = [
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_time", {})],
    },
    {"role": "tool", "tool_call_id": "c-get_weather", "content": "18C"},
    {"role": "tool", "tool_call_id": "c-get_time", "content": "12:00"},
    {"role": "assistant", "content": "18C at noon."},
    {"role": "user", "content": "Thanks"},
]
CONVERSATIONS = {"plain": PLAIN, "no_system": NO_SYSTEM, "multi": MULTI, "one_call": ONE_CALL}


def published(name: str, messages: list[dict], tools: list | None, gen: bool, **kwargs: Any) -> str:
    """`messages` rendered by the published template `name`, as `apply_chat_template` would."""
    template = (FIXTURES / f"{name}.jinja").read_text()
    return render_template(template, SPECIAL[name], messages, tools, gen, **kwargs)


def render_template(template: str, special: dict, messages: list[dict], tools, gen: bool, **kwargs) -> str:
    hf = [_hf_message(m) for m in messages]
    (text,), _ = render_jinja_template(
        [hf], tools=tools or None, chat_template=template, add_generation_prompt=gen, **special, **kwargs
    )
    return text


def _hf_message(m: dict) -> dict:
    """The HF form of a message: tool-call arguments as mappings, no `id`s."""
    out = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {
                "type": "function",
                "function": {**tc["function"], "arguments": json.loads(tc["function"]["arguments"])},
            }
            for tc in m["tool_calls"]
        ]
    return out


def hermes(messages: list[dict], tools: list | None) -> list[dict]:
    """What a tool-less template sees under our Hermes convention."""
    msgs = hermes_messages(messages)
    return with_system_text(msgs, tools_system_prompt(tools)) if tools else msgs


# ------------------------------------------------------------------------------ render == published template


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", [*CONVERSATIONS, "two_calls"])
@pytest.mark.parametrize("with_tools", [False, True])
def test_qwen25_matches_published(conv, gen, with_tools):
    msgs = CONVERSATIONS.get(conv, TWO_CALLS)
    tools = TOOLS if with_tools else []
    ours = Qwen25Renderer().render(msgs, tools, gen)
    assert ours == published("Qwen-Qwen2.5-7B-Instruct", msgs, tools, gen)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", [*CONVERSATIONS, "two_calls"])
@pytest.mark.parametrize("with_tools", [False, True])
def test_smollm2_chatml_matches_published(conv, gen, with_tools):
    msgs = CONVERSATIONS.get(conv, TWO_CALLS)
    tools = TOOLS if with_tools else []
    ours = ChatMLRenderer().render(msgs, tools, gen)
    assert ours == published("HuggingFaceTB-SmolLM2-135M-Instruct", hermes(msgs, tools), None, gen)


THINKING = [
    {"role": "system", "content": "Be careful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "<think>\nI should call the tool.\n</think>\n\n",
        "tool_calls": [call("get_weather", {"city": "Paris"})],
    },
    {"role": "tool", "tool_call_id": "c-get_weather", "content": "18C"},
    {"role": "assistant", "content": "<think>\nGot it.\n</think>\n\nIt is 18C."},
    {"role": "user", "content": "And in Rome?"},
    {
        "role": "assistant",
        "content": "<think>\nAgain.\n</think>\n\nLet me look.",
        "tool_calls": [call("get_weather", {"city": "Rome"}), call("get_time", {})],
    },
    {"role": "tool", "tool_call_id": "c-get_weather", "content": "21C"},
    {"role": "tool", "tool_call_id": "c-get_time", "content": "12:00"},
]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", [*CONVERSATIONS, "two_calls", "thinking"])
@pytest.mark.parametrize("with_tools", [False, True])
def test_qwen3_matches_published(conv, gen, with_tools):
    msgs = {"two_calls": TWO_CALLS, "thinking": THINKING}.get(conv) or CONVERSATIONS[conv]
    tools = TOOLS if with_tools else []
    for k in range(1, len(msgs) + 1):  # every prefix: the rewrite of history depends on where it ends
        assert Qwen3Renderer().render(msgs[:k], tools, gen) == published(
            "Qwen-Qwen3-0.6B", msgs[:k], tools, gen
        )
    no_think = Qwen3Renderer(thinking=False).render(msgs, tools, True)
    assert no_think == published("Qwen-Qwen3-0.6B", msgs, tools, True, enable_thinking=False)


def test_qwen3_drops_past_thinking_so_it_is_not_concatenative():
    before = Qwen3Renderer().render(THINKING[:5], [], False)
    after = Qwen3Renderer().render(THINKING[:6], [], False)
    assert "<think>\nGot it.\n</think>" in before and "Got it." not in after
    assert not after.startswith(before) and not Qwen3Renderer().concatenative


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("name", ["meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct"])
def test_llama3_matches_published(name, conv, gen, with_tools):
    msgs = CONVERSATIONS[conv]
    tools = TOOLS if with_tools else []
    if with_tools and conv == "plain":
        msgs = [*msgs, {"role": "assistant", "content": " Hello. "}]  # content is trimmed
    ours = Llama3Renderer().render(msgs, tools, gen)
    assert ours == published(name, msgs, tools, gen, date_string="26 Jul 2024")


def test_llama3_tool_turns_read_as_the_template_writes_them():
    text = Llama3Renderer().render(ONE_CALL, TOOLS, True)
    assert "Environment: ipython\n" in text
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": '
        in text
    )
    # The template `tojson`s string results too, so a JSON result arrives quoted.
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp_c\\": 18}"<|eot_id|>' in text


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", [*CONVERSATIONS, "two_calls"])
@pytest.mark.parametrize("with_tools", [False, True])
def test_gemma3_matches_published_and_our_template(conv, gen, with_tools):
    msgs = CONVERSATIONS.get(conv, TWO_CALLS)
    tools = TOOLS if with_tools else []
    ours = Gemma3Renderer().render(msgs, tools, gen)
    special = SPECIAL["google-gemma-3-270m-it"]
    assert ours == render_template(gemma3_chat_template(), special, msgs, tools, gen)
    # The published template takes these too (it refuses turns that do not alternate; consecutive tool
    # results make one user turn, so all of these alternate).
    assert ours == published("google-gemma-3-270m-it", hermes(msgs, tools), None, gen)


def test_gemma3_turn_format():
    text = Gemma3Renderer().render(ONE_CALL[:3], [WEATHER_TOOL], False)
    assert text.startswith("<bos><start_of_turn>user\nYou may call one or more functions")
    assert "</tool_call>\n\nYou are a weather bot.\n\nWeather in Paris?<end_of_turn>\n" in text
    assert text.endswith(
        '<start_of_turn>model\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><end_of_turn>\n"
    )


# ------------------------------------------------------------------------------------------ parse round trip

RENDERERS = [ChatMLRenderer(), Qwen25Renderer(), Qwen3Renderer(), Llama3Renderer(), Gemma3Renderer()]


def reply_text(renderer, context: list[dict], reply: dict, tools: list) -> str:
    """The text a model writes for `reply`: the render of the turn, less prompt and end-of-turn token."""
    prompt = renderer.render(context, tools, True)
    full = renderer.render([*context, reply], tools, False)
    assert full.startswith(prompt)
    text = full[len(prompt) :]
    cut = min(text.find(s) for s in renderer.stop_tokens if s in text)
    return text[:cut]


@pytest.mark.parametrize("renderer", RENDERERS, ids=lambda r: r.name)
def test_parse_reads_back_a_rendered_tool_call(renderer):
    reply = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]}
    parsed = renderer.parse(reply_text(renderer, ONE_CALL[:2], reply, TOOLS))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]


@pytest.mark.parametrize("renderer", RENDERERS, ids=lambda r: r.name)
def test_parse_reads_back_plain_text(renderer):
    reply = {"role": "assistant", "content": "It is 18C in Paris."}
    parsed = renderer.parse(reply_text(renderer, ONE_CALL[:2], reply, TOOLS))
    assert parsed.tool_calls == []
    assert parsed.content.endswith("It is 18C in Paris.")


@pytest.mark.parametrize("renderer", [r for r in RENDERERS if r.name != "llama3"], ids=lambda r: r.name)
def test_parse_reads_back_two_calls_with_text(renderer):
    parsed = renderer.parse(reply_text(renderer, TWO_CALLS[:1], TWO_CALLS[1], TOOLS))
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert parsed.content.endswith("Let me check.")


def test_qwen3_parse_keeps_thinking_in_content_and_ignores_calls_in_it():
    text = '<think>\nMaybe <tool_call>{"name": "x"}</tool_call>?\n</think>\n\nHello.'
    parsed = Qwen3Renderer().parse(text)
    assert parsed.tool_calls == []
    assert parsed.reasoning == 'Maybe <tool_call>{"name": "x"}</tool_call>?'
    assert parsed.content == text


def test_llama3_parse_python_tag_semicolons_and_malformed():
    r = Llama3Renderer()
    parsed = r.parse(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}'
    )
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert (
        r.parse('{"name": "get_weather", "parameters": {"city": ').tool_calls == []
    )  # broken: stays content
    assert r.parse('{"name": "get_weather", "parameters": {}}', tools_enabled=False).tool_calls == []
    # Several calls render back joined by "; ", which the parser reads (the template itself takes one).
    msgs = [{"role": "assistant", "content": "", "tool_calls": parsed.tool_calls}]
    assert '"parameters": {"city": "Rome"}}; {"name": "get_time"' in r.render(
        [*ONE_CALL[:2], *msgs], TOOLS, False
    )


# ------------------------------------------------------------------------------------------------ detection


def fake_tokenizer(name: str | None, template: str | None = None, **tokens: Any) -> SimpleNamespace:
    """A tokenizer that renders with a published template, as far as `renderer_for` looks."""
    template = (
        template if template is not None else (FIXTURES / f"{name}.jinja").read_text() if name else None
    )
    special = {**(SPECIAL.get(name or "", {})), **tokens}

    def apply_chat_template(messages, tokenize, add_generation_prompt, **kwargs):
        return render_template(template, special, messages, None, add_generation_prompt, **kwargs)

    vocab = set(tokens.pop("vocab", ()))
    return SimpleNamespace(
        chat_template=template,
        bos_token=special.get("bos_token"),
        apply_chat_template=apply_chat_template,
        convert_tokens_to_ids=lambda t: 7 if t in vocab else 0,
        unk_token_id=0,
    )


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("HuggingFaceTB-SmolLM2-135M-Instruct", "chatml"),
        ("Qwen-Qwen2.5-7B-Instruct", "qwen2.5"),
        ("Qwen-Qwen3-0.6B", "qwen3"),
        ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
        ("meta-llama-Llama-3.2-3B-Instruct", "llama3"),
        ("google-gemma-3-270m-it", "gemma3"),
    ],
)
def test_renderer_for_picks_the_family(name, family):
    assert renderer_for(fake_tokenizer(name)).name == family


def test_renderer_for_keeps_an_edited_template():
    """A fine-tune whose template looks like Qwen2.5's but renders differently keeps its own template."""
    edited = (
        (FIXTURES / "Qwen-Qwen2.5-7B-Instruct.jinja")
        .read_text()
        .replace("'<|im_end|>' + '\\n'", "'<|im_end|>'")
    )
    assert isinstance(renderer_for(fake_tokenizer(None, edited)), HFTemplateRenderer)


def test_gemma_directory_without_template_gets_the_gemma_renderer():
    tok = fake_tokenizer(None, None, bos_token="<bos>", vocab=["<start_of_turn>"])
    tok.chat_template = None
    assert renderer_for(tok).name == "gemma3"
    assert renderer_for(fake_tokenizer(None, "{{ messages }}")).name == "hf-template"


def test_smollm2_real_tokenizer_gets_chatml(tokenizer):
    assert isinstance(renderer_for(tokenizer), ChatMLRenderer)


def test_forced_tool_choice_is_refused_for_a_non_hermes_tool_format(tokenizer):
    """The forcing grammar writes <tool_call> blocks: a Llama 3 model would return them as plain text."""
    from advantage.engine.grammar import GrammarCompiler
    from advantage.server.completions import _grammar
    from advantage.server.schemas import APIError, ChatCompletionRequest

    grammars = GrammarCompiler(tokenizer, len(tokenizer))
    req = ChatCompletionRequest(model="m", messages=NO_SYSTEM, tools=TOOLS, tool_choice="required")
    assert Llama3Renderer().tool_format == "json" and Gemma3Renderer().tool_format == "hermes"
    with pytest.raises(APIError, match="tool_choice 'auto'"):
        _grammar(req, "json", grammars)
    assert _grammar(req, "hermes", grammars)[1] == "tools"
