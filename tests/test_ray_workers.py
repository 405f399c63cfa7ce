"""Trainer workers placed as Ray actors (`training/ray_workers.py`), on a local Ray cluster on the CPU.

With one worker and no address nothing changes and Ray is never imported. The Ray tests share one local
cluster (5-16 s to start) and skip when Ray is not installed. On the two-core dev box each took 15-21 s
when it was quiet and 42-75 s under load: the LocalBackend ones (a two-step run, a killed worker) run by
default; the equality and checkpoint round trip is `slow` (test_distributed.py covers the equality)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (
    DP_CONFIG,
    DP_LORA,
    DP_STEPS,
    arm_trainer_worker_to_die,
    dp_datums,
    single_process_steps,
    toy_rollout,
)

import advantage as adv
from advantage.config import LoRAConfig
from advantage.training.ray_workers import Placement, RayTrainerGroup, trainer_factory
from advantage.training.trainer import Trainer

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed; it is the optional extra: pip install 'advantage[ray]'",
)


def test_one_worker_needs_no_ray_and_bad_placements_are_refused() -> None:
    assert trainer_factory(Placement()) is None
    assert trainer_factory(Placement(workers=2)) is not None
    assert trainer_factory(Placement(ray_address="auto")) is not None
    for bad in ({"workers": 0}, {"cpus_per_worker": 0}, {"gpus_per_worker": -1}):
        with pytest.raises(ValueError):
            Placement(**bad)  # type: ignore[arg-type]


def test_trainer_workers_without_ray_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'advantage\[ray\]'"):
        RayTrainerGroup.start("unused", DP_LORA, Placement(workers=2))


NO_RAY_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    import advantage as adv
    from helpers import toy_rollout

    async def main():
        backend = adv.LocalBackend({root!r}, progress=False, trainer_workers=1)
        model = adv.TrainableModel("solo", project="t", base_model={base!r})
        await model.register(backend)
        groups = await adv.gather_trajectory_groups(
            [[toy_rollout(model) for _ in range(2)] for _ in range(2)], progress=False)
        result = await model.train(groups, adv.TrainConfig(learning_rate=1e-2))
        await backend.close()
        print("STEP", result.step, "RAY", sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))

    asyncio.run(main())
    """
)


