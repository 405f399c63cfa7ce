"""What the torch engine keeps per request and per sampled row, and the checks every engine makes on a
request before it queues (`check_fits`, `check_sequences`).

A `Row` is one of a request's `n` completions: its tokens, their logprobs, its text (built token by token by
its detokenizer), its grammar constraint and, while a chosen enum value is being written, the value's tokens
still to come (`enum_choice.py`). `Row.advance` appends one sampled token and decides whether the row is
finished (a stop token, a stop string, the grammar's end, `max_tokens`); `Row.emit` streams its new text."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from advantage.engine.base import Completion, ContextLengthError, TokenCallback
from advantage.engine.detokenize import Detokenizer
from advantage.engine.grammar import Constraint
from advantage.engine.renderers import renderer_for
from advantage.engine.sampling import SamplingParams

T = TypeVar("T")


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    adapter: str | None
    future: concurrent.futures.Future[list[Completion]]
    on_token: TokenCallback | None
    results: list[Completion | None]
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Row:
    req: Request
    index: int
    generator: torch.Generator | None
    detok: Detokenizer  # this row's text, token by token (engine/detokenize.py)
    constraint: Constraint | None = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    plan: list[int] = field(default_factory=list)  # the tokens of an enum value chosen by lookahead, to come
    text: str = ""
    emitted: int = 0
    finish: Literal["stop", "length"] | None = None

    @property
    def temperature(self) -> float:
        return self.req.params.temperature

    def advance(
        self, token: int, logprob: float, stop_ids: set[int], decode: Callable[[list[int]], str]
    ) -> None:
        """Append one sampled token; finish the row on a stop token, a stop string, the grammar's end or
        `max_tokens`; stream what is new. `decode` turns a whole row of ids into its text."""
        if self.plan:
            self.plan.pop(0)
        self.ids.append(token)
        self.logprobs.append(logprob)
        if self.constraint is not None:
            self.constraint.consume(token)
        if token in stop_ids:
            self.finish = "stop"
            self.text = decode(self.ids[:-1])
        elif not self.stop_string_in(self.detok.step(token)):
            done = self.constraint is not None and self.constraint.done
            if done or len(self.ids) >= self.req.max_new:
                self.finish = "stop" if done else "length"
                # the whole row once: with a trailing partial character, as a full decode has it
                self.text = decode(self.ids)
        self.emit()

    def stop_string_in(self, piece: str | None) -> bool:
        """Append the new token's text (None while a character is incomplete: incremental detokenization,
        not a decode of the whole row per token); on a stop string, cut the text there and finish the row.
        A stop string is looked for only where it could newly end."""
        if not piece:
            return False
        stops = self.req.params.stop
        start = max(0, len(self.text) - max((len(s) for s in stops), default=1) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish = "stop"
        return True

    def emit(self) -> None:
        """Stream the row's new text, holding back what might still turn into a stop string."""
        stops = self.req.params.stop
        if self.req.on_token is not None:
            hold = 0 if self.finish else max((len(s) - 1 for s in stops), default=0)
            end = len(self.text) - hold
            if not self.finish and self.text.endswith("\ufffd"):
                end = min(end, len(self.text) - 1)
            if end > self.emitted:
                self.req.on_token(self.index, self.text[self.emitted : end])
                self.emitted = end

    def completion(self) -> Completion:
        assert self.finish is not None, "only a finished row has a completion"
        return Completion(self.ids, self.logprobs, self.text, self.finish, self.top, self.forced)


def settle(fut: concurrent.futures.Future[T], outcome: T | BaseException) -> None:
    """Answer a request, unless it is answered or cancelled already (a client may cancel at any moment)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


def check_fits(context_len: int, default_max_tokens: int, prompt_len: int, max_tokens: int | None) -> int:
    """The number of new tokens a request may sample in a context of `context_len` (`Engine.check_fits`)."""
    room = context_len - prompt_len
    if room < 1:
        raise ContextLengthError(
            f"The prompt has {prompt_len} tokens but the model's context is {context_len}; "
            "shorten the messages."
        )
    if max_tokens is None:
        return min(room, default_max_tokens)
    if max_tokens > room:
        raise ContextLengthError(
            f"The prompt has {prompt_len} tokens and max_tokens is {max_tokens}, which exceeds the "
            f"model's context of {context_len}; lower max_tokens to at most {room} or shorten the prompt."
        )
    return max_tokens


def check_sequences(sequences: list[list[int]], context_len: int, vocab: int) -> None:
    """What `Engine.score` refuses at once: an empty sequence, one past the context, an id off the vocabulary."""
    for i, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"Sequence {i} is empty; send at least one token id.")
        if len(seq) > context_len:
            raise ContextLengthError(
                f"Sequence {i} has {len(seq)} tokens but the model's context is {context_len}."
            )
        if any(not 0 <= t < vocab for t in seq):
            raise ValueError(f"Sequence {i} has token ids outside the vocabulary [0, {vocab}).")


def stop_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """The tokens that end a completion: the tokenizer's and the generation config's eos, and the chat
    template's end-of-turn tokens (a GGUF's eos may not be one: Gemma 3's is <eos>, its turns end at
    <end_of_turn>)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", *renderer_for(tokenizer).stop_tokens):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}
