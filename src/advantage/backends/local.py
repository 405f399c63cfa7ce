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

from advantage.backends.base import TrainResult
from advantage.config import TrainConfig
from advantage.environment import set_engine_defaults
from advantage.trajectory import TrajectoryGroup

if TYPE_CHECKING:
    from advantage.model import TrainableModel
    from advantage.service import Service


class LocalBackend:
    def __init__(
        self,
        root: str | Path = ".advantage",
        *,
        progress: bool = True,
        trainer_workers: int = 1,
        ray_address: str | None = None,
        **engine_kwargs: object,
    ) -> None:
        """`trainer_workers` > 1 (or a `ray_address`) trains each model data-parallel on that many Ray actors
        (`training/ray_workers.py`; needs `advantage[ray]`); 1 and no address keeps the in-process trainer."""
        set_engine_defaults()  # before the engine's modules load torch: see advantage.environment
        from advantage.server.runner import BackgroundServer
        from advantage.service import Service
        from advantage.training.ray_workers import Placement, trainer_factory

        self.root = Path(root)
        factory = trainer_factory(Placement(workers=trainer_workers, ray_address=ray_address))
        self.service: Service = Service(self.root, engine_kwargs=dict(engine_kwargs), trainer_factory=factory)
        self.api_key: str | None = secrets.token_hex(16)  # loopback only, but not open to other local users
        self._server = BackgroundServer(self.service, api_key=self.api_key).start()
        self.base_url = self._server.base_url
        self.progress = progress

    async def register(self, model: TrainableModel) -> int:
        return await asyncio.to_thread(
            self.service.register,
            model.project,
            model.name,
            model.base_model,
            model.lora,
            model.fork_from,
            model.record_traffic,
        )

    async def train(
        self, model: TrainableModel, groups: list[TrajectoryGroup], config: TrainConfig
    ) -> TrainResult:
        bar = tqdm(total=0, desc=f"train {model.name}", unit="mb", leave=False, disable=not self.progress)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            step, metrics = await self.service.train_async(model.name, groups, config, progress)
        finally:
            bar.close()
        return TrainResult(step, metrics)

    async def get_step(self, model: TrainableModel) -> int:
        return self.service.model_entry(model.name).latest

    async def log(self, model: TrainableModel, groups: list[TrajectoryGroup], split: str) -> dict[str, float]:
        return await asyncio.to_thread(self.service.log_groups, model.name, groups, split)

    async def feedback(self, model: TrainableModel, body: dict[str, Any]) -> dict[str, Any]:
        from advantage.online.feedback import give_feedback

        def run() -> dict[str, Any]:
            stores = self.service.traffic_stores(model.name)
            return vars(give_feedback(stores, **body))

        return await asyncio.to_thread(run)  # SQLite reads and writes block

    async def delete_checkpoints(self, model: TrainableModel, keep: str, metric: str) -> list[int]:
        return await asyncio.to_thread(self.service.delete_checkpoints, model.name, keep, metric)

    async def primitive(self, model: TrainableModel, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        from advantage.service_ops import run_op

        return await run_op(self.service, model.name, op, payload)

    def run_dir(self, model: TrainableModel) -> Path:
        entry = self.service.model_entry(model.name)
        assert entry.run_dir is not None
        return entry.run_dir

    async def close(self) -> None:
        self._server.stop()
        self.service.close()
