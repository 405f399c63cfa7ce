"""Chat messages in, prompt text out; model text in, OpenAI tool calls out.

The server and the trainer both turn OpenAI-style `messages` into a prompt through `render_prompt`, so the
prompt a completion was sampled from and the context the trainer rebuilds are the same text.

Formats. Each model family has a renderer (`engine.renderers`): SmolLM2/ChatML, Qwen2.5, Qwen3, Llama 3.x
and Gemma 3 are transcribed from their published chat templates and tested against them; any other model
uses its tokenizer's own template. Families whose template has no tools (SmolLM2, Gemma 3) get the Hermes
convention of `engine.hermes`: a tool block in the system prompt, `<tool_call>` blocks in the reply,
`<tool_response>` blocks in a user turn. `parse_reply` reads a sampled reply back the family's way; a call
that does not parse stays in the content as plain text: a sampled model often writes broken calls, and that
is a reward signal, not a crash.

`tool_choice`: "none" renders no tools. "required" and a named function (`{"type": "function", "function":
{"name": X}}`) leave the prompt exactly as "auto" does and are enforced at decoding time instead, by a
grammar that only admits `<tool_call>` blocks of the allowed functions with arguments that fit their schemas
(`grammar.grammar_for_tool_choice`). Keeping the prompt the same matters for training: a rollout may force a
call on one turn and not the next, and the trainer rebuilds every turn's context from the trajectory's one
`tools` list.
"""

from __future__ import annotations

import json
from typing import Any

from advantage.engine.hermes import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    Message,
    ParsedOutput,
    parse_assistant_output,
    tools_system_prompt,
)
from advantage.engine.renderers import renderer_for

ToolChoice = str | dict[str, Any] | None

ROLES = ("system", "developer", "user", "assistant", "tool")


# --------------------------------------------------------------------------------------------- validation


def validate_messages(messages: Any) -> None:
    """Raise `ValueError` saying what to fix when `messages` is not a usable OpenAI chat request.

    Checked here, once, so a bad request fails with a readable message instead of a Jinja error deep in the
    chat template."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}.")
    if not messages:
        raise ValueError("messages is empty; send at least one, e.g. {'role': 'user', 'content': ...}.")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(m).__name__}.")
        role = m.get("role")
        if role is None:
            raise ValueError(f"{where} has no 'role'; use one of {', '.join(ROLES)}.")
        if role not in ROLES:
            raise ValueError(f"{where} has unknown role {role!r}; use one of {', '.join(ROLES)}.")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise ValueError(f"{where} ({role}) has no 'content'; only assistant messages may omit it.")
        else:
            _check_content(content, where)
        if role == "assistant" and m.get("tool_calls") is not None:
            _check_tool_calls(m["tool_calls"], where)
        elif m.get("tool_calls") is not None:
            raise ValueError(f"{where} ({role}) has 'tool_calls'; only assistant messages can call tools.")
        _check_unicode(m, where)


def _check_unicode(value: Any, where: str) -> None:
    """Refuse text that UTF-8 cannot carry: JSON may escape a lone surrogate ("\\ud800"), and the tokenizer
    then fails on it. Every string in `value` (content, tool calls, names) is checked."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{where} holds text that is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text."
        ) from None


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(
            f"{where}.content must be a string, null, or a list of text parts, got {type(content).__name__}."
        )
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError(
                f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}; "
                f"got {part!r:.80}. Only text is supported."
            )


def _check_tool_calls(tool_calls: Any, where: str) -> None:
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where}.tool_calls must be a list, got {type(tool_calls).__name__}.")
    for j, tc in enumerate(tool_calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(tc, dict):
            raise ValueError(f"{at} must be a dict {{'type': 'function', 'function': {{...}}}}.")
        if tc.get("type", "function") != "function":
            raise ValueError(f"{at} has type {tc.get('type')!r}; only 'function' tool calls are supported.")
        fn = tc.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{at} needs a 'function' dict with 'name' and 'arguments'.")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{at}.function needs a non-empty string 'name'.")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ValueError(f"{at}.function.arguments is not valid JSON ({e}); send an object.") from e
        if not isinstance(args, dict):
            raise ValueError(f"{at}.function.arguments must be a JSON object, got {type(args).__name__}.")


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ValueError(
            f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {tools!r:.60}."
        )
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}.")
        _check_unicode(t, f"tools[{j}]")
    return tools


def forced_functions(tool_choice: ToolChoice, tools: list[dict[str, Any]]) -> list[str] | None:
    """The functions a tool_choice forces a call to (None: no call is forced). Raises on a bad choice."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    known = [t["function"]["name"] for t in tools]
    if tool_choice == "required":
        if not known:
            raise ValueError("tool_choice 'required' needs at least one tool in tools.")
        return known
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ValueError("tool_choice must look like {'type': 'function', 'function': {'name': ...}}.")
        if name not in known:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools ({known}).")
        return [name]
    raise ValueError(
        f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}."
    )


# ------------------------------------------------------------------------------------------------ render


def render_prompt(
    tokenizer: Any,
    messages: list[Message],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages` in the tokenizer's model family's chat format (see module docstring)."""
    validate_messages(messages)
    tools = _check_tools(tools) if tools else []
    forced_functions(tool_choice, tools)  # validated here; enforced by the sampler's grammar
    if tool_choice == "none":
        tools = []
    return renderer_for(tokenizer).render([_normalize(m) for m in messages], tools, add_generation_prompt)


def encode_prompt(
    tokenizer: Any,
    messages: list[Message],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: ToolChoice = None,
) -> list[int]:
    """The prompt's token ids: `render_prompt` (which validates the request), then the tokenizer."""
    text = render_prompt(tokenizer, messages, tools, tool_choice)
    return list(tokenizer.encode(text, add_special_tokens=False))


def parse_reply(tokenizer: Any, text: str, tools_enabled: bool) -> ParsedOutput:
    """Content and tool calls of a sampled reply, in the tokenizer's model family's format."""
    return renderer_for(tokenizer).parse(text, tools_enabled)


def _normalize(m: Message) -> Message:
    """A copy with string content (text parts joined) and 'developer' read as 'system'."""
    out = dict(m)
    content = m.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list):
        out["content"] = "\n".join(p["text"] for p in content)
    if out["role"] == "developer":
        out["role"] = "system"
    return out


__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ParsedOutput",
    "encode_prompt",
    "forced_functions",
    "parse_assistant_output",
    "parse_reply",
    "render_prompt",
    "tools_system_prompt",
    "validate_messages",
]
