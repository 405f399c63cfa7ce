"""The training routes of `advantage serve`: what `RemoteBackend` calls, under `/v1/training/`.

    POST   /v1/training/models                             register (resume from the newest complete step,
                                                           or fork a new model from `fork_from`)
    GET    /v1/training/models/{name}/step                 the latest step
    POST   /v1/training/models/{name}/train                one GRPO step; streams NDJSON events (below)
    POST   /v1/training/models/{name}/log                  record evaluation groups under a split
    POST   /v1/training/models/{name}/delete_checkpoints   keep the latest (and best) steps only
    POST   /v1/training/models/{name}/{op}                 the low-level API's primitives: datums,
           sft_datums, forward, forward_backward, optim_step, save_weights, log_metrics,
           sample, logprobs, restore, and the online trainer's online_start, online_traffic,
           mark_trained, promote, online_unjudged, online_judged (`service_ops`)

`train` answers `application/x-ndjson`, one JSON object a line:
    {"event": "started", "step": 3}                        accepted; the model was at step 3
    {"event": "progress", "done": 1, "total": 4}           micro-batches done
    {"event": "heartbeat"}                                 nothing new for a while (keeps proxies open)
    {"event": "result", "step": 4, "metrics": {...}}       the last line on success
    {"event": "error", "status": 400, "error": {...}}      the last line on failure (OpenAI's error shape)
Everything that can be checked cheaply (the model is registered, names, empty groups, non-finite rewards,
the config) is checked before the stream starts, so bad input is a plain 4xx; only errors found while
training (say, a trajectory over `max_seq_len`) arrive as an error event.

Inference during a train step: the step runs on the service's training thread, so the server keeps
answering chat completions meanwhile, from the previous weights. The new step is checkpointed and published
(`name` and `name@step` then resolve to it) just before the result event; a request that started on the
old weights finishes on them.

If the client goes away mid-step the step still completes on the server (a thread cannot be cancelled) and
becomes the new latest step; a client that reconnects learns it from `get_step`. An op (below) whose client
goes away before the training thread took it up is dropped. At most `Service(max_train_queue=)` jobs wait for
the training thread; past that a train step or an op is answered 429 with Retry-After, before anything runs. If the server dies
mid-step, the partly written checkpoint is a `.tmp-*` dir that the next `register` sweeps: the newest
complete step stays the latest.

Bodies are JSON (NaN is accepted on the wire, so a NaN reward reaches the validation that explains it) and
unknown fields are refused; they are parsed, and the groups rebuilt and checked, on worker threads. Auth is
the app's middleware, as for every route.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from advantage import service_ops as ops
from advantage.engine.base import QueueFull
from advantage.registry import ModelEntry, UnknownServedModel, check_name
from advantage.server.parsing import OffLoopRoute
from advantage.server.schemas import INTERNAL_ERROR, APIError, queue_full
from advantage.service import Service
from advantage.trajectory import InvalidGroups, TrajectoryGroup, read_groups
from advantage.wire.ops import (
    DatumsRequest,
    DeleteCheckpointsRequest,
    ForwardBackwardRequest,
    ForwardRequest,
    LogMetricsRequest,
    LogprobsRequest,
    LogRequest,
    MarkTrainedRequest,
    ModelSpec,
    OnlineJudgedRequest,
    OnlineStartRequest,
    OnlineTrafficRequest,
    OnlineUnjudgedRequest,
    OptimStepRequest,
    PromoteRequest,
    RestoreRequest,
    SampleRequest,
    SaveWeightsRequest,
    SFTDatumsRequest,
    TrainRequest,
)
from advantage.wire.records import GroupRecord

log = logging.getLogger(__name__)
Req = TypeVar("Req", bound=BaseModel)  # a route's request model
router = APIRouter(prefix="/v1/training", route_class=OffLoopRoute)
HEARTBEAT_S = 15.0
NOT_REGISTERED = "model_not_registered"  # the error code RemoteBackend answers by registering again


# ---------------------------------------------------------------------------------------------- routes


@router.post("/models")
async def register(body: ModelSpec, request: Request) -> Response:
    service = _service(request)
    try:
        step = await asyncio.to_thread(
            service.register,
            body.project,
            body.name,
            body.base_model,
            body.lora,
            body.fork_from,
            body.record_traffic,
            body.background_samples,
        )
    except Exception as exc:
        raise api_error(exc) from exc
    return _json({"name": body.name, "project": body.project, "base_model": body.base_model, "step": step})


@router.get("/models/{name}/step")
async def get_step(name: str, request: Request) -> Response:
    entry = _trainable(_service(request), name)
    return _json({"name": name, "step": entry.latest})


@router.post(
    "/models/{name}/train", response_model=None, responses={200: {"content": {"application/x-ndjson": {}}}}
)
async def train(name: str, body: TrainRequest, request: Request) -> StreamingResponse:
    service = _service(request)
    entry = _trainable(service, name)
    groups = await asyncio.to_thread(_groups, service, name, body.groups, "train")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()

    def progress(done: int, total: int) -> None:  # called on the training thread
        loop.call_soon_threadsafe(queue.put_nowait, (done, total))

    start = entry.latest
    try:  # queued now: a full training queue is a 429, before the stream starts
        task = asyncio.ensure_future(service.train_async(name, groups, body.config, progress))
    except QueueFull as exc:
        raise queue_full(exc) from None
    task.add_done_callback(lambda _: queue.put_nowait(None))  # after every progress item already queued
    return StreamingResponse(_train_events(start, task, queue), media_type="application/x-ndjson")


@router.post("/models/{name}/log")
async def log_groups(name: str, body: LogRequest, request: Request) -> Response:
    service = _service(request)
    _trainable(service, name)
    groups = await asyncio.to_thread(_groups, service, name, body.groups, None)
    try:
        metrics = await asyncio.to_thread(service.log_groups, name, groups, body.split, body.step)
    except Exception as exc:
        raise api_error(exc) from exc
    return _json({"name": name, "metrics": metrics})


@router.post("/models/{name}/delete_checkpoints")
async def delete_checkpoints(name: str, body: DeleteCheckpointsRequest, request: Request) -> Response:
    service = _service(request)
    _trainable(service, name)
    try:
        deleted = await asyncio.to_thread(service.delete_checkpoints, name, body.keep, body.metric)
    except Exception as exc:
        raise api_error(exc) from exc
    return _json({"name": name, "deleted": deleted})


def _op_route(
    route: str, body_model: type[Req], op: Callable[[Service, str, Req], Awaitable[BaseModel]]
) -> None:
    """`POST /models/{name}/<route>`: read the body into `body_model`, run `op` (a `service_ops` function)."""

    async def handler(name: str, body: Any, request: Request) -> Response:
        service = _service(request)
        _trainable(service, name)
        try:
            reply = await op(service, name, body)
        except Exception as exc:
            raise api_error(exc) from exc
        return await asyncio.to_thread(_json, reply.model_dump())  # logprobs or datums can be megabytes

    handler.__annotations__ = {"name": str, "body": body_model, "request": Request, "return": Response}
    handler.__name__ = f"op_{route}"
    router.add_api_route(
        f"/models/{{name}}/{route}", handler, methods=["POST"], summary=f"Low-level: {route}"
    )
    OP_ROUTES.append(route)


OP_ROUTES: list[str] = []  # the low-level routes, for the OpenAPI notes (a full queue is a 429 on each)
_op_route("datums", DatumsRequest, ops.datums)
_op_route("sft_datums", SFTDatumsRequest, ops.sft_datums)
_op_route("forward", ForwardRequest, ops.forward)
_op_route("forward_backward", ForwardBackwardRequest, ops.forward_backward)
_op_route("optim_step", OptimStepRequest, ops.optim_step)
_op_route("save_weights", SaveWeightsRequest, ops.save_weights)
_op_route("log_metrics", LogMetricsRequest, ops.log_metrics)
_op_route("sample", SampleRequest, ops.sample)
_op_route("logprobs", LogprobsRequest, ops.logprobs)
_op_route("restore", RestoreRequest, ops.restore)
_op_route("online_start", OnlineStartRequest, ops.online_start)
_op_route("promote", PromoteRequest, ops.promote)
_op_route("online_traffic", OnlineTrafficRequest, ops.online_traffic)
_op_route("mark_trained", MarkTrainedRequest, ops.mark_trained)
_op_route("online_unjudged", OnlineUnjudgedRequest, ops.online_unjudged)
_op_route("online_judged", OnlineJudgedRequest, ops.online_judged)


# ---------------------------------------------------------------------------------------------- helpers


def api_error(exc: BaseException) -> APIError:
    """The service's exceptions as HTTP errors: bad input is a 4xx whose message says what to do."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return queue_full(exc)
    if isinstance(exc, InvalidGroups):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, UnknownServedModel):
        message = str(exc.args[0]) if exc.args else "Unknown model."
        return APIError(
            404,
            f"{message} Register it first (`await model.register(backend)`).",
            "not_found_error",
            code=NOT_REGISTERED,
        )
    if isinstance(exc, ValueError):  # bad input is refused as a ValueError (pydantic's errors are ones too)
        return APIError(400, str(exc))
    # Anything else is the server's fault: the traceback goes to its log, and the client learns no internals.
    log.error("training route failed", exc_info=exc)
    return APIError(500, INTERNAL_ERROR, "server_error")


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _trainable(service: Service, name: str) -> ModelEntry:
    try:
        check_name("model name", name)
        return service.trainable(name)[0]
    except Exception as exc:
        raise api_error(exc) from exc


