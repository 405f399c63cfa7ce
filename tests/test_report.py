"""`advantage report` without a browser: what goes into the page (charts, fit, trajectories), that the page
is self-contained and keeps untrusted text inert, the CLI's errors, and the W&B mirror of metrics.jsonl.
The browser checks on a real run are in test_report_browser.py."""

from __future__ import annotations

import json
import math
import re
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat.chat_completion import Choice
from typer.testing import CliRunner

import advantage as adv
from advantage import tracking
from advantage.cli import app
from advantage.report import build_report_data, render_html, write_report
from advantage.report.curves import best_step
from advantage.report.html import script_json
from advantage.tracking import RunLog

XSS = '</script><script>window.__xss=1</script><img src=x onerror="window.__xss=1">'


def _choice(content: str, step: int) -> Choice:
    return Choice.model_validate(
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": content},
            "token_ids": [1, 2, 3],
            "token_logprobs": [-0.1, -0.2, -0.3],
            "weights": {"model": "m", "step": step},
        }
    )


def _groups(step: int) -> list[adv.TrajectoryGroup]:
    trajs = [
        adv.Trajectory(
            [
                {"role": "user", "content": f"question {XSS}"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "c0",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
                _choice(f"answer {i}", step),
            ],
            reward=i / 3,
            metrics={"success": float(i == 3)},
            logs=[f"RULER (judge) score {i / 3:.3f}: explanation {i}"],
            finish_reason="answered",
        )
        for i in range(4)
    ]
    return [adv.TrajectoryGroup(trajs, exceptions=["Traceback: boom"])]


def _run(tmp_path: Path, steps: int) -> Path:
    """A run dir written by RunLog as the service writes it: val at step 0, then train steps."""
    run = tmp_path / "proj" / "models" / "m"
    log = RunLog(run)
    log.append(0, "val", {"val/reward": 0.2, "val/success": 0.0})
    log.write_trajectories("val", 0, _groups(0))
    for s in range(1, steps + 1):
        reward = 0.2 + 0.5 * (1 - math.exp(-s / 3))
        log.append(
            s,
            "train",
            {"train/reward": reward, "loss": 0.1 / s, "logprob_drift_mean_abs": 0.01, "grad_norm": math.nan},
        )
        log.write_trajectories("train", s, _groups(s))
    return run


def test_report_data_from_a_run(tmp_path: Path) -> None:
    data = build_report_data(_run(tmp_path, 8))
    titles = [c.title for c in data.charts]
    # No entropy in this run (logged only since issue 20): the stack is reward and drift, and that is all.
    assert titles[:3] == ["Reward", "Logprob drift (sampler vs trainer)", "Loss"]
    assert [c.stacked for c in data.charts[:3]] == [True, True, False]
    reward = data.charts[0]
    assert [s.name for s in reward.series] == ["train/reward", "val/reward", "ScaleRL fit (train)"]
    assert reward.series[1].points == [(0.0, 0.2)]
    fit_curve = reward.series[2].points
    assert data.fit.ok and data.fit.message.startswith("A=")
    assert fit_curve[-1][0] == pytest.approx(16.0)  # drawn out to 2x the steps so far
    assert "success" in titles and "grad_norm" not in titles  # a metric that is always NaN has no points
    assert sorted(data.trajectories) == ["train", "val"]
    assert sorted(data.trajectories["train"], key=int) == [str(s) for s in range(1, 9)]
    t = data.trajectories["train"]["3"][0].trajectories[3]
    assert t.reward == 1.0 and t.logs == ["RULER (judge) score 1.000: explanation 3"]
    assert [m.role for m in t.messages] == ["user", "assistant", "tool", "assistant"]
    assert t.messages[1].tool_calls == [{"name": "get_weather", "arguments": "{}"}]
    assert t.messages[3].sampled and t.messages[3].weights_step == 3 and t.messages[3].content == "answer 3"
    assert data.trajectories["train"]["1"][0].exceptions == ["Traceback: boom"]


def _append_rows(run: Path, rows: list[dict[str, Any]]) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps({"time": 0.0, **r}) + "\n" for r in rows)


def _health_run(tmp_path: Path) -> Path:
    """8 train steps with the collapse signs logged, val at steps 0, 4 and 8, and the run ended on step 4,
    restored as step 9 (the row the training loop writes when it ends on its best step)."""
    run = _run(tmp_path, 8)
    rows: list[dict[str, Any]] = []
    for s in range(1, 9):
        rows.append({"step": s, "split": "train", "entropy": 1.0 - s / 10, "frac_truncated_completions": 0.0,
                     "loss/clip_frac": 0.01 * s})  # fmt: skip
    for s, success in ((4, 0.97), (8, 0.5)):
        rows.append({"step": s, "split": "val", "val/reward": success, "val/success": success})
    rows.append({"step": 9, "split": "restore", "restored_from": 4, "metric": "val/success", "value": 0.97})
    _append_rows(run, rows)
    return run


