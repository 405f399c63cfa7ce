"""Exact resume: each step dir holds the AdamW state beside the adapter, so a run stopped after step 2 and
started again (a new Service on the same root, as after a kill) takes the same step 3 as a run that never
stopped. Without the saved moments it would not: the last test shows the difference is visible."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from openai.types.chat.chat_completion import Choice
from safetensors.torch import load_file

import advantage as adv
from advantage.config import AdamParams, LoRAConfig
from advantage.service import Service
from advantage.training import checkpoints as ckpt
from advantage.training.trainer import Datum, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = [{"role": "user", "content": "Count."}]
CONFIG = adv.TrainConfig(learning_rate=1e-2)


def _groups(step: int) -> list[adv.TrajectoryGroup]:
    """Fixed groups, different at every step: the runs compared see the same data."""

    def traj(i: int) -> adv.Trajectory:
        ids = [100 + 7 * step + i, 200 + 3 * i, 300 + step, 2]
        choice = Choice.model_validate(
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "x"},
                "token_ids": ids,
                "token_logprobs": [-10.0 - 0.1 * k for k in range(len(ids))],
            }
        )
        return adv.Trajectory([*PROMPT, choice], reward=float((i + step) % 3))

    return [
        adv.TrajectoryGroup([traj(i) for i in range(4)]),
        adv.TrajectoryGroup([traj(i) for i in range(4, 8)]),
    ]


def _train(root: Path, model: str, steps: range) -> int:
    """A fresh Service on `root` (resuming whatever is there), `steps` train steps, then it is dropped."""
    service = Service(root)
    try:
        start = service.register("p", "m", model)
        for step in steps:
            assert service.train("m", _groups(step), CONFIG)[0] == step + 1
        return start
    finally:
        service.close()


def _adapter(root: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(ckpt.step_dir(ckpt.model_dir(root, "p", "m"), step) / "adapter_model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_resumed_run_takes_the_same_third_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    straight, resumed, forgetful = tmp_path / "straight", tmp_path / "resumed", tmp_path / "forgetful"
    assert _train(straight, str(tiny_model_dir), range(3)) == 0
    assert _train(resumed, str(tiny_model_dir), range(2)) == 0
    shutil.copytree(resumed, forgetful)
    (ckpt.step_dir(ckpt.model_dir(forgetful, "p", "m"), 2) / "optimizer.pt").unlink()

    # Stopped after step 2, started again: the third step continues the same AdamW moments.
    assert _train(resumed, str(tiny_model_dir), range(2, 3)) == 2
    for step in (1, 2, 3):
        a, b = _adapter(straight, step), _adapter(resumed, step)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)

    # The same resume with the moments lost takes a different step, far outside that tolerance.
    assert _train(forgetful, str(tiny_model_dir), range(2, 3)) == 2
    moved = _max_diff(_adapter(straight, 3), _adapter(straight, 2))
    assert _max_diff(_adapter(forgetful, 3), _adapter(straight, 3)) > 0.1 * moved


def test_loading_a_step_replaces_the_moments(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`Trainer.load` takes the step's AdamW state; a step saved without one (an adapter from elsewhere) starts
    the moments afresh rather than keeping those of the weights trained before."""
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    datum = Datum(
        input_ids=[1, 5, 9, 30, 31, 2], loss_mask=[0, 0, 0, 1, 1, 1], logprobs=[-1.0] * 6, advantage=1.0
    )

    def step() -> None:
        trainer.forward_backward([datum], lambda b: (-(b.logp * b.adv[:, None] * b.mask).sum(), {}))
        trainer.optim_step(AdamParams(learning_rate=1e-2))

    step()
    trainer.save(tmp_path / "one")
    saved = {k: v.clone() for k, v in trainer.optimizer.state[trainer.params[0]].items()}
    step()
    trainer.load(tmp_path / "one")
    for k, v in trainer.optimizer.state[trainer.params[0]].items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)

    (tmp_path / "one" / "optimizer.pt").unlink()
    step()
    trainer.load(tmp_path / "one")
    assert not trainer.optimizer.state
