"""Structured outputs: OpenAI's `response_format`, or a forced tool call, turned into a grammar that
constrains sampling.

llguidance (a maintained Rust library with CPU wheels and no torch dependency) compiles a JSON schema into
a token-level matcher. At every decode step the matcher gives the set of tokens that keep the output valid;
the sampler only picks among them, so even the 135M bundled model always returns JSON that fits the schema
(unless it runs out of max_tokens, which is then reported as finish_reason "length").
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

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


# The separators of json.dumps, which is how calls in the prompt (the chat module's rendering of earlier turns
# and examples) are written: compact JSON put the 135M model off its stride (right arguments on held-out demo
# questions fell from 31% to 16%).
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

TokenSpans = Callable[[str], list[tuple[int, int, int]]]  # text -> (token id, start char, end char) per token
EnumValues = dict[tuple[str, str], list[list[int]]]  # (function, argument) -> each value's token ids
ENUM_VALUES = "// enum-values"  # a grammar comment line that lists one enum's values as tokens
_NAME = '{"name": "'


@functools.lru_cache(maxsize=64)
def enum_values(grammar: str) -> EnumValues:
    """The enum table written into a tool-call grammar by `grammar_for_tool_choice` (empty for others)."""
    table: EnumValues = {}
    for line in grammar.splitlines():
        if line.startswith(ENUM_VALUES):
            entry = json.loads(line[len(ENUM_VALUES) :])
            table[(entry["function"], entry["key"])] = entry["values"]
    return table


def grammar_for_tool_choice(
    tools: list[dict[str, Any]], functions: list[str], token_spans: TokenSpans | None = None
) -> str:
    """A grammar that admits exactly one `<tool_call>` block (as the chat module renders it) calling one of
    `functions` with arguments that fit that function's parameter schema. One, not "one or more": given
    the choice, a small model keeps appending calls until max_tokens.

    With `token_spans` (the tokenizer's, see `GrammarCompiler`), a string enum among a function's arguments
    admits each value only as the tokens the tokenizer itself writes it with. Spelled character by
    character, the grammar lets the model start a value with a piece it never uses for it: in the demo,
    "Beijing" is `Be` + `ijing`, but the 135M model put more weight on `B`, after which only "Bangkok" was
    left, so a question about Beijing got Bangkok's weather. With canonical tokens `B` means Bangkok and
    `Be` means Beijing, and the first token decides the value.

    Each such enum is also listed in a comment line of the grammar (`// enum-values {json}`: the function,
    the key and every value's tokens), which `Constraint.values_at` reads back: an engine can then choose a
    value by the logprob of all its tokens, not of its first one alone (`TorchEngine(enum_lookahead=)`).
    Being part of the grammar text, the table reaches an engine in another process with the grammar."""
    import llguidance

    by_name = {t["function"]["name"]: t["function"] for t in tools}
    schemas = [by_name[name].get("parameters") for name in functions]
    if token_spans is None or not all(p is None or isinstance(p, dict) for p in schemas):
        # (a parameters value that is no schema at all is left to llguidance, whose error names it)
        calls = [_call_schema(name, by_name[name].get("parameters")) for name in functions]
        lark = f"body: %json {json.dumps({'anyOf': calls, 'x-guidance': _CALL_JSON})}"
    else:
        rules = [f"body: {' | '.join(f'call_{i}' for i in range(len(functions)))}"]
        tables: list[str] = []
        for i, name in enumerate(functions):
            call, values = _call_rules(f"call_{i}", name, by_name[name].get("parameters"), token_spans)
            rules += call
            tables += [
                f"{ENUM_VALUES} {json.dumps({'function': name, 'key': key, 'values': seqs})}"
                for key, seqs in values.items()
            ]
        lark = "\n".join(rules + tables)
    return str(
        llguidance.LLMatcher.grammar_from_lark(f'start: "<tool_call>\\n" body "\\n</tool_call>"\n{lark}')
    )


def _call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _call_rules(
    rule: str, name: str, parameters: dict[str, Any] | None, token_spans: TokenSpans
) -> tuple[list[str], dict[str, list[list[int]]]]:
    """Lark rules for one function's call object, `{"name": NAME, "arguments": {...}}`, and the token
    sequences of each string enum among its arguments (by key). The arguments are written key by key when
    the schema fixes them (every property required, no others: the keys then come in the schema's order, as
    llguidance's %json writes them), so that a string enum can be a choice of token sequences; any other
    arguments schema is left to %json whole."""
    head = _lark_string(f'{{"name": {json.dumps(name)}, "arguments": ')
    params = parameters or {"type": "object"}
    props, required = params.get("properties"), params.get("required")
    fixed = (
        params.get("type") == "object"
        and isinstance(props, dict)
        and props
        and params.get("additionalProperties") is False
        and isinstance(required, list)
        and all(isinstance(r, str) for r in required)
        and set(required) == set(props)
        and set(params) <= {"type", "properties", "required", "additionalProperties", "description", "title"}
    )
    if not fixed or not isinstance(props, dict):
        return [f'{rule}: {head} {rule}_args "}}"', f"{rule}_args: %json {_json_rule(params)}"], {}
    parts, rules, values = [], [], {}
    for j, (key, schema) in enumerate(props.items()):
        sep = "{" if j == 0 else ", "
        parts.append(_lark_string(f"{sep}{json.dumps(key)}: "))
        parts.append(f"{rule}_{j}")
        seqs = _enum_tokens(schema, token_spans)
        if seqs is None:
            rules.append(f"{rule}_{j}: %json {_json_rule(schema)}")
        else:
            alts = " | ".join(" ".join(f"<[{t}]>" for t in seq) for seq in seqs)
            rules.append(f'{rule}_{j}: "\\"" ({alts}) "\\""')
            values[key] = seqs
    return [f'{rule}: {head} {" ".join(parts)} "}}}}"', *rules], values


def _enum_tokens(schema: Any, token_spans: TokenSpans) -> list[list[int]] | None:
    """Each value's canonical tokens, for a plain string enum whose values all have them; else None."""
    enum = schema.get("enum") if isinstance(schema, dict) else None
    if not (
        isinstance(enum, list)
        and enum
        and all(isinstance(v, str) for v in enum)
        and schema.get("type", "string") == "string"
        and set(schema) <= {"type", "enum", "description", "title"}
    ):
        return None
    seqs = [_canonical_tokens(v, token_spans) for v in dict.fromkeys(enum)]
    return None if any(s is None for s in seqs) else [s for s in seqs if s is not None]


def _canonical_tokens(value: str, token_spans: TokenSpans) -> list[int] | None:
    """The token ids the tokenizer writes a JSON string's content with, between its quotes (as in `{"k":
    "VALUE"}`), or None when a token straddles a quote (the value then stays character by character)."""
    inner = json.dumps(value, ensure_ascii=False)[1:-1]  # as llguidance writes strings: UTF-8, no \u escapes
    prefix = '{"k": "'
    start, end = len(prefix), len(prefix) + len(inner)
    ids = []
    for tok, a, b in token_spans(prefix + inner + '"}'):
        if b <= start or a >= end:
            continue
        if a < start or b > end:
            return None
        ids.append(tok)
    return ids or None


def _json_rule(schema: Any) -> str:
    """%json's argument: the schema with the call's separators (anything else as it is, for llguidance's
    error to name)."""
    return json.dumps({**schema, "x-guidance": _CALL_JSON} if isinstance(schema, dict) else schema)


def _lark_string(text: str) -> str:
    return json.dumps(text)


class GrammarCompiler:
    """Per-tokenizer matcher factory (the tokenizer conversion is done once, on first use)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._tok: Any = None
        self._lock = threading.Lock()
        self._valid: OrderedDict[str, None] = OrderedDict()  # grammars that validated, most recent last
        self._tool_grammars: OrderedDict[str, str] = OrderedDict()  # tools JSON -> grammar

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._tok

    def tool_choice(self, tools: list[dict[str, Any]], functions: list[str]) -> str:
        """`grammar_for_tool_choice` with this tokenizer's canonical tokens for string enums (cached: an
        agent sends the same tools on every turn)."""
        key = json.dumps([tools, functions], sort_keys=True)
        with self._lock:
            if key in self._tool_grammars:
                self._tool_grammars.move_to_end(key)
                return self._tool_grammars[key]
        grammar = grammar_for_tool_choice(tools, functions, self.token_spans)
        with self._lock:
            self._tool_grammars[key] = grammar
            while len(self._tool_grammars) > 64:
                self._tool_grammars.popitem(last=False)
        return grammar

    def token_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(token id, start, end) per token of `text`; empty for a tokenizer without offsets (a slow one),
        which leaves every value character by character."""
        if not getattr(self._hf, "is_fast", False):
            return []
        enc = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return [
            (int(t), int(a), int(b))
            for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

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

        return Constraint(llguidance.LLMatcher(self._tokenizer(), grammar), enum_values(grammar))

    def replay(self, grammar: str, token_ids: list[int]) -> Replay:
        """Feed a completion sampled under `grammar` (from its start) back through the grammar: where it
        allowed exactly one token (`Completion.forced`, for an engine that does not report it), and how many
        tokens it took to complete, for an engine that samples on past the grammar's end (an EOS)."""
        constraint, forced = self.matcher(grammar), list[int]()
        for i, tok in enumerate(token_ids):
            if constraint.done:
                return Replay(forced, i)
            if int(allowed_tokens([constraint], self.vocab_size).sum()) == 1:
                forced.append(i)
            constraint.consume(tok)
        return Replay(forced, len(token_ids))


class Replay(NamedTuple):
    forced: list[int]  # indices of the tokens the grammar left no choice on
    end: int  # the tokens before the grammar was complete (all of them, if it never was)


class Constraint:
    """One sequence's matcher: which tokens may come next, and feeding it the sampled ones."""

    def __init__(self, matcher: Any, values: EnumValues | None = None) -> None:
        self._m = matcher
        self._values = values or {}

    def values_at(self, text: str) -> list[list[int]] | None:
        """The token sequences of the enum whose value starts here, if `text` (the sequence so far) has just
        opened a string of a call argument listed in the grammar's enum table; else None."""
        if not self._values or not text.endswith('": "'):
            return None
        key = text[:-4].rpartition('"')[2]
        at = text.rfind(_NAME)
        if at < 0:
            return None
        function = text[at + len(_NAME) :].partition('"')[0]
        return self._values.get((function, key))

    @property
    def matcher(self) -> Any:
        """The llguidance `LLMatcher`."""
        return self._m

    def consume(self, token: int) -> None:
        self._m.consume_token(token)

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())


# Each bit's value in an int32 word of a bitmask (bit 31's is the sign bit).
_BIT_VALUES = (1 << torch.arange(32, dtype=torch.int64)).to(torch.int32)
_executor: Any = None
_executor_lock = threading.Lock()


def _mask_executor() -> Any:
    """llguidance's thread pool for computing many rows' masks at once (without the GIL), one per process,
    with as many threads as torch uses."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))
        return _executor


def allowed_tokens(constraints: list[Constraint | None], vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens each row may sample next (every token for a row without a constraint).

    Two or more rows' masks are computed in llguidance's thread pool, outside the GIL (one row's on this
    thread): measured at 48 rows of the demo, see BENCHMARKS.md."""
    import llguidance.torch as llt

    bitmask = llt.allocate_token_bitmask(len(constraints), vocab_size)
    bitmask.fill_(-1)
    jobs = [(c.matcher, row) for row, c in enumerate(constraints) if c is not None]
    if len(jobs) > 1:
        llt.fill_next_token_bitmask_par(_mask_executor(), jobs, bitmask)
    elif jobs:
        llt.fill_next_token_bitmask(jobs[0][0], bitmask, jobs[0][1])
    bits = (bitmask.unsqueeze(-1) & _BIT_VALUES).ne(0)  # bit i of word w is token 32 * w + i
    return bits.reshape(len(constraints), -1)[:, :vocab_size]
