"""The training loop end to end on the tiny random Llama, through the real server on 127.0.0.1: a train
step really changes the served weights (hot swap), and a killed process resumes from its newest complete
checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import PROMPT, same_weights_logprob_tol, toy_rollout

import advantage as adv
from advantage.training import checkpoints as ckpt

pytestmark = pytest.mark.integration


_rollout = toy_rollout


async def _first_token_logprob(model: adv.TrainableModel, name: str) -> tuple[int, float]:
    resp = await model.openai_client().chat.completions.create(
        model=name, messages=PROMPT, max_tokens=1, temperature=0.0
    )
    extra = resp.choices[0].model_extra
    return extra["token_ids"][0], extra["token_logprobs"][0]


async def test_train_step_is_served_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("hot", project="t", base_model=str(tiny_model_dir))
    await model.register(backend)
    try:
        assert model.get_inference_name() == "hot@0"
        tok0, lp0 = await _first_token_logprob(model, "hot@0")
        groups = await adv.gather_trajectory_groups(
            [[_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
        )
        result = await model.train(groups, adv.TrainConfig(learning_rate=5e-2))
        assert result.step == 1 and model.get_inference_name() == "hot@1"
        assert result.metrics["trained_tokens"] > 0
        assert result.metrics["logprob_drift_mean_abs"] < 0.05  # sampler and trainer agree before the update
        served = [m.id for m in (await model.openai_client().models.list()).data]
        assert "hot@1" in served and "hot" in served
        # The same greedy first token now gets a different logprob from the server: the new weights answer.
        _, lp1 = await _first_token_logprob(model, "hot@1")
        tok_old, lp_old = await _first_token_logprob(model, "hot@0")
        assert abs(lp1 - lp0) > 1e-4
        assert (tok_old, pytest.approx(lp_old, abs=1e-3)) == (tok0, lp0)  # older steps stay servable
        resp = await model.openai_client().chat.completions.create(model="hot", messages=PROMPT, max_tokens=2)
        assert resp.choices[0].model_extra["weights"] == {"model": "hot", "step": 1}
    finally:
        await backend.close()


TRAIN_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    import advantage as adv
    from helpers import toy_rollout as _rollout

    async def main():
        backend = adv.LocalBackend({root!r}, progress=False)
        model = adv.TrainableModel("resume", project="t", base_model={base!r})
        await model.register(backend)
        print("START", await model.get_step(), flush=True)
        for _ in range({steps}):
            groups = await adv.gather_trajectory_groups(
                [[_rollout(model) for _ in range(4)] for _ in range(2)], progress=False)
            result = await model.train(groups, adv.TrainConfig(learning_rate=1e-2))
            print("STEP", result.step, flush=True)
        await backend.close()

    asyncio.run(main())
    """
)


def _run(tiny: Path, root: Path, steps: int, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    code = TRAIN_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root), base=str(tiny), steps=steps)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_kill_9_between_steps_and_during_checkpoint_write_then_resume(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    mdir = ckpt.model_dir(tmp_path, "t", "resume")
    # 1. kill -9 right after step 2 completes (between steps).
    proc = _run(tiny_model_dir, tmp_path, steps=10)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("STEP 2"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert ckpt.list_steps(mdir)[-1] >= 2
    last = ckpt.list_steps(mdir)[-1]

    # 2. Restart, and get killed inside the next checkpoint write: a partial dir is left behind.
    proc = _run(tiny_model_dir, tmp_path, steps=1, env={"ADVANTAGE_FAULT": "kill-in-checkpoint-write"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert f"START {last}" in out
    assert list(mdir.glob(".tmp-*")), "the killed write should leave a partial temp dir"
    assert ckpt.list_steps(mdir)[-1] == last  # the partial step is not a step

    # 3. Restart cleanly: it resumes from the newest complete step, sweeps the partial dir, and goes on.
    proc = _run(tiny_model_dir, tmp_path, steps=1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"START {last}" in out and f"STEP {last + 1}" in out
    assert not list(mdir.glob(".tmp-*"))
    for s in ckpt.list_steps(mdir):  # every complete step loads
        assert ckpt.read_state(mdir, s)["step"] == s
        if s > 0:
            assert (ckpt.step_dir(mdir, s) / "adapter_model.safetensors").stat().st_size > 0


async def test_log_and_delete_checkpoints_keep_best_and_latest(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("keep", project="t", base_model=str(tiny_model_dir))
    await model.register(backend)
    try:
        val_rewards = {1: 0.9, 2: 0.1, 3: 0.4}
        for step in (1, 2, 3):
            groups = await adv.gather_trajectory_groups(
                [[_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
            )
            assert (await model.train(groups, adv.TrainConfig(learning_rate=1e-3))).step == step
            val = adv.TrajectoryGroup([adv.Trajectory(PROMPT, reward=val_rewards[step])])
            logged = await model.log([val], split="val")
            assert logged["val/reward"] == pytest.approx(val_rewards[step])
        assert await model.delete_checkpoints() == [2]  # step 1 is the best by val/reward, 3 the latest
        mdir = ckpt.model_dir(tmp_path, "t", "keep")
        assert ckpt.list_steps(mdir) == [0, 1, 3]
        served = [m.id for m in (await model.openai_client().models.list()).data]
        assert "keep@2" not in served and "keep@1" in served
        resp = await model.openai_client().chat.completions.create(
            model="keep@1", messages=PROMPT, max_tokens=1
        )
        assert resp.choices[0].model_extra["weights"]["step"] == 1  # an older kept step still serves
        rows = (mdir / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 6  # 3 train steps + 3 evaluations
        assert (mdir / "trajectories" / "val" / "0003.jsonl").exists()
    finally:
        await backend.close()


async def test_restore_serves_an_earlier_step_as_the_latest(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("back", project="t", base_model=str(tiny_model_dir))
    await model.register(backend)
    try:
        with pytest.raises(ValueError, match="logged 'val/reward'"):
            await model.restore()  # nothing evaluated yet: say what to do
        scores = {1: 0.9, 2: 0.1}
        for step in (1, 2):
            groups = await adv.gather_trajectory_groups(
                [[_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
            )
            await model.train(groups, adv.TrainConfig(learning_rate=5e-2))
            val = adv.TrajectoryGroup([adv.Trajectory(messages_and_choices=[], reward=scores[step])])
            await model.log([val], split="val")
        _, lp1 = await _first_token_logprob(model, "back@1")
        _, lp2 = await _first_token_logprob(model, "back@2")
        assert abs(lp1 - lp2) > 10 * same_weights_logprob_tol()
        new = await model.restore()  # the best by val/reward: step 1
        assert (new, model.restored_from, model.get_inference_name()) == (3, 1, "back@3")
        _, lp3 = await _first_token_logprob(model, "back")
        # Step 1's weights, served as the latest (to float tolerance: in bf16 this -10.07 moved by 8.6e-4).
        assert lp3 == pytest.approx(lp1, abs=same_weights_logprob_tol())
        rows = [r for r in backend.service.model_entry("back").log.rows() if r["split"] == "restore"]
        assert rows == [{**rows[0], "step": 3, "restored_from": 1.0, "metric": "val/reward", "value": 0.9}]
        # Training goes on from the restored weights.
        groups = await adv.gather_trajectory_groups(
            [[_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
        )
        assert (await model.train(groups, adv.TrainConfig(learning_rate=5e-2))).step == 4
        assert await model.restore(0) == 5  # step 0: the base weights
        with pytest.raises(ValueError, match="not on disk"):
            await model.restore(99)
    finally:
        await backend.close()