def _groups(
    service: Service, name: str, records: list[GroupRecord], action: str | None
) -> list[TrajectoryGroup]:
    """The groups of a request, read, and checked as LocalBackend checks its caller's when `action` is a
    training one (`service_ops.accept_groups`; `Service.log_groups` checks logged ones)."""
    try:
        groups = read_groups(records)
        if action is not None:
            ops.accept_groups(service, name, groups, action)
    except Exception as exc:
        raise api_error(exc) from exc
    return groups


async def _train_events(
    start: int,
    task: asyncio.Future[tuple[int, dict[str, float]]],
    queue: asyncio.Queue[tuple[int, int] | None],
) -> AsyncIterator[bytes]:
    try:
        yield _line({"event": "started", "step": start})
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except TimeoutError:
                yield _line({"event": "heartbeat"})
                continue
            if item is None:
                break
            yield _line({"event": "progress", "done": item[0], "total": item[1]})
        exc = task.exception()
        if exc is None:
            step, metrics = task.result()
            yield _line({"event": "result", "step": step, "metrics": metrics})
        else:
            err = api_error(exc)
            body = {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
            yield _line({"event": "error", "status": err.status, "error": body})
    finally:
        if not task.done():  # the client left: the step still completes, and becomes the latest
            task.add_done_callback(_orphan_done)


def _orphan_done(task: asyncio.Future[tuple[int, dict[str, float]]]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("train step failed after its client disconnected", exc_info=exc)
    else:
        log.warning("train step %d finished after its client disconnected", task.result()[0])


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event) + "\n").encode()


def _json(content: dict[str, Any]) -> Response:
    # json.dumps, unlike Starlette's JSONResponse, writes NaN (a metric can be NaN); Python clients read it.
    return Response(json.dumps(content), media_type="application/json")
