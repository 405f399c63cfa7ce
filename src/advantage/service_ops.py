"""The low-level API's operations on a `Service`: a JSON-able payload in, a JSON-able dict out.

`LocalBackend.primitive` calls `run_op` in-process and the server's `/v1/training/models/{name}/{op}` routes
call it over HTTP, so a `TrainingClient` behaves the same on both. Every op but `sample` runs on the
service's training thread, where all use of the trainer happens. Bad input raises ValueError (pydantic's
ValidationError is one), which the server answers with a 400 that says what to change.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from openai.types.chat.chat_completion import Choice
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from advantage.config import TrainConfig
from advantage.engine.chat import render_prompt, validate_messages
from advantage.engine.sampling import SamplingParams
from advantage.lowlevel import BUILTIN_LOSSES, AdamParams, Datum
from advantage.online.store import rewarded_to_dict
from advantage.service import Service, UnknownServedModel, Weights, check_name
from advantage.tracking import check_metric_names
from advantage.training import primitives
from advantage.training.grpo import build_datums
from advantage.training.losses import LossConfig
from advantage.training.tokenize import tokenize_for_sft
from advantage.training.trainer import Datum as TrainDatum
from advantage.training.trainer import Trainer
from advantage.trajectory import Trajectory, TrajectoryGroup

R = TypeVar("R")
LossName = Literal["cispo", "ppo", "grpo", "gspo", "importance_sampling", "cross_entropy", "dpo", "linear"]
assert set(BUILTIN_LOSSES) | {"linear"} == set(LossName.__args__)  # type: ignore[attr-defined]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatumsBody(_Body):
    groups: list[dict[str, Any]] = Field(min_length=1, description="`TrajectoryGroup.to_dict()` items.")
    config: TrainConfig = Field(default_factory=TrainConfig)
    skip_zero_variance: bool = Field(
        True, description="Give no datums for groups whose rewards are all equal (False: every trajectory)."
    )


class SFTDatumsBody(_Body):
    trajectories: list[dict[str, Any]] = Field(min_length=1, description="`Trajectory.to_dict()` items.")
    max_seq_len: int = Field(2048, ge=16, le=131072)
    on_overflow: Literal["error", "truncate"] = "error"
    where: list[str] | None = Field(
        None,
        description="A name per trajectory for errors (e.g. 'data.jsonl, line 7'); default 'Trajectory i'.",
    )


class ForwardBody(_Body):
    datums: list[Datum] = Field(min_length=1)
    micro_batch_size: int = Field(8, ge=1, le=256)


class LossKnobs(_Body):
    eps: float = Field(0.2, ge=0, lt=1)
    eps_high: float = Field(0.28, ge=0, le=10)
    cispo_eps_max: float = Field(4.0, gt=0, le=100)
    agg: Literal["token_mean", "seq_mean", "dr_grpo"] = "token_mean"
    kl_beta: float = Field(0.0, ge=0, le=10)
    dpo_beta: float = Field(0.1, gt=0, le=100)


class ForwardBackwardBody(ForwardBody):
    loss: LossName = "cispo"
    loss_config: LossKnobs = Field(default_factory=LossKnobs)


class OptimStepBody(_Body):
    adam: AdamParams = Field(default_factory=AdamParams)


class SaveWeightsBody(_Body):
    metrics: Annotated[dict[str, float], AfterValidator(check_metric_names)] = Field(
        default_factory=dict, description="Logged at the new step; not named step, split or time."
    )
    split: str = "train"


class LogMetricsBody(_Body):
    metrics: Annotated[dict[str, float], AfterValidator(check_metric_names)] = Field(
        min_length=1, description="Logged at the latest step; not named step, split or time."
    )
    split: str = "val"


class RestoreBody(_Body):
    step: int | None = Field(None, ge=0, description="Step to go back to; default: the best by `metric`.")
    metric: str = Field("val/reward", description="metrics.jsonl column that picks the best step.")


class SampleBody(_Body):
    prompt: list[int] | list[dict[str, Any]] = Field(
        min_length=1, description="Token ids, or chat messages rendered with the chat template."
    )
    tools: list[dict[str, Any]] | None = Field(None, description="OpenAI tool schemas, for a chat prompt.")
    n: int = Field(1, ge=1, le=64)
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    step: int | None = Field(None, ge=0, description="Sample from this step (default: the latest).")


class OnlineStartBody(_Body):
    pass


class PromoteBody(_Body):
    step: int = Field(ge=1, description="The step the promotion gate judged.")
    accept: bool = Field(
        description="True: it becomes the default; False: training goes back to the default."
    )
    metrics: Annotated[dict[str, float], AfterValidator(check_metric_names)] = Field(
        default_factory=dict, description="Logged with it under split 'online' (the gate's scores)."
    )


class OnlineTrafficBody(_Body):
    kind: Literal["untrained", "promoted"] = Field(
        "untrained", description="Rated choices not trained on yet, or those in promoted steps (replay)."
    )
    limit: int | None = Field(None, ge=1, description="At most this many rows.")


class MarkTrainedBody(_Body):
    keys: list[tuple[str, int]] = Field(description="(completion id, choice index) pairs.")
    step: int = Field(ge=0, description="The step they went into (or the step trained from, when stale).")
    outcome: Literal["promoted", "rejected", "stale", "skipped"]


class LogprobsBody(_Body):
    sequences: list[Annotated[list[int], Field(min_length=1)]] = Field(
        min_length=1, description="Token ids; each sequence is scored whole."
    )
    model: str | None = Field(
        None,
        description="The served weights that score them: `name@step`, `name` (its latest step) or a base "
        "model; it must share this model's tokenizer. Default: this model's latest step.",
    )


OPS: dict[str, type[_Body]] = {
    "datums": DatumsBody,
    "sft_datums": SFTDatumsBody,
    "forward": ForwardBody,
    "forward_backward": ForwardBackwardBody,
    "optim_step": OptimStepBody,
    "save_weights": SaveWeightsBody,
    "log_metrics": LogMetricsBody,
    "sample": SampleBody,
    "logprobs": LogprobsBody,
    "restore": RestoreBody,
    "online_start": OnlineStartBody,
    "promote": PromoteBody,
    "online_traffic": OnlineTrafficBody,
    "mark_trained": MarkTrainedBody,
}


async def run_op(service: Service, name: str, op: str, payload: dict[str, Any] | BaseModel) -> dict[str, Any]:
    """Validate `payload` for `op` and run it for the trainable model `name`."""
    if op not in OPS:
        raise ValueError(f"Unknown operation {op!r}; one of {sorted(OPS)}.")
    body = payload if isinstance(payload, OPS[op]) else OPS[op].model_validate(payload)
    service.trainable(name)  # unknown or untrainable: UnknownServedModel before any work
    if isinstance(body, SampleBody):
        return await _sample(service, name, body)
    if isinstance(body, LogprobsBody):
        return await _logprobs(service, name, body)
    return await service.on_train_thread(_SYNC_OPS[op], service, name, body)


# ------------------------------------------------------------------------------ ops on the training thread


def _datums(service: Service, name: str, body: DatumsBody) -> dict[str, Any]:
    _, trainer = service.trainable(name)
    groups = [
        _read(TrajectoryGroup.from_dict, g, f"Group {i}", "TrajectoryGroup")
        for i, g in enumerate(body.groups)
    ]
    datums, metrics = build_datums(trainer, groups, body.config, body.skip_zero_variance)
    return {"datums": [_public(d) for d in datums], "metrics": metrics}


def _sft_datums(service: Service, name: str, body: SFTDatumsBody) -> dict[str, Any]:
    """Every trajectory is tokenized before any error is raised, and the error lists each bad one (up to 20),
    so a data file is checked whole before training starts."""
    _, trainer = service.trainable(name)
    if body.where is not None and len(body.where) != len(body.trajectories):
        raise ValueError(f"where has {len(body.where)} names for {len(body.trajectories)} trajectories.")
    context = int(getattr(trainer.model.get_base_model().config, "max_position_embeddings", body.max_seq_len))
    limit = min(body.max_seq_len, context)  # what the model can take, not only what the config allows
    out, errors = [], []
    for i, t in enumerate(body.trajectories):
        where = body.where[i] if body.where is not None else f"Trajectory {i}"
        try:
            traj = _read(Trajectory.from_dict, t, where, "Trajectory")
            tok = tokenize_for_sft(trainer.tokenizer, traj, limit, body.on_overflow)
        except ValueError as exc:
            too_long = f" (the model's context is {context} tokens)" if "over the limit" in str(exc) else ""
            errors.append(f"{where}: {exc}{too_long}")
            continue
        out.append(Datum(input_ids=tok.input_ids, loss_mask=[float(m) for m in tok.assistant_mask]))
    if len(errors) == 1:
        raise ValueError(errors[0])
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(
            f"{len(errors)} trajectories cannot be trained on:\n" + "\n".join(errors[:20]) + more
        )
    return {"datums": [d.model_dump(mode="json") for d in out]}


def _forward(service: Service, name: str, body: ForwardBody) -> dict[str, Any]:
    _, trainer = service.trainable(name)
    datums = _internal(trainer, body.datums)
    return {"logprobs": primitives.forward(trainer, datums, body.micro_batch_size)}


def _forward_backward(service: Service, name: str, body: ForwardBackwardBody) -> dict[str, Any]:
    entry, trainer = service.trainable(name)
    datums = _internal(trainer, body.datums)
    cfg = LossConfig(**body.loss_config.model_dump())
    with entry.lock:
        metrics, logprobs = primitives.forward_backward(
            trainer, datums, body.loss, cfg, body.micro_batch_size
        )
    return {"metrics": metrics, "logprobs": logprobs}


def _optim_step(service: Service, name: str, body: OptimStepBody) -> dict[str, Any]:
    entry, trainer = service.trainable(name)
    a = body.adam
    with entry.lock:
        norm = trainer.optim_step(a.lr, a.betas, a.weight_decay, a.grad_clip)
    return {"metrics": {"grad_norm": norm}}


def _save_weights(service: Service, name: str, body: SaveWeightsBody) -> dict[str, Any]:
    check_name("split", body.split)
    entry, _ = service.trainable(name)
    with entry.lock:
        step = service.save_step(name, {"metrics": body.metrics, "source": "save_weights"})
        entry.log.append(step, body.split, body.metrics)
    return {"step": step, "name": f"{name}@{step}"}


def _log_metrics(service: Service, name: str, body: LogMetricsBody) -> dict[str, Any]:
    check_name("split", body.split)
    entry, _ = service.trainable(name)
    with entry.lock:
        step = entry.latest
        entry.log.append(step, body.split, body.metrics)
    return {"step": step}


def _restore(service: Service, name: str, body: RestoreBody) -> dict[str, Any]:
    step, restored = service.restore(name, body.step, body.metric)
    return {"step": step, "name": f"{name}@{step}", "restored_from": restored}


def _online_start(service: Service, name: str, body: OnlineStartBody) -> dict[str, Any]:
    default, latest = service.online_start(name)
    return {"default": default, "latest": latest}


def _promote(service: Service, name: str, body: PromoteBody) -> dict[str, Any]:
    return {"default": service.promote(name, body.step, body.accept, body.metrics)}


def _online_traffic(service: Service, name: str, body: OnlineTrafficBody) -> dict[str, Any]:
    stores = service.traffic_stores(name)
    if not stores:
        return {"recording": False, "rows": []}
    [store] = stores
    rows = store.untrained(body.limit) if body.kind == "untrained" else store.trained("promoted", body.limit)
    return {"recording": True, "rows": [rewarded_to_dict(r) for r in rows]}


def _mark_trained(service: Service, name: str, body: MarkTrainedBody) -> dict[str, Any]:
    stores = service.traffic_stores(name)
    if not stores:
        raise ValueError(f"{name!r} has no recorded traffic to mark.")
    stores[0].mark_trained([(cid, int(idx)) for cid, idx in body.keys], body.step, body.outcome)
    return {"marked": len(body.keys)}


_SYNC_OPS: dict[str, Any] = {
    "datums": _datums,
    "sft_datums": _sft_datums,
    "forward": _forward,
    "forward_backward": _forward_backward,
    "optim_step": _optim_step,
    "save_weights": _save_weights,
    "log_metrics": _log_metrics,
    "restore": _restore,
    "online_start": _online_start,
    "promote": _promote,
    "online_traffic": _online_traffic,
    "mark_trained": _mark_trained,
}


async def _sample(service: Service, name: str, body: SampleBody) -> dict[str, Any]:
    # Resolving (maybe loading an older step's adapter), rendering and tokenizing happen on a worker thread.
    weights, ids, params = await asyncio.to_thread(_sample_request, service, name, body)
    completions = await weights.engine.generate(ids, params, weights.adapter)
    return {
        "prompt_tokens": ids,
        "sequences": [
            {"tokens": c.token_ids, "logprobs": c.logprobs, "text": c.text, "finish_reason": c.finish_reason}
            for c in completions
        ],
        "weights": f"{name}@{weights.step}",
    }


def _sample_request(
    service: Service, name: str, body: SampleBody
) -> tuple[Weights, list[int], SamplingParams]:
    try:
        weights = service.resolve(name if body.step is None else f"{name}@{body.step}")
    except UnknownServedModel as exc:  # a missing step is bad input, not an unregistered model
        raise ValueError(str(exc.args[0])) from None
    engine = weights.engine
    if isinstance(body.prompt[0], int):
        ids = [int(t) for t in body.prompt]  # type: ignore[arg-type]
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}).")
    else:
        messages: list[dict[str, Any]] = body.prompt  # type: ignore[assignment]
        validate_messages(messages)
        text = render_prompt(engine.tokenizer, messages, tools=body.tools)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, n=body.n
    )
    params.validate()
    engine.check_fits(len(ids), params.max_tokens)
    return weights, ids, params


async def _logprobs(service: Service, name: str, body: LogprobsBody) -> dict[str, Any]:
    weights = await asyncio.to_thread(_scoring_weights, service, name, body.model)
    logprobs = await asyncio.wrap_future(weights.engine.score(body.sequences, weights.adapter))
    return {"logprobs": logprobs, "weights": weights.info()}


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


# ------------------------------------------------------------------------------ conversions


MAX_ABS_REWARD = 1e12  # the reward statistics square rewards: far below this, they never overflow


def check_group(group: TrajectoryGroup, vocab_size: int | None = None) -> None:
    """Refuse a group that training or logging would choke on, saying which trajectory and what to send:
    rewards that are not finite or beyond ±MAX_ABS_REWARD, and Choices whose `token_ids` are not ids of the
    vocabulary (of `vocab_size` ids, when given) or whose `token_logprobs` are not finite numbers."""
    for ti, t in enumerate(group.trajectories):
        if not math.isfinite(t.reward) or abs(t.reward) > MAX_ABS_REWARD:
            raise ValueError(
                f"Trajectory {ti} has reward {t.reward!r}; rewards must be finite numbers within "
                f"±{MAX_ABS_REWARD:g}. Rescale the reward function's output."
            )
        for k, item in enumerate(t.messages_and_choices):
            if isinstance(item, Choice):
                _check_choice(
                    item.model_extra or {}, f"Trajectory {ti}, messages_and_choices[{k}]", vocab_size
                )


def _check_choice(extra: dict[str, Any], where: str, vocab_size: int | None) -> None:
    ids, lps = extra.get("token_ids"), extra.get("token_logprobs")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise ValueError(
                f"{where}: token_ids must be a list of integer token ids, as the backend sent them."
            )
        bad = [x for x in ids if vocab_size is not None and not 0 <= x < vocab_size]
        if bad:
            raise ValueError(
                f"{where}: token_ids has {bad[0]}, outside the vocabulary [0, {vocab_size}); send the ids the "
                "backend sampled."
            )
    if lps is not None:
        if not isinstance(lps, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in lps
        ):
            raise ValueError(
                f"{where}: token_logprobs must be a list of finite numbers (no NaN or infinity); send the "
                "logprobs the backend returned."
            )
    if isinstance(ids, list) and isinstance(lps, list) and len(ids) != len(lps):
        raise ValueError(
            f"{where}: {len(ids)} token_ids but {len(lps)} token_logprobs; send one logprob per id."
        )
    forced = extra.get("forced_token_indices")
    if forced is not None and not (
        isinstance(forced, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(ids or []) for i in forced)
    ):
        raise ValueError(
            f"{where}: forced_token_indices must be a list of indices into token_ids, as the backend sent it."
        )


def _read(from_dict: Callable[[dict[str, Any]], R], d: dict[str, Any], where: str, kind: str) -> R:
    try:
        out = from_dict(d)
    except KeyError as exc:
        raise ValueError(f"{where} does not read as {kind}.to_dict(): it has no {exc.args[0]!r}.") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where} does not read as {kind}.to_dict(): {type(exc).__name__}: {exc}") from exc
    if isinstance(out, TrajectoryGroup):
        try:
            check_group(out)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return out


def _internal(trainer: Trainer, datums: list[Datum]) -> list[TrainDatum]:
    for i, d in enumerate(datums):  # before int(): int(inf) is an OverflowError, not a message
        bad = [m for m in d.loss_mask if m not in (0.0, 1.0)]
        if bad:
            raise ValueError(f"Datum {i}: loss_mask has {bad[0]!r}; its values must be 0 or 1 (1: trained).")
    out = [
        TrainDatum(d.input_ids, [int(m) for m in d.loss_mask], d.logprobs, d.advantage, d.extras)
        for d in datums
    ]
    base = trainer.model.get_base_model()
    max_len = int(getattr(base.config, "max_position_embeddings", 2048))
    primitives.check_datums(out, int(base.config.vocab_size), max_len)
    return out


def _public(d: TrainDatum) -> dict[str, Any]:
    return Datum(
        input_ids=d.input_ids,
        loss_mask=[float(m) for m in d.loss_mask],
        advantage=d.advantage,
        logprobs=d.old_logprobs,
        extras=d.extras,
    ).model_dump(mode="json")
