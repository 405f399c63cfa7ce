"""Requests and replies of the backend's operations, one pair per operation.

`LocalBackend` passes them in-process and `RemoteBackend` sends them as JSON to
`/v1/training/models/{name}/{op}` (the register, train and log routes take `ModelSpec`, `TrainRequest` and
`LogRequest`); either way the server side (`advantage.service_ops`) runs the same typed function. Bad input
raises ValueError (pydantic's ValidationError is one) where the request is built or read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from advantage.config import AdamParams, LoRAConfig, LossConfig, LossName, TrainConfig
from advantage.wire.datum import MAX_TOP_K, Datum
from advantage.wire.records import GroupRecord

RESERVED = ("step", "split", "time")  # metrics.jsonl's own columns: no metric may take these names
LINEAR = "linear"  # the backend's loss Σ w·logp, with w in extras["logprob_grad"] (how custom losses run)


def check_metric_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """Refuse user metrics named like a bookkeeping column of metrics.jsonl (they would overwrite it)."""
    taken = sorted(k for k in metrics if k in RESERVED)
    if taken:
        raise ValueError(
            f"metrics {taken} use reserved names: {', '.join(RESERVED)} are metrics.jsonl's own columns "
            "(which step, which split, when). Rename them, e.g. 'my_step'."
        )
    return metrics


UserMetrics = Annotated[dict[str, float], AfterValidator(check_metric_names)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------ the model and its steps


class ModelSpec(_Wire):
    """What a backend needs to know of a trainable model (the register request)."""

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
    background_samples: int = Field(
        0,
        ge=0,
        le=16,
        description="Record this many extra samples of every recorded request, never returned to the caller "
        "(choices n..n+k-1, marked background), so each request is a group once a judge scores it. Sampled "
        "in the caller's batch; needs record_traffic. Each register sets it anew.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.background_samples and not self.record_traffic:
            raise ValueError(
                "background_samples are recorded traffic: set record_traffic=True with them (or leave them 0)."
            )
        return self


class TrainRequest(_Wire):
    groups: list[GroupRecord]
    config: TrainConfig = Field(default_factory=TrainConfig)


class LogRequest(_Wire):
    groups: list[GroupRecord]
    split: str = "val"
    step: int | None = Field(
        None, ge=0, description="The step whose weights were evaluated (default: the latest step)."
    )


class DeleteCheckpointsRequest(_Wire):
    keep: Literal["best+latest", "latest"] = "best+latest"
    metric: str = "val/reward"


# ------------------------------------------------------------------------------ the low-level primitives


class DatumsRequest(_Wire):
    groups: list[GroupRecord] = Field(description="`TrajectoryGroup.to_dict()` items.")
    config: TrainConfig = Field(default_factory=TrainConfig)
    skip_zero_variance: bool = Field(
        True, description="Give no datums for groups whose rewards are all equal (False: every trajectory)."
    )


class SFTDatumsRequest(_Wire):
    trajectories: list[dict[str, Any]] = Field(min_length=1, description="`Trajectory.to_dict()` items.")
    max_seq_len: int = Field(2048, ge=16, le=131072)
    on_overflow: Literal["error", "truncate"] = "error"
    where: list[str] | None = Field(
        None,
        description="A name per trajectory for errors (e.g. 'data.jsonl, line 7'); default 'Trajectory i'.",
    )


class DatumsReply(_Wire):
    datums: list[Datum]
    metrics: dict[str, float] = Field(default_factory=dict)


class ForwardRequest(_Wire):
    datums: list[Datum] = Field(min_length=1)
    micro_batch_size: int = Field(8, ge=1, le=256)


class ForwardReply(_Wire):
    logprobs: list[list[float]]  # per datum, aligned to input_ids (0.0 where unmasked)


class ForwardBackwardRequest(ForwardRequest):
    loss: LossName | Literal["linear"] = "cispo"
    loss_config: LossConfig = Field(default_factory=LossConfig)


class ForwardBackwardOutput(BaseModel):
    logprobs: list[list[float]]  # per datum, aligned to input_ids (0.0 where unmasked)
    metrics: dict[str, float]


class OptimStepRequest(_Wire):
    adam: AdamParams = Field(default_factory=AdamParams)


class OptimStepReply(_Wire):
    metrics: dict[str, float]  # {"grad_norm": ...}


class SaveWeightsRequest(_Wire):
    metrics: UserMetrics = Field(
        default_factory=dict, description="Logged at the new step; not named step, split or time."
    )
    split: str = "train"


class SaveWeightsReply(_Wire):
    step: int
    name: str  # name@step, served at once


class LogMetricsRequest(_Wire):
    metrics: UserMetrics = Field(
        min_length=1, description="Logged at the latest step; not named step, split or time."
    )
    split: str = "val"


class StepReply(_Wire):
    step: int


class SampleRequest(_Wire):
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


class SampledSequence(BaseModel):
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


class SampleOutput(BaseModel):
    prompt_tokens: list[int]
    sequences: list[SampledSequence]
    weights: str  # the name@step that sampled


class LogprobsRequest(_Wire):
    sequences: list[Annotated[list[int], Field(min_length=1)]] = Field(
        min_length=1, description="Token ids; each sequence is scored whole."
    )
    model: str | None = Field(
        None,
        description="The served weights that score them: `name@step`, `name` (its latest step) or a base "
        "model; it must share this model's tokenizer. Default: this model's latest step.",
    )
    top_k: int = Field(
        0,
        ge=0,
        le=MAX_TOP_K,
        description="Also return each position's top_k most likely tokens and their logprobs (distillation).",
    )


class WeightsInfo(_Wire):
    model: str
    step: int


class LogprobsReply(_Wire):
    logprobs: list[list[float]]
    weights: WeightsInfo
    top_ids: list[list[list[int]]] = Field(
        default_factory=list,
        description="With top_k: [sequence][position] the top_k token ids, most likely first.",
    )
    top_logprobs: list[list[list[float]]] = Field(
        default_factory=list, description="With top_k: their logprobs, aligned to top_ids."
    )


class RestoreRequest(_Wire):
    step: int | None = Field(None, ge=0, description="Step to go back to; default: the best by `metric`.")
    metric: str = Field("val/reward", description="metrics.jsonl column that picks the best step.")


class RestoreReply(_Wire):
    step: int
    name: str
    restored_from: int


# ------------------------------------------------------------------------------ the online trainer's


class OnlineStartRequest(_Wire):
    pass


class OnlineStartReply(_Wire):
    default: int
    latest: int


class PromoteRequest(_Wire):
    step: int = Field(ge=1, description="The step the promotion gate judged.")
    accept: bool = Field(
        description="True: it becomes the default; False: training goes back to the default."
    )
    metrics: UserMetrics = Field(
        default_factory=dict, description="Logged with it under split 'online' (the gate's scores)."
    )


class PromoteReply(_Wire):
    default: int


class OnlineTrafficRequest(_Wire):
    kind: Literal["untrained", "promoted", "golden"] = Field(
        "untrained",
        description="Rated choices not trained on yet (never golden ones), those in promoted steps (replay), "
        "or the golden set: golden completions' choices rated at least `min_reward`, newest rating first.",
    )
    limit: int | None = Field(None, ge=1, description="At most this many rows.")
    min_reward: float | None = Field(
        None,
        allow_inf_nan=False,
        strict=True,  # a JSON number: not a boolean (lax mode reads false as 0.0)
        description="kind 'golden': only choices rated at least this (None: any explicit feedback).",
    )


class OnlineTrafficReply(_Wire):
    recording: bool
    rows: list[dict[str, Any]]  # `online.store.rewarded_to_dict` rows


class MarkTrainedRequest(_Wire):
    keys: list[tuple[str, int]] = Field(description="(completion id, choice index) pairs.")
    step: int = Field(ge=0, description="The step they went into (or the step trained from, when stale).")
    outcome: Literal["promoted", "rejected", "stale", "skipped"]


class MarkTrainedReply(_Wire):
    marked: int


class OnlineUnjudgedRequest(_Wire):
    min_choices: int = Field(2, ge=2, le=128, description="Only completions with this many choices or more.")
    min_step: int = Field(0, ge=0, description="Only completions sampled from this step or a later one.")
    limit: int = Field(8, ge=1, le=1000, description="At most this many completions, oldest first.")


class OnlineUnjudgedReply(_Wire):
    recording: bool
    completions: list[dict[str, Any]]  # `dataclasses.asdict` of `online.store.RecordedCompletion`


class JudgeScore(_Wire):
    choice: int = Field(ge=0)
    reward: float = Field(ge=0, le=1, allow_inf_nan=False, description="The judge's score, in [0, 1].")
    comment: str | None = Field(None, max_length=4000, description="The judge's explanation.")


class OnlineJudgedRequest(_Wire):
    completion_id: str = Field(min_length=1, max_length=128)
    judge: str = Field(min_length=1, max_length=256, description="The judge model's name.")
    outcome: Literal["scored", "failed"]
    scores: list[JudgeScore] = Field(
        default_factory=list, description="Written to choices without feedback; explicit feedback wins."
    )


class OnlineJudgedReply(_Wire):
    scores: int
