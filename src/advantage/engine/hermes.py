"""The Hermes tool-call convention: `<tool_call>{json}</tool_call>` blocks in the text of a turn.

Qwen2.5 and Qwen3 were trained on it, and we teach it, in a system prompt, to models whose chat template has
no tools (SmolLM2, Gemma 3):

- The tools go into the system prompt, in front of any existing system message (`tools_system_prompt`):

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

`parse_assistant_output` reads the `<tool_call>` blocks back. A block that does not parse stays in the
content as plain text: a sampled model often writes broken calls, and that is a reward signal, not a crash.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


# ------------------------------------------------------------------------------------------------ render


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


def arguments_dict(fn: dict[str, Any]) -> dict[str, Any]:
    """A tool call's arguments as a mapping (OpenAI sends a JSON string; chat templates `tojson` a mapping)."""
    args = fn.get("arguments", "{}")
    return json.loads(args or "{}") if isinstance(args, str) else dict(args)


def tool_call_block(fn: dict[str, Any]) -> str:
    call = json.dumps({"name": fn["name"], "arguments": arguments_dict(fn)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def hermes_messages(msgs: list[Message]) -> list[Message]:
    """Rewrite tool calls and tool results as plain text turns, for a template that knows neither.

    `msgs` are normalized (string content, no 'developer' role); the result has only role and content."""
    out: list[Message] = []
    tool_turn = False  # whether out[-1] is a user turn made of tool results
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [tool_call_block(tc["function"]) for tc in m["tool_calls"]]
            body = "\n".join(([m["content"]] if m["content"] else []) + blocks)
            out.append({"role": "assistant", "content": body})
            tool_turn = False
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if tool_turn:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            tool_turn = True
        else:
            out.append({"role": m["role"], "content": m["content"]})
            tool_turn = False
    return out


def with_system_text(msgs: list[Message], text: str) -> list[Message]:
    """Put `text` in front of the leading system message's content, creating the message if there is none."""
    if msgs and msgs[0]["role"] == "system":
        old = msgs[0]["content"]
        return [{**msgs[0], "content": f"{text}\n\n{old}" if old else text}, *msgs[1:]]
    return [{"role": "system", "content": text}, *msgs]


# ------------------------------------------------------------------------------------------------- parse


@dataclass
class ParsedOutput:
    """An assistant reply split into text and OpenAI-shaped tool calls.

    `reasoning` is the text of a leading `<think>` block, for models that write one (Qwen3); the block also
    stays in `content`, so that the message, sent back as history, renders the way the template expects."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str | None = None


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
        call = parse_call_json(body)
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


def parse_call_json(body: str, args_key: str = "arguments") -> dict[str, Any] | None:
    """The OpenAI tool call that `{"name": ..., "<args_key>": {...}}` stands for, or None when malformed."""
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError:
        return None
    return call_from_object(obj, args_key)


def call_from_object(obj: Any, args_key: str = "arguments") -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, {})
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
