"""The report's curves, read from the rows of `metrics.jsonl`: the chart series, the ScaleRL fit over train
reward, and the run's best step.

The reward chart heads a stack of panels on one x range, so a collapse reads straight down it: the policy
entropy and the sampler-trainer drift sit under the reward, with the best step marked on them and on the
other headline charts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from advantage.scaling import fit_run

Point = tuple[float, float]
ROW_KEYS = {"step", "split", "time"}  # bookkeeping fields of a metrics row, not metrics
RESTORE_SPLIT = "restore"  # the row that says which step's weights the run ended on; it holds no metrics
BEST_FALLBACK_METRIC = "val/reward"  # picks the best step when the run recorded no restore row
FIT_METRIC = "train/reward"
ChartSpec = tuple[str, str, list[tuple[str, list[str]]]]  # (title, y label, [(split, names tried in order)])
# The stack: the reward and, under it on the same x range, the signs of a collapse. The train reward is
# logged both as "reward_mean" (by the trainer) and "train/reward" (by the rollouts' summary).
STACK: list[ChartSpec] = [
    ("Reward", "mean reward", [("train", ["train/reward", "reward_mean"]), ("val", ["val/reward"])]),
    ("Policy entropy", "nats per token", [("train", ["entropy"])]),
    ("Logprob drift (sampler vs trainer)", "mean |Δ logprob|", [("train", ["logprob_drift_mean_abs"])]),
]
# The other headline charts, beside the stack.
HEADLINE: list[ChartSpec] = [
    ("Loss", "loss", [("train", ["loss"]), ("val", ["val/loss"])]),  # val: SFT's validation loss
    ("Gradient norm", "global norm before clipping", [("train", ["grad_norm"])]),
    ("Clip fraction", "fraction of tokens clipped", [("train", ["loss/clip_frac"])]),
    ("Truncated completions", "fraction of completions", [("train", ["frac_truncated_completions"])]),
    ("Logprob correlation (sampler vs trainer)", "correlation", [("train", ["logprob_drift_corr"])]),
    ("Throughput", "tokens / second", [("train", ["tokens_per_second"])]),
    ("Step time", "seconds", [("train", ["seconds"])]),
    # The continual trainer's verdicts (`train_online`, split "online"); rejected steps are marked.
    ("Online: promotion gate", "evaluation score", [("online", ["score"]), ("online", ["default_score"])]),
    (
        "Online: staleness of trained traffic",
        "steps behind the default",
        [("online", ["staleness_mean"]), ("online", ["staleness_max"])],
    ),
]
GATE_CHART = "Online: promotion gate"


class Series(BaseModel):
    name: str
    split: str  # picks the colour: train blue, val orange
    points: list[Point]
    kind: str = "data"  # "data" (markers and lines) or "fit" (a dashed curve)


class Marker(BaseModel):
    x: float
    label: str  # drawn beside the vertical line
    title: str  # the hover text


class Chart(BaseModel):
    title: str
    y_label: str
    x_label: str = "step"
    series: list[Series]
    headline: bool = False
    stacked: bool = False  # in the stack under the reward, on its shared x range
    x_range: Point | None = None  # (lo, hi) to show, when it is not just the chart's own points
    markers: list[Marker] = []


class FitInfo(BaseModel):
    ok: bool
    message: str  # the fit's summary, or why there is none
    rising: bool = True  # False: a fit ran, but the reward is not rising, so it predicts no ceiling


class BestStep(BaseModel):
    step: int  # the step whose weights scored best
    metric: str  # what chose it
    value: float | None
    restored_as: int | None = None  # the later step that holds its weights, when the run ended on it
    message: str  # one line for the page


def as_number(v: Any) -> float | None:
    """A finite float, or None for what JSON cannot hold (NaN, inf) or what is not a number."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _series(rows: list[dict[str, Any]], split: str, metric: str) -> list[Point]:
    pts = []
    for r in rows:
        y = as_number(r.get(metric))
        if r.get("split") == split and y is not None and as_number(r.get("step")) is not None:
            pts.append((float(r["step"]), y))
    return pts


def _step(v: Any) -> int | None:
    """A step number: an int, or a float that holds one (JSON writers differ)."""
    x = as_number(v)
    return int(x) if x is not None and x == int(x) else None


def best_step(rows: list[dict[str, Any]]) -> BestStep | None:
    """The run's best step: the last restore row's `restored_from`, else the step with the highest
    `val/reward` (the latest of equals, as `delete_checkpoints` keeps), else None. A restore row followed
    by more training is a roll-back mid-run (the health guard's), and the message says so."""
    for r in reversed(rows):
        step = _step(r.get("restored_from"))
        if r.get("split") == RESTORE_SPLIT and step is not None:
            metric, value, new = str(r.get("metric") or ""), as_number(r.get("value")), _step(r.get("step"))
            chosen = f", chosen by {metric} = {'?' if value is None else f'{value:.4g}'}" if metric else ""
            trained_on = new is not None and any(
                x.get("split") == "train" and (_step(x.get("step")) or 0) > new for x in rows
            )
            held = (
                f"; restored as step {new}, and training went on from there" if trained_on
                else f"; the run ended on it, restored as step {new}" if new is not None
                else ""
            )  # fmt: skip
            return BestStep(
                step=step,
                metric=metric or "restore",
                value=value,
                restored_as=new,
                message=f"Best step {step}{chosen}{held}.",
            )
    scores: dict[int, float] = {}
    for r in rows:
        step, value = _step(r.get("step")), as_number(r.get(BEST_FALLBACK_METRIC))
        if r.get("split") == "val" and step is not None and value is not None:
            scores[step] = value  # a step evaluated twice keeps its last value, as RunLog.metric_by_step
    if not scores:
        return None
    step = max(scores, key=lambda s: (scores[s], s))
    return BestStep(
        step=step,
        metric=BEST_FALLBACK_METRIC,
        value=scores[step],
        message=(
            f"Best step {step}, chosen here by the highest {BEST_FALLBACK_METRIC} = {scores[step]:.4g}: the run "
            "recorded no restore row, so it may have ended on other weights."
        ),
    )


