"""How a GRPO step weighs its groups: tied groups (equal rewards, advantage 0) are skipped for speed but
count in the mean (`tied_groups_in_mean`), `lr_by_signal` shrinks a step that trained few groups, and
`tree_advantages` credits per token where a group's rollouts share a start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import dp_datums
from openai.types.chat.chat_completion import Choice

from advantage.config import LoRAConfig, LossConfig, TrainConfig
from advantage.training.grpo import train_step
from advantage.training.primitives import MeanOver, forward_backward, plan_step
from advantage.training.trainer import Trainer
from advantage.trajectory import Trajectory, TrajectoryGroup
from advantage.wire.datum import Datum


def _d(n_trained: int, adv: float = 1.0) -> Datum:
    return Datum(input_ids=[1] * (2 + n_trained), loss_mask=[0, 0] + [1] * n_trained, advantage=adv)


def test_plan_weights_divide_by_the_whole_batch_by_hand() -> None:
    ds = [_d(2), _d(3), _d(5)]  # 10 trained tokens; the whole batch: 8 sequences, 40 tokens
    whole = MeanOver(sequences=8, tokens=40)
    seq = plan_step(ds, "cispo", LossConfig(agg="seq_mean"), 1, whole)
    assert sorted(seq.weights) == pytest.approx([1 / 8] * 3)  # each sequence is 1/8 of the mean, not 1/3
    tok = plan_step(ds, "cispo", LossConfig(agg="token_mean"), 1, whole)
    assert sorted(tok.weights) == pytest.approx([2 / 40, 3 / 40, 5 / 40])
    alone = plan_step(ds, "cispo", LossConfig(agg="seq_mean"), 1)
    assert sorted(alone.weights) == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="smaller than the datums"):
        plan_step(ds, "cispo", LossConfig(), 1, MeanOver(sequences=2, tokens=40))


def _grad(trainer: Trainer, datums: list[Datum], cfg: LossConfig, mean_over: MeanOver | None) -> torch.Tensor:
    trainer.model.zero_grad(set_to_none=True)
    forward_backward(trainer, datums, "cispo", cfg, 4, mean_over=mean_over)
    return torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None])


@pytest.mark.parametrize("agg", ["seq_mean", "token_mean", "dr_grpo"])
def test_skipping_zero_advantage_datums_with_mean_over_is_the_full_batch_gradient(
    tiny_model_dir: Path, agg: str
) -> None:
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    for p in trainer.params:  # LoRA B starts at 0; give every LoRA weight a gradient
        torch.nn.init.normal_(p, std=0.02)
    full = dp_datums()
    tied = {3, 4, 5, 9, 10, 11}  # two whole prompts' groups
    full = [d.model_copy(update={"advantage": 0.0}) if i in tied else d for i, d in enumerate(full)]
    active = [d for i, d in enumerate(full) if i not in tied]
    cfg = LossConfig(agg=agg, max_len=max(len(d.input_ids) for d in full))  # type: ignore[arg-type]
    tokens = sum(sum(1 for m in d.loss_mask if m) for d in full)
    g_full = _grad(trainer, full, cfg, None)
    g_skip = _grad(trainer, active, cfg, MeanOver(len(full), tokens))
    g_alone = _grad(trainer, active, cfg, None)
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_skip, g_full, atol=1e-7, rtol=1e-5)
    if agg != "token_mean":  # the mean over the trained half only: twice the gradient
        torch.testing.assert_close(g_alone, 2 * g_full, atol=1e-7, rtol=1e-5)


def _group(rewards: list[float], start: int) -> TrajectoryGroup:
    trajs = []
    for k, r in enumerate(rewards):
        ids = [40 + start + k, 50 + k, 2]
        choice = Choice.model_validate(
            {
                "finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": "x"},
                "token_ids": ids,
                "token_logprobs": [-1.0, -1.2, -0.8],
            }
        )
        trajs.append(Trajectory([{"role": "user", "content": "hi"}, choice], reward=r))
    return TrajectoryGroup(trajs)


def test_train_step_counts_tied_groups_in_the_mean(tiny_model_dir: Path) -> None:
    groups = [_group([1.0, 0.0, 0.5, 0.0], 0), _group([1.0] * 4, 10), _group([0.0] * 4, 20)]
    norms = {}
    for in_mean in (True, False):
        trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32", seed=0)
        for p in trainer.params:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        cfg = TrainConfig(agg="seq_mean", tied_groups_in_mean=in_mean, max_grad_norm=1e9)
        m = train_step(trainer, groups, cfg)
        assert m["n_sequences"] == 4  # only the untied group runs either way
        norms[in_mean] = m["grad_norm"]
    assert norms[True] == pytest.approx(norms[False] / 3, rel=1e-5)  # 4 of 12 sequences carried signal


def test_lr_by_signal_scales_the_step_by_the_fraction_that_carried_signal(tiny_model_dir: Path) -> None:
    groups = [_group([1.0, 0.0, 0.5, 0.0], 0), _group([1.0] * 4, 10), _group([0.0] * 4, 20)]
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    lrs = [
        train_step(trainer, groups, TrainConfig(learning_rate=3e-3, lr_by_signal=flag))["lr"]
        for flag in (False, True)
    ]
    assert lrs == pytest.approx([3e-3, 3e-3 * 4 / 12])


def test_tree_advantages_leave_tokens_every_rollout_wrote_alone(tiny_model_dir: Path) -> None:
    from advantage.training.grpo import build_datums
    from advantage.wire.datum import ADV_KEY

    trajs = []
    for k, r in enumerate([1.0, 0.0, 1.0, 0.0]):  # every rollout writes 40 first, then each its own
        choice = Choice.model_validate(
            {
                "finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": "x"},
                "token_ids": [40, 50 + k, 2],
                "token_logprobs": [-1.0, -1.2, -0.8],
            }
        )
        trajs.append(Trajectory([{"role": "user", "content": "hi"}, choice], reward=r))
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    for tree in (False, True):
        datums, _ = build_datums(trainer, [TrajectoryGroup(trajs)], TrainConfig(tree_advantages=tree))
        if not tree:
            assert all(ADV_KEY not in d.extras for d in datums)
            continue
        for d in datums:
            first = d.loss_mask.index(1.0)
            per_token = d.extras[ADV_KEY]
            assert per_token[first] == 0.0  # "40": all four wrote it, mean advantage 0
            assert per_token[first + 1] == pytest.approx(d.advantage) and d.advantage != 0  # its own
    # Against the node's baseline: the same where the rollouts part (the node is the group's root, mean 0),
    # and 0 after it, where each runs on alone (the final "2" and whatever the template adds).
    datums, _ = build_datums(
        trainer, [TrajectoryGroup(trajs)], TrainConfig(tree_advantages=True, tree_baseline="node")
    )
    for d in datums:
        first = d.loss_mask.index(1.0)
        per_token = d.extras[ADV_KEY]
        assert per_token[first + 1] == pytest.approx(d.advantage)
        assert all(a == 0.0 for j, a in enumerate(per_token) if j != first + 1)


def test_kl_anchor_over_micro_batches_with_the_batch_prefix(tiny_model_dir: Path) -> None:
    # The reference pass once laid the rows out with the micro-batch's own prefix, not the batch's, and the
    # loss refused the shapes. At the start (LoRA B = 0) policy and base agree: the KL term adds no gradient.
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    ds = dp_datums()
    g_kl = _grad(trainer, ds, LossConfig(agg="token_mean", kl_beta=0.1), None)
    g_plain = _grad(trainer, ds, LossConfig(agg="token_mean"), None)
    assert g_plain.abs().max() > 0
    torch.testing.assert_close(g_kl, g_plain, atol=1e-7, rtol=1e-5)
