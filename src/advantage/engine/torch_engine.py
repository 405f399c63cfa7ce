"""A continuous-batching inference engine on plain torch + transformers (CPU or CUDA).

One background thread owns the model. Requests queue up; between decode steps the loop admits every
waiting request that uses the running batch's adapter, prefills them (`prefill.py`: identical prompts once,
so the 8 rollouts of a GRPO group share one prefill; a prefix that an earlier prompt already computed, such
as the system prompt and tool schemas, or the previous turn of the conversation, comes from the prefix
cache), left-pads them into the running batch's KV cache (`batch.py`) and decodes all rows together (a row's
own bookkeeping: `rows.py`). On a CPU the vocabulary head runs in whichever form is fastest there
(`head.py`). The KV cache grows in place (see `kv.py`). Finished rows leave the batch at once, and columns
that no row needs any more are cropped.

Rows in one batch share one LoRA adapter: merged into the weights for fp32 models on CPU (`lora.py`), else
peft's active adapter. A request for another adapter waits until the rows ahead of it drain, so FIFO order
is kept. Adapters are loaded and removed by name without a restart; those commands run on the engine thread
between steps, so a swap never tears a running batch.

At most `max_pending` requests wait to join the batch; past that, `submit` raises `QueueFull` (the server
answers 429 with Retry-After). Cancelling a request's future (the server does when its client goes away)
takes its rows out of the batch before the next decode step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from advantage.engine.base import Completion, ContextLengthError, QueueFull, Scores, TokenCallback
from advantage.engine.batch import Batch
from advantage.engine.cascade import CASCADE, supports_cascade
from advantage.engine.detokenize import detokenizer_factory
from advantage.engine.enum_choice import choose_values
from advantage.engine.grammar import GrammarCompiler, allowed_tokens
from advantage.engine.head import HeadForm, tune_head
from advantage.engine.head import check_form as check_head_form
from advantage.engine.kv import GrowingCache, PrefixCache, layer_kv
from advantage.engine.lora import LoraWeights, MergedLora, load_lora
from advantage.engine.precision import column_major_linears, resolve_dtype, use_fp32_head
from advantage.engine.prefill import Prefill
from advantage.engine.rows import Request, Row, check_fits, check_sequences, settle, stop_token_ids
from advantage.engine.sampling import SamplingError, SamplingParams, sample_next
from advantage.engine.scoring import sequence_logprobs
from advantage.engine.weights import BaseWeights, own_memory
from advantage.threads import set_torch_threads

log = logging.getLogger(__name__)

R = TypeVar("R")
RETRY_AFTER_S = 1  # what a QueueFull advises: the batch turns over in about that time


class TorchEngine:
    """The `Engine` contract (`engine/base.py`) on plain torch + transformers; see the module docstring."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_size: int = 32,
        max_context: int | None = None,
        default_max_tokens: int = 1024,
        prefix_cache_mb: int = 512,
        head_dtype: str = "float32",
        max_pending: int = 256,
        merge_lora: bool | None = None,
        cascade: bool | None = None,
        enum_lookahead: int = 4,
        threads: int | None = None,
        head_form: HeadForm | Literal["auto"] = "auto",
        trainer_busy: threading.Event | None = None,
        threads_while_training: int | None = None,
    ) -> None:
        for what, n in (("threads", threads), ("threads_while_training", threads_while_training)):
            if n is not None and n < 1:
                raise ValueError(f"{what} must be >= 1 (or None: the default), got {n}.")
        check_head_form(head_form)
        # torch's intra-op threads on the engine thread. The count is kept per thread, and a new thread starts
        # with the last one set on any thread: None takes the creating thread's, not another engine's.
        self.threads = threads or torch.get_num_threads()
        # While `trainer_busy` is set (an in-process trainer is running a step on the same cores), the engine
        # decodes on fewer threads: on 2 cores a few dozen rows decode only ~1.08x faster on the second one,
        # and an update beside an engine on one thread went 1.3-1.4x faster than the two one after the other
        # (BENCHMARKS.md, session 36). The count is switched between decode steps.
        self.trainer_busy = trainer_busy
        self.threads_while_training = min(threads_while_training or max(1, self.threads // 2), self.threads)
        self._threads_now = self.threads
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Rows without a seed draw from this generator, not torch's global one: that one is the whole
        # process's, and a trainer being built on another thread draws its adapter's first weights from it.
        self._rng = torch.Generator()
        self._rng.seed()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._new_detokenizer = detokenizer_factory(self.tokenizer)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(dtype, self.device))
        if head_dtype == "float32":  # logprobs computed as the trainer computes them (engine/precision.py)
            use_fp32_head(model)
        # Rows that share a cached prompt prefix read one copy of its KV (cascade.py), where the model allows;
        # by default on CPU only: on an H200 its extra small kernels made decoding slower (BENCHMARKS.md).
        want = self.device.type == "cpu" if cascade is None else cascade
        self.cascade = want and supports_cascade(model)
        if self.cascade:
            model.set_attn_implementation(CASCADE)
        # transformers' `to` is wrapped (functools.wraps), which hides its bound signature from mypy
        self.model: Any = own_memory(column_major_linears(model.to(self.device).eval()))  # type: ignore[arg-type]
        # Taken before any adapter: an in-process Trainer of this model builds on these (engine/weights.py).
        self.base_weights = BaseWeights.of(self.model, model_path)
        self._head_form = head_form
        # rows -> the head's form from that many rows up, once the engine thread has timed them (_loop);
        # None: the head is left as loaded (CUDA, bf16, a bias)
        self.head_plan: dict[int, HeadForm] | None = None
        cfg_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.context_len = min(max_context or cfg_len, cfg_len)
        self.max_batch_size = max_batch_size
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}.")
        self.max_pending = max_pending  # requests waiting to join the batch; more is a QueueFull
        self.default_max_tokens = default_max_tokens
        self.stop_token_ids = stop_token_ids(self.tokenizer, model.generation_config)
        self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20)
        self.grammars = GrammarCompiler(self.tokenizer, int(model.config.vocab_size))
        if enum_lookahead < 0:
            raise ValueError(f"enum_lookahead must be >= 0, got {enum_lookahead}.")
        self.enum_lookahead = enum_lookahead  # enum values of a forced call scored whole (enum_choice.py)
        self._adapters: dict[str, str] = {}  # adapter name -> path
        # fp32 on CPU: adapters are merged into the weights per batch (engine/lora.py); else peft layers.
        if merge_lora is None:
            merge_lora = self.device.type == "cpu" and self.model.dtype == torch.float32
        self._merged = MergedLora(self.model) if merge_lora else None
        self._lora: dict[str, LoraWeights] = {}
        self._peft = False  # whether self.model has peft's LoRA layers (they stay once added)
        self._pending: deque[Request] = deque()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._cv = threading.Condition()
        self._batch = Batch()  # the running batch (batch.py)
        self._batch_adapter: str | None = None
        self._closed = False
        self.stats = {
            "decode_steps": 0,
            "prefill_rows": 0,
            "prefill_prompts": 0,
            "generated_tokens": 0,
            "cancelled_rows": 0,
            "shared_prefix_steps": 0,  # decode steps whose rows read one shared copy of a prompt prefix
            "enum_choices": 0,  # enum values of forced calls chosen by whole-value logprob
            "lookahead_rows": 0,  # candidate values scored past their first token
        }
        self._thread = threading.Thread(target=self._loop, name="advantage-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public API
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
        if adapter is not None and adapter not in self._adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        fut: concurrent.futures.Future[list[Completion]] = concurrent.futures.Future()
        req = Request(list(prompt_ids), params, max_new, adapter, fut, on_token, [None] * params.n)
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            if len(self._pending) >= self.max_pending:  # requests given up on do not count
                self._pending = deque(r for r in self._pending if not r.future.cancelled())
            if len(self._pending) >= self.max_pending:
                raise QueueFull(
                    f"The engine is busy: {len(self._pending)} requests are waiting already (at most "
                    f"{self.max_pending}). Retry in {RETRY_AFTER_S} s, or send fewer requests at once.",
                    RETRY_AFTER_S,
                )
            self._pending.append(req)
            self._cv.notify()
        return fut

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        """`submit`, awaitable. Cancelling the await cancels the request: its rows leave the batch."""
        return await asyncio.wrap_future(self.submit(prompt_ids, params, adapter, on_token))

    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        """Return the number of new tokens allowed, or raise ContextLengthError saying what to change."""
        return check_fits(self.context_len, self.default_max_tokens, prompt_len, max_tokens)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load (or replace) a LoRA adapter by name; requests may use it as soon as this returns."""
        self._run_on_engine(lambda: self._load_adapter(name, str(path)))

    def remove_adapter(self, name: str) -> None:
        self._run_on_engine(lambda: self._remove_adapter(name))

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def score(
        self, sequences: list[list[int]], adapter: str | None = None, top_k: int = 0
    ) -> concurrent.futures.Future[Scores]:
        """Per-token logprobs of whole token sequences under `adapter` (None: the base weights), as the
        sampler computes them (`scoring.py`): logprobs[i][j] = log p(ids[j] | ids[:j]), 0.0 at j = 0, and
        with `top_k` each position's top_k tokens. Runs on the engine thread between decode steps, so a
        running batch pauses for it and then goes on."""
        if adapter is not None and adapter not in self._adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        check_sequences(sequences, self.context_len, int(self.model.config.vocab_size))
        seqs = [list(s) for s in sequences]
        if top_k < 0:
            raise ValueError(f"top_k is {top_k}; it must be 0 (none) or more.")
        return self._command(lambda: self._score(seqs, adapter, top_k))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---------------------------------------------------------------- engine thread
    def _run_on_engine(self, fn: Callable[[], None]) -> None:
        self._command(fn).result()

    def _command(self, fn: Callable[[], R]) -> concurrent.futures.Future[R]:
        """Run `fn` on the engine thread before its next step; the future holds its result."""
        fut: concurrent.futures.Future[R] = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._commands.append((fn, fut))
            self._cv.notify()
        return fut

    def _score(self, sequences: list[list[int]], adapter: str | None, top_k: int) -> Scores:
        with torch.inference_mode(), self._weights_of(adapter):
            return sequence_logprobs(self.model, sequences, self.tokenizer.pad_token_id or 0, top_k)

    @contextlib.contextmanager
    def _weights_of(self, adapter: str | None) -> Iterator[None]:
        """The weights of `adapter` between steps; the next step puts its batch's own back
        (`_adapter_context` merges or selects them again)."""
        if self._merged is not None:
            self._merged.activate(adapter, self._lora)
            yield
        elif adapter is None:  # as `_adapter_context`: the last adapter removed stays in peft's layers
            with self.model.disable_adapter() if self._peft else contextlib.nullcontext():
                yield
        else:
            self.model.set_adapter(adapter)
            try:
                yield
            finally:
                if self._batch_adapter is not None:
                    self.model.set_adapter(self._batch_adapter)

    def _loop(self) -> None:
        set_torch_threads(self._threads_now)
        try:  # timed on this thread, at its thread count, before the first request (head.py)
            rows = sorted({1, 8, min(self.max_batch_size, 64)})
            self.head_plan = tune_head(self.model, rows=rows, form=self._head_form)
        except Exception:  # the head as loaded computes the same logits
            log.exception("timing the vocabulary head's forms failed; it stays as loaded")
        while True:
            with self._cv:
                while not (self._pending or self._batch.rows or self._commands or self._closed):
                    self._cv.wait()
                if self._closed:
                    self._fail_all(RuntimeError("engine closed"))
                    return
            batch: list[Request] = []
            self._share_cores()
            try:
                self._run_commands()
                self._drop_cancelled()
                batch = self._take_admissible()
                with torch.inference_mode(), self._adapter_context():
                    if batch:
                        self._prefill(batch)
                    if self._batch.rows:
                        self._decode_step()
            except Exception as exc:  # a failed forward fails its rows, never the engine
                log.exception("engine step failed")
                self._fail_rows(exc)
                for req in batch:  # a prefill that failed before its rows joined: fail those requests too
                    settle(req.future, exc)

    def _share_cores(self) -> None:
        """Decode on `threads_while_training` threads while the trainer runs, on `threads` otherwise."""
        busy = self.trainer_busy is not None and self.trainer_busy.is_set()
        want = self.threads_while_training if busy else self.threads
        if want != self._threads_now:
            set_torch_threads(want)
            self._threads_now = want

    def _run_commands(self) -> None:
        while self._commands:
            with self._cv:
                fn, fut = self._commands.popleft()
            if not fut.set_running_or_notify_cancel():  # its caller gave up (a scoring client went away)
                continue
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)

    @contextlib.contextmanager
    def _adapter_context(self) -> Iterator[None]:
        if self._merged is not None:
            self._merged.activate(self._batch_adapter, self._lora)
            yield
        elif self._batch_adapter is None and self._peft:  # the last adapter removed stays in peft's layers
            with self.model.disable_adapter():
                yield
        else:
            yield

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self._adapters:
            self._remove_adapter(name)
        self.prefix_cache.clear(name)  # the KV states were computed with the old weights
        if self._merged is not None:
            self._lora[name] = load_lora(path, self.model)
        elif not self._adapters and not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self._peft = True
        else:
            self.model.load_adapter(path, adapter_name=name)
        self._adapters[name] = path
        if self._batch_adapter is not None and self._merged is None:
            self.model.set_adapter(self._batch_adapter)

    def _remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            return
        if self._batch.rows and self._batch_adapter == name:
            raise RuntimeError(f"adapter {name!r} is serving requests; retry when they finish")
        if self._merged is not None:
            if self._merged.active == name:
                self._merged.restore()
            del self._lora[name]
        elif name in self.model.peft_config and len(self.model.peft_config) > 1:
            if self.model.active_adapter == name:  # another one peft holds, served or not (the base is
                # served with all of them disabled)
                self.model.set_adapter(next(a for a in self.model.peft_config if a != name))
            self.model.delete_adapter(name)
        # (peft) The last adapter stays in peft (deleting it is not allowed) but is no longer served.
        del self._adapters[name]
        if self._batch_adapter == name:  # the batch it served has drained: the next step must not ask for it
            self._batch_adapter = None
        self.prefix_cache.clear(name)

    def _take_admissible(self) -> list[Request]:
        """Pop the waiting requests that can join the running batch (same adapter, room left, FIFO)."""
        with self._cv:
            if not self._batch.rows and self._pending:
                self._batch_adapter = self._pending[0].adapter
                if self._batch_adapter is not None and self._merged is None:
                    self.model.set_adapter(self._batch_adapter)
            batch: list[Request] = []
            n_rows = sum(r.finish is None for r in self._batch.rows)
            while self._pending and self._pending[0].adapter == self._batch_adapter:
                req = self._pending[0]
                if n_rows + req.params.n > self.max_batch_size and (n_rows or batch):
                    break
                self._pending.popleft()
                # The future stays pending while the request runs, so that cancelling it stays possible.
                if not req.future.cancelled():
                    batch.append(req)
                    n_rows += req.params.n
        return batch

    def _prefill(self, batch: list[Request]) -> None:
        prompts: dict[tuple[int, ...], int] = {}
        rows: list[Row] = []
        src: list[int] = []
        for req in batch:
            key = tuple(req.prompt_ids)
            u = prompts.setdefault(key, len(prompts))
            for i in range(req.params.n):
                gen = self._rng
                if req.params.seed is not None:
                    gen = torch.Generator().manual_seed(req.params.seed + i)
                constraint = self.grammars.matcher(req.params.grammar) if req.params.grammar else None
                rows.append(Row(req, i, gen, self._new_detokenizer(), constraint))
                src.append(u)
        unique = [list(p) for p in prompts]
        cache, shared, attn_UP, out = Prefill(
            self.model,
            self.prefix_cache,
            self._batch_adapter,
            self.cascade,
            self.tokenizer.pad_token_id or 0,
            self.device,
        ).forward(unique)
        src_t = torch.tensor(src, device=self.device)
        cache.batch_select_indices(src_t)
        attn_RP = attn_UP.to(self.device)[src_t]
        logits_RV = out.logits[:, -1, :][src_t]
        self.stats["prefill_prompts"] += len(unique)
        self.stats["prefill_rows"] += len(rows)
        self._batch.compact()  # finished rows would only be copied along
        self._batch.merge(rows, cache, shared, attn_RP, self.prefix_cache.min_reuse)
        first = len(self._batch.rows) - len(rows)
        self._sample_and_advance(logits_RV, range(first, len(self._batch.rows)))

    def _decode_step(self) -> None:
        b = self._batch
        assert b.last is not None
        pos_B1, mask = b.grow()
        out = self.model(
            input_ids=b.last.unsqueeze(1),
            attention_mask=mask,
            position_ids=pos_B1,
            past_key_values=b.cache,
            use_cache=True,
            **b.prefix_kwargs(),
        )
        self.stats["decode_steps"] += 1
        self.stats["shared_prefix_steps"] += b.held > 0
        self._sample_and_advance(out.logits[:, -1, :], range(len(b.rows)))

    def _sample_and_advance(self, logits_RV: torch.Tensor, row_ids: range) -> None:
        rows = [self._batch.rows[i] for i in row_ids]
        temp = torch.tensor([r.req.params.temperature for r in rows], device=logits_RV.device)
        top_p = torch.tensor([r.req.params.top_p for r in rows], device=logits_RV.device)
        allowed_RV = None
        forced_R: list[bool] = [False] * len(rows)
        constraints = [r.constraint if r.finish is None else None for r in rows]  # a finished row rides along
        if any(constraints):
            allowed_RV = allowed_tokens(constraints, logits_RV.shape[-1])
            forced_R = (allowed_RV.sum(-1) == 1).tolist()  # by the grammar: a value chosen below is trained
            allowed_RV = allowed_RV.to(logits_RV.device)
            if self.enum_lookahead:
                self.stats["enum_choices"] += choose_values(
                    rows, logits_RV, allowed_RV, self.enum_lookahead, partial(self._lookahead, row_ids.start)
                )
        tokens_R, lp_R = sample_next(logits_RV, temp, top_p, [r.generator for r in rows], allowed_RV)
        k = max(r.req.params.top_logprobs for r in rows)
        top_vals = top_idx = None
        if k:
            top_vals, top_idx = torch.log_softmax(logits_RV.float(), -1).topk(k, dim=-1)
        assert self._batch.last is not None
        self._batch.last[row_ids.start : row_ids.stop] = tokens_R
        live = 0
        for j, row in enumerate(rows):
            if row.finish is not None:
                continue
            live += 1
            if forced_R[j]:
                row.forced.append(len(row.ids))
            row.advance(int(tokens_R[j]), float(lp_R[j]), self.stop_token_ids, self._decode)
            if row.req.params.top_logprobs and top_vals is not None and top_idx is not None:
                n = row.req.params.top_logprobs
                row.top.append(list(zip(top_idx[j, :n].tolist(), top_vals[j, :n].tolist(), strict=True)))
        self.stats["generated_tokens"] += live
        self._retire_finished()

    def _lookahead(self, first: int, jobs: list[tuple[int, list[int]]]) -> list[float]:
        """`enum_choice.ScoreRests` for rows `first + j`: the logprob of each candidate's tokens after its
        first, in its row's context (the cache as of now), from one forward of the candidates, right-padded,
        on copies of their rows' KV."""
        b = self._batch
        assert b.cache is not None and b.attn is not None
        seqs = [seq for _, seq in jobs]
        idx = torch.tensor([first + j for j, _ in jobs], device=self.device)
        width = max(len(s) for s in seqs) - 1
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        attn = b.attn.index_select(0, idx)
        pos = attn.sum(-1, keepdim=True) + b.held + torch.arange(width, device=self.device)
        attn = torch.cat([attn, attn.new_ones((len(seqs), width))], dim=1)
        cache = GrowingCache(len(b.cache.layers), offset=b.held)
        for layer, (k, v) in zip(cache.growing_layers, layer_kv(b.cache), strict=True):
            layer.update(k.index_select(0, idx), v.index_select(0, idx))
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=b.full_mask(attn),
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            **b.prefix_kwargs(),
        )
        lp_BTV = torch.log_softmax(out.logits.float(), dim=-1)
        self.stats["lookahead_rows"] += len(seqs)
        return [
            float(sum(lp_BTV[i, t - 1, seq[t]] for t in range(1, len(seq)))) for i, seq in enumerate(seqs)
        ]

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids: one text
        return text

    def _retire_finished(self) -> None:
        """Answer the requests whose rows just finished. Finished rows leave the batch (a copy of the whole
        KV cache) only once they are a quarter of it, or when new rows join: until then they ride along,
        which costs little (decoding is bound by reading the weights, not by the rows) and saves a copy."""
        finished = [r for r in self._batch.rows if r.finish is not None]
        for r in finished:
            if r.req.results[r.index] is None:
                r.req.results[r.index] = r.completion()
                if all(c is not None for c in r.req.results):
                    settle(r.req.future, [c for c in r.req.results if c is not None])
        if finished and len(finished) * 4 >= len(self._batch.rows):
            self._batch.compact()

    def _drop_cancelled(self) -> None:
        """Rows of a cancelled request (its client went away) leave the batch now, not when they finish."""
        cancelled = sum(r.finish is None and r.req.future.cancelled() for r in self._batch.rows)
        if cancelled:
            self.stats["cancelled_rows"] += cancelled
            self._batch.compact()

    def _fail_rows(self, exc: Exception) -> None:
        for r in self._batch.clear():
            settle(r.req.future, exc)

    def _fail_all(self, exc: Exception) -> None:
        self._fail_rows(exc)
        while self._pending:
            settle(self._pending.popleft().future, exc)
        while self._commands:  # a command queued as the engine closed must not wait forever
            _, fut = self._commands.popleft()
            if not fut.done():
                fut.set_exception(exc)


__all__ = ["Completion", "ContextLengthError", "QueueFull", "SamplingError", "SamplingParams", "TorchEngine"]