def test_entropy_and_drift_sit_under_the_reward_with_the_best_step_marked(tmp_path: Path) -> None:
    data = build_report_data(_health_run(tmp_path))
    stack = [c for c in data.charts if c.stacked]
    assert [c.title for c in stack] == ["Reward", "Policy entropy", "Logprob drift (sampler vs trainer)"]
    assert stack[1].series[0].points[0] == (1.0, 0.9) and stack[1].y_label == "nats per token"
    # One x range down the stack: from the val at step 0 to the fit's end at 2 x 8 steps.
    assert {c.x_range for c in stack} == {(0.0, 16.0)}
    best = data.best
    assert best is not None and (best.step, best.value, best.restored_as) == (4, 0.97, 9)
    assert best.message.startswith("Best step 4, chosen by val/success = 0.97; the run ended on it, restored")
    headline = [c for c in data.charts if c.headline]
    assert all([(m.x, m.label) for m in c.markers] == [(4.0, "best step 4")] for c in headline)
    assert all(not c.markers for c in data.charts if not c.headline)
    titles = [c.title for c in data.charts]
    assert "Clip fraction" in titles and "Truncated completions" in titles and "entropy" not in titles
    assert not {"restored_from", "value", "metric"} & set(titles)  # the restore row is no metric
    page = render_html(data)
    assert '"markers":[{"x":4.0,"label":"best step 4"' in page


def test_best_step_without_a_restore_row_is_the_best_val_reward() -> None:
    rows: list[dict[str, Any]] = [
        {"step": 0, "split": "val", "val/reward": 0.5},
        {"step": 3, "split": "val", "val/reward": 0.8},
        {"step": 3, "split": "train", "val/reward": 0.99},  # not a val row: ignored
        {"step": 6, "split": "val", "val/reward": 0.8},  # ties go to the later step, as delete_checkpoints
        {"step": 9, "split": "val", "val/reward": math.nan},
    ]
    best = best_step(rows)
    assert best is not None and (best.step, best.value, best.restored_as) == (6, 0.8, None)
    assert "val/reward" in best.message and "no restore row" in best.message
    assert best_step([{"step": 1, "split": "train", "train/reward": 0.5}]) is None
    # A restore row wins over val/reward; the last one counts, and a float step is still a step.
    rows += [{"step": 10, "split": "restore", "restored_from": 3, "metric": "val/success", "value": 0.9},
             {"step": 11, "split": "restore", "restored_from": 6.0, "metric": "val/success", "value": 0.95}]  # fmt: skip
    best = best_step(rows)
    assert best is not None and (best.step, best.restored_as, best.metric) == (6, 11, "val/success")
    assert (
        best.message == "Best step 6, chosen by val/success = 0.95; the run ended on it, restored as step 11."
    )
    # A roll-back mid-run (training went on after it), written without a metric as `model.restore(step)` does.
    rows += [{"step": 12, "split": "restore", "restored_from": 9.0},
             {"step": 13, "split": "train", "train/reward": 0.5}]  # fmt: skip
    best = best_step(rows)
    assert best is not None and (best.step, best.metric, best.value) == (9, "restore", None)
    assert best.message == "Best step 9; restored as step 12, and training went on from there."


def test_a_run_without_best_step_or_health_metrics_still_renders(tmp_path: Path) -> None:
    run = tmp_path / "old"
    RunLog(run).append(1, "train", {"train/reward": 0.5, "loss": 0.1})
    data = build_report_data(run)
    assert data.best is None and [c.title for c in data.charts] == ["Reward", "Loss"]
    assert all(not c.markers for c in data.charts)
    assert render_html(data).startswith("<!doctype html>")


def test_a_collapsed_run_gets_no_ceiling_in_the_report(tmp_path: Path) -> None:
    run = tmp_path / "collapsed"
    rewards = [0.534, 0.55, 0.60, 0.64, 0.68, 0.70, 0.738, 0.722, 0.541, 0.359, 0.291, 0.178]  # issue 20
    for s, r in enumerate(rewards, 1):
        RunLog(run).append(
            s, "train", {"train/reward": r, "logprob_drift_mean_abs": 0.01 * s, "entropy": 0.5}
        )
    data = build_report_data(run)
    assert not data.fit.ok and not data.fit.rising
    assert data.fit.message.startswith("The reward is not rising (peaked at step 7 with 0.738, last 0.178;")
    assert [s.kind for s in data.charts[0].series] == ["data"]  # no dashed ceiling drawn


