"""What a renderer is: one model family's chat format, both ways.

`render` turns normalized messages (string content, 'developer' read as 'system', tool-call arguments in any
OpenAI shape) and tools into the exact prompt text the family's published chat template makes; `parse` turns
the text a model sampled back into content and OpenAI tool calls. `stop_tokens` are the special tokens that
end an assistant turn; `tool_format` names how the family writes tool calls. `concatenative` says whether
rendering a longer conversation only appends text (ChatML, Llama 3, Gemma 3) or may rewrite earlier turns
(Qwen3 drops past `<think>` blocks): the trainer builds one sequence per trajectory in the first case and one
per sampled turn in the second.
"""

from __future__ import annotations

from typing import Any, Protocol

from advantage.engine.hermes import Message, ParsedOutput


class Renderer(Protocol):
    # Read-only members, so the frozen dataclasses that implement them match.
    @property
    def name(self) -> str: ...
    @property
    def concatenative(self) -> bool: ...
    @property
    def stop_tokens(self) -> tuple[str, ...]: ...
    @property
    def tool_format(self) -> str:
        """`hermes` (<tool_call> blocks, what forced tool_choice's grammar writes) or `json`."""
        ...

    def render(
        self, messages: list[Message], tools: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        """The prompt text (special tokens as text; encode it with `add_special_tokens=False`)."""
        ...

    def parse(self, text: str, tools_enabled: bool = True) -> ParsedOutput:
        """Content and tool calls of sampled text (special tokens already stripped by the decoder)."""
        ...
