"""Structured outputs: OpenAI's `response_format`, or a forced tool call, turned into a grammar that
constrains sampling.

llguidance (a maintained Rust library with CPU wheels and no torch dependency) compiles a JSON schema into
a token-level matcher. At every decode step the matcher gives the set of tokens that keep the output valid;
the sampler only picks among them, so even the 135M bundled model always returns JSON that fits the schema
(unless it runs out of max_tokens, which is then reported as finish_reason "length").
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch


class GrammarError(ValueError):
    """A response_format that cannot be compiled; the message says what is wrong."""


def grammar_from_response_format(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar for an OpenAI `response_format`, or None for free text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format.json_schema must be an object with a 'schema' object.")
        schema = spec.get("schema") or {"type": "object"}
    else:
        raise GrammarError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}."
        )
    import llguidance

    # Compact JSON: a small model given free whitespace can loop on newlines forever.
    return str(
        llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
    )


def grammar_for_tool_choice(tools: list[dict[str, Any]], functions: list[str]) -> str:
    """A grammar that admits exactly one `<tool_call>` block (as the chat module renders it) calling one of
    `functions` with arguments that fit that function's parameter schema. One, not "one or more": given
    the choice, a small model keeps appending calls until max_tokens."""
    import llguidance

    by_name = {t["function"]["name"]: t["function"] for t in tools}
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": by_name[name].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in functions
    ]
    # The separators of json.dumps, which is how calls in the prompt (the chat module's rendering of earlier
    # turns and examples) are written: compact JSON put the 135M model off its stride (right arguments on
    # held-out demo questions fell from 31% to 16%).
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    schema = {"anyOf": calls, "x-guidance": options}
    lark = "\n".join(
        [
            'start: "<tool_call>\\n" body "\\n</tool_call>"',
            f"body: %json {json.dumps(schema)}",
        ]
    )
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


class GrammarCompiler:
    """Per-tokenizer matcher factory (the tokenizer conversion is done once, on first use)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._tok: Any = None
        self._lock = threading.Lock()
        self._valid: OrderedDict[str, None] = OrderedDict()  # grammars that validated, most recent last

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._tok

    def validate(self, grammar: str) -> None:
        import llguidance

        with self._lock:  # the server validates a request's grammar, then the engine again
            if grammar in self._valid:
                self._valid.move_to_end(grammar)
                return
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer())
        if error:
            raise GrammarError(f"Invalid response_format schema: {error}")
        with self._lock:
            self._valid[grammar] = None
            while len(self._valid) > 64:
                self._valid.popitem(last=False)

    def matcher(self, grammar: str) -> Constraint:
        import llguidance

        return Constraint(llguidance.LLMatcher(self._tokenizer(), grammar))


class Constraint:
    """One sequence's matcher: which tokens may come next, and feeding it the sampled ones."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an llguidance token bitmask."""
        import llguidance.torch as llt

        llt.fill_next_token_bitmask(self._m, bitmask, row)

    def consume(self, token: int) -> None:
        self._m.consume_token(token)

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(constraints: list[Constraint | None], vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens each row may sample next (every token for a row without a constraint)."""
    import llguidance.torch as llt

    bitmask = llt.allocate_token_bitmask(len(constraints), vocab_size)
    bitmask.fill_(-1)
    for row, c in enumerate(constraints):
        if c is not None:
            c.fill(bitmask, row)
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1  # bit i of word w is token 32 * w + i
    return bits.reshape(len(constraints), -1)[:, :vocab_size].bool()