def test_the_reward_range_bounds_the_reports_ceiling(tmp_path: Path) -> None:
    """A run still climbing steeply fits a ceiling above anything a [0, 1] reward can reach unless the report
    is told the range (`advantage report --min-reward 0 --max-reward 1`)."""
    run = tmp_path / "climbing"
    for s, r in enumerate([0.30, 0.36, 0.44, 0.52, 0.61, 0.70, 0.79, 0.89], 1):
        RunLog(run).append(s, "train", {"train/reward": r})
    unbounded = build_report_data(run)
    assert unbounded.fit.ok and float(unbounded.fit.message.split("=")[1].split()[0]) > 1.05
    bounded = build_report_data(run, reward_range=(0.0, 1.0))
    assert bounded.fit.ok and float(bounded.fit.message.split("=")[1].split()[0]) <= 1.0
    assert max(y for _, y in bounded.charts[0].series[-1].points) <= 1.0 + 1e-9
    result = CliRunner().invoke(app, ["report", str(run), "--min-reward", "0", "--max-reward", "1"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["report", str(run), "--max-reward", "0.5"])  # below a reward seen
    assert result.exit_code == 0, result.output  # the fit is what fails, and the page says so
    assert "a_max=0.5 is below the best observed reward" in (run / "report.html").read_text()


def test_fit_failure_is_said_not_raised(tmp_path: Path) -> None:
    data = build_report_data(_run(tmp_path, 2))
    assert not data.fit.ok and "at least 4 points" in data.fit.message
    assert [s.kind for s in data.charts[0].series] == ["data", "data"]


def test_a_run_with_nothing_logged_yet_still_renders(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 0.5}\n{"cut by a cra')
    data = build_report_data(tmp_path)
    assert [c.title for c in data.charts] == ["Loss"] and data.trajectories == {}
    assert not data.fit.ok and "train/reward" in data.fit.message
    assert render_html(data).startswith("<!doctype html>")


def test_max_steps_keeps_first_and_last(tmp_path: Path) -> None:
    data = build_report_data(_run(tmp_path, 9), max_steps=3)
    assert sorted(data.trajectories["train"], key=int) == ["1", "5", "9"]
    assert data.omitted_steps == {"train": 6, "val": 0}


def test_html_is_self_contained_and_escapes_untrusted_text(tmp_path: Path) -> None:
    page = render_html(build_report_data(_run(tmp_path, 4)))
    # Nothing fetched: no external src/href, no stylesheet links, and a CSP that forbids fetching anyway.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    assert "default-src 'none'" in page
    # The payload only appears \u-escaped inside the JSON: no raw tag can close the data script.
    assert XSS not in page and "<img src=x" not in page
    assert page.count("</script>") == 2  # the data block and the code block
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert blob is not None
    first = json.loads(blob.group(1))["trajectories"]["train"]["1"][0]["trajectories"][0]
    assert first["messages"][0]["content"] == f"question {XSS}"  # the text itself is kept, as data


def test_script_json_round_trips() -> None:
    value = {"a": "</script><!-- & \u2028", "b": [1.5, math.nan, math.inf]}
    text = script_json(value)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": value["a"], "b": [1.5, None, None]}


def test_cli_writes_the_report(tmp_path: Path) -> None:
    run = _run(tmp_path, 4)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file()
    out = tmp_path / "elsewhere" / "r.html"
    assert CliRunner().invoke(app, ["report", str(run), "--out", str(out)]).exit_code == 0
    assert out.read_text().startswith("<!doctype html>")


def test_cli_open_hands_the_file_to_the_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    run = _run(tmp_path, 4)
    assert CliRunner().invoke(app, ["report", str(run), "--open"]).exit_code == 0
    assert opened == [(run / "report.html").resolve().as_uri()]


def test_cli_says_what_a_run_dir_is(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code != 0
    assert "metrics.jsonl" in result.output and "run dir" in result.output
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)


# ---------------------------------------------------------------------- W&B
# W&B is an online paid service that cannot run here, so a fake `wandb` module stands in for it: what is
# checked is the contract with it (init once per run dir, log the same names at the same step).


class FakeRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, Any], int]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.logged.append((metrics, step))


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    calls: list[dict[str, Any]] = []
    runs: list[FakeRun] = []

    def init(**kwargs: Any) -> FakeRun:
        calls.append(kwargs)
        runs.append(FakeRun())
        return runs[-1]

    module = types.ModuleType("wandb")
    module.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr(tracking, "_wandb_runs", {})
    return types.SimpleNamespace(calls=calls, runs=runs)


def test_wandb_gets_the_same_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wandb: types.SimpleNamespace
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "test-key")
    run = tmp_path / "proj" / "models" / "m"
    RunLog(run).append(0, "val", {"val/reward": 0.5})
    RunLog(run).append(1, "train", {"train/reward": 0.6, "loss": 0.1})  # a new RunLog: the same W&B run
    assert len(fake_wandb.calls) == 1
    init = fake_wandb.calls[0]
    assert (init["project"], init["name"], init["resume"]) == ("proj", "m", "allow")
    assert fake_wandb.runs[0].logged == [({"val/reward": 0.5}, 0), ({"train/reward": 0.6, "loss": 0.1}, 1)]
    rows = RunLog(run).rows()
    assert [{k: v for k, v in r.items() if k not in ("step", "split", "time")} for r in rows] == [
        m for m, _ in fake_wandb.runs[0].logged
    ]


