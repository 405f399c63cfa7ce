"""The run log: `<run>/metrics.jsonl` (one row per training step or evaluation) and the trajectories of
every split and step under `<run>/trajectories/<split>/<step:04d>.jsonl`.

When WANDB_API_KEY is set and `wandb` is installed (`pip install 'advantage[wandb]'`), every metrics row
also goes to W&B under the same names and step. Without the key, `wandb` is never imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import warnings
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


_wandb_runs: dict[Path, Any] = {}  # run dir -> its W&B run, or None when W&B could not start (per process)
_wandb_lock = threading.Lock()


def _wandb_run(run_dir: Path) -> Any | None:
    """The W&B run that mirrors `run_dir`, started on first use; None when W&B is off."""
    if not os.environ.get("WANDB_API_KEY"):
        return None
    key = run_dir.resolve()
    with _wandb_lock:
        if key not in _wandb_runs:
            _wandb_runs[key] = _start_wandb(key)
        return _wandb_runs[key]


def _start_wandb(run_dir: Path) -> Any | None:
    """A W&B run named after the model in the project's W&B project (`<root>/<project>/models/<name>`). Its
    id comes from the run dir, so a resumed training run appends to the same W&B run. A dashboard that
    cannot start warns and never stops training: metrics.jsonl still has everything."""
    try:
        import wandb
    except ImportError:
        warnings.warn(
            "WANDB_API_KEY is set but wandb is not installed, so metrics go to metrics.jsonl only. "
            "Install it with `pip install 'advantage[wandb]'`, or unset WANDB_API_KEY.",
            stacklevel=4,
        )
        return None
    project, name = run_dir.parent.parent.name or "advantage", run_dir.name
    run_id = f"{name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"
    try:
        return wandb.init(
            project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), reinit="create_new"
        )
    except Exception as e:  # a bad key, no network: W&B's own errors vary by version
        warnings.warn(
            f"W&B did not start ({type(e).__name__}: {e}), so metrics go to metrics.jsonl only. Check "
            "WANDB_API_KEY (or set WANDB_MODE=offline), or unset WANDB_API_KEY to turn W&B off.",
            stacklevel=4,
        )
        return None


class RunLog:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"

    def append(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "split": split, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        run = _wandb_run(self.dir)
        if run is not None:
            run.log(dict(metrics), step=step)

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
