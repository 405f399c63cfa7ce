"""Names kept for one release after issue 17 (README, "Deprecated names"): each still works, and warns."""

from __future__ import annotations

import pytest

import advantage as adv
from advantage import lowlevel
from advantage.trajectory import Trajectory, TrajectoryGroup


def test_adam_params_old_field_names_work_and_warn() -> None:
    with pytest.warns(DeprecationWarning, match="AdamParams"):
        old = adv.AdamParams(lr=1e-3, grad_clip=0.5)
    assert old == adv.AdamParams(learning_rate=1e-3, max_grad_norm=0.5)
    with pytest.warns(DeprecationWarning, match="AdamParams.lr"):
        assert old.lr == 1e-3
    with pytest.warns(DeprecationWarning, match="AdamParams.grad_clip"):
        assert old.grad_clip == 0.5


def test_configs_take_only_the_new_names() -> None:
    """TrainConfig and SFTConfig never took `lr`: it stays an unknown key there."""
    with pytest.raises(ValueError, match="lr"):
        adv.TrainConfig(lr=1e-3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="grad_clip"):
        adv.SFTConfig(grad_clip=1.0)  # type: ignore[call-arg]


def test_configs_are_adam_params_and_loss_configs() -> None:
    """One declaration of each knob: the configs are the records the optimizer and the losses take."""
    cfg = adv.TrainConfig(learning_rate=3e-4, kl_beta=0.1)
    assert isinstance(cfg, adv.AdamParams) and isinstance(cfg, adv.LossConfig)
    assert isinstance(adv.SFTConfig(), adv.AdamParams) and adv.SFTConfig().learning_rate == 2e-4
    assert adv.TrainConfig.model_fields["learning_rate"].description == (
        adv.AdamParams.model_fields["learning_rate"].description
    )


def test_builtin_losses_and_validate_rewards_warn() -> None:
    with pytest.warns(DeprecationWarning, match="BUILTIN_LOSSES"):
        names = lowlevel.BUILTIN_LOSSES
    assert set(names) == {
        "cispo", "ppo", "grpo", "gspo", "importance_sampling", "cross_entropy", "dpo", "distill_topk"
    }  # fmt: skip
    group = TrajectoryGroup([Trajectory([{"role": "user", "content": "hi"}], reward=float("nan"))])
    with (
        pytest.warns(DeprecationWarning, match="validate_rewards"),
        pytest.raises(ValueError, match="finite"),
    ):
        group.validate_rewards()
