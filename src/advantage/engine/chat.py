"""Chat messages in, prompt text out; model text in, OpenAI tool calls out.

The server and the trainer both turn OpenAI-style `messages` into a prompt through `render_prompt`, so the
prompt a completion was sampled from and the context the trainer rebuilds are the same text.

Tool format. A model whose chat template knows about tools (its template mentions `tools`) gets them passed
through `apply_chat_template(tools=...)`. Others, like the bundled SmolLM2, get a Hermes-style convention
rendered by this module:

- The tools go into the system prompt, in front of any existing system message (one is created otherwise):

      You may call one or more functions to help with the user's request. Their JSON schemas are inside
      <tools></tools>:
      <tools>
      {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
      </tools>
      To call a function, respond with one block per call:
      <tool_call>
      {"name": <function-name>, "arguments": <args-json-object>}
      </tool_call>

- An assistant message with `tool_calls` renders as its content followed by one
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block per call (blocks joined by "\\n").
- `role: "tool"` messages render as a `user` turn holding `<tool_response>\\n{content}\\n</tool_response>`;
  consecutive tool messages share one user turn, one block each, joined by "\\n".
- `tool_choice`: "none" renders no tools. "required" and a named function (`{"type": "function",
  "function": {"name": X}}`) leave the prompt exactly as "auto" does and are enforced at decoding time
  instead, by a grammar that only admits `<tool_call>` blocks of the allowed functions with arguments that
  fit their schemas (`grammar.grammar_for_tool_choice`). Keeping the prompt the same matters for training:
  a rollout may force a call on one turn and not the next, and the trainer rebuilds every turn's context
  from the trajectory's one `tools` list.

`parse_assistant_output` reads the `<tool_call>` blocks back. A block that does not parse stays in the
content as plain text: a sampled model often writes broken calls, and that is a reward signal, not a crash.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
ToolChoice = str | dict[str, Any] | None

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


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
    """The prompt text for `messages` under the tokenizer's chat template (format: see module docstring)."""
    validate_messages(messages)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("This tokenizer has no chat template; use an instruct/chat model as base_model.")
    tools = _check_tools(tools) if tools else []
    forced_functions(tool_choice, tools)  # validated here; enforced by the sampler's grammar
    if tool_choice == "none":
        tools = []
    native = isinstance(template, str) and "tools" in template

    msgs = [_normalize(m) for m in messages]
    kwargs: dict[str, Any] = {}
    if native:
        msgs = [_native_tool_args(m) for m in msgs]
        if tools:
            kwargs["tools"] = tools
    else:
        msgs = _hermes_messages(msgs)
        if tools:
            msgs = _with_system_text(msgs, tools_system_prompt(tools), prepend=True)
    text = tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str.")
    return text


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes-style tool block put into the system prompt of models whose template has no tools."""
    schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    lines = [
        "You may call one or more functions to help with the user's request. "
        "Their JSON schemas are inside <tools></tools>:",
        f"<tools>\n{schemas}\n</tools>",
        "To call a function, respond with one block per call:",
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}',
    ]
    return "\n".join(lines)


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


def _native_tool_args(m: Message) -> Message:
    """HF tool templates expect `arguments` as a mapping (they `tojson` it); OpenAI sends a JSON string."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for tc in m["tool_calls"]:
        fn = dict(tc["function"])
        if isinstance(fn.get("arguments"), str):
            fn["arguments"] = json.loads(fn["arguments"] or "{}")
        calls.append({**tc, "type": "function", "function": fn})
    return {**m, "tool_calls": calls}


def _hermes_messages(msgs: list[Message]) -> list[Message]:
    """Rewrite tool calls and tool results as plain text turns for a template that knows neither."""
    out: list[Message] = []
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [_tool_call_block(tc["function"]) for tc in m["tool_calls"]]
            body = "\n".join(([m["content"]] if m["content"] else []) + blocks)
            out.append({"role": "assistant", "content": body})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    for m in out:
        m.pop("_tool_turn", None)
    return out


def _tool_call_block(fn: dict[str, Any]) -> str:
    args = fn.get("arguments", "{}")
    args_obj = json.loads(args or "{}") if isinstance(args, str) else args
    call = json.dumps({"name": fn["name"], "arguments": args_obj}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def _with_system_text(msgs: list[Message], text: str, prepend: bool) -> list[Message]:
    """Add `text` to the leading system message (before or after its content), creating one if needed."""
    if msgs and msgs[0]["role"] == "system":
        old = msgs[0]["content"]
        new = (f"{text}\n\n{old}" if prepend else f"{old}\n\n{text}") if old else text
        return [{**msgs[0], "content": new}, *msgs[1:]]
    return [{"role": "system", "content": text}, *msgs]


# ------------------------------------------------------------------------------------------------- parse


@dataclass
class ParsedOutput:
    """An assistant reply split into text and OpenAI-shaped tool calls."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_assistant_output(text: str, tools_enabled: bool) -> ParsedOutput:
    """Split sampled text into content and `<tool_call>` blocks (a missing final close tag is tolerated).

    A block whose body is not `{"name": str, "arguments": object-or-JSON-string}` stays in the content."""
    if not tools_enabled or TOOL_CALL_OPEN not in text:
        return ParsedOutput(content=text.strip(), tool_calls=[])
    kept: list[str] = []
    calls: list[dict[str, Any]] = []
    pos = 0
    while (start := text.find(TOOL_CALL_OPEN, pos)) != -1:
        kept.append(text[pos:start])
        body_start = start + len(TOOL_CALL_OPEN)
        close = _json_close(text, body_start)  # an argument may itself contain "</tool_call>"
        if close == -1:
            close = text.find(TOOL_CALL_CLOSE, body_start)
        end = len(text) if close == -1 else close + len(TOOL_CALL_CLOSE)
        body = text[body_start : len(text) if close == -1 else close]
        call = _parse_call(body)
        if call is None:
            kept.append(text[start:end])
        else:
            calls.append(call)
        pos = end
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return ParsedOutput(content=content or (None if calls else ""), tool_calls=calls)


def _json_close(text: str, body_start: int) -> int:
    """Where the close tag after a block's JSON object starts; -1 unless the block is one JSON object and then
    a close tag. The object is read first, so a string inside it may hold anything, "</tool_call>" included."""
    i = body_start + len(text[body_start:]) - len(text[body_start:].lstrip())
    try:
        _, j = json.JSONDecoder().raw_decode(text, i)
    except json.JSONDecodeError:
        return -1
    j += len(text[j:]) - len(text[j:].lstrip())
    return j if text.startswith(TOOL_CALL_CLOSE, j) else -1


def _parse_call(body: str) -> dict[str, Any] | None:
    """The OpenAI tool call a block body stands for, or None when it is malformed."""
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }
