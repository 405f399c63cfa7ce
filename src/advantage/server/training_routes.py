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
           mark_trained, promote (`service_ops`)

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
goes away before the training thread took it up is dropped. At most `Service.max_train_queue` jobs wait for
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
import math
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from advantage.config import LoRAConfig, TrainConfig
from advantage.engine.base import QueueFull
from advantage.server.parsing import OffLoopRoute
from advantage.server.schemas import INTERNAL_ERROR, APIError, queue_full
from advantage.service import ModelEntry, Service, UnknownServedModel, check_name
from advantage.service_ops import OPS, check_group, run_op
from advantage.training.ray_workers import RayTrainerGroup
from advantage.trajectory import TrajectoryGroup

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/training", route_class=OffLoopRoute)
HEARTBEAT_S = 15.0
NOT_REGISTERED = "model_not_registered"  # the error code RemoteBackend answers by registering again


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterBody(_Body):
    project: str = Field(description="Project name (a directory under the server's root).")
    name: str = Field(description="Model name, unique on the server; served as `name` and `name@step`.")
    base_model: str = Field(description="A bundled model name or a model directory on the server.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA shape (fixed at step 0).")
    fork_from: str | None = Field(
        None,
        description="Start from another model's checkpoint: `other@step`, `other` (its latest step) or "
        "`project/other@step`; copied as step 0 (adapter and optimizer state) when the model is new.",
    )
    record_traffic: bool = Field(
        False,
        description="Record the chat completions this model serves (request, sampled ids and logprobs, "
        "weights step, metadata), for `POST /v1/feedback` and online training. Each register sets it anew.",
    )


class TrajectoryBody(_Body):
    """`Trajectory.to_dict()`: message items are `{"message": {...}}` or `{"choice": {...}}`."""

    messages_and_choices: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    reward: float
    metrics: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    logs: list[str] = Field(default_factory=list)
    finish_reason: str | None = None


class GroupBody(_Body):
    """`TrajectoryGroup.to_dict()`."""

    trajectories: list[TrajectoryBody]
    exceptions: list[str] = Field(default_factory=list)


class TrainBody(_Body):
    groups: list[GroupBody]
    config: TrainConfig = Field(default_factory=TrainConfig)


class LogBody(_Body):
    groups: list[GroupBody]
    split: str = "val"


class DeleteCheckpointsBody(_Body):
    keep: Literal["best+latest", "latest"] = "best+latest"
    metric: str = "val/reward"


# ---------------------------------------------------------------------------------------------- routes


@router.post("/models")
async def register(body: RegisterBody, request: Request) -> Response:
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
async def train(name: str, body: TrainBody, request: Request) -> StreamingResponse:
    service = _service(request)
    entry = _trainable(service, name)
    groups = await asyncio.to_thread(_groups, body.groups, "train", _vocab_size(entry))
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
async def log_groups(name: str, body: LogBody, request: Request) -> Response:
    service = _service(request)
    _trainable(service, name)
    groups = await asyncio.to_thread(_groups, body.groups, "log")
    try:
        check_name("split", body.split)  # it becomes a directory name
        metrics = await asyncio.to_thread(service.log_groups, name, groups, body.split)
    except Exception as exc:
        raise api_error(exc) from exc
    return _json({"name": name, "metrics": metrics})


@router.post("/models/{name}/delete_checkpoints")
async def delete_checkpoints(name: str, body: DeleteCheckpointsBody, request: Request) -> Response:
    service = _service(request)
    _trainable(service, name)
    try:
        deleted = await asyncio.to_thread(service.delete_checkpoints, name, body.keep, body.metric)
    except Exception as exc:
        raise api_error(exc) from exc
    return _json({"name": name, "deleted": deleted})


def _add_op_route(op: str, body_model: type[BaseModel]) -> None:
    async def handler(name: str, body: Any, request: Request) -> Response:
        service = _service(request)
        _trainable(service, name)
        try:
            result = await run_op(service, name, op, body)
        except Exception as exc:
            raise api_error(exc) from exc
        return await asyncio.to_thread(_json, result)  # logprobs or datums can be megabytes

    handler.__annotations__ = {"name": str, "body": body_model, "request": Request, "return": Response}
    handler.__name__ = f"op_{op}"
    router.add_api_route(f"/models/{{name}}/{op}", handler, methods=["POST"], summary=f"Low-level: {op}")


for _op, _body in OPS.items():
    _add_op_route(_op, _body)


# ---------------------------------------------------------------------------------------------- helpers


def api_error(exc: BaseException) -> APIError:
    """The service's exceptions as HTTP errors: bad input is a 4xx whose message says what to do."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return queue_full(exc)
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
        entry = service.model_entry(name)
    except Exception as exc:
        raise api_error(exc) from exc
    if entry.trainer is None or entry.run_dir is None:
        raise api_error(UnknownServedModel(f"Model {name!r} is not trainable on this backend."))
    return entry


def _vocab_size(entry: ModelEntry) -> int:
    assert entry.trainer is not None
    if isinstance(entry.trainer, RayTrainerGroup):  # data-parallel workers: the model is in them
        return entry.trainer.vocab_size
    return int(entry.trainer.model.get_base_model().config.vocab_size)


def _groups(bodies: list[GroupBody], action: str, vocab_size: int | None = None) -> list[TrajectoryGroup]:
    """Rebuild the records and refuse what training or logging would choke on, with the reason."""
    if not bodies:
        raise APIError(
            400, f"{action}() got no trajectory groups; gather some rollouts first.", param="groups"
        )
    groups: list[TrajectoryGroup] = []
    for gi, body in enumerate(bodies):
        if not body.trajectories:
            raise APIError(
                400,
                f"Group {gi} has no trajectories; drop groups whose rollouts all failed before sending them.",
                param=f"groups.{gi}.trajectories",
            )
        try:
            group = TrajectoryGroup.from_dict(body.model_dump())
        except (KeyError, TypeError, ValueError) as exc:
            raise APIError(
                400,
                f"Group {gi} does not read as TrajectoryGroup.to_dict(): {type(exc).__name__}: {exc}",
                param=f"groups.{gi}",
            ) from exc
        try:
            group.validate_rewards()
            check_group(group, vocab_size)
        except ValueError as exc:
            raise APIError(400, f"Group {gi}: {exc}", param=f"groups.{gi}") from exc
        for ti, t in enumerate(group.trajectories):
            bad = [k for k, v in t.metrics.items() if not math.isfinite(v)]
            if bad:
                raise APIError(
                    400,
                    f"Group {gi}, trajectory {ti}: metrics {bad} are not finite numbers; fix or drop them.",
                    param=f"groups.{gi}.trajectories.{ti}.metrics",
                )
        groups.append(group)
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
