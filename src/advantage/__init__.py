"""advantage: train LLM agents with reinforcement learning."""

from advantage.backends.base import Backend, TrainResult
from advantage.backends.local import LocalBackend
from advantage.config import LoRAConfig, TrainConfig
from advantage.gather import RolloutError, gather_trajectory_groups
from advantage.model import Model, TrainableModel
from advantage.trajectory import Trajectory, TrajectoryGroup

__all__ = [
    "Backend",
    "LocalBackend",
    "LoRAConfig",
    "Model",
    "RolloutError",
    "TrainConfig",
    "TrainResult",
    "TrainableModel",
    "Trajectory",
    "TrajectoryGroup",
    "gather_trajectory_groups",
]