def test_one_trainer_worker_never_imports_ray(tiny_model_dir: Path, tmp_path: Path) -> None:
    """LocalBackend(trainer_workers=1): register and one train step in a fresh process, and no module of Ray
    is loaded (whether Ray is installed or not)."""
    script = NO_RAY_SCRIPT.format(
        tests=str(Path(__file__).parent), root=str(tmp_path), base=str(tiny_model_dir)
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STEP 1 RAY []" in out.stdout, out.stdout


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (starting one takes ~16 s here); groups started on it leave it up."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@needs_ray
@pytest.mark.slow
def test_ray_workers_match_one_process_and_round_trip_checkpoints(
    ray_cluster: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """M = 2 actors (gloo) on the same datums as the single-process trainer: the same adapter. A checkpoint
    saved through the group loads into a plain Trainer, and loading one puts every worker back on it."""
    import ray

    want, _ = single_process_steps(tiny_model_dir)
    group = RayTrainerGroup.start(tiny_model_dir, DP_LORA, Placement(workers=2, dtype="float32"))
    try:
        for step in range(DP_STEPS):
            metrics = ray.get([a.train_datums.remote(dp_datums(), DP_CONFIG, step) for a in group.actors])
            assert metrics[0] == metrics[1]
        states = group.adapter_states()
        for n, v in want.items():
            assert torch.equal(states[0][n], states[1][n]), n
            torch.testing.assert_close(states[0][n], v, atol=1e-6, rtol=1e-4)
        group.save(tmp_path)
        plain = Trainer(tiny_model_dir, DP_LORA, dtype="float32")
        plain.load(tmp_path)
        for n, p in plain.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.detach(), states[0][n])
        ray.get([a.train_datums.remote(dp_datums(), DP_CONFIG, DP_STEPS) for a in group.actors])
        group.load(tmp_path)  # back to the saved step, on every worker
        for s in group.adapter_states():
            for n, v in states[0].items():
                assert torch.equal(s[n], v), n
        with pytest.raises(AttributeError, match="trainer_workers=1"):
            group.optim_step(DP_CONFIG)  # the low-level API is not distributed
    finally:
        group.close()


@needs_ray
async def test_local_backend_trains_on_two_ray_workers(
    ray_cluster: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """LocalBackend(trainer_workers=2): two GRPO steps through the public API; each new step is served, and
    the checkpoint on disk is what both workers hold."""
    backend = adv.LocalBackend(tmp_path, progress=False, trainer_workers=2)
    model = adv.TrainableModel("dp", project="t", base_model=str(tiny_model_dir), lora=LoRAConfig(r=4))
    await model.register(backend)
    try:
        for want_step in (1, 2):
            groups = await adv.gather_trajectory_groups(
                [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
            )
            result = await model.train(groups, adv.TrainConfig(learning_rate=1e-2, micro_batch_size=4))
            assert result.step == want_step and model.get_inference_name() == f"dp@{want_step}"
            assert result.metrics["trainer_workers"] == 2.0 and result.metrics["trained_tokens"] > 0
            assert result.metrics["logprob_drift_mean_abs"] < 0.05  # the workers' weights are the served ones
        served = [m.id for m in (await model.openai_client().models.list()).data]
        assert "dp@2" in served
        group = backend.service.model_entry("dp").trainer
        assert isinstance(group, RayTrainerGroup)
        states = group.adapter_states()
        plain = Trainer(tiny_model_dir, LoRAConfig(r=4))
        plain.load(backend.run_dir(model) / "0002")
        for n, p in plain.model.named_parameters():
            if p.requires_grad:
                assert torch.equal(states[0][n], states[1][n]), n
                torch.testing.assert_close(p.detach(), states[0][n])
    finally:
        await backend.close()


@needs_ray
async def test_a_killed_trainer_worker_fails_the_step_and_the_next_resumes_from_the_checkpoint(
    ray_cluster: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Worker 1 dies mid-step: the step raises a clear error, nothing is published, and the next call starts
    fresh workers from the last checkpoint (step 1), so the next `train` publishes step 2 from there."""

    backend = adv.LocalBackend(tmp_path, progress=False, trainer_workers=2)
    model = adv.TrainableModel("kill", project="t", base_model=str(tiny_model_dir), lora=LoRAConfig(r=4))
    await model.register(backend)
    config = adv.TrainConfig(learning_rate=1e-2, micro_batch_size=2)
    try:
        groups = await adv.gather_trajectory_groups(
            [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
        )
        assert (await model.train(groups, config)).step == 1
        group = backend.service.model_entry("kill").trainer
        assert isinstance(group, RayTrainerGroup)

        arm_trainer_worker_to_die(group)
        with pytest.raises(RuntimeError, match="trainer worker failed during step 2; nothing was saved"):
            await model.train(groups, config)
        assert await model.get_step() == 1 and model.get_inference_name() == "kill@1"
        assert not (backend.run_dir(model) / "0002").exists()
        served = [m.id for m in (await model.openai_client().models.list()).data]
        assert "kill@2" not in served
        # The next call restarts both workers (the survivor's group is broken too) on step 1's checkpoint.
        states = group.adapter_states()
        plain = Trainer(tiny_model_dir, LoRAConfig(r=4))
        plain.load(backend.run_dir(model) / "0001")
        for n, p in plain.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(states[0][n], p.detach())
                assert torch.equal(states[0][n], states[1][n]), n
        result = await model.train(groups, config)
        assert result.step == 2 and result.metrics["trainer_workers"] == 2.0
        assert model.get_inference_name() == "kill@2"
    finally:
        await backend.close()


@needs_ray
@pytest.mark.slow
async def test_serve_with_trainer_workers_trains_over_http(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`advantage serve --trainer-workers 2` (its own local Ray cluster): a RemoteBackend registers and trains
    one step, done by the two workers; SIGTERM stops the server, its workers and its cluster."""
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "advantage", "serve", "--trainer-workers", "2", "--port", str(port)]
    cmd += ["--root", str(tmp_path / "root"), "--base-model", str(tiny_model_dir), "--api-key", "k"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        backend = adv.RemoteBackend(f"http://127.0.0.1:{port}", api_key="k", progress=False)
        model = adv.TrainableModel("remote-dp", project="t", base_model=str(tiny_model_dir))
        await model.register(backend)
        groups = await adv.gather_trajectory_groups(
            [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
        )
        result = await model.train(groups, adv.TrainConfig(learning_rate=1e-2))
        assert result.step == 1 and result.metrics["trainer_workers"] == 2.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
