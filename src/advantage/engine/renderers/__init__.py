"""One renderer per model family: messages + tools -> prompt text, sampled text -> content + tool calls.

`renderer_for(tokenizer)` picks the family from the tokenizer's chat template (or, for a Gemma directory
converted without one, from its special tokens), then checks the pick: the renderer and the template must
render the same plain conversations, or the tokenizer's own template is used (`HFTemplateRenderer`). A
fine-tune that edited its template thus keeps its template; the check runs once per template.

| family          | detected by                                | tools                       | concatenative |
|-----------------|--------------------------------------------|-----------------------------|---------------|
| SmolLM2/ChatML  | `<|im_start|>` (no tools in template)      | Hermes text in system       | yes           |
| Qwen2.5         | its default "You are Qwen..." system       | native (Hermes)             | yes           |
| Qwen3           | `<|im_start|>` and `<think>`               | native (Hermes)             | no            |
| Llama 3.x       | `<|start_header_id|>`                      | native (JSON, first user)   | yes           |
| Gemma 3         | `<start_of_turn>`                          | Hermes text in first turn   | yes           |
"""

from __future__ import annotations

from typing import Any

from advantage.engine.renderers.base import Renderer
from advantage.engine.renderers.chatml import (
    QWEN25_SYSTEM,
    SMOLLM2_SYSTEM,
    ChatMLRenderer,
    Qwen3Renderer,
    Qwen25Renderer,
)
from advantage.engine.renderers.gemma3 import Gemma3Renderer, gemma3_chat_template
from advantage.engine.renderers.hf import HFTemplateRenderer
from advantage.engine.renderers.llama3 import Llama3Renderer

# Plain conversations a picked renderer must render exactly as the tokenizer's template does.
_PROBES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
]
_checked: dict[tuple[str, str, str], bool] = {}  # (template, bos, renderer) -> whether the probes agree


def renderer_for(tokenizer: Any) -> Renderer:
    """The renderer of `tokenizer`'s model family, or its own template when we know none that fits."""
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else None
    bos = getattr(tokenizer, "bos_token", None)
    picked = _family(template, bos, _has_token(tokenizer, "<start_of_turn>"))
    if picked is None:
        return HFTemplateRenderer(tokenizer)
    if template is None:
        return picked  # nothing to check against: a converted Gemma directory without a template
    key = (template, str(bos), repr(picked))
    if key not in _checked:
        _checked[key] = _agrees(picked, tokenizer)
    return picked if _checked[key] else HFTemplateRenderer(tokenizer)


def _family(template: str | None, bos: str | None, has_gemma_turns: bool) -> Renderer | None:
    if template is None:
        return Gemma3Renderer(bos_token=bos or "<bos>") if has_gemma_turns else None
    if "<|start_header_id|>" in template:
        return Llama3Renderer(bos_token=bos or "<|begin_of_text|>")
    if "<start_of_turn>" in template:
        return Gemma3Renderer(bos_token=bos or "<bos>")
    if "<|im_start|>" in template:
        if "<think>" in template:
            return Qwen3Renderer()
        if QWEN25_SYSTEM in template:
            return Qwen25Renderer()
        if "tools" not in template:
            return ChatMLRenderer(default_system=SMOLLM2_SYSTEM if SMOLLM2_SYSTEM in template else None)
    return None


def _agrees(renderer: Renderer, tokenizer: Any) -> bool:
    extra = {"date_string": renderer.date_string} if isinstance(renderer, Llama3Renderer) else {}
    try:
        for msgs in _PROBES:
            ours = renderer.render(msgs, [], True)
            theirs = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
            if ours != theirs:
                return False
    except Exception:  # a template that refuses a probe is not one we know
        return False
    return True


def _has_token(tokenizer: Any, token: str) -> bool:
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        return False
    tid = convert(token)
    return isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None)


__all__ = [
    "ChatMLRenderer",
    "Gemma3Renderer",
    "HFTemplateRenderer",
    "Llama3Renderer",
    "Qwen25Renderer",
    "Qwen3Renderer",
    "Renderer",
    "gemma3_chat_template",
    "renderer_for",
]
