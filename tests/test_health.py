"""Health bands and the collapse guard: pure functions of the per-step metrics and held-out scores."""

from __future__ import annotations

import pytest

from advantage.health import CollapseGuard, health_warnings, paired_drop_p

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


def test_paired_drop_p_is_an_exact_sign_test() -> None:
    # Seed 3 of session 36, dev questions at steps 6 and 12: three lost, none gained -> (1/2)^3.
    step6 = [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    step12 = [1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert paired_drop_p(step6, step12) == 0.125
    assert paired_drop_p(step12, step6) == 1.0  # no item lost: no evidence of a drop
    assert paired_drop_p([1] * 5, [0] * 5) == 1 / 32
    # 4 lost, 1 gained: P(X >= 4 | n = 5) = (C(5,4) + C(5,5)) / 32 = 6/32
    assert paired_drop_p([1, 1, 1, 1, 0], [0, 0, 0, 0, 1]) == 6 / 32
    assert paired_drop_p([1, 0], [1, 0]) == 1.0  # nothing changed
    # read as right at >= 0.5: one lost, one gained -> P(X >= 1 | n = 2) = 3/4
    assert paired_drop_p([0.9, 0.2], [0.4, 0.7]) == 0.75
    with pytest.raises(ValueError, match="same items"):
        paired_drop_p([1, 1], [1])


def test_guard_with_outcomes_keeps_the_last_step_unless_the_drop_is_significant() -> None:
    g = CollapseGuard(tolerance=0.15)
    best = [1.0] * 15 + [0.0]
    g.update(0, 12 / 16, [1.0] * 12 + [0.0] * 4)
    g.update(6, 15 / 16, best)
    three_lost = [0.0] * 3 + [1.0] * 12 + [0.0]  # 12/16: 19 points below, p = 1/8
    g.update(12, 12 / 16, three_lost)
    assert g.drop_p(12) == 0.125 and g.end_step(12, 12 / 16) == 12
    five_lost = [0.0] * 5 + [1.0] * 10 + [0.0]  # 10/16, p = 1/32 < 0.05
    g.update(15, 10 / 16, five_lost)
    assert g.end_step(15, 10 / 16) == 6
    g.update(18, 10 / 16)  # no outcomes for the last step: the tolerance alone decides
    assert g.drop_p(18) is None and g.end_step(18, 10 / 16) == 6
    strict = CollapseGuard(tolerance=0.15, alpha=0.2)
    strict.update(6, 15 / 16, best)
    strict.update(12, 12 / 16, three_lost)
    assert strict.end_step(12, 12 / 16) == 6  # p = 0.125 < 0.2


def test_guard_patience() -> None:
    g = CollapseGuard(tolerance=0.05, patience=2)
    g.update(0, 0.5)
    assert g.update(1, 0.3) == "continue"  # first bad evaluation
    assert g.update(2, 0.3) == "rollback"  # second in a row
