"""The backend's operations on a `Service`, typed: each takes its request (`advantage.wire.ops`) and returns
its reply.

`LocalBackend` calls them in-process and the server's `/v1/training/models/{name}/{op}` routes call them
over HTTP, so a `TrainingClient` behaves the same on both. Every op but `sample` and `logprobs` runs on the
service's training thread, where all use of the trainer happens. Requests arrive validated (pydantic, at the
boundary); what needs the model (the vocabulary, the context) is checked here. Bad input raises ValueError,
which the server answers with a 400 that says what to change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

from advantage.engine.chat import encode_prompt
from advantage.engine.sampling import SamplingParams
from advantage.online.records import Feedback, rewarded_to_dict
from advantage.registry import UnknownServedModel, Weights, check_name
from advantage.service import Service
from advantage.training import primitives
from advantage.training.grpo import build_datums
from advantage.training.ray_workers import RayTrainerGroup
from advantage.training.tokenize import tokenize_for_sft
from advantage.training.trainer import Trainer
from advantage.trajectory import Trajectory, TrajectoryGroup, check_groups, read_groups
from advantage.wire.datum import Datum
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
    SampledSequence,
    SampleOutput,
    SampleRequest,
    SaveWeightsReply,
    SaveWeightsRequest,
    SFTDatumsRequest,
    StepReply,
    WeightsInfo,
)

Req = TypeVar("Req")
Rep = TypeVar("Rep")


async def _on_train_thread(
    service: Service, fn: Callable[[Service, str, Req], Rep], name: str, req: Req
) -> Rep:
    service.trainable(name)  # unknown or untrainable: UnknownServedModel before any work
    return await service.on_train_thread(fn, service, name, req)


def accept_groups(service: Service, name: str, groups: list[TrajectoryGroup], action: str) -> None:
    """The one check of groups to train on (`trajectory.check_groups`), with the sampled token ids checked
    against the model's vocabulary. (`Service.log_groups` checks logged groups, of any model.)"""
    _, trainer = service.trainable(name)
    check_groups(groups, action, vocab_size(trainer))


def vocab_size(trainer: Trainer) -> int:
    if isinstance(trainer, RayTrainerGroup):  # data-parallel workers: the model is in them
        return trainer.vocab_size
    return int(trainer.model.get_base_model().config.vocab_size)


# ------------------------------------------------------------------------------ the low-level primitives


async def datums(service: Service, name: str, req: DatumsRequest) -> DatumsReply:
    groups = await asyncio.to_thread(read_groups, req.groups)
    return await datums_of(service, name, groups, req)


async def datums_of(
    service: Service, name: str, groups: list[TrajectoryGroup], req: DatumsRequest
) -> DatumsReply:
    """`datums` on groups already read (LocalBackend's: the caller's own records)."""
    accept_groups(service, name, groups, "datums")
    return await _on_train_thread(service, lambda s, n, r: _datums(s, n, groups, r), name, req)


def _datums(service: Service, name: str, groups: list[TrajectoryGroup], req: DatumsRequest) -> DatumsReply:
    _, trainer = service.trainable(name)
    out, metrics = build_datums(trainer, groups, req.config, req.skip_zero_variance)
    return DatumsReply(datums=out, metrics=metrics)


async def sft_datums(service: Service, name: str, req: SFTDatumsRequest) -> DatumsReply:
    return await _on_train_thread(service, _sft_datums, name, req)


def _sft_datums(service: Service, name: str, req: SFTDatumsRequest) -> DatumsReply:
    """Every trajectory is tokenized before any error is raised, and the error lists each bad one (up to 20),
    so a data file is checked whole before training starts."""
    _, trainer = service.trainable(name)
    if req.where is not None and len(req.where) != len(req.trajectories):
        raise ValueError(f"where has {len(req.where)} names for {len(req.trajectories)} trajectories.")
    context = int(getattr(trainer.model.get_base_model().config, "max_position_embeddings", req.max_seq_len))
    limit = min(req.max_seq_len, context)  # what the model can take, not only what the config allows
    out, errors = [], []
    for i, t in enumerate(req.trajectories):
        where = req.where[i] if req.where is not None else f"Trajectory {i}"
        try:
            traj = _trajectory(t, where)
            tok = tokenize_for_sft(trainer.tokenizer, traj, limit, req.on_overflow)
        except ValueError as exc:
            too_long = f" (the model's context is {context} tokens)" if "over the limit" in str(exc) else ""
            errors.append(f"{where}: {exc}{too_long}")
            continue
        out.append(Datum(input_ids=tok.input_ids, loss_mask=tok.assistant_mask))
    if len(errors) == 1:
        raise ValueError(errors[0])
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(
            f"{len(errors)} trajectories cannot be trained on:\n" + "\n".join(errors[:20]) + more
        )
    return DatumsReply(datums=out)