def _chart(rows: list[dict[str, Any]], spec: ChartSpec, used: set[str], stacked: bool) -> Chart:
    """One stack or headline chart: per split, the first of its names that has points."""
    title, y_label, wanted = spec
    series = []
    for split, names in wanted:
        for name in names:
            pts = _series(rows, split, name)
            if pts:
                series.append(Series(name=name, split=split, points=pts))
                used.update(names)
                break
    return Chart(title=title, y_label=y_label, series=series, headline=True, stacked=stacked)


def _rejected(rows: list[dict[str, Any]]) -> list[Marker]:
    """A marker per step the online promotion gate refused."""
    out = []
    for r in rows:
        step = _step(r.get("step"))
        if r.get("split") == "online" and step is not None and as_number(r.get("promoted")) == 0.0:
            score, default = as_number(r.get("score")), as_number(r.get("default_score"))
            why = (
                f": score {score:.3g} against the default's {default:.3g}"
                if score is not None and default is not None
                else ""
            )
            out.append(Marker(x=step, label=f"rejected {step}", title=f"Step {step} was not promoted{why}."))
    return out


def build_charts(
    rows: list[dict[str, Any]], fit_curve: list[Point] | None, best: BestStep | None = None
) -> list[Chart]:
    """The stack (reward, entropy, drift on one x range), the other headline charts, then one chart per
    remaining metric, with `<split>/x` of every split together. `best` is marked on the stack and the
    headline charts. Metrics a run did not log (entropy, before it was logged) just have no chart."""
    used: set[str] = set()
    stack = [_chart(rows, spec, used, stacked=True) for spec in STACK]
    if fit_curve:
        stack[0].series.append(
            Series(name="ScaleRL fit (train)", split="train", points=fit_curve, kind="fit")
        )
    stack = [c for c in stack if c.series]
    xs = [p[0] for c in stack for s in c.series for p in s.points] + ([best.step] if best else [])
    for c in stack:  # one x range, so a step sits at the same place on every panel of the stack
        c.x_range = (min(xs), max(xs))
    charts = stack + [_chart(rows, spec, used, stacked=False) for spec in HEADLINE]
    if best is not None:
        mark = Marker(x=best.step, label=f"best step {best.step}", title=best.message)
        for c in charts:
            c.markers = [mark]
    for c in charts:
        if c.title == GATE_CHART:
            c.markers = c.markers + _rejected(rows)
    by_name: dict[str, dict[str, list[Point]]] = {}  # chart name -> split -> points
    for r in rows:
        split = str(r.get("split", "?"))
        if split == RESTORE_SPLIT:
            continue
        for key, value in r.items():
            if key in ROW_KEYS or key in used or as_number(value) is None:
                continue
            name = key.removeprefix(f"{split}/")
            by_name.setdefault(name, {}).setdefault(split, [])
    for name in sorted(by_name):
        series = []
        for split in sorted(by_name[name]):
            key = name if _series(rows, split, name) else f"{split}/{name}"
            series.append(Series(name=split, split=split, points=_series(rows, split, key)))
        charts.append(Chart(title=name, y_label=name, series=[s for s in series if s.points]))
    return [c for c in charts if c.series]


def build_fit(
    run_dir: Path, rows: list[dict[str, Any]], reward_range: tuple[float | None, float | None] = (None, None)
) -> tuple[FitInfo, list[Point] | None]:
    """The ScaleRL fit of train reward against step, and its curve out to 2x the steps so far; no curve
    for a reward that is not rising, whose fit predicts nothing. `reward_range` (least, most), where known,
    bounds the fitted ceiling (`fit_scaling_curve`'s `a_min`, `a_max`)."""
    try:
        fit = fit_run(run_dir, metric=FIT_METRIC, axis="step", a_min=reward_range[0], a_max=reward_range[1])
    except ValueError as e:
        return FitInfo(ok=False, message=f"No ceiling fit: {e}."), None
    if not fit.rising:
        return FitInfo(ok=False, rising=False, message=f"{fit.summary(fit.c_max)}."), None
    first = min((s for s, _ in _series(rows, "train", FIT_METRIC) if s > 0), default=1.0)
    n = 80
    xs = [first + (2 * fit.c_max - first) * i / (n - 1) for i in range(n)]
    curve = [(x, float(fit.predict(x))) for x in xs]
    return FitInfo(ok=True, message=fit.summary(fit.c_max)), curve
