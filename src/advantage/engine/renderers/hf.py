"""The fallback renderer: the tokenizer's own Jinja chat template, for families we have no renderer for.

A template that mentions `tools` gets them through `apply_chat_template(tools=...)`, with tool-call arguments
as mappings (HF templates `tojson` them); any other gets the Hermes convention of `engine.hermes` rendered
into its messages. We cannot know whether an unknown template rewrites history, so it is taken as
concatenative; the trainer falls back to one sequence per turn when a render proves otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class HFTemplateRenderer:
    tokenizer: Any = field(repr=False)
    name: str = "hf-template"
    concatenative: bool = True
    tool_format: str = "hermes"
    stop_tokens: tuple[str, ...] = ()

    def render(
        self, messages: list[Message], tools: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("This tokenizer has no chat template; use an instruct/chat model as base_model.")
        kwargs: dict[str, Any] = {}
        if isinstance(template, str) and "tools" in template:
            msgs = [_native_tool_args(m) for m in messages]
            if tools:
                kwargs["tools"] = tools
        else:
            msgs = hermes_messages(messages)
            if tools:
                msgs = with_system_text(msgs, tools_system_prompt(tools))
        text = self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        if not isinstance(text, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str."
            )
        return text

    def parse(self, text: str, tools_enabled: bool = True) -> ParsedOutput:
        return parse_assistant_output(text, tools_enabled)


def _native_tool_args(m: Message) -> Message:
    """HF tool templates expect `arguments` as a mapping (they `tojson` it); OpenAI sends a JSON string."""
    if not m.get("tool_calls"):
        return m
    calls = [
        {
            **tc,
            "type": "function",
            "function": {**tc["function"], "arguments": arguments_dict(tc["function"])},
        }
        for tc in m["tool_calls"]
    ]
    return {**m, "tool_calls": calls}
