"""Llama 3.1 / 3.2 / 3.3 Instruct, transcribed from Meta's published chat template.

- A system header always opens the prompt: "Cutting Knowledge Date" and "Today Date" lines, then the
  (trimmed) system message. With tools, "Environment: ipython" comes first.
- Tools go into the first user message (the template's default, `tools_in_user_message`), as indented JSON
  schemas under an instruction to answer with `{"name": function name, "parameters": {...}}`.
- An assistant tool call renders as that JSON object alone; a tool result as an `ipython` turn holding its
  content as a JSON value (the template `tojson`s strings too, so a result "18C" appears as "\\"18C\\"").
- Content is trimmed, so the format is concatenative.

Where we go past the template: it refuses more than one tool call per assistant message, and a model may
still write several; we render them joined by "; " (the parser reads that form back) rather than fail the
rollout. The date is fixed to the template's own fallback, "26 Jul 2024", by default: a prompt that changes at
midnight would make the trainer's context differ from the sampler's. Built-in tools (`<|python_tag|>` calls
to brave_search or wolfram_alpha) are not rendered; the parser drops a leading `<|python_tag|>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from advantage.engine.hermes import Message, ParsedOutput, arguments_dict, call_from_object

TOOLS_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
PYTHON_TAG = "<|python_tag|>"


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


@dataclass(frozen=True)
class Llama3Renderer:
    bos_token: str = "<|begin_of_text|>"
    date_string: str = "26 Jul 2024"
    name: str = "llama3"
    concatenative: bool = True
    tool_format: str = "json"
    stop_tokens: tuple[str, ...] = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

    def render(
        self, messages: list[Message], tools: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        msgs = list(messages)
        system = msgs.pop(0)["content"].strip() if msgs[0]["role"] == "system" else ""
        out = self.bos_token + _header("system") + ("Environment: ipython\n" if tools else "")
        out += f"Cutting Knowledge Date: December 2023\nToday Date: {self.date_string}\n\n{system}<|eot_id|>"
        if tools:
            if not msgs:
                raise ValueError(
                    "Llama 3 puts the tools in the first user message; send one after the system."
                )
            first = msgs.pop(0)["content"].strip()
            schemas = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
            out += _header("user") + TOOLS_INSTRUCTION + schemas + first + "<|eot_id|>"
        for m in msgs:
            if m["role"] == "tool":
                out += _header("ipython") + json.dumps(m["content"], ensure_ascii=False) + "<|eot_id|>"
            elif m.get("tool_calls"):
                out += _header("assistant") + "; ".join(_call(tc) for tc in m["tool_calls"]) + "<|eot_id|>"
            else:
                out += _header(m["role"]) + m["content"].strip() + "<|eot_id|>"
        return out + (_header("assistant") if add_generation_prompt else "")

    def parse(self, text: str, tools_enabled: bool = True) -> ParsedOutput:
        """A reply that is only JSON call objects (optionally after `<|python_tag|>`, several joined by ";")
        is tool calls; anything else, a malformed call included, is content."""
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        calls = _parse_calls(body) if tools_enabled and body.startswith("{") else None
        if not calls:
            return ParsedOutput(content=text.strip())
        return ParsedOutput(content=None, tool_calls=calls)


def _call(tc: dict[str, Any]) -> str:
    fn = tc.get("function", tc)
    return f'{{"name": "{fn["name"]}", "parameters": {json.dumps(arguments_dict(fn), ensure_ascii=False)}}}'


def _parse_calls(body: str) -> list[dict[str, Any]] | None:
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    i = 0
    while i < len(body):
        try:
            obj, i = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return None
        key = "parameters" if isinstance(obj, dict) and "parameters" in obj else "arguments"
        call = call_from_object(obj, key)
        if call is None:
            return None
        calls.append(call)
        i = len(body) - len(body[i:].lstrip().removeprefix(";").lstrip())
    return calls
