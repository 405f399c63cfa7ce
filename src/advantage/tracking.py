"""The run log: `<run>/metrics.jsonl` (one row per training step or evaluation) and the trajectories of
every split and step under `<run>/trajectories/<split>/<step:04d>.jsonl`.

When WANDB_API_KEY is set and `wandb` is installed (`pip install 'advantage[wandb]'`), every metrics row
also goes to W&B under the same names and step. Without the key, `wandb` is never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from advantage.trajectory import TrajectoryGroup
from advantage.wire.ops import RESERVED, check_metric_names

__all__ = ["RESERVED", "RunLog", "check_metric_names", "group_metrics", "policy_lag"]
_append_lock = threading.Lock()  # one writer at a time, so rows from two threads never interleave


def group_metrics(groups: list[TrajectoryGroup], prefix: str) -> dict[str, float]:
    """Reward mean/std and the mean of every trajectory metric, named `<prefix>/<name>`."""
    trajs = [t for g in groups for t in g.trajectories]
    out: dict[str, float] = {f"{prefix}/n_trajectories": float(len(trajs))}
    out[f"{prefix}/exceptions"] = float(sum(len(g.exceptions) for g in groups))
    if not trajs:
        return out
    rewards = [t.reward for t in trajs]
    # statistics.mean and pstdev sum exactly, so rewards near the float limit (the server refuses them; a
    # local caller may not) give their true mean and std instead of overflowing.
    out[f"{prefix}/reward"] = statistics.mean(rewards)
    out[f"{prefix}/reward_std"] = statistics.pstdev(rewards)
    keys = sorted({k for t in trajs for k in t.metrics})
    for k in keys:
        vals = [float(t.metrics[k]) for t in trajs if k in t.metrics]
        out[f"{prefix}/{k}"] = statistics.mean(vals)
    return out


def policy_lag(groups: list[TrajectoryGroup], model: str, step: int) -> dict[str, float]:
    """How many updates behind the weights being trained (`model` at `step`) the groups' completions were
    sampled: the mean and the most over the completions that say they came from `model` (none: {}). 0 is
    on-policy; a step trained while the next step's rollouts gathered gives its successor about 1."""
    lags = [
        step - int(w["step"])
        for g in groups
        for t in g.trajectories
        for c in t.choices()
        if (w := (c.model_extra or {}).get("weights") or {}).get("model") == model and "step" in w
    ]
    if not lags:
        return {}
    return {"policy_lag_mean": float(statistics.mean(lags)), "policy_lag_max": float(max(lags))}


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

    def append(self, step: int, split: str, metrics: Mapping[str, float | str]) -> None:
        """One row, on disk (fsynced) before this returns. A last line left without its newline by a crash
        is ended first, so the new row is not glued to the torn one."""
        check_metric_names(dict(metrics))
        self.dir.mkdir(parents=True, exist_ok=True)
        data = (json.dumps({"step": step, "split": split, "time": time.time(), **metrics}) + "\n").encode()
        with _append_lock, open(self.metrics_path, "a+b") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)  # "a" mode: always at the end, wherever the read left the position
            f.flush()
            os.fsync(f.fileno())
        run = _wandb_run(self.dir)
        if run is not None:
            run.log(dict(metrics), step=step)

    def write_trajectories(self, split: str, step: int, groups: list[TrajectoryGroup]) -> Path:
        out = self.dir / "trajectories" / split / f"{step:04d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with _append_lock, open(out, "a") as f:
            for gi, g in enumerate(groups):
                f.write(json.dumps({"group": gi, **g.to_dict()}) + "\n")
        return out

    def rows(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        text = self.metrics_path.read_bytes().decode("utf-8", errors="replace")  # a cut may split a character
        return [row for line in text.splitlines() for row in _rows_in_line(line)]

    def numeric_metrics(self) -> list[str]:
        """The metrics with a number in some row (what `metric_by_step` can rank steps by)."""
        names = {k for r in self.rows() for k, v in r.items() if _is_number(v)}
        return sorted(names - set(RESERVED))

    def metric_by_step(self, metric: str) -> dict[int, float]:
        if metric in RESERVED:
            raise ValueError(
                f"{metric!r} is a bookkeeping column of metrics.jsonl, not a metric; use one of the numeric "
                f"metrics: {', '.join(self.numeric_metrics()) or '(none logged yet)'}."
            )
        out: dict[int, float] = {}
        for r in self.rows():
            if metric not in r:
                continue
            if not _is_number(r[metric]):
                raise ValueError(
                    f"Metric {metric!r} is not numeric (step {r.get('step')} has {r[metric]!r}); use one of the "
                    f"numeric metrics: {', '.join(self.numeric_metrics()) or '(none logged yet)'}."
                )
            if _is_number(r.get("step")):
                out[int(r["step"])] = float(r[metric])
        return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rows_in_line(line: str) -> list[dict[str, Any]]:
    """The rows in one line of metrics.jsonl. A crash mid-write leaves a torn row, and a writer that did
    not end it first glued the next row onto it: keep every whole row in the line, drop only the torn part."""
    line = line.strip()
    if not line:
        return []
    try:
        row = json.loads(line)
        return [row] if isinstance(row, dict) else []
    except json.JSONDecodeError:
        pass
    rows: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    pos = line.find("{", 1)
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(line, pos)
        except json.JSONDecodeError:
            pos = line.find("{", pos + 1)
            continue
        if isinstance(obj, dict) and "step" in obj and "split" in obj:
            rows.append(obj)
            pos = line.find("{", end)
        else:
            pos = line.find("{", pos + 1)
    return rows
