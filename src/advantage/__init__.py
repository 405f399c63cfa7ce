"""advantage: train LLM agents with reinforcement learning.

Importing it changes no environment variable and loads no torch: the engine's defaults are set when an
engine starts (see `advantage.environment`).
"""

from advantage.backends.base import Backend, TrainResult
from advantage.backends.local import LocalBackend
from advantage.backends.remote import BackendUnavailableError, RemoteBackend
from advantage.config import (
    AdamParams,
    LoRAConfig,
    LossConfig,
    LRSchedule,
    OnlineConfig,
    SFTConfig,
    TrainConfig,
)
from advantage.curriculum import TaskMix, apportion
from advantage.distill import distill_datums, reverse_kl_advantages, topk_datums
from advantage.gather import (
    RolloutError,
    gather_informative_groups,
    gather_trajectory_groups,
    is_informative,
)
from advantage.health import CollapseGuard, HealthBands, health_warnings, paired_drop_p
from advantage.lowlevel import TrainingClient
from advantage.model import Model, TrainableModel
from advantage.rewards import JudgeVerdict, RulerError, RulerJudge, ruler, ruler_score_group
from advantage.scaling import ScalingFit, fit_scaling_curve
from advantage.trajectory import Trajectory, TrajectoryGroup
from advantage.wire.datum import Datum
from advantage.wire.ops import ForwardBackwardOutput, ModelSpec, SampleOutput

__all__ = [
    "AdamParams",
    "Datum",
    "ForwardBackwardOutput",
    "SampleOutput",
    "SFTConfig",
    "LossConfig",
    "ModelSpec",
    "TrainingClient",
    "Backend",
    "BackendUnavailableError",
    "RemoteBackend",
    "JudgeVerdict",
    "RulerError",
    "RulerJudge",
    "ScalingFit",
    "fit_scaling_curve",
    "ruler",
    "ruler_score_group",
    "LocalBackend",
    "LoRAConfig",
    "LRSchedule",
    "CollapseGuard",
    "HealthBands",
    "health_warnings",
    "paired_drop_p",
    "Model",
    "OnlineConfig",
    "RolloutError",
    "TrainConfig",
    "TrainResult",
    "TrainableModel",
    "Trajectory",
    "TrajectoryGroup",
    "gather_informative_groups",
    "gather_trajectory_groups",
    "is_informative",
    "TaskMix",
    "apportion",
    "distill_datums",
    "reverse_kl_advantages",
    "topk_datums",
]
