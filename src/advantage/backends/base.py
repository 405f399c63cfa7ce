"""The backend protocol: what `TrainableModel` needs from wherever training and inference run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from advantage.config import TrainConfig
from advantage.trajectory import TrajectoryGroup

if TYPE_CHECKING:
    from advantage.model import TrainableModel


@dataclass
class TrainResult:
    step: int  # the step the model is at after training (served at once as name@step)
    metrics: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    base_url: str  # the OpenAI-compatible root, ".../v1"
    api_key: str | None

    async def register(self, model: TrainableModel) -> int: ...

    async def train(
        self, model: TrainableModel, groups: list[TrajectoryGroup], config: TrainConfig
    ) -> TrainResult: ...

    async def get_step(self, model: TrainableModel) -> int: ...

    async def log(
        self, model: TrainableModel, groups: list[TrajectoryGroup], split: str
    ) -> dict[str, float]: ...

    async def feedback(self, model: TrainableModel, body: dict[str, Any]) -> dict[str, Any]:
        """Feedback on a recorded completion (`POST /v1/feedback`'s body and answer)."""
        ...

    async def delete_checkpoints(self, model: TrainableModel, keep: str, metric: str) -> list[int]: ...

    async def primitive(self, model: TrainableModel, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One low-level operation (see `advantage.lowlevel` and `advantage.service_ops`)."""
        ...

    async def close(self) -> None: ...
