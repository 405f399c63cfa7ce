"""Learning-rate schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from advantage.config import LRSchedule, TrainConfig
from advantage.training.schedules import lr_at


def test_constant_with_warmup() -> None:
    s = LRSchedule(warmup_steps=3)
    # warm-up: lr * (step + 1) / (W + 1) = 1e-3 * 1/4, 2/4, 3/4; then 1e-3 for good
    assert [lr_at(s, 1e-3, k) for k in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_linear_decay() -> None:
    s = LRSchedule(kind="linear", warmup_steps=0, total_steps=4, min_lr_ratio=0.0)
    # p = step / 4: lr * (1 - p) = 1.0, 0.75, 0.5, 0.25, 0.0, and 0.0 after the end
    assert [lr_at(s, 1.0, k) for k in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_cosine_decay_to_min_ratio() -> None:
    s = LRSchedule(kind="cosine", warmup_steps=1, total_steps=5, min_lr_ratio=0.2)
    # step 0: warm-up, 1/2. Then p = (step - 1) / 4 and lr = 0.2 + 0.8 * (1 + cos(pi p)) / 2:
    # p=0 -> 1.0; p=0.5 -> 0.2 + 0.4 = 0.6; p=1 -> 0.2
    assert lr_at(s, 1.0, 0) == pytest.approx(0.5)
    assert lr_at(s, 1.0, 1) == pytest.approx(1.0)
    assert lr_at(s, 1.0, 2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(s, 1.0, 3) == pytest.approx(0.6)
    assert lr_at(s, 1.0, 5) == pytest.approx(0.2)
    assert lr_at(s, 1.0, 50) == pytest.approx(0.2)


def test_a_decay_needs_its_end() -> None:
    with pytest.raises(ValidationError, match="total_steps"):
        LRSchedule(kind="cosine")
    with pytest.raises(ValidationError, match="larger than warmup_steps"):
        LRSchedule(kind="linear", warmup_steps=5, total_steps=5)
    assert TrainConfig(schedule={"kind": "cosine", "total_steps": 10}).schedule.total_steps == 10
