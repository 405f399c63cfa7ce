"""Training one step while the next step's rollouts gather (the demo's `overlap`): the engine and the trainer
on torch threads of their own, both at work at once through the real server on 127.0.0.1, and each train
step's metrics saying how far behind the sampling weights were."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch
from helpers import toy_rollout
from openai.types.chat.chat_completion import Choice

import advantage as adv
from advantage.engine.torch_engine import TorchEngine
from advantage.service import Service
from advantage.tracking import RunLog, policy_lag

pytestmark = pytest.mark.integration


def test_the_engine_sets_its_own_threads_only(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        TorchEngine(tiny_model_dir, threads=0)
    before = torch.get_num_threads()
    engine = TorchEngine(tiny_model_dir, dtype="float32", threads=1)
    try:
        assert engine._command(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == before  # this thread keeps its own
    finally:
        engine.close()


def test_the_engine_decodes_on_fewer_threads_while_the_trainer_runs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="threads_while_training must be >= 1"):
        TorchEngine(tiny_model_dir, threads_while_training=0)
    service = Service(tmp_path, {"dtype": "float32", "threads": 2})
    engine = service.engine(str(tiny_model_dir))

    def engine_threads() -> int:
        return engine._command(torch.get_num_threads).result(timeout=30)

    ours = torch.get_num_threads()  # what the training thread takes (the count the service was made under)
    try:
        assert engine_threads() == 2
        service.submit_train(lambda: None).result(timeout=30)  # the training thread exists, has run no op

        def during_a_job() -> tuple[int, int]:
            return engine_threads(), torch.get_num_threads()

        # A job on the training thread (a train step, or any other use of the trainer): the engine's next
        # step runs on threads_while_training (default: half of its threads), then on its own again. torch
        # sets a thread's count at its first op to the last count set on any thread: the training thread,
        # which had run none when the engine set 1, keeps its own all the same.
        assert service.submit_train(during_a_job).result(timeout=30) == (1, ours)
        assert not service.trainer_busy.is_set() and engine_threads() == 2
    finally:
        service.close()


async def test_a_step_trains_while_the_next_rollouts_gather(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False, threads=1)
    model = adv.TrainableModel("lag", project="t", base_model=str(tiny_model_dir))
    await model.register(backend)

    async def rollouts() -> list[adv.TrajectoryGroup]:
        return await adv.gather_trajectory_groups(
            [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
        )

    try:
        # A new thread starts with the last thread count set on any thread (the engine's 1): the training
        # thread takes the count the backend was created under instead.
        assert await backend.service.on_train_thread(torch.get_num_threads) == torch.get_num_threads()
        config = adv.TrainConfig(learning_rate=5e-2)
        first = await rollouts()
        upcoming = asyncio.ensure_future(rollouts())  # from step 0's weights, while step 1 trains
        one = await model.train(first, config)
        second = await upcoming
        two = await model.train(second, config)
        assert (one.step, two.step) == (1, 2)
        assert one.metrics["policy_lag_mean"] == 0.0 and one.metrics["policy_lag_max"] == 0.0
        # Step 2 trained from step 1's weights on completions of step 0 (or of step 1, for a request that
        # arrived after the swap): one update behind at most, and recorded as such.
        steps = {s for g in second for t in g.trajectories for s in t.weight_steps()}
        assert steps <= {0, 1}
        assert 0.0 <= two.metrics["policy_lag_mean"] <= 1.0 and two.metrics["policy_lag_max"] == max(
            1 - s for s in steps
        )
        logged = [r for r in RunLog(backend.run_dir(model)).rows() if r.get("split") == "train"]
        assert [r["policy_lag_mean"] for r in logged] == [
            one.metrics["policy_lag_mean"],
            two.metrics["policy_lag_mean"],
        ]
    finally:
        await backend.close()


def test_policy_lag_counts_only_the_trained_models_completions() -> None:
    def choice(model: str, step: int) -> dict:
        return {
            "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x"},
            "weights": {"model": model, "step": step},
        }  # fmt: skip

    def traj(*choices: dict) -> adv.Trajectory:
        items: list = [{"role": "user", "content": "q"}]
        items += [Choice.model_validate(c) for c in choices]
        return adv.Trajectory(items, reward=0.0)

    groups = [
        adv.TrajectoryGroup([traj(choice("m", 3), choice("m", 4)), traj(choice("judge", 0))]),
        adv.TrajectoryGroup([traj(choice("m", 4))]),
    ]
    # completions of m at steps 3, 4, 4, trained at step 5: lags 2, 1, 1; the judge's is not m's
    assert policy_lag(groups, "m", 5) == {"policy_lag_mean": pytest.approx(4 / 3), "policy_lag_max": 2.0}
    assert policy_lag(groups, "other", 5) == {}


def test_serve_takes_engine_threads_for_the_torch_engine_only() -> None:
    from typer.testing import CliRunner

    from advantage.cli import app

    result = CliRunner().invoke(app, ["serve", "--engine", "vllm", "--engine-threads", "1", "--port", "7988"])
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # rich's error box, unwrapped
    assert result.exit_code == 2 and "only the torch engine takes a thread count" in said
    result = CliRunner().invoke(app, ["serve", "--engine-threads", "0", "--port", "7988"])
    assert result.exit_code == 2 and "--engine-threads" in result.output
