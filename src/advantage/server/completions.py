"""`POST /v1/chat/completions`: render the request, run it on the engine, answer in OpenAI's shape.

Besides the standard fields, every choice carries extension fields that the official SDK keeps in
`choice.model_extra`: `token_ids` (the exact sampled ids), `token_logprobs` (their logprobs under the
unmodified model distribution), `forced_token_indices` (where a grammar left exactly one token to pick:
training skips those, since nothing was chosen there), `prompt_token_ids`, and `weights` ({"model",
"step"}), which say which weights produced it. Training uses these ids; it never re-tokenizes the model's
text.

**Recording.** For a trainable model that records its traffic (`Service.recorder`), each completion is
stored (`online/store.py`) with its request, every choice's sampled ids and logprobs, the weights step and
the caller's `metadata` and `user`, before the response (or a stream's last chunk) goes out: a caller that
has the completion id can send feedback on it at once. A store that fails to write is logged and does not
fail the completion. A model with background samples gets k more choices per request, queued beside the
caller's and recorded after the response, never returned (`server/background.py`).

`prepare` (rendering, tokenizing, grammar checks, loading an older step's adapter) runs on a worker thread,
and so does encoding a response; the event loop only moves bytes. A request is submitted to the engine before
the response starts, so a full engine queue is a 429 even when streaming.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import Response
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_usage import CompletionUsage

from advantage.engine.base import Completion, ContextLengthError, QueueFull, TokenCallback
from advantage.engine.chat import encode_prompt, forced_functions, parse_reply
from advantage.engine.grammar import GrammarCompiler, GrammarError, grammar_from_response_format
from advantage.engine.renderers import renderer_for
from advantage.engine.sampling import SamplingError, SamplingParams
from advantage.online.records import RecordedChoice, RecordedCompletion
from advantage.online.store import TrafficStore
from advantage.registry import UnknownServedModel, Weights
from advantage.server.background import (
    BackgroundFuture,
    attach_background,
    cancel_background,
    submit_background,
)
from advantage.server.schemas import APIError, ChatCompletionRequest, queue_full
from advantage.service import Service

log = logging.getLogger(__name__)


class PreparedRequest:
    def __init__(
        self,
        req: ChatCompletionRequest,
        weights: Weights,
        prompt_ids: list[int],
        params: SamplingParams,
        recorder: TrafficStore | None = None,
        background: int = 0,
    ):
        self.req, self.weights, self.prompt_ids, self.params = req, weights, prompt_ids, params
        self.recorder = recorder
        self.background = background if recorder is not None else 0  # background samples to ask for
        self.pending = 0  # background samples queued: recorded with the completion, appended when done
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.tools_enabled = bool(req.tools) and req.tool_choice != "none"


def prepare(service: Service, req: ChatCompletionRequest) -> PreparedRequest:
    """Validate everything up front so that a bad request is a 4xx before any compute is spent. CPU-heavy
    for a long conversation or a large schema: call it on a worker thread."""
    try:
        weights = service.resolve(req.model)
    except UnknownServedModel as exc:
        raise APIError(404, str(exc.args[0]), "not_found_error", "model", "model_not_found") from None
    try:
        prompt_ids = encode_prompt(weights.engine.tokenizer, req.messages, req.tools, req.tool_choice)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        param = next((p for p in ("tools", "tool_choice") if message.startswith(p)), "messages")
        raise APIError(400, message, param=param) from None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true.", param="top_logprobs")
    grammar, source = _grammar(
        req, renderer_for(weights.engine.tokenizer).tool_format, weights.engine.grammars
    )
    if grammar is not None:
        try:
            weights.engine.grammars.validate(grammar)
        except ValueError as exc:
            detail = str(exc).removeprefix("Invalid response_format schema: ")
            raise APIError(400, _schema_error(source, detail), param=source) from None
    try:
        params = SamplingParams(
            max_tokens=req.max_completion_tokens or req.max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=stop,
            seed=req.seed,
            n=req.n,
            top_logprobs=req.top_logprobs or 0,
            grammar=grammar,
        )
        weights.engine.check_fits(len(prompt_ids), params.max_tokens)
    except SamplingError as exc:
        raise APIError(400, str(exc)) from None
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    recorder = service.recorder(weights.model)
    background = service.background_samples_of(weights.model) if recorder is not None else 0
    return PreparedRequest(req, weights, prompt_ids, params, recorder, background)


def _grammar(
    req: ChatCompletionRequest, tool_format: str, grammars: GrammarCompiler
) -> tuple[str | None, str]:
    """The grammar that constrains the reply, and the field it comes from: response_format, or the tools
    of a forced tool_choice.

    llguidance raises a plain ValueError on schemas it cannot take (one nested too deep, say), so every
    ValueError here is the request's schema at fault."""
    try:
        grammar = grammar_from_response_format(req.response_format)
    except GrammarError as exc:
        raise APIError(400, str(exc), param="response_format") from None
    except ValueError as exc:
        raise APIError(400, _schema_error("response_format", str(exc)), param="response_format") from None
    forced = forced_functions(req.tool_choice, req.tools or [])  # validated by render_prompt already
    if forced is None:
        return grammar, "response_format"
    if grammar is not None:
        raise APIError(
            400, "Use either response_format or a forced tool_choice, not both.", param="response_format"
        )
    if tool_format != "hermes":  # the grammar writes <tool_call> blocks, which this family does not read
        raise APIError(
            400,
            f"tool_choice 'required' or a named function is enforced with <tool_call> blocks, which this "
            f"model's tool format ({tool_format}) does not use; send tool_choice 'auto'.",
            param="tool_choice",
        )
    try:
        return grammars.tool_choice(req.tools or [], forced), "tools"
    except ValueError as exc:
        raise APIError(400, _schema_error("tools", str(exc)), param="tools") from None


