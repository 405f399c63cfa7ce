"""Health bands and the collapse guard: pure functions of the per-step metrics and held-out scores."""

from __future__ import annotations

from advantage.health import CollapseGuard, health_warnings

HEALTHY = {"logprob_drift_mean_abs": 0.02, "entropy": 0.8, "loss/clip_frac": 0.01, "grad_norm": 0.5,
           "frac_truncated_completions": 0.0}  # fmt: skip


def test_healthy_step_has_no_warnings() -> None:
    assert health_warnings(HEALTHY, [HEALTHY, HEALTHY]) == []


def test_each_band_warns_by_name() -> None:
    # The collapsed demo run of issue 20: drift 0.073 at its last step.
    assert health_warnings({**HEALTHY, "logprob_drift_mean_abs": 0.073}, [HEALTHY]) == ["drift 0.073 > 0.05"]
    # Samples one update behind (overlap): 0.05 + 0.15 x 1; half of them behind: 0.05 + 0.15 x 0.5
    lagged = {**HEALTHY, "logprob_drift_mean_abs": 0.129, "policy_lag_mean": 1.0}
    assert health_warnings(lagged, [HEALTHY]) == []
    assert health_warnings({**lagged, "policy_lag_mean": 0.5}, [HEALTHY]) == ["drift 0.129 > 0.125"]
    low = health_warnings({**HEALTHY, "entropy": 0.1}, [HEALTHY])  # 0.1 < 0.25 x 0.8 = 0.2
    assert low == ["entropy 0.100 < 0.25x first (0.800)"]
    assert health_warnings({**HEALTHY, "entropy": 2.5}, [HEALTHY])[0].startswith("entropy 2.500 > 3x")
    assert health_warnings({**HEALTHY, "loss/clip_frac": 0.3}, [HEALTHY]) == ["clip frac 0.30 > 0.2"]
    spike = health_warnings({**HEALTHY, "grad_norm": 3.0}, [HEALTHY, HEALTHY])  # 3.0 > 5 x median 0.5
    assert spike == ["grad norm 3 > 5x median (0.5)"]
    cut = health_warnings({**HEALTHY, "frac_truncated_completions": 0.5}, [HEALTHY])
    assert cut == ["50% of turns cut off at max_tokens"]


def test_missing_metrics_and_no_history_are_quiet() -> None:
    assert health_warnings({}, []) == []
    assert health_warnings({"grad_norm": 100.0}, [{"grad_norm": 1.0}]) == []  # one point is no median yet


def test_guard_rolls_back_then_stops() -> None:
    g = CollapseGuard(tolerance=0.1, patience=1, max_rollbacks=1)
    assert g.update(0, 0.30) == "continue"
    assert g.update(3, 0.60) == "continue" and (g.best_step, g.best_score) == (3, 0.60)
    assert g.update(6, 0.55) == "continue"  # within the tolerance of the best
    assert g.update(9, 0.60) == "continue" and g.best_step == 9  # a tie keeps the later step
    assert g.update(12, 0.20) == "rollback" and g.rollbacks == 1
    assert g.update(15, 0.10) == "stop"


def test_guard_ends_on_the_last_step_unless_it_fell_past_the_tolerance() -> None:
    g = CollapseGuard(tolerance=0.15)
    for step, score in [(0, 0.75), (3, 0.88), (6, 0.94), (9, 0.81), (12, 0.81)]:
        g.update(step, score)
    assert g.best_step == 6
    assert g.end_step(12, 0.81) == 12  # 0.13 below the best: within the tolerance
    assert g.end_step(12, 0.78) == 6  # 0.16 below: the best
    g = CollapseGuard(tolerance=0.15)
    for step, score in [(0, 0.69), (3, 0.75), (6, 0.69), (9, 0.50), (11, 0.50)]:
        g.update(step, score)
    assert g.end_step(11, 0.50) == 3
    g.update(14, 0.80)
    assert g.end_step(14, 0.80) == 14  # the last is the best


def test_guard_patience() -> None:
    g = CollapseGuard(tolerance=0.05, patience=2)
    g.update(0, 0.5)
    assert g.update(1, 0.3) == "continue"  # first bad evaluation
    assert g.update(2, 0.3) == "rollback"  # second in a row
