"""The remote backend: the same user code, training and serving on `advantage serve` over HTTP.

Rollouts, tools and rewards stay in this process; `model.openai_client()` talks to the server's OpenAI
routes, and the training calls go to its `/v1/training/` routes (see `advantage.server.training_routes`).
This module imports nothing from the server side.

Retries, and why each call gets the ones it gets (connection retries are httpx's transport retries; the
others are tenacity's, with exponential backoff from 0.5 s to 8 s):
- Every call is sent again when the connection could not be made at all (refused, or the connect timed
  out): the server never saw the request, so sending it again is safe.
- `register`, `get_step`, `delete_checkpoints` and `feedback` are idempotent, so they are also retried when the
  connection breaks after the request went out, and on 502/503/504 (a proxy in front of a restarting
  server). A retried `delete_checkpoints` may return `[]` when the first attempt already deleted.
- `log` appends a row to the run's metrics and trajectories: it is not idempotent and is never sent twice
  once it may have arrived; a broken connection raises `BackendUnavailableError`.
- `train` is never blindly retried: a step that reached the server may complete there even when this
  client never hears back. A connection lost mid-step raises `BackendUnavailableError`; the server keeps
  its newest complete checkpoint, and `get_step()` after a restart tells which step it resumed from.
- A 429 (the server's engine or training queue is full) means nothing was queued: every call, `train`
  included, is sent again after the server's Retry-After, up to `max_retries` times.
- A server restarted since `register` no longer knows the model; it answers 404 `model_not_registered`
  before doing anything, and this client registers the model again (resuming from the newest complete
  checkpoint on the server's disk) and repeats the call once.
- The low-level API (`advantage.lowlevel`): `datums`, `sft_datums`, `forward` and `sample` read state and
  are retried like `get_step`; `forward_backward`, `optim_step` and `save_weights` change it (accumulated
  gradients, optimizer moments, a new step) and are never sent twice. Gradients accumulated on a server
  that then restarts are gone: start the step's forward_backward calls again.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential
from tqdm.auto import tqdm

from advantage.backends.base import TrainResult
from advantage.config import TrainConfig
from advantage.trajectory import TrajectoryGroup
from advantage.wire.ops import (
    DatumsReply,
    DatumsRequest,
    ForwardBackwardOutput,
    ForwardBackwardRequest,
    ForwardReply,
    ForwardRequest,
    LogMetricsRequest,
    LogprobsReply,
    LogprobsRequest,
    MarkTrainedReply,
    MarkTrainedRequest,
    ModelSpec,
    OnlineJudgedReply,
    OnlineJudgedRequest,
    OnlineStartReply,
    OnlineStartRequest,
    OnlineTrafficReply,
    OnlineTrafficRequest,
    OnlineUnjudgedReply,
    OnlineUnjudgedRequest,
    OptimStepReply,
    OptimStepRequest,
    PromoteReply,
    PromoteRequest,
    RestoreReply,
    RestoreRequest,
    SampleOutput,
    SampleRequest,
    SaveWeightsReply,
    SaveWeightsRequest,
    SFTDatumsRequest,
    StepReply,
)

NOT_REGISTERED = "model_not_registered"  # the server's error code for a model it does not know (any more)
_RETRY_STATUS = frozenset({502, 503, 504})
_IDEMPOTENT_OPS = frozenset(
    {
        "datums",
        "sft_datums",
        "forward",
        "sample",
        "logprobs",
        "online_traffic",
        "mark_trained",
        "online_unjudged",
        "online_judged",
    }
)
# Raised before the request went out. httpx's transport retries the first two itself; a pool timeout (every
# connection busy) is retried here.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_BACKOFF = wait_exponential(multiplier=0.5, max=8.0)  # 0.5, 1, 2, 4, 8, 8, ... seconds
T = TypeVar("T")


class BackendError(Exception):
    """The server refused or failed a request. `status` is the HTTP status; `type` and `code` come from
    the OpenAI-shaped error body. `retry_after` is the wait in seconds a 429 asked for (None otherwise)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        type_: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.code = message, status, type_, code
        self.retry_after = retry_after


class BackendRequestError(BackendError, ValueError):
    """A 4xx: the request was wrong (bad input, unknown model); the message says what to change."""


class BackendAuthError(BackendError, PermissionError):
    """A 401: no API key, or not the one the server was started with."""


class BackendUnavailableError(BackendError, ConnectionError):
    """The server could not be reached, or went away before answering."""


