"""Gemma 3 Instruct, transcribed from Google's published chat template, plus Hermes tool calls.

The template has no system role and no tools: a system message becomes a prefix of the first turn
("{system}\\n\\n"), the assistant role is called `model`, and each turn's content is trimmed. Tools follow the
Hermes convention of `engine.hermes`: their description goes in front of the system text, calls are
`<tool_call>` blocks in the model's turn, and results are `<tool_response>` blocks in a user turn.

`gemma3.jinja` beside this file is the same format as a Jinja template: the published one with these tool
additions, installed into the bundled Gemma model's directory so that `apply_chat_template` and exported
models chat and call tools the same way. The published template raises when user and model turns do not
alternate; we render them as they come.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from advantage.engine.hermes import (
    Message,
    ParsedOutput,
    hermes_messages,
    parse_assistant_output,
    tools_system_prompt,
    with_system_text,
)


def gemma3_chat_template() -> str:
    """Our Gemma 3 Jinja template (published template + Hermes tools), from the package data."""
    return resources.files("advantage.engine.renderers").joinpath("gemma3.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Gemma3Renderer:
    bos_token: str = "<bos>"
    name: str = "gemma3"
    concatenative: bool = True
    tool_format: str = "hermes"
    stop_tokens: tuple[str, ...] = ("<end_of_turn>", "<eos>")

    def render(
        self, messages: list[Message], tools: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        msgs = hermes_messages(messages)
        if tools:
            msgs = with_system_text(msgs, tools_system_prompt(tools))
        prefix = ""
        if msgs[0]["role"] == "system":
            prefix = msgs.pop(0)["content"] + "\n\n"
        out = self.bos_token
        for i, m in enumerate(msgs):
            role = "model" if m["role"] == "assistant" else m["role"]
            out += f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n"
        return out + ("<start_of_turn>model\n" if add_generation_prompt else "")

    def parse(self, text: str, tools_enabled: bool = True) -> ParsedOutput:
        return parse_assistant_output(text, tools_enabled)
