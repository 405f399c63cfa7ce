"""ChatML families: SmolLM2 (no tools in its template: Hermes tool text in the system prompt), Qwen2.5 and
Qwen3 (Hermes tool calls native to their templates; Qwen3 also thinks in `<think>` blocks).

Each `render` is a transcription of the family's published Jinja template; tests render the same
conversations with that template and compare the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from advantage.engine.hermes import (
    Message,
    ParsedOutput,
    arguments_dict,
    hermes_messages,
    parse_assistant_output,
    tools_system_prompt,
    with_system_text,
)

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# The tool preamble of the Qwen templates, around the one JSON schema per line.
QWEN_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)


def _turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _qwen_tools(tools: list[dict[str, Any]]) -> str:
    return (
        QWEN_TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + QWEN_TOOLS_TAIL
    )


def _qwen_call(tc: dict[str, Any]) -> str:
    fn = tc.get("function", tc)
    args = json.dumps(arguments_dict(fn), ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'


def _tool_results(messages: list[Message], i: int) -> str:
    """A tool message as the Qwen templates put it: consecutive results share one user turn."""
    first = i == 0 or messages[i - 1]["role"] != "tool"
    last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
    return (
        ("<|im_start|>user" if first else "")
        + f"\n<tool_response>\n{messages[i]['content']}\n</tool_response>"
        + ("<|im_end|>\n" if last else "")
    )


@dataclass(frozen=True)
class ChatMLRenderer:
    """Plain ChatML (SmolLM2's template): tools and tool calls as Hermes text (`engine.hermes`)."""

    default_system: str | None = SMOLLM2_SYSTEM
    name: str = "chatml"
    concatenative: bool = True
    tool_format: str = "hermes"
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)

    def render(
        self, messages: list[Message], tools: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        msgs = hermes_messages(messages)
        if tools:
            msgs = with_system_text(msgs, tools_system_prompt(tools))
        out = ""
        if self.default_system is not None and msgs[0]["role"] != "system":
            out += _turn("system", self.default_system)
        out += "".join(_turn(m["role"], m["content"]) for m in msgs)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def parse(self, text: str, tools_enabled: bool = True) -> ParsedOutput:
        return parse_assistant_output(text, tools_enabled)


@dataclass(frozen=True)
class Qwen25Renderer:
    """Qwen2.5-Instruct: a default system prompt, tools in the system turn, Hermes calls, `tool` results as
    `<tool_response>` blocks in a user turn."""

    name: str = "qwen2.5"
    concatenative: bool = True
    tool_format: str = "hermes"
    stop_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")

    def render(
        self, messages: list[Message], tools: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        has_system = messages[0]["role"] == "system"
        system = messages[0]["content"] if has_system else QWEN25_SYSTEM
        out = _turn("system", system + "\n\n" + _qwen_tools(tools) if tools else system)
        for i, m in enumerate(messages):
            role = m["role"]
            if (
                role == "user"
                or (role == "system" and i > 0)
                or (role == "assistant" and not m.get("tool_calls"))
            ):
                out += _turn(role, m["content"])
            elif role == "assistant":
                out += "<|im_start|>assistant" + (f"\n{m['content']}" if m["content"] else "")
                out += "".join("\n" + _qwen_call(tc) for tc in m["tool_calls"]) + "<|im_end|>\n"
            elif role == "tool":
                out += _tool_results(messages, i)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def parse(self, text: str, tools_enabled: bool = True) -> ParsedOutput:
        return parse_assistant_output(text, tools_enabled)


@dataclass(frozen=True)
class Qwen3Renderer:
    """Qwen3 (hybrid thinking). Its template keeps an assistant turn's `<think>` block only after the last
    real user message, so a later turn re-renders earlier ones differently: not concatenative.

    `thinking=False` is the template's `enable_thinking=False`: an empty think block opens the reply."""

    thinking: bool = True
    name: str = "qwen3"
    concatenative: bool = False
    tool_format: str = "hermes"
    stop_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")

    def render(
        self, messages: list[Message], tools: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        has_system = messages[0]["role"] == "system"
        if tools:
            system = messages[0]["content"] + "\n\n" if has_system else ""
            out = _turn("system", system + _qwen_tools(tools))
        else:
            out = _turn("system", messages[0]["content"]) if has_system else ""
        last_query = _last_query_index(messages)
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "user" or (role == "system" and i > 0):
                out += _turn(role, m["content"])
            elif role == "assistant":
                content, reasoning = _split_reasoning(m)
                out += "<|im_start|>assistant\n"
                if i > last_query and (i == len(messages) - 1 or reasoning):
                    out += "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
                else:
                    out += content
                for j, tc in enumerate(m.get("tool_calls") or []):
                    out += ("\n" if j > 0 or content else "") + _qwen_call(tc)
                out += "<|im_end|>\n"
            elif role == "tool":
                out += _tool_results(messages, i)
        if add_generation_prompt:
            out += "<|im_start|>assistant\n" + ("" if self.thinking else "<think>\n\n</think>\n\n")
        return out

    def parse(self, text: str, tools_enabled: bool = True) -> ParsedOutput:
        """Tool calls are read only after the think block (a model may think about `<tool_call>` syntax)."""
        head, sep, tail = text.partition("</think>")
        if not sep:
            return parse_assistant_output(text, tools_enabled)
        reasoning = head.split("<think>")[-1].strip()
        rest = parse_assistant_output(tail, tools_enabled)
        think = head.lstrip() + sep
        content = think + ("\n\n" + rest.content if rest.content else "")
        return ParsedOutput(content=content, tool_calls=rest.tool_calls, reasoning=reasoning)


def _last_query_index(messages: list[Message]) -> int:
    """The index of the last user message that is not a wrapped tool result (the template's last_query)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        c = m["content"]
        if m["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def _split_reasoning(m: Message) -> tuple[str, str]:
    """(content, reasoning) of an assistant message, as the Qwen3 template reads them."""
    content = m["content"]
    if m.get("reasoning_content") is not None:
        return content, m["reasoning_content"]
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return content.split("</think>")[-1].lstrip("\n"), reasoning
    return content, ""
