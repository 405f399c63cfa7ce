"""Real learning runs (slow, opt-in with `pytest -m slow`): the default demo, start to finish, with two seeds.

Each run must end at or above its baseline, and reach the demo's target of 95 % held-out success. The time
the whole command takes (15 minutes on 2 cores is the target) is printed, not asserted: a timed test on a
shared machine measures the machine. This is issue 20's target. With the source unit first in
`convert_units` (session 33), the last trained step reached 100 % on seeds 1, 3 and 4, 97 % on seed 2, and
91 % and 100 % in two runs of seed 0 (BENCHMARKS.md, "The source unit first again"). A seed below 95 %
fails this test: the target is not met on every run yet."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0, 1])
def test_default_demo_reaches_its_target(tmp_path: Path, seed: int) -> None:
    from advantage.tasks.tool_use.config import DemoConfig
    from advantage.tasks.tool_use.train import main

    result = main(DemoConfig(root=tmp_path, seed=seed))
    print(f"seed {seed}: {result}")
    assert result["final_success"] >= result["baseline_success"], result
    assert result["final_success"] >= 0.95, result


def test_online_demo_learns_from_traffic_alone(tmp_path: Path) -> None:
    """Issue 16's target: held-out success from the baseline to >= 85 % within 30 minutes, trained on
    nothing but the simulated users' traffic and feedback."""
    from advantage.tasks.tool_use.online import OnlineDemoConfig, main

    result = main(OnlineDemoConfig(root=tmp_path))
    print(f"online: {result}")
    assert result["final_success"] >= 0.85, result
