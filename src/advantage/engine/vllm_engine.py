"""vLLM as the engine on GPUs: the `Engine` contract (`engine/base.py`) over vLLM's in-process async engine.

**Untested.** vLLM does not run on our CPU machines, and the GPU machines lent to us so far cannot install
it (no network, 64 MiB per transfer; vllm 0.33.0's wheel is 336 MB). This module was written against vLLM's
source shortly before 0.33.0 and has never run. Its contract tests are ready in one command on a CUDA
machine with vLLM installed (`pytest -m gpu tests/test_engine_contract.py -k vllm`); until they pass there,
use `TorchEngine` (the default) for anything that matters. The install path is `requirements-gpu.txt`.

How the contract maps onto vLLM (`vllm.v1.engine.async_llm.AsyncLLM`):
- One asyncio loop on a thread of its own owns the `AsyncLLM`; `submit` schedules a coroutine there and
  returns its `concurrent.futures.Future`. Cancelling that future cancels the coroutine, which closes vLLM's
  output stream, and vLLM aborts the request.
- Prompts go in as token ids (`TokensPrompt`); every choice's sampled-token logprobs come back with
  `logprobs=top_logprobs` (0: the sampled token's only) under `logprobs_mode="raw_logprobs"`: log_softmax of
  the raw logits, before temperature and top-p, which is what the trainer computes.
- `score` is vLLM's prompt logprobs of a one-token request (`prompt_logprobs=top_k`).
- Adapters: every `load_adapter` registers a new `LoRARequest` with a fresh name and id (`name#version`),
  because vLLM keeps an adapter's weights and its prefix-cache entries under its id and name: replacing one
  in place would serve stale KV. The old version is removed once no running request uses it.
- Grammars (`response_format`, forced tool calls) are llguidance grammars already (`engine/grammar.py`);
  they go to vLLM's structured outputs with the `guidance` backend, which is llguidance.

What differs from `TorchEngine`, by design or for lack of a hook:
- With a grammar, vLLM may mask the logits before it takes the logprobs (its source suggests so), and then
  the logprobs it returns are of the masked distribution, not the model's. `Completion.forced` (the tokens
  the grammar left no choice on) is found afterwards, by replaying the grammar over the sampled tokens
  (`GrammarCompiler.replay`), and the EOS that vLLM samples after a grammar completes is dropped.
  `TorchEngine`'s `enum_lookahead` (enum values chosen whole) has no counterpart.
- Greedy requests (temperature 0) with n > 1 are sampled once and copied (vLLM refuses n > 1 greedy).
- The trainer loads its own copy of the base weights (no storage shared with the engine): leave it GPU
  memory with `gpu_memory_utilization` (0.45 by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from advantage.engine.base import Completion, QueueFull, Scores, TokenCallback
from advantage.engine.grammar import GrammarCompiler
from advantage.engine.rows import check_fits, check_sequences, stop_token_ids
from advantage.engine.sampling import SamplingParams

R = TypeVar("R")
MAX_TOP_K = (
    64  # the most top logprobs a request or a score may ask for (the wire's LogprobsRequest.top_k cap)
)
RETRY_AFTER_S = 1
INSTALL_HINT = (
    "VLLMEngine needs vLLM, on a machine with an NVIDIA GPU: create a separate virtualenv and run "
    "`pip install -r requirements-gpu.txt` there (README, 'Scaling out'); the CPU install cannot hold it."
)


class VLLMEngine:
    """The `Engine` contract over vLLM's async engine; see the module docstring (untested)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        max_context: int | None = None,
        default_max_tokens: int = 1024,
        gpu_memory_utilization: float = 0.45,
        max_lora_rank: int = 64,
        max_loras: int = 4,
        max_pending: int = 1024,
        seed: int = 0,
        **engine_args: Any,
    ) -> None:
        """`engine_args` go to vLLM's `AsyncEngineArgs` as they are (e.g. `tensor_parallel_size`,
        `enforce_eager`, `enable_sleep_mode`). `max_pending`: requests in vLLM at once; more is a QueueFull."""
        try:
            from vllm.config import StructuredOutputsConfig
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}.")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.vocab_size = int(AutoConfig.from_pretrained(model_path).vocab_size)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        try:
            generation_config: Any = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's eos and the template's tokens only
            generation_config = None
        self.stop_token_ids = sorted(stop_token_ids(self.tokenizer, generation_config))
        self.default_max_tokens = default_max_tokens
        self.max_pending = max_pending
        args = AsyncEngineArgs(
            model=str(model_path),
            dtype=dtype,
            max_model_len=max_context,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            enable_prefix_caching=True,
            seed=seed,
            logprobs_mode="raw_logprobs",
            max_logprobs=MAX_TOP_K,
            structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
            **engine_args,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="advantage-vllm", daemon=True)
        self._thread.start()

        async def make() -> Any:  # on the loop, so vLLM's output handler runs there
            return AsyncLLM.from_engine_args(args)

        self._llm = self._call(make())
        self.context_len = int(self._llm.model_config.max_model_len)
        self._lock = threading.Lock()
        self._closed = False
        self._running = 0  # requests and scores in vLLM now
        self._versions: dict[str, Any] = {}  # adapter name -> its current LoRARequest
        self._users: Counter[int] = Counter()  # LoRA id -> requests running on it
        self._retired: set[int] = set()  # replaced or removed versions, removed from vLLM once unused
        self._ids = itertools.count(1)  # vLLM's LoRA ids start at 1
        self._tasks: set[asyncio.Task[Any]] = set()  # requests running on the loop

    # ---------------------------------------------------------------- the contract
    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        return check_fits(self.context_len, self.default_max_tokens, prompt_len, max_tokens)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> concurrent.futures.Future[list[Completion]]:
        max_new = self.check_fits(len(prompt_ids), params.max_tokens)  # params are valid by construction
        if params.grammar is not None:
            self.grammars.validate(params.grammar)
        lora = self._take(adapter)
        return self._schedule(self._generate(list(prompt_ids), params, max_new, lora, on_token), lora)

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        return await asyncio.wrap_future(self.submit(prompt_ids, params, adapter, on_token))

    def score(
        self, sequences: list[list[int]], adapter: str | None = None, top_k: int = 0
    ) -> concurrent.futures.Future[Scores]:
        check_sequences(sequences, self.context_len, self.vocab_size)
        if not 0 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k is {top_k}; it must be in [0, {MAX_TOP_K}].")
        lora = self._take(adapter)
        return self._schedule(self._score([list(s) for s in sequences], lora, top_k), lora)

    def load_adapter(self, name: str, path: str | Path) -> None:
        from vllm.lora.request import LoRARequest

        lora_id = next(self._ids)
        lora = LoRARequest(lora_name=f"{name}#{lora_id}", lora_int_id=lora_id, lora_path=str(path))
        self._call(self._llm.add_lora(lora))  # loads now: a bad adapter fails here, not on first use
        with self._lock:
            old = self._versions.get(name)
            self._versions[name] = lora
        if old is not None:
            self._retire(old.lora_int_id)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            old = self._versions.pop(name, None)
        if old is not None:
            self._retire(old.lora_int_id)

    def adapters(self) -> list[str]:
        with self._lock:
            return list(self._versions)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True

        async def cancel_all() -> None:  # fail whatever is running: their futures end cancelled
            tasks = list(self._tasks)  # ours only: vLLM's own tasks end in its shutdown
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=10)  # their aborts reach vLLM before it shuts down

        self._call(cancel_all())
        self._llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # ---------------------------------------------------------------- requests on the loop
    def _take(self, adapter: str | None) -> Any:
        """Count a request in (QueueFull past max_pending) and pin its adapter's current version."""
        with self._lock:
            if self._closed:
                raise RuntimeError("engine is closed")
            if self._running >= self.max_pending:
                raise QueueFull(
                    f"The engine is busy: {self._running} requests are running already (at most "
                    f"{self.max_pending}). Retry in {RETRY_AFTER_S} s, or send fewer requests at once.",
                    RETRY_AFTER_S,
                )
            lora = None
            if adapter is not None:
                if adapter not in self._versions:
                    raise KeyError(f"adapter {adapter!r} is not loaded")
                lora = self._versions[adapter]
                self._users[lora.lora_int_id] += 1
            self._running += 1
            return lora

    def _schedule(self, coro: Coroutine[Any, Any, R], lora: Any) -> concurrent.futures.Future[R]:
        fut = asyncio.run_coroutine_threadsafe(self._tracked(coro), self._loop)
        fut.add_done_callback(lambda _: self._release(lora))
        return fut

    async def _tracked(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run a request's coroutine as a task `close` can find (touched on the loop's thread only)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await coro
        finally:
            self._tasks.discard(task)

    def _release(self, lora: Any) -> None:
        with self._lock:
            self._running -= 1
            if lora is None:
                return
            self._users[lora.lora_int_id] -= 1
            done = lora.lora_int_id in self._retired and self._users[lora.lora_int_id] <= 0
        if done:
            self._retire(lora.lora_int_id)

    def _retire(self, lora_id: int) -> None:
        """Remove a replaced or removed version from vLLM now, or when its last request ends."""
        with self._lock:
            self._retired.add(lora_id)
            if self._users[lora_id] > 0 or self._closed:
                return
            self._retired.discard(lora_id)
            del self._users[lora_id]
        asyncio.run_coroutine_threadsafe(self._llm.remove_lora(lora_id), self._loop)

    async def _generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new: int,
        lora: Any,
        on_token: TokenCallback | None,
    ) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        copies = params.n if params.temperature == 0 else 1  # vLLM samples greedy requests once
        sp = self._sampling_params(params, max_new, n=params.n // copies)
        choices = [_Choice() for _ in range(sp.n)]
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), sp, uuid.uuid4().hex, lora_request=lora
        )
        async for out in stream:
            for c in out.outputs:  # DELTA: each output carries the tokens new since the last
                choices[c.index].extend(c, params.top_logprobs)
                if on_token is not None and c.text:
                    on_token(c.index, c.text)
        done = [ch.completion() for ch in choices]
        if params.grammar is not None:
            for c in done:
                await asyncio.to_thread(self._settle_grammar, params.grammar, c)
        if copies > 1:
            for i in range(1, copies):
                if on_token is not None and done[0].text:
                    on_token(i, done[0].text)
            done = [done[0]] + [_copy(done[0]) for _ in range(copies - 1)]
        return done

    def _settle_grammar(self, grammar: str, c: Completion) -> None:
        """`c.forced` from a replay of the grammar; and where vLLM sampled on past the grammar's end (it stops
        only on a stop token, so it samples the EOS that the finished grammar alone allows, at logprob 0 under
        the mask), drop that tail, as `TorchEngine` ends a row when its grammar does."""
        c.forced, end = self.grammars.replay(grammar, c.token_ids)
        if end < len(c.token_ids) and all(t in self.stop_token_ids for t in c.token_ids[end:]):
            del c.token_ids[end:], c.logprobs[end:], c.top_logprobs[end:]
            c.finish_reason = "stop"

    def _sampling_params(self, params: SamplingParams, max_new: int, n: int) -> Any:
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.sampling_params import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            max_tokens=max_new,
            stop=list(params.stop) or None,
            stop_token_ids=self.stop_token_ids,
            logprobs=params.top_logprobs,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
            # a fresh one per request: vLLM's backends rewrite it in place
            structured_outputs=None
            if params.grammar is None
            else StructuredOutputsParams(grammar=vllm_grammar(params.grammar)),
        )

    async def _score(self, sequences: list[list[int]], lora: Any, top_k: int) -> Scores:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VLLMSamplingParams

        async def one(ids: list[int]) -> Any:
            sp = VLLMSamplingParams(
                max_tokens=1, prompt_logprobs=top_k, output_kind=RequestOutputKind.FINAL_ONLY
            )
            last = None
            async for out in self._llm.generate(
                TokensPrompt(prompt_token_ids=ids), sp, uuid.uuid4().hex, lora_request=lora
            ):
                last = out
            return last

        outs = await asyncio.gather(*(one(s) for s in sequences))
        scores = Scores([], [], [])
        for ids, out in zip(sequences, outs, strict=True):
            per_pos = out.prompt_logprobs or [None]
            scores.logprobs.append([0.0] + [per_pos[j][ids[j]].logprob for j in range(1, len(ids))])
            if top_k:
                tops: list[list[tuple[int, float]]] = [[]] + [
                    _top(per_pos[j], top_k) for j in range(1, len(ids))
                ]
                scores.top_ids.append([[t for t, _ in row] for row in tops])
                scores.top_logprobs.append([[lp for _, lp in row] for row in tops])
        return scores

    def _call(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run `coro` on the engine's loop and wait for it (never from the loop itself)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


class _Choice:
    """One choice as its deltas arrive."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.text = ""
        self.finish: str | None = None

    def extend(self, out: Any, top_logprobs: int) -> None:
        new = list(out.token_ids)
        # vLLM slices a delta's logprobs as [-len(new):]: with no new tokens (an abort, an error) that is all
        # of them, not none
        entries = list(out.logprobs or [])[-len(new) :] if new else []
        for tok, entry in zip(new, entries, strict=True):
            self.logprobs.append(float(entry[tok].logprob))
            if top_logprobs:
                self.top.append(_top(entry, top_logprobs))
        self.ids += new
        self.text += out.text
        if out.finish_reason is not None:
            self.finish = out.finish_reason

    def completion(self) -> Completion:
        if self.finish == "abort":
            raise asyncio.CancelledError("vLLM aborted the request")
        if self.finish not in ("stop", "length", "repetition"):
            raise RuntimeError(f"vLLM ended the request with finish_reason {self.finish!r}; retry it.")
        return Completion(
            self.ids, self.logprobs, self.text, "length" if self.finish == "length" else "stop", self.top
        )


def vllm_grammar(grammar: str) -> str:
    """Our llguidance grammar as vLLM's guidance backend reads `grammar=` (Lark or GBNF text, through
    `llguidance.grammar_from("grammar", ...)`): a tool-call grammar is Lark already; a response_format's is
    llguidance's serialized {"grammars": [...]} form, unwrapped here to the Lark `%json` rule it stands for
    (its options, e.g. compact whitespace, ride in the schema's "x-guidance")."""
    if not grammar.lstrip().startswith("{"):
        return grammar
    (g,) = json.loads(grammar)["grammars"]
    return str(g["lark_grammar"]) if g.get("lark_grammar") else "start: %json " + json.dumps(g["json_schema"])


def _top(entry: dict[int, Any], k: int) -> list[tuple[int, float]]:
    """The k likeliest of one position's logprob entries (vLLM adds the actual token, whatever its rank)."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    return [(int(t), float(lp.logprob)) for t, lp in ranked[:k]]


def _copy(c: Completion) -> Completion:
    top = [list(t) for t in c.top_logprobs]
    return Completion(list(c.token_ids), list(c.logprobs), c.text, c.finish_reason, top, list(c.forced))


def vllm_factory(**kwargs: Any) -> Any:
    """An `EngineFactory` (`engine/base.py`) for `Service(engine_factory=...)`: a base model's directory ->
    a `VLLMEngine` with `kwargs`. Fails at once, saying how to install vLLM, where it is missing."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return lambda model_dir: VLLMEngine(model_dir, **kwargs)