def test_no_key_no_wandb_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    RunLog(tmp_path).append(1, "train", {"loss": 0.1})
    assert "wandb" not in sys.modules
    assert len(RunLog(tmp_path).rows()) == 1


def test_key_without_wandb_installed_warns_and_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "test-key")
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    monkeypatch.setattr(tracking, "_wandb_runs", {})
    with pytest.warns(UserWarning, match=r"advantage\[wandb\]"):
        RunLog(tmp_path).append(1, "train", {"loss": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per run dir, not once per step
        RunLog(tmp_path).append(2, "train", {"loss": 0.2})
    assert len(RunLog(tmp_path).rows()) == 2


def test_wandb_that_fails_to_start_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wandb: types.SimpleNamespace
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "bad-key")

    def init(**kwargs: Any) -> None:
        raise RuntimeError("401 unauthorized")

    sys.modules["wandb"].init = init  # type: ignore[union-attr]
    with pytest.warns(UserWarning, match="401 unauthorized"):
        RunLog(tmp_path).append(1, "train", {"loss": 0.1})
    assert len(RunLog(tmp_path).rows()) == 1


# ------------------------------------------------------------------------------------ the online view


def test_online_view_shows_traffic_feedback_staleness_and_the_gate(tmp_path: Path) -> None:
    from advantage.online.activity import traffic_activity
    from advantage.online.store import (
        FILENAME,
        Feedback,
        RecordedChoice,
        RecordedCompletion,
        SQLiteTrafficStore,
    )

    run = _run(tmp_path, 3)
    log = RunLog(run)  # the continual trainer's verdicts: step 2 refused by the gate
    for step, promoted, score in [(1, 1.0, 0.5), (2, 0.0, 0.25), (3, 1.0, 0.625)]:
        row = {
            "promoted": promoted,
            "score": score,
            "default_score": 0.5,
            "staleness_mean": 0.5,
            "staleness_max": 1.0,
        }
        log.append(step, "online", row)
    store = SQLiteTrafficStore(run / FILENAME)
    t0 = time.time() - 3600  # recent: older traffic is pruned on insert (retention)
    for i, (dt, n, rated) in enumerate([(0, 1, 1), (10, 2, 1), (20, 1, 0), (600, 1, 1)]):
        choices = [
            RecordedChoice(k, [1], [-0.1], [1, 2], [], "stop", {"role": "assistant", "content": "x"})
            for k in range(n)
        ]
        store.record(RecordedCompletion(f"c{i}", "m", 0, t0 + dt, {"messages": []}, choices, {}, user=None))
        store.set_feedback([Feedback(f"c{i}", k, 1.0, None, None, f"c{i}", t0) for k in range(rated)])
    store.close()

    bins, width = traffic_activity(run / FILENAME, bins=2)  # 600 s in two bins of 300 s
    assert width == 300.0
    assert [(b.completions, b.choices, b.rated) for b in bins] == [(3, 4, 2), (1, 1, 1)]
    assert bins[0].per_hour(width) == 36.0 and bins[0].rated_share == 0.5

    data = build_report_data(run)
    charts = {c.title: c for c in data.charts}
    requests = charts["Online: requests per hour"]
    assert requests.headline and requests.x_label.startswith("minutes")
    assert sum(y for _, y in requests.series[0].points) * 600 / 30 / 3600 == pytest.approx(4)  # 4 completions
    assert charts["Online: feedback rate"].series[0].points[0] == (0.0, 2 / 3)  # c0 and c1 share 20 s: 2 of 3
    gate = charts["Online: promotion gate"]
    assert [s.name for s in gate.series] == ["score", "default_score"]
    assert [m.label for m in gate.markers if m.label.startswith("rejected")] == ["rejected 2"]
    assert "0.25 against the default's 0.5" in gate.markers[-1].title
    assert charts["Online: staleness of trained traffic"].series[0].points == [
        (1.0, 0.5),
        (2.0, 0.5),
        (3.0, 0.5),
    ]
    assert "score" not in charts  # not drawn a second time among the per-metric charts
    render_html(data)  # and the page renders


def test_traffic_activity_of_an_empty_store(tmp_path: Path) -> None:
    from advantage.online.activity import traffic_activity
    from advantage.online.store import SQLiteTrafficStore

    SQLiteTrafficStore(tmp_path / "t.sqlite").close()
    assert traffic_activity(tmp_path / "t.sqlite") == ([], 0.0)