def _schema_error(source: str, detail: str) -> str:
    what = "response_format schema" if source == "response_format" else "function parameters schema in tools"
    hint = " It is nested too deeply: send a flatter schema." if "recursion limit" in detail else ""
    return f"Invalid {what}: {detail.rstrip('.')}.{hint}"


def submit(p: PreparedRequest, on_token: TokenCallback | None = None) -> asyncio.Future[list[Completion]]:
    """Queue the request on the engine; cancelling the returned future takes its rows out of the batch."""
    try:
        fut: concurrent.futures.Future[list[Completion]] = p.weights.engine.submit(
            p.prompt_ids, p.params, p.weights.adapter, on_token
        )
    except QueueFull as exc:
        raise queue_full(exc) from None
    return asyncio.wrap_future(fut)


def submit_with_background(
    p: PreparedRequest, on_token: TokenCallback | None = None
) -> tuple[asyncio.Future[list[Completion]], BackgroundFuture | None]:
    """`submit`, then the request's background samples (if its model asks for any) right behind it."""
    fut = submit(p, on_token)
    bg = submit_background(p.weights, p.prompt_ids, p.params, p.background)
    p.pending = p.background if bg is not None else 0
    return fut, bg


async def complete(p: PreparedRequest) -> Response:
    fut, bg = submit_with_background(p)
    try:
        outs = await fut
        body = await asyncio.to_thread(lambda: _json(_completion(p, outs)))  # encoded off the loop
    except BaseException:
        cancel_background(bg)
        raise
    _attach(p, bg, len(outs))
    return Response(body, media_type="application/json")


def _attach(p: PreparedRequest, bg: BackgroundFuture | None, n: int) -> None:
    """Append the background samples to the recorded completion when they are done (choices n..n+k-1)."""
    if bg is None or p.recorder is None:
        return

    def build(outs: list[Completion]) -> list[RecordedChoice]:
        return [_recorded(p, n + i, c, _choice(p, n + i, c), background=True) for i, c in enumerate(outs)]

    attach_background(bg, p.recorder, p.id, build)


def _json(m: ChatCompletion | ChatCompletionChunk) -> str:
    """The wire JSON of a response model: only the fields we set (OpenAI omits the ones it has no value for)."""
    return m.model_dump_json(exclude_unset=True)


def _completion(p: PreparedRequest, outs: list[Completion]) -> ChatCompletion:
    choices = [_choice(p, i, c) for i, c in enumerate(outs)]
    _record(p, outs, choices)
    n_out = sum(len(c.token_ids) for c in outs)
    return ChatCompletion(
        id=p.id,
        object="chat.completion",
        created=p.created,
        model=p.req.model,
        choices=choices,
        usage=_usage(len(p.prompt_ids), n_out),
        weights=p.weights.info(),
        prompt_token_ids=p.prompt_ids,
    )


def _choice(p: PreparedRequest, index: int, c: Completion) -> Choice:
    parsed = parse_reply(p.weights.engine.tokenizer, c.text, p.tools_enabled)
    # A reply without tool calls is returned verbatim, as OpenAI does (the parser strips whitespace): the
    # streamed deltas then add up to the same content, and token_ids decode to it.
    content = parsed.content if parsed.tool_calls else c.text
    finish: Literal["stop", "length", "tool_calls"] = c.finish_reason
    if parsed.tool_calls:
        message = ChatCompletionMessage.model_validate(
            {"role": "assistant", "content": content, "tool_calls": parsed.tool_calls}
        )
        if finish == "stop":
            finish = "tool_calls"
    else:
        message = ChatCompletionMessage(role="assistant", content=content)
    return Choice(
        index=index,
        message=message,
        finish_reason=finish,
        logprobs=_logprobs(p, c) if p.req.logprobs else None,
        **_extensions(p, c),
    )


