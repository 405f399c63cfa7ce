"""advantage: train LLM agents with reinforcement learning."""

from advantage.trajectory import Trajectory, TrajectoryGroup

__all__ = ["Trajectory", "TrajectoryGroup"]