class RemoteBackend:
    """Train and serve on `advantage serve` at `base_url` ("http://host:7999", with or without "/v1").

    `api_key` defaults to the ADVANTAGE_API_KEY environment variable, the one `advantage serve` reads.
    `timeout` bounds each request, and the silence between two events of a train step (the server sends a
    heartbeat every 15 s). `max_retries` is how many times a call is sent again (see the module docstring).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        max_retries: int = 3,
        progress: bool = True,
    ) -> None:
        root = base_url.strip().rstrip("/")
        root = root.removesuffix("/v1").rstrip("/")
        if not root.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}.")
        self.server_url = root
        self.base_url = f"{root}/v1"  # the OpenAI root, for model.openai_client()
        self.api_key = api_key if api_key is not None else os.environ.get("ADVANTAGE_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.progress = progress
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------ the protocol
    async def register(self, model: ModelSpec) -> int:
        body: dict[str, Any] = {
            "project": model.project,
            "name": model.name,
            "base_model": model.base_model,
            "lora": model.lora.model_dump(mode="json"),
        }
        if model.fork_from is not None:  # only when set: a server that predates forks takes the rest
            body["fork_from"] = model.fork_from
        if model.record_traffic:  # likewise for a server that predates recording
            body["record_traffic"] = True
        if model.background_samples:  # and background samples
            body["background_samples"] = model.background_samples
        data = await self._call("POST", "/models", body, idempotent=True, what="register")
        return int(data["step"])

    async def get_step(self, model: ModelSpec) -> int:
        data = await self._call_registered(model, "GET", "step", None, idempotent=True)
        return int(data["step"])

    async def log(
        self, model: ModelSpec, groups: list[TrajectoryGroup], split: str, step: int | None = None
    ) -> dict[str, float]:
        body = {"groups": [g.to_dict() for g in groups], "split": split, "step": step}
        data = await self._call_registered(model, "POST", "log", body, idempotent=False)
        return {k: float(v) for k, v in data["metrics"].items()}

    async def feedback(self, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        # Not a training route: an absolute URL overrides the client's /v1/training base.
        url = f"{self.base_url}/feedback"
        return await self._again_if_unregistered(
            model,
            lambda: self._call("POST", url, {**body, "model": model.name}, idempotent=True, what="feedback"),
        )

    async def delete_checkpoints(self, model: ModelSpec, keep: str, metric: str) -> list[int]:
        body = {"keep": keep, "metric": metric}
        data = await self._call_registered(model, "POST", "delete_checkpoints", body, idempotent=True)
        return [int(s) for s in data["deleted"]]

    async def train(
        self, model: ModelSpec, groups: list[TrajectoryGroup], config: TrainConfig
    ) -> TrainResult:
        content = _dumps({"groups": [g.to_dict() for g in groups], "config": config.model_dump(mode="json")})
        bar = tqdm(total=0, desc=f"train {model.name}", unit="mb", leave=False, disable=not self.progress)
        try:
            return await self._again_if_unregistered(model, lambda: self._train_stream(model, content, bar))
        finally:
            bar.close()

    # ------------------------------------------------------------------------------------ the low-level API
    async def datums(self, model: ModelSpec, req: DatumsRequest) -> DatumsReply:
        return DatumsReply.model_validate(await self._op(model, "datums", req))

    async def sft_datums(self, model: ModelSpec, req: SFTDatumsRequest) -> DatumsReply:
        return DatumsReply.model_validate(await self._op(model, "sft_datums", req))

    async def forward(self, model: ModelSpec, req: ForwardRequest) -> ForwardReply:
        return ForwardReply.model_validate(await self._op(model, "forward", req))

    async def forward_backward(self, model: ModelSpec, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        return ForwardBackwardOutput.model_validate(await self._op(model, "forward_backward", req))

    async def optim_step(self, model: ModelSpec, req: OptimStepRequest) -> OptimStepReply:
        return OptimStepReply.model_validate(await self._op(model, "optim_step", req))

    async def save_weights(self, model: ModelSpec, req: SaveWeightsRequest) -> SaveWeightsReply:
        return SaveWeightsReply.model_validate(await self._op(model, "save_weights", req))

    async def log_metrics(self, model: ModelSpec, req: LogMetricsRequest) -> StepReply:
        return StepReply.model_validate(await self._op(model, "log_metrics", req))

    async def sample(self, model: ModelSpec, req: SampleRequest) -> SampleOutput:
        return SampleOutput.model_validate(await self._op(model, "sample", req))

    async def logprobs(self, model: ModelSpec, req: LogprobsRequest) -> LogprobsReply:
        return LogprobsReply.model_validate(await self._op(model, "logprobs", req))

    async def restore(self, model: ModelSpec, req: RestoreRequest) -> RestoreReply:
        return RestoreReply.model_validate(await self._op(model, "restore", req))

    async def online_start(self, model: ModelSpec, req: OnlineStartRequest) -> OnlineStartReply:
        return OnlineStartReply.model_validate(await self._op(model, "online_start", req))

    async def promote(self, model: ModelSpec, req: PromoteRequest) -> PromoteReply:
        return PromoteReply.model_validate(await self._op(model, "promote", req))

    async def online_traffic(self, model: ModelSpec, req: OnlineTrafficRequest) -> OnlineTrafficReply:
        return OnlineTrafficReply.model_validate(await self._op(model, "online_traffic", req))

    async def online_unjudged(self, model: ModelSpec, req: OnlineUnjudgedRequest) -> OnlineUnjudgedReply:
        return OnlineUnjudgedReply.model_validate(await self._op(model, "online_unjudged", req))

    async def online_judged(self, model: ModelSpec, req: OnlineJudgedRequest) -> OnlineJudgedReply:
        return OnlineJudgedReply.model_validate(await self._op(model, "online_judged", req))

    async def mark_trained(self, model: ModelSpec, req: MarkTrainedRequest) -> MarkTrainedReply:
        return MarkTrainedReply.model_validate(await self._op(model, "mark_trained", req))

    async def _op(self, model: ModelSpec, route: str, req: BaseModel) -> dict[str, Any]:
        # Gradient accumulation, optimizer steps and checkpoints change state: never sent twice.
        body = (
            req.model_dump()
        )  # not mode="json": that writes NaN as null, and the server then cannot say where
        return await self._call_registered(model, "POST", route, body, idempotent=route in _IDEMPOTENT_OPS)

    async def close(self) -> None:
        if self._http is not None and self._loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._http = self._loop = None

    # ------------------------------------------------------------------------------------ HTTP
    def _client(self) -> httpx.AsyncClient:
        # An httpx client belongs to the event loop it first ran on; a backend reused under a new
        # asyncio.run() gets a fresh one.
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
            self._http = httpx.AsyncClient(
                base_url=f"{self.base_url}/training",
                headers=headers,
                timeout=timeout,
                transport=httpx.AsyncHTTPTransport(retries=self.max_retries),  # refused or timed-out connects
            )
            self._loop = loop
        return self._http

    def _retrying(self, idempotent: bool) -> AsyncRetrying:
        """What is sent again beyond the transport's connect retries: a 429 (nothing was queued) and a pool
        timeout (nothing was sent) always; a broken connection and a 502/503/504 only for an idempotent call."""

        def worth_retrying(exc: BaseException) -> bool:
            if isinstance(exc, BackendError):
                return exc.retry_after is not None or (idempotent and exc.status in _RETRY_STATUS)
            if isinstance(exc, httpx.PoolTimeout):
                return True
            already_retried = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))  # by the transport
            return idempotent and isinstance(exc, httpx.TransportError) and not already_retried

        return AsyncRetrying(
            retry=retry_if_exception(worth_retrying),
            wait=_wait,
            stop=stop_after_attempt(self.max_retries + 1),
            reraise=True,
        )

    async def _again_if_unregistered(self, model: ModelSpec, send: Callable[[], Awaitable[T]]) -> T:
        try:
            return await send()
        except BackendRequestError as exc:
            if exc.code != NOT_REGISTERED:
                raise
        await self.register(model)  # the server restarted since: register again, then repeat once
        return await send()

    async def _call_registered(
        self,
        model: ModelSpec,
        method: str,
        action: str,
        body: dict[str, Any] | None,
        *,
        idempotent: bool,
    ) -> dict[str, Any]:
        path = f"/models/{quote(model.name, safe='')}/{action}"
        return await self._again_if_unregistered(
            model, lambda: self._call(method, path, body, idempotent=idempotent, what=action)
        )

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, idempotent: bool, what: str
    ) -> dict[str, Any]:
        content = None if body is None else _dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}

        async def send() -> dict[str, Any]:
            resp = await self._client().request(method, path, content=content, headers=headers)
            payload = _json_or_none(resp)
            if resp.status_code >= 400 or payload is None:
                raise _error(resp, payload, self.server_url, what)
            return payload

        try:
            return await self._retrying(idempotent)(send)
        except httpx.TransportError as exc:
            if idempotent or isinstance(exc, _NOT_SENT):
                raise self._unreachable(what, exc) from exc
            raise BackendUnavailableError(
                f"The connection to {self.server_url} broke during {what}() ({_cause(exc)}); the "
                "server may or may not have recorded it. Check the run's metrics.jsonl on the server "
                "before sending it again."
            ) from exc

    async def _train_stream(self, model: ModelSpec, content: bytes, bar: tqdm) -> TrainResult:
        path = f"/models/{quote(model.name, safe='')}/train"
        headers = {"Content-Type": "application/json"}

        async def send() -> TrainResult:
            async with self._client().stream("POST", path, content=content, headers=headers) as resp:
                if resp.status_code >= 400:  # refused before anything was trained
                    await resp.aread()
                    raise _error(resp, _json_or_none(resp), self.server_url, "train")
                # An error event in the stream raises from here, and is never retried.
                result = await _read_train_events(resp, bar, self.server_url)
            if result is None:  # a clean end of stream without a result: the server stopped mid-step
                raise self._went_away(model, None)
            return result

        try:
            return await self._retrying(idempotent=False)(send)
        except _NOT_SENT as exc:
            raise self._unreachable("train", exc, "; nothing was trained") from exc
        except httpx.TransportError as exc:  # the step went out: never send it twice
            raise self._went_away(model, exc) from exc

    def _unreachable(self, what: str, exc: Exception, consequence: str = "") -> BackendUnavailableError:
        return BackendUnavailableError(
            f"Cannot reach the advantage server at {self.server_url} for {what}() after "
            f"{self.max_retries + 1} attempts ({_cause(exc)}){consequence}. Is `advantage serve` running "
            "there, and is the URL right?"
        )

    def _went_away(self, model: ModelSpec, exc: Exception | None) -> BackendUnavailableError:
        cause = _cause(exc) if exc is not None else "the stream ended without a result"
        return BackendUnavailableError(
            f"The server at {self.server_url} went away during a train step of {model.name!r} ({cause}). "
            "Its newest complete checkpoint is kept (a half-written step is discarded). After restarting "
            "the server, call `await model.get_step()` to see the step it resumed from (this step may or "
            "may not have completed), then `await model.train(...)` again."
        )


async def _read_train_events(resp: httpx.Response, bar: tqdm, server: str) -> TrainResult | None:
    """Follow the NDJSON events of a train step to its result, its error, or (None) a cut stream."""
    async for line in resp.aiter_lines():
        if not line.strip():
            continue
        event = json.loads(line)
        kind = event.get("event")
        if kind == "progress":
            bar.total = int(event["total"])
            bar.n = int(event["done"])
            bar.refresh()
        elif kind == "result":
            return TrainResult(int(event["step"]), {k: float(v) for k, v in event["metrics"].items()})
        elif kind == "error":
            raise _error_from(int(event.get("status", 500)), {"error": event.get("error")}, server, "train")
    return None


def _error(resp: httpx.Response, payload: dict[str, Any] | None, server: str, what: str) -> BackendError:
    """The error for a refused request; a 429 carries the wait its Retry-After asks for."""
    error = _error_from(resp.status_code, payload, server, what)
    if resp.status_code == 429:
        error.retry_after = _retry_after(resp)
    return error


def _error_from(status: int, payload: dict[str, Any] | None, server: str, what: str) -> BackendError:
    err = (payload or {}).get("error")
    if isinstance(err, dict) and err.get("message"):
        message, type_, code = str(err["message"]), err.get("type"), err.get("code")
    elif status in (404, 405):
        message, type_, code = (
            f"The server at {server} has no training route for {what}(): is it `advantage serve`, and a "
            "version with the training API?",
            None,
            None,
        )
    else:
        message, type_, code = f"The server at {server} answered HTTP {status} to {what}().", None, None
    if status == 401:
        return BackendAuthError(
            f"{message} The server at {server} refused the API key: pass `RemoteBackend(url, api_key=KEY)` "
            "(or set ADVANTAGE_API_KEY) with the key `advantage serve` was started with.",
            status,
            type_,
            code,
        )
    if 400 <= status < 500:
        return BackendRequestError(message, status, type_, code)
    if status in _RETRY_STATUS:
        return BackendUnavailableError(f"{message} (HTTP {status}: the server is not available)", status)
    return BackendError(message, status, type_, code)


def _json_or_none(resp: httpx.Response) -> dict[str, Any] | None:
    try:
        data = json.loads(resp.content)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _dumps(body: dict[str, Any]) -> bytes:
    # Plain json.dumps writes NaN, which httpx refuses to encode: a NaN reward then reaches the server's
    # validation, which says which trajectory has it and what to do.
    return json.dumps(body).encode()


def _retry_after(resp: httpx.Response) -> float:
    """The seconds a 429 asks to wait (Retry-After), within [0.1, 60]; 1 when it does not say."""
    try:
        seconds = float(resp.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0
    return min(max(seconds, 0.1), 60.0) if math.isfinite(seconds) else 1.0


def _wait(state: RetryCallState) -> float:
    """The server's Retry-After after a 429, exponential backoff otherwise."""
    exc = state.outcome.exception() if state.outcome is not None else None
    if isinstance(exc, BackendError) and exc.retry_after is not None:
        return exc.retry_after
    return _BACKOFF(state)


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