def _record(p: PreparedRequest, outs: list[Completion], choices: list[Choice]) -> None:
    """Store the completion when its model records traffic. On a worker thread: SQLite writes block."""
    if p.recorder is None:
        return
    request = p.req.model_dump(exclude_none=True, exclude={"metadata", "user", "stream", "stream_options"})
    record = RecordedCompletion(
        id=p.id,
        model=p.weights.model,
        step=p.weights.step,
        created=time.time(),
        request=request,
        choices=[_recorded(p, i, c, full) for i, (c, full) in enumerate(zip(outs, choices, strict=True))],
        metadata=dict(p.req.metadata or {}),
        user=p.req.user,
        pending=p.pending,
    )
    try:
        p.recorder.record(record)
    except Exception:  # a full disk or a locked file must not fail the completion the caller is owed
        log.exception("could not record completion %s of %s", p.id, p.weights.model)


def _recorded(
    p: PreparedRequest, index: int, c: Completion, full: Choice, background: bool = False
) -> RecordedChoice:
    return RecordedChoice(
        index=index,
        token_ids=c.token_ids,
        logprobs=c.logprobs,
        prompt_token_ids=p.prompt_ids,
        forced_token_indices=c.forced,
        finish_reason=full.finish_reason,
        message=full.message.model_dump(mode="json", exclude_unset=True),
        background=background,
    )


def _extensions(p: PreparedRequest, c: Completion) -> dict[str, Any]:
    return {
        "token_ids": c.token_ids,
        "token_logprobs": c.logprobs,
        "forced_token_indices": c.forced,
        "prompt_token_ids": p.prompt_ids,
        "weights": p.weights.info(),
    }


def _logprobs(p: PreparedRequest, c: Completion) -> ChoiceLogprobs:
    tok = p.weights.engine.tokenizer

    def top(tid: int, lp: float) -> TopLogprob:
        s = tok.decode([tid])
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    content = []
    for i, (tid, lp) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        s = tok.decode([tid])
        tops = [top(t, v) for t, v in c.top_logprobs[i]] if c.top_logprobs else []
        content.append(
            ChatCompletionTokenLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")), top_logprobs=tops)
        )
    return ChoiceLogprobs(content=content, refusal=None)


def _usage(prompt: int, completion: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def stream(p: PreparedRequest) -> AsyncIterator[str]:
    """SSE chunks. Content streams token by token; with tools, the reply is parsed whole and then sent, so
    a half-written `<tool_call>` never reaches the client as content. The request is submitted now, so a
    full queue raises (a 429) before the response starts."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def on_token(index: int, delta: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, delta))

    task, bg = submit_with_background(p, None if p.tools_enabled else on_token)
    return _chunks(p, queue, task, bg)


async def _chunks(
    p: PreparedRequest,
    queue: asyncio.Queue[tuple[int, str]],
    task: asyncio.Future[list[Completion]],
    bg: BackgroundFuture | None,
) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> str:
        extra = {} if usage is None else {"usage": usage}
        m = ChatCompletionChunk(
            id=p.id,
            object="chat.completion.chunk",
            created=p.created,
            model=p.req.model,
            choices=choices,
            **extra,
        )
        return f"data: {_json(m)}\n\n"

    try:
        yield chunk(
            [ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content="")) for i in range(p.params.n)]
        )
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            try:
                waited: set[asyncio.Future[Any]] = {getter, task}
                done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter in done:
                index, text = getter.result()
                yield chunk([ChunkChoice(index=index, delta=ChoiceDelta(content=text), finish_reason=None)])
        outs = task.result()
    finally:  # the client went away mid-stream (or the stream failed): the engine drops the request's rows
        task.cancel()
        if not task.done() or task.cancelled() or task.exception() is not None:
            cancel_background(bg)  # no completion to record them with

    def encode() -> list[Choice]:
        fulls = [_choice(p, i, c) for i, c in enumerate(outs)]
        _record(p, outs, fulls)
        return fulls

    try:
        fulls = await asyncio.to_thread(encode)
    except BaseException:
        cancel_background(bg)
        raise
    _attach(p, bg, len(outs))
    for i, (c, full) in enumerate(zip(outs, fulls, strict=True)):
        delta = ChoiceDelta()
        if p.tools_enabled:
            calls = full.message.tool_calls
            delta = ChoiceDelta.model_validate(
                {"content": full.message.content}
                | (
                    {"tool_calls": [{"index": k, **tc.model_dump()} for k, tc in enumerate(calls)]}
                    if calls
                    else {}
                )
            )
        yield chunk(
            [
                ChunkChoice(
                    index=i,
                    delta=delta,
                    finish_reason=full.finish_reason,
                    logprobs=None
                    if full.logprobs is None
                    else full.logprobs.model_dump(),  # the chunk's own type
                    **_extensions(p, c),
                )
            ]
        )
    if p.req.stream_options and p.req.stream_options.include_usage:
        yield chunk([], usage=_usage(len(p.prompt_ids), sum(len(c.token_ids) for c in outs)))
    yield "data: [DONE]\n\n"
