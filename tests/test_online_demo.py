"""`advantage demo --online` end to end, briefly, on the bundled model: simulated users drive the served model
through the plain `openai` SDK and rate each episode through `POST /v1/feedback`; the continual trainer
trains and judges steps from that traffic alone; the report shows the online view. The learning target
(>= 85 % held-out in 30 minutes) is the slow test in test_demo_learning.py."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from advantage.cli import app
from advantage.online.store import FILENAME
from advantage.report import build_report_data
from advantage.tasks.tool_use.online import OnlineDemoConfig, main


def test_online_demo_trains_and_judges_steps_from_rated_traffic(tmp_path: Path) -> None:
    cfg = OnlineDemoConfig(
        root=tmp_path, minutes=15, max_steps=1, users=4, askers=2, min_groups=1, val_size=2, dev_size=2
    )
    result = main(cfg)
    run = tmp_path / "demo" / "models" / cfg.name
    with sqlite3.connect(run / FILENAME) as db:
        rated = db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        episodes = db.execute("SELECT COUNT(DISTINCT episode) FROM completions WHERE episode IS NOT NULL")
        tagged = episodes.fetchone()[0]
        trained = dict(db.execute("SELECT outcome, COUNT(*) FROM trained GROUP BY outcome").fetchall())
    assert result["episodes"] >= 4 and tagged >= result["episodes"]  # an unrated episode may be cut at stop
    assert rated >= result["episodes"]  # the feedback on an episode's last turn rates every turn
    assert result["steps"] == 1, result
    assert sum(trained.values()) >= 2 and set(trained) <= {"promoted", "rejected", "stale", "skipped"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    verdicts = [r for r in rows if r.get("split") == "online"]
    assert len(verdicts) == result["steps"] and all("score" in r and "promoted" in r for r in verdicts)
    titles = {c.title for c in build_report_data(run).charts}
    assert {"Online: requests per hour", "Online: feedback rate", "Online: promotion gate"} <= titles


def test_demo_options_belong_to_one_mode() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["demo", "--online", "--steps", "3"])
    assert out.exit_code != 0 and "--steps: not an option of the online demo" in out.output
    out = runner.invoke(app, ["demo", "--minutes", "3"])
    assert out.exit_code != 0 and "--minutes: not an option of the offline demo" in out.output
