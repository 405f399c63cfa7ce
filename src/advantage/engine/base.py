"""The engine contract: what the service and the server ask of an inference engine, and nothing more.

An engine serves one base model and any number of LoRA adapters, each under a name. A request is prompt
token ids and `SamplingParams`; the answer is, per choice, the sampled token ids and the logprob of each
under the served weights' unmodified distribution (log_softmax of the raw logits: what the trainer
computes for the same tokens). Everything else is the engine's own business: batching, prefix reuse, KV
memory, how an adapter is applied.

`TorchEngine` (`torch_engine.py`, CPU or CUDA) implements it, and `VLLMEngine` (`vllm_engine.py`, NVIDIA
GPUs; written against vLLM's source, never run yet) does too. The same contract tests
(`tests/test_engine_contract.py`) run against every engine.

The records and errors of the contract live here, so that the server imports no particular engine.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from advantage.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from advantage.engine.grammar import GrammarCompiler

TokenCallback = Callable[[int, str], None]  # (choice index, text delta); may be called on the engine's thread


class ContextLengthError(ValueError):
    """The prompt (plus max_tokens) does not fit the model's context."""


class QueueFull(RuntimeError):
    """Too much work is waiting already; trying again after `retry_after` seconds makes sense."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Completion:
    """One sampled choice."""

    token_ids: list[int]
    logprobs: list[float]  # one per token id: its logprob under the served weights (unmodified distribution)
    text: str
    finish_reason: Literal["stop", "length"]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Indices into token_ids where the grammar allowed exactly one token: no choice was made there, so the
    # acting (constrained) policy's logprob is 0 and a trainer must not train on them.
    forced: list[int] = field(default_factory=list)


@dataclass
class Scores:
    """What `sequence_logprobs` returns: `logprobs[i][j]` = log p(ids[j] | ids[:j]) (0.0 at j = 0) and, when
    asked for, the top_k most likely tokens at each position with their logprobs (empty lists at j = 0)."""

    logprobs: list[list[float]]
    top_ids: list[list[list[int]]] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)


@runtime_checkable
class Engine(Protocol):
    """An inference engine as the service uses it (see the module docstring)."""

    tokenizer: Any  # the served model's Hugging Face tokenizer: prompts are rendered and encoded with it
    grammars: GrammarCompiler  # validates a request's grammar before it is queued (a 400, not a failure)

    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        """The number of new tokens a request may sample, or ContextLengthError saying what to change."""
        ...

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> concurrent.futures.Future[list[Completion]]:
        """Queue a request for `params.n` choices with adapter `adapter` (None: the base weights). Raises
        at once on bad input (SamplingError, ContextLengthError, KeyError for an unknown adapter) and when
        too much is waiting (QueueFull). Cancelling the future cancels the request."""
        ...

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        """`submit`, awaitable; cancelling the await cancels the request."""
        ...

    def score(
        self, sequences: list[list[int]], adapter: str | None = None, top_k: int = 0
    ) -> concurrent.futures.Future[Scores]:
        """Per-token logprobs of whole token sequences under `adapter` (None: the base weights), as sampling
        computes them: logprobs[i][j] = log p(ids[j] | ids[:j]), 0.0 at j = 0; with `top_k`, each position's
        top_k tokens and logprobs too. Raises at once on bad input."""
        ...

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter directory under `name`, replacing one of that name. Requests may use
        it once this returns; requests already running finish on the weights they started with."""
        ...

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name` (a no-op if it is not loaded). RuntimeError while it is serving a batch."""
        ...

    def adapters(self) -> list[str]:
        """The adapter names loaded now."""
        ...

    def close(self) -> None:
        """Fail whatever is waiting or running, and free the engine."""
        ...


EngineFactory = Callable[[Path], Engine]  # a base model's directory -> an engine serving it
