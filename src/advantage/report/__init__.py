"""`advantage report`: one self-contained HTML file per run, with its curves, the ScaleRL ceiling fit and a
trajectory viewer. `build_report_data` reads the run dir; `render_html` turns that into the page."""

from __future__ import annotations

from pathlib import Path

from advantage.files import write_text_atomic
from advantage.report.data import ReportData, build_report_data
from advantage.report.html import render_html

__all__ = ["ReportData", "build_report_data", "render_html", "write_report"]


def write_report(
    run_dir: Path,
    out: Path | None = None,
    max_steps: int = 50,
    reward_range: tuple[float | None, float | None] = (None, None),
) -> Path:
    """Write the report of `run_dir` to `out` (default `<run_dir>/report.html`) and return its path.
    `reward_range` (least, most reward the task can give; either may be None) bounds the ceiling fit."""
    data = build_report_data(Path(run_dir), max_steps=max_steps, reward_range=reward_range)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    write_text_atomic(path, render_html(data))
    return path
