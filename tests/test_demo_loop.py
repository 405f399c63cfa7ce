"""The demo's loop on the bundled model, shortened to seconds a step: evaluations that run alongside the next
step's rollouts, dynamic sampling, focus groups, the end on the best step. (The learning itself is tested, slow, in
test_demo_learning.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import advantage as adv
from advantage.tasks.tool_use.config import DemoConfig
from advantage.tasks.tool_use.steps import step_scenarios
from advantage.tasks.tool_use.train import run


def _rows(root: Path) -> list[dict]:
    path = root / "demo" / "models" / "tool-use-001" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow  # ~2 min and a model + trainer in the test process; CI's wheel check runs a one-step demo
@pytest.mark.parametrize("overlap", [False, True])
async def test_shortened_demo_with_dynamic_sampling_and_overlapped_evaluations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overlap: bool
) -> None:
    cfg = DemoConfig(
        root=tmp_path, steps=2, val_size=2, dev_size=2, eval_every=1, groups_per_step=1, group_size=2,
        focus_groups=1, min_informative_groups=2, max_groups_per_step=3, micro_batch_size=4, overlap=overlap,
    )  # fmt: skip
    out = await run(cfg)
    rows = _rows(tmp_path)
    trains = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in trains] == [1, 2]
    # With overlap, step 2 trained on rollouts gathered while step 1 trained: from step 0's weights, or
    # step 1's for a request that came after the swap.
    assert trains[0]["policy_lag_mean"] == 0.0
    assert 0.0 < trains[1]["policy_lag_mean"] <= 1.0 if overlap else trains[1]["policy_lag_mean"] == 0.0
    # Dynamic sampling: each step gathered 2 groups (1 + 1 focus group), then one more while fewer than 2
    # carried signal.
    assert all(2 <= r["n_groups"] <= 3 for r in trains)
    # Dev success is known for the base weights, step 1 (evaluated beside step 2's rollouts) and the last step.
    assert sorted(r["step"] for r in rows if r["split"] == "dev") == [0, 1, 2]
    vals = [r for r in rows if r["split"] == "val"]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == int(out["served_step"])  # the best step, or its copy
    printed = capsys.readouterr().out
    assert "baseline held-out success" in printed and "held-out success" in printed.splitlines()[-1]
    assert 0.0 <= out["final_success"] <= 1.0


def test_dynamic_sampling_needs_room_for_its_rounds() -> None:
    with pytest.raises(ValueError, match="max_groups_per_step"):
        DemoConfig(groups_per_step=8, min_informative_groups=8, max_groups_per_step=4)
    DemoConfig(groups_per_step=8, max_groups_per_step=4)  # off: the cap is not used


def test_focus_groups_go_to_the_tools_still_failed() -> None:
    cfg = DemoConfig(groups_per_step=8, focus_groups=4, seed=3)
    mix = adv.TaskMix(["get_weather", "convert_currency", "convert_units", "get_events"])
    mix.update({"get_weather": [1.0] * 8, "get_events": [1.0] * 8, "convert_units": [0.0] * 8})
    # failure: weather 0.25, currency 0.5 (no results: the prior), units 0.75, events 0.25
    # -> the 4 focus groups: quotas 0.57, 1.14, 1.71, 0.57 -> 0, 1, 1, 0 + the largest remainders (units
    # 0.71, then weather 0.57) -> currency 1, units 2, weather 1; on top of 2 of each in equal shares
    tools = [s.tool for s in step_scenarios(cfg, 0, mix)]
    assert {t: tools.count(t) for t in set(tools)} == {
        "get_weather": 3, "convert_currency": 3, "convert_units": 4, "get_events": 2,
    }  # fmt: skip
    assert step_scenarios(cfg, 0, mix) == step_scenarios(cfg, 0, mix)
    assert step_scenarios(cfg, 0, mix) != step_scenarios(cfg, 1, mix)
    # without focus groups the step draws what it always drew
    assert [s.tool for s in step_scenarios(DemoConfig(seed=3, focus_groups=0), 0)].count("get_weather") == 2
