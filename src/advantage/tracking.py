"""The run log: `<run>/metrics.jsonl` (one row per training step or evaluation) and the trajectories of
every split and step under `<run>/trajectories/<split>/<step:04d>.jsonl`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from advantage.trajectory import TrajectoryGroup


def group_metrics(groups: list[TrajectoryGroup], prefix: str) -> dict[str, float]:
    """Reward mean/std and the mean of every trajectory metric, named `<prefix>/<name>`."""
    trajs = [t for g in groups for t in g.trajectories]
    out: dict[str, float] = {f"{prefix}/n_trajectories": float(len(trajs))}
    out[f"{prefix}/exceptions"] = float(sum(len(g.exceptions) for g in groups))
    if not trajs:
        return out
    rewards = [t.reward for t in trajs]
    mean = sum(rewards) / len(rewards)
    out[f"{prefix}/reward"] = mean
    out[f"{prefix}/reward_std"] = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    keys = sorted({k for t in trajs for k in t.metrics})
    for k in keys:
        vals = [float(t.metrics[k]) for t in trajs if k in t.metrics]
        out[f"{prefix}/{k}"] = sum(vals) / len(vals)
    return out


class RunLog:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"

    def append(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "split": split, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_trajectories(self, split: str, step: int, groups: list[TrajectoryGroup]) -> Path:
        out = self.dir / "trajectories" / split / f"{step:04d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for gi, g in enumerate(groups):
                f.write(json.dumps({"group": gi, **g.to_dict()}) + "\n")
        return out

    def rows(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
        return rows

    def metric_by_step(self, metric: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for r in self.rows():
            if metric in r:
                out[int(r["step"])] = float(r[metric])
        return out
