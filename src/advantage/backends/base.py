"""The backend protocol: what `TrainableModel` and `TrainingClient` need from wherever training and inference
run. Each call names the model by its `ModelSpec` (a plain record: name, project, base model, LoRA), and
each low-level operation is a method with a typed request and reply (`advantage.wire.ops`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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


@dataclass
class TrainResult:
    step: int  # the step the model is at after training (served at once as name@step)
    metrics: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    base_url: str  # the OpenAI-compatible root, ".../v1"
    api_key: str | None

    async def register(self, model: ModelSpec) -> int:
        """Register (or resume) the model; returns its latest step."""
        ...

    async def train(
        self, model: ModelSpec, groups: list[TrajectoryGroup], config: TrainConfig
    ) -> TrainResult:
        """One GRPO step; returns the new step, served before this returns."""
        ...

    async def get_step(self, model: ModelSpec) -> int: ...

    async def log(
        self, model: ModelSpec, groups: list[TrajectoryGroup], split: str, step: int | None = None
    ) -> dict[str, float]: ...

    async def feedback(self, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        """Feedback on a recorded completion (`POST /v1/feedback`'s body and answer)."""
        ...

    async def delete_checkpoints(self, model: ModelSpec, keep: str, metric: str) -> list[int]: ...

    # The low-level API (`advantage.lowlevel`; the server side is `advantage.service_ops`).
    async def datums(self, model: ModelSpec, req: DatumsRequest) -> DatumsReply: ...

    async def sft_datums(self, model: ModelSpec, req: SFTDatumsRequest) -> DatumsReply: ...

    async def forward(self, model: ModelSpec, req: ForwardRequest) -> ForwardReply: ...

    async def forward_backward(
        self, model: ModelSpec, req: ForwardBackwardRequest
    ) -> ForwardBackwardOutput: ...

    async def optim_step(self, model: ModelSpec, req: OptimStepRequest) -> OptimStepReply: ...

    async def save_weights(self, model: ModelSpec, req: SaveWeightsRequest) -> SaveWeightsReply: ...

    async def log_metrics(self, model: ModelSpec, req: LogMetricsRequest) -> StepReply: ...

    async def sample(self, model: ModelSpec, req: SampleRequest) -> SampleOutput: ...

    async def logprobs(self, model: ModelSpec, req: LogprobsRequest) -> LogprobsReply: ...

    async def restore(self, model: ModelSpec, req: RestoreRequest) -> RestoreReply: ...

    # The online trainer's (`advantage.online.trainer`).
    async def online_start(self, model: ModelSpec, req: OnlineStartRequest) -> OnlineStartReply: ...

    async def promote(self, model: ModelSpec, req: PromoteRequest) -> PromoteReply: ...

    async def online_traffic(self, model: ModelSpec, req: OnlineTrafficRequest) -> OnlineTrafficReply: ...

    async def online_unjudged(self, model: ModelSpec, req: OnlineUnjudgedRequest) -> OnlineUnjudgedReply: ...

    async def online_judged(self, model: ModelSpec, req: OnlineJudgedRequest) -> OnlineJudgedReply: ...

    async def mark_trained(self, model: ModelSpec, req: MarkTrainedRequest) -> MarkTrainedReply: ...

    async def close(self) -> None: ...