def _trajectory(d: dict[str, Any], where: str) -> Trajectory:
    try:
        return Trajectory.from_dict(d)
    except ValueError as exc:
        raise ValueError(
            f"{where} does not read as Trajectory.to_dict(): {type(exc).__name__}: {exc}"
        ) from exc


async def forward(service: Service, name: str, req: ForwardRequest) -> ForwardReply:
    return await _on_train_thread(service, _forward, name, req)


def _forward(service: Service, name: str, req: ForwardRequest) -> ForwardReply:
    _, trainer = service.trainable(name)
    _check_datums(trainer, req.datums)
    return ForwardReply(logprobs=primitives.forward(trainer, req.datums, req.micro_batch_size))


async def forward_backward(service: Service, name: str, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
    return await _on_train_thread(service, _forward_backward, name, req)


def _forward_backward(service: Service, name: str, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
    entry, trainer = service.trainable(name)
    _check_datums(trainer, req.datums)
    with entry.lock:
        metrics, logprobs = primitives.forward_backward(
            trainer, req.datums, req.loss, req.loss_config, req.micro_batch_size
        )
    return ForwardBackwardOutput(metrics=metrics, logprobs=logprobs)


async def optim_step(service: Service, name: str, req: OptimStepRequest) -> OptimStepReply:
    return await _on_train_thread(service, _optim_step, name, req)


def _optim_step(service: Service, name: str, req: OptimStepRequest) -> OptimStepReply:
    entry, trainer = service.trainable(name)
    with entry.lock:
        norm = trainer.optim_step(req.adam)
    return OptimStepReply(metrics={"grad_norm": norm})


async def save_weights(service: Service, name: str, req: SaveWeightsRequest) -> SaveWeightsReply:
    return await _on_train_thread(service, _save_weights, name, req)


def _save_weights(service: Service, name: str, req: SaveWeightsRequest) -> SaveWeightsReply:
    check_name("split", req.split)
    entry, _ = service.trainable(name)
    with entry.lock:
        step = service.save_step(name, {"metrics": req.metrics, "source": "save_weights"})
        entry.log.append(step, req.split, req.metrics)
    return SaveWeightsReply(step=step, name=f"{name}@{step}")


async def log_metrics(service: Service, name: str, req: LogMetricsRequest) -> StepReply:
    return await _on_train_thread(service, _log_metrics, name, req)


def _log_metrics(service: Service, name: str, req: LogMetricsRequest) -> StepReply:
    check_name("split", req.split)
    entry, _ = service.trainable(name)
    with entry.lock:
        step = entry.latest
        entry.log.append(step, req.split, req.metrics)
    return StepReply(step=step)


async def restore(service: Service, name: str, req: RestoreRequest) -> RestoreReply:
    return await _on_train_thread(service, _restore, name, req)


def _restore(service: Service, name: str, req: RestoreRequest) -> RestoreReply:
    step, restored = service.restore(name, req.step, req.metric)
    return RestoreReply(step=step, name=f"{name}@{step}", restored_from=restored)


# ------------------------------------------------------------------------------ the online trainer's


async def online_start(service: Service, name: str, req: OnlineStartRequest) -> OnlineStartReply:
    return await _on_train_thread(service, _online_start, name, req)


def _online_start(service: Service, name: str, req: OnlineStartRequest) -> OnlineStartReply:
    default, latest = service.online_start(name)
    return OnlineStartReply(default=default, latest=latest)


async def promote(service: Service, name: str, req: PromoteRequest) -> PromoteReply:
    return await _on_train_thread(service, _promote, name, req)


def _promote(service: Service, name: str, req: PromoteRequest) -> PromoteReply:
    return PromoteReply(default=service.promote(name, req.step, req.accept, req.metrics))


async def online_traffic(service: Service, name: str, req: OnlineTrafficRequest) -> OnlineTrafficReply:
    return await _on_train_thread(service, _online_traffic, name, req)


def _online_traffic(service: Service, name: str, req: OnlineTrafficRequest) -> OnlineTrafficReply:
    stores = service.traffic_stores(name)
    if not stores:
        return OnlineTrafficReply(recording=False, rows=[])
    [store] = stores
    if req.kind == "untrained":
        rows = store.untrained(req.limit)
    elif req.kind == "golden":
        rows = store.golden(req.min_reward, req.limit)
    else:
        rows = store.trained("promoted", req.limit)
    return OnlineTrafficReply(recording=True, rows=[rewarded_to_dict(r) for r in rows])


async def mark_trained(service: Service, name: str, req: MarkTrainedRequest) -> MarkTrainedReply:
    return await _on_train_thread(service, _mark_trained, name, req)


def _mark_trained(service: Service, name: str, req: MarkTrainedRequest) -> MarkTrainedReply:
    stores = service.traffic_stores(name)
    if not stores:
        raise ValueError(f"{name!r} has no recorded traffic to mark.")
    stores[0].mark_trained([(cid, int(idx)) for cid, idx in req.keys], req.step, req.outcome)
    return MarkTrainedReply(marked=len(req.keys))


async def online_unjudged(service: Service, name: str, req: OnlineUnjudgedRequest) -> OnlineUnjudgedReply:
    return await _on_train_thread(service, _online_unjudged, name, req)


def _online_unjudged(service: Service, name: str, req: OnlineUnjudgedRequest) -> OnlineUnjudgedReply:
    stores = service.traffic_stores(name)
    if not stores:
        return OnlineUnjudgedReply(recording=False, completions=[])
    found = stores[0].unjudged(req.min_choices, req.min_step, req.limit)
    return OnlineUnjudgedReply(recording=True, completions=[dataclasses.asdict(c) for c in found])


async def online_judged(service: Service, name: str, req: OnlineJudgedRequest) -> OnlineJudgedReply:
    return await _on_train_thread(service, _online_judged, name, req)


def _online_judged(service: Service, name: str, req: OnlineJudgedRequest) -> OnlineJudgedReply:
    stores = service.traffic_stores(name)
    if not stores:
        raise ValueError(f"{name!r} has no recorded traffic to judge.")
    now = time.time()
    rows = [
        Feedback(req.completion_id, s.choice, s.reward, None, s.comment, None, now, judge=req.judge)
        for s in req.scores
    ]
    stores[0].set_judged(req.completion_id, req.judge, req.outcome, rows)
    return OnlineJudgedReply(scores=len(rows))


# ------------------------------------------------------------------------------ sampling and scoring


async def sample(service: Service, name: str, req: SampleRequest) -> SampleOutput:
    service.trainable(name)
    # Resolving (maybe loading an older step's adapter), rendering and tokenizing happen on a worker thread.
    weights, ids, params = await asyncio.to_thread(_sample_request, service, name, req)
    completions = await weights.engine.generate(ids, params, weights.adapter)
    return SampleOutput(
        prompt_tokens=ids,
        sequences=[
            SampledSequence(
                tokens=c.token_ids, logprobs=c.logprobs, text=c.text, finish_reason=c.finish_reason
            )
            for c in completions
        ],
        weights=f"{name}@{weights.step}",
    )


def _sample_request(
    service: Service, name: str, req: SampleRequest
) -> tuple[Weights, list[int], SamplingParams]:
    try:
        weights = service.resolve(name if req.step is None else f"{name}@{req.step}")
    except UnknownServedModel as exc:  # a missing step is bad input, not an unregistered model
        raise ValueError(str(exc.args[0])) from None
    engine = weights.engine
    if isinstance(req.prompt[0], int):
        ids = [int(t) for t in req.prompt]
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}).")
    else:
        ids = encode_prompt(engine.tokenizer, req.prompt, tools=req.tools)
    params = SamplingParams(
        max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, n=req.n
    )
    engine.check_fits(len(ids), params.max_tokens)
    return weights, ids, params


