"""The embedded backend: the engine, trainer and OpenAI-compatible server, in this process.

Inference goes through the real HTTP server on a free 127.0.0.1 port, so rollouts use exactly the same
client code against LocalBackend as against a remote `advantage serve`. Training runs on a worker thread;
the server keeps answering (from the previous weights) while a step runs.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from advantage import cluster
from advantage.backends.base import TrainResult
from advantage.config import TrainConfig
from advantage.environment import set_engine_defaults
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

if TYPE_CHECKING:
    from advantage.engine.replicas import EngineKind
    from advantage.service import Service


class LocalBackend:
    def __init__(
        self,
        root: str | Path = ".advantage",
        *,
        progress: bool = True,
        trainer_workers: int = 1,
        engine_replicas: int = 1,
        ray_address: str | None = None,
        engine: EngineKind = "torch",
        **engine_kwargs: object,
    ) -> None:
        """`trainer_workers` > 1 (or a `ray_address`) trains each model data-parallel on that many Ray actors
        (`training/ray_workers.py`); `engine_replicas` > 1 (or a `ray_address`) serves each base model from
        that many engine replicas as Ray actors (`engine/replicas.py`). Both need `advantage[ray]` and share one
        cluster: the one at `ray_address`, or a local one with room for both (one CPU per actor). 1 and no
        address keeps the trainer and the engine in this process, and Ray is not imported. `engine`: "torch"
        (`TorchEngine`, CPU or CUDA) or "vllm" (`VLLMEngine` on NVIDIA GPUs, untested so far: README,
        "Scaling out"); `engine_kwargs` go to it."""
        set_engine_defaults()  # before the engine's modules load torch: see advantage.environment
        from advantage import service_ops
        from advantage.engine.replicas import ReplicaPlacement, engine_factory
        from advantage.server.runner import BackgroundServer
        from advantage.service import Service
        from advantage.training.ray_workers import Placement, trainer_factory

        self._ops = service_ops  # loaded here, not at import: it loads torch (see advantage.environment)

        self.root = Path(root)
        trainers = Placement(workers=trainer_workers, ray_address=ray_address)
        replicas = ReplicaPlacement(replicas=engine_replicas, ray_address=ray_address)
        if trainers.uses_ray or replicas.uses_ray:  # the cluster sized for both kinds of actor, first
            cpus = trainers.workers * trainers.cpus_per_worker + replicas.replicas * replicas.cpus_per_replica
            cluster.join(ray_address, cpus, self)
        self.service: Service = Service(
            self.root,
            engine_kwargs=dict(engine_kwargs),
            engine_factory=engine_factory(replicas, dict(engine_kwargs), engine),
            trainer_factory=trainer_factory(trainers),
        )
        self.api_key: str | None = secrets.token_hex(16)  # loopback only, but not open to other local users
        self._server = BackgroundServer(self.service, api_key=self.api_key).start()
        self.base_url = self._server.base_url
        self.progress = progress

    async def register(self, model: ModelSpec) -> int:
        return await asyncio.to_thread(
            self.service.register,
            model.project,
            model.name,
            model.base_model,
            model.lora,
            model.fork_from,
            model.record_traffic,
            model.background_samples,
        )

    async def train(
        self, model: ModelSpec, groups: list[TrajectoryGroup], config: TrainConfig
    ) -> TrainResult:
        bar = tqdm(total=0, desc=f"train {model.name}", unit="mb", leave=False, disable=not self.progress)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        self._ops.accept_groups(self.service, model.name, groups, "train")  # the boundary: checked once, here
        try:
            step, metrics = await self.service.train_async(model.name, groups, config, progress)
        finally:
            bar.close()
        return TrainResult(step, metrics)

    async def get_step(self, model: ModelSpec) -> int:
        return self.service.model_entry(model.name).latest

    async def log(
        self, model: ModelSpec, groups: list[TrajectoryGroup], split: str, step: int | None = None
    ) -> dict[str, float]:
        return await asyncio.to_thread(self.service.log_groups, model.name, groups, split, step)

    async def feedback(self, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        from advantage.online.feedback import give_feedback

        def run() -> dict[str, Any]:
            stores = self.service.traffic_stores(model.name)
            return vars(give_feedback(stores, **body))

        return await asyncio.to_thread(run)  # SQLite reads and writes block

    async def delete_checkpoints(self, model: ModelSpec, keep: str, metric: str) -> list[int]:
        return await asyncio.to_thread(self.service.delete_checkpoints, model.name, keep, metric)

    # ------------------------------------------------------------------ the low-level operations
    async def datums(self, model: ModelSpec, req: DatumsRequest) -> DatumsReply:
        return await self._ops.datums(self.service, model.name, req)

    async def sft_datums(self, model: ModelSpec, req: SFTDatumsRequest) -> DatumsReply:
        return await self._ops.sft_datums(self.service, model.name, req)

    async def forward(self, model: ModelSpec, req: ForwardRequest) -> ForwardReply:
        return await self._ops.forward(self.service, model.name, req)

    async def forward_backward(self, model: ModelSpec, req: ForwardBackwardRequest) -> ForwardBackwardOutput:
        return await self._ops.forward_backward(self.service, model.name, req)

    async def optim_step(self, model: ModelSpec, req: OptimStepRequest) -> OptimStepReply:
        return await self._ops.optim_step(self.service, model.name, req)

    async def save_weights(self, model: ModelSpec, req: SaveWeightsRequest) -> SaveWeightsReply:
        return await self._ops.save_weights(self.service, model.name, req)

    async def log_metrics(self, model: ModelSpec, req: LogMetricsRequest) -> StepReply:
        return await self._ops.log_metrics(self.service, model.name, req)

    async def sample(self, model: ModelSpec, req: SampleRequest) -> SampleOutput:
        return await self._ops.sample(self.service, model.name, req)

    async def logprobs(self, model: ModelSpec, req: LogprobsRequest) -> LogprobsReply:
        return await self._ops.logprobs(self.service, model.name, req)

    async def restore(self, model: ModelSpec, req: RestoreRequest) -> RestoreReply:
        return await self._ops.restore(self.service, model.name, req)

    async def online_start(self, model: ModelSpec, req: OnlineStartRequest) -> OnlineStartReply:
        return await self._ops.online_start(self.service, model.name, req)

    async def promote(self, model: ModelSpec, req: PromoteRequest) -> PromoteReply:
        return await self._ops.promote(self.service, model.name, req)

    async def online_traffic(self, model: ModelSpec, req: OnlineTrafficRequest) -> OnlineTrafficReply:
        return await self._ops.online_traffic(self.service, model.name, req)

    async def online_unjudged(self, model: ModelSpec, req: OnlineUnjudgedRequest) -> OnlineUnjudgedReply:
        return await self._ops.online_unjudged(self.service, model.name, req)

    async def online_judged(self, model: ModelSpec, req: OnlineJudgedRequest) -> OnlineJudgedReply:
        return await self._ops.online_judged(self.service, model.name, req)

    async def mark_trained(self, model: ModelSpec, req: MarkTrainedRequest) -> MarkTrainedReply:
        return await self._ops.mark_trained(self.service, model.name, req)

    def run_dir(self, model: ModelSpec) -> Path:
        entry = self.service.model_entry(model.name)
        assert entry.run_dir is not None
        return entry.run_dir

    async def close(self) -> None:
        self._server.stop()
        self.service.close()
        cluster.leave(self)  # a local Ray cluster started for this backend stops (a no-op without one)
