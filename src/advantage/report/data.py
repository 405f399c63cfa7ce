"""What the report shows, read from a run dir: its curves (see `curves.py`) and the trajectories of each
split and step, slimmed to what a reader looks at (messages, tool calls, reward, metrics, logs) without
token ids and logprobs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from advantage.online.activity import traffic_activity
from advantage.report.curves import (
    BestStep,
    Chart,
    FitInfo,
    Series,
    as_number,
    best_step,
    build_charts,
    build_fit,
)
from advantage.tracking import RunLog

MAX_CONTENT_CHARS = 20_000  # per message; a runaway generation should not make the report unopenable
MAX_METADATA_CHARS = 4_000


class MessageView(BaseModel):
    role: str
    content: str
    tool_calls: list[dict[str, str]] = []  # {"name", "arguments"}
    tool_call_id: str | None = None
    sampled: bool = False  # a Choice: the policy produced it and training uses it
    weights_step: int | None = None


class TrajectoryView(BaseModel):
    reward: float | None
    finish_reason: str | None
    metrics: dict[str, float | None]
    logs: list[str]
    messages: list[MessageView]
    tools: list[str]
    metadata: str  # JSON, cut at MAX_METADATA_CHARS


class GroupView(BaseModel):
    index: int
    trajectories: list[TrajectoryView]
    exceptions: list[str]


class ReportData(BaseModel):
    title: str
    run_dir: str
    generated: str
    n_rows: int
    charts: list[Chart]
    fit: FitInfo
    best: BestStep | None  # None: no restore row and no held-out reward to choose by
    # split -> step (as a string: JSON keys) -> groups
    trajectories: dict[str, dict[str, list[GroupView]]]
    omitted_steps: dict[str, int]  # split -> steps left out by max_steps


TRAFFIC_FILE = "traffic.sqlite"  # a recording model's store, in its run dir


def traffic_charts(path: Path) -> list[Chart]:
    """The online view's traffic panels: requests per hour and the share of choices rated, over time."""
    bins, width = traffic_activity(path)
    if not bins:
        return []
    x = [b.start / 60 for b in bins]
    label = "minutes since the first recorded request"
    rate = [(xi, b.per_hour(width)) for xi, b in zip(x, bins, strict=True)]
    rated = [(xi, b.rated_share) for xi, b in zip(x, bins, strict=True) if b.choices]
    return [
        Chart(title="Online: requests per hour", y_label="chat completions / hour", x_label=label,
              series=[Series(name="requests", split="online", points=rate)], headline=True),
        Chart(title="Online: feedback rate", y_label="share of choices rated", x_label=label,
              series=[Series(name="rated", split="online", points=rated)], headline=True),
    ]  # fmt: skip


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                parts.append(str(p.get("text", "")))
            else:
                parts.append(f"[{p.get('type', 'part') if isinstance(p, dict) else 'part'}]")
        text = "\n".join(parts)
    else:
        text = json.dumps(content)
    if len(text) > MAX_CONTENT_CHARS:
        text = text[:MAX_CONTENT_CHARS] + f"\n[… {len(text) - MAX_CONTENT_CHARS} more characters cut]"
    return text


def _tool_calls(calls: Any) -> list[dict[str, str]]:
    out = []
    for c in calls or []:
        fn = (c or {}).get("function") or {}
        args = fn.get("arguments", "")
        out.append(
            {
                "name": str(fn.get("name", "?")),
                "arguments": args if isinstance(args, str) else json.dumps(args),
            }
        )
    return out


def _message(item: dict[str, Any]) -> MessageView:
    if "choice" in item:  # a sampled assistant turn, as recorded by Trajectory.to_dict
        choice = item["choice"] or {}
        msg = choice.get("message") or {}
        step = (choice.get("weights") or {}).get("step")
        return MessageView(
            role=str(msg.get("role") or "assistant"),
            content=_text(msg.get("content")),
            tool_calls=_tool_calls(msg.get("tool_calls")),
            sampled=True,
            weights_step=int(step) if isinstance(step, int) else None,
        )
    msg = item.get("message") or {}
    return MessageView(
        role=str(msg.get("role", "?")),
        content=_text(msg.get("content")),
        tool_calls=_tool_calls(msg.get("tool_calls")),
        tool_call_id=msg.get("tool_call_id"),
    )