async def logprobs(service: Service, name: str, req: LogprobsRequest) -> LogprobsReply:
    service.trainable(name)
    weights = await asyncio.to_thread(_scoring_weights, service, name, req.model)
    scores = await asyncio.wrap_future(weights.engine.score(req.sequences, weights.adapter, req.top_k))
    return LogprobsReply(
        logprobs=scores.logprobs,
        weights=WeightsInfo(model=weights.model, step=weights.step),
        top_ids=scores.top_ids,
        top_logprobs=scores.top_logprobs,
    )


def _scoring_weights(service: Service, name: str, served: str | None) -> Weights:
    """The weights `served` names (default: `name`'s latest), refused unless their tokenizer is `name`'s:
    token ids mean nothing under another vocabulary."""
    try:
        weights = service.resolve(served or name)
    except UnknownServedModel as exc:  # bad input to this op, not an unregistered trainable model
        raise ValueError(str(exc.args[0])) from None
    own = service.engine(service.model_entry(name).base_model)
    if weights.engine is not own and weights.engine.tokenizer.get_vocab() != own.tokenizer.get_vocab():
        raise ValueError(
            f"{served!r} has another tokenizer than {name!r}; scoring {name!r}'s token ids needs a model that "
            "shares its tokenizer (a step of a model on the same base, or a base model of the same family)."
        )
    return weights


def _check_datums(trainer: Trainer, datums: list[Datum]) -> None:
    """What a datum cannot check on its own: this model's vocabulary and context length."""
    base = trainer.model.get_base_model()
    max_len = int(getattr(base.config, "max_position_embeddings", 2048))
    primitives.check_datums(datums, vocab_size(trainer), max_len)