def _trajectory(d: dict[str, Any]) -> TrajectoryView:
    meta = json.dumps(d.get("metadata") or {}, indent=1, default=str)
    if len(meta) > MAX_METADATA_CHARS:
        meta = meta[:MAX_METADATA_CHARS] + "\n[… cut]"
    return TrajectoryView(
        reward=as_number(d.get("reward")),
        finish_reason=d.get("finish_reason"),
        metrics={str(k): as_number(v) for k, v in (d.get("metrics") or {}).items()},
        logs=[str(x) for x in d.get("logs") or []],
        messages=[_message(i) for i in d.get("messages_and_choices") or []],
        tools=[str(((t or {}).get("function") or {}).get("name", "?")) for t in d.get("tools") or []],
        metadata=meta,
    )


def read_groups(path: Path) -> list[GroupView]:
    """The groups of one `<split>/<step>.jsonl` file; a line cut by a crash mid-write is skipped."""
    groups: list[GroupView] = []
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        groups.append(
            GroupView(
                index=len(groups),
                trajectories=[_trajectory(t) for t in d.get("trajectories") or []],
                exceptions=[str(e) for e in d.get("exceptions") or []],
            )
        )
    return groups


def _spread(items: list[Path], keep: int) -> list[Path]:
    """At most `keep` items, evenly spaced, always with the first and the last."""
    if len(items) <= keep:
        return items
    if keep <= 1:
        return items[-1:]
    idx = sorted({round(i * (len(items) - 1) / (keep - 1)) for i in range(keep)})
    return [items[i] for i in idx]


def build_trajectories(
    run_dir: Path, max_steps: int
) -> tuple[dict[str, dict[str, list[GroupView]]], dict[str, int]]:
    out: dict[str, dict[str, list[GroupView]]] = {}
    omitted: dict[str, int] = {}
    root = run_dir / "trajectories"
    if not root.is_dir():
        return out, omitted
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted((p for p in split_dir.glob("*.jsonl") if p.stem.isdigit()), key=lambda p: int(p.stem))
        kept = _spread(files, max_steps)
        omitted[split_dir.name] = len(files) - len(kept)
        out[split_dir.name] = {str(int(p.stem)): read_groups(p) for p in kept}
    return out, omitted


def _title(run_dir: Path) -> str:
    """ "project / name" for the usual `<root>/<project>/models/<name>` layout, else the folder's name."""
    if run_dir.parent.name == "models" and run_dir.parent.parent.name:
        return f"{run_dir.parent.parent.name} / {run_dir.name}"
    return run_dir.name


def build_report_data(
    run_dir: Path, max_steps: int = 50, reward_range: tuple[float | None, float | None] = (None, None)
) -> ReportData:
    """Everything the report shows for `run_dir`. Raises FileNotFoundError when it holds no metrics.jsonl.
    `reward_range` (least, most reward the task can give) bounds the ceiling fit."""
    run_dir = Path(run_dir)
    log = RunLog(run_dir)
    if not log.metrics_path.is_file():
        raise FileNotFoundError(
            f"{log.metrics_path} does not exist. Pass a run dir, the folder that holds metrics.jsonl and "
            "trajectories/ (by default <root>/<project>/models/<name>, e.g. .advantage/demo/models/tool-use-001)."
        )
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    rows = log.rows()
    fit, curve = build_fit(run_dir, rows, reward_range)
    best = best_step(rows)
    trajectories, omitted = build_trajectories(run_dir, max_steps)
    charts = build_charts(rows, curve, best)
    if (run_dir / TRAFFIC_FILE).is_file():
        after = sum(c.headline for c in charts)  # after the headline charts, before the per-metric ones
        charts[after:after] = traffic_charts(run_dir / TRAFFIC_FILE)
    return ReportData(
        title=_title(run_dir.resolve()),
        run_dir=str(run_dir.resolve()),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        n_rows=len(rows),
        charts=charts,
        fit=fit,
        best=best,
        trajectories=trajectories,
        omitted_steps=omitted,
    )
