"""RemoteBackend against the real server: the same user code as with LocalBackend trains over HTTP.

The server runs in-process on 127.0.0.1 (a `BackgroundServer`) for the API tests, and as a separate
`advantage serve`-equivalent process for the kill -9 test, which restarts it on the same root and port. The
tiny random Llama keeps each train step well under a second.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import PROMPT, toy_rollout

import advantage as adv
from advantage.backends.remote import (
    BackendAuthError,
    BackendRequestError,
    BackendUnavailableError,
    RemoteBackend,
)
from advantage.server.runner import BackgroundServer, free_port
from advantage.service import Service
from advantage.training import checkpoints as ckpt
from advantage.training.grpo import Progress
from advantage.training.trainer import Trainer

pytestmark = pytest.mark.integration

KEY = "k"


_rollout = toy_rollout


async def _groups(model: adv.TrainableModel, n_groups: int = 2, size: int = 4) -> list[adv.TrajectoryGroup]:
    return await adv.gather_trajectory_groups(
        [[_rollout(model) for _ in range(size)] for _ in range(n_groups)], progress=False
    )


class GatedService(Service):
    """A Service whose train step can be held mid-step, to show inference is served meanwhile."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.in_step = threading.Event()

    def train(
        self,
        name: str,
        groups: list[adv.TrajectoryGroup],
        config: adv.TrainConfig,
        progress: Progress | None = None,
    ) -> tuple[int, dict[str, float]]:
        def held(done: int, total: int) -> None:
            if progress:
                progress(done, total)
            self.in_step.set()
            assert self.gate.wait(30), "the test never opened the gate"

        return super().train(name, groups, config, held)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[GatedService]:
    svc = GatedService(tmp_path)
    yield svc
    svc.close()


@pytest.fixture
def server(service: GatedService) -> Iterator[BackgroundServer]:
    srv = BackgroundServer(service, api_key=KEY).start()
    yield srv
    srv.stop()


def test_base_url_with_or_without_v1() -> None:
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert RemoteBackend(url).base_url == "http://h:1/v1"
    with pytest.raises(ValueError, match="http://"):
        RemoteBackend("h:1")


async def test_same_user_code_trains_over_http(
    tiny_model_dir: Path, tmp_path: Path, server: BackgroundServer, service: GatedService
) -> None:
    backend = RemoteBackend(server.base_url.removesuffix("/v1"), api_key=KEY, progress=False)
    model = adv.TrainableModel("remote", project="t", base_model=str(tiny_model_dir))
    await model.register(backend)
    try:
        assert model.base_url == server.base_url and model.get_inference_name() == "remote@0"
        result = await model.train(await _groups(model), adv.TrainConfig(learning_rate=1e-2))
        assert result.step == 1 and model.get_inference_name() == "remote@1"
        assert result.metrics["trained_tokens"] > 0 and "train/reward" in result.metrics

        # Step 2, held mid-step on the server: inference is answered meanwhile, from the previous weights.
        groups = await _groups(model)
        service.gate.clear()
        train = asyncio.create_task(model.train(groups, adv.TrainConfig(learning_rate=1e-2)))
        assert await asyncio.to_thread(service.in_step.wait, 30)
        resp = await model.openai_client().chat.completions.create(
            model="remote", messages=PROMPT, max_tokens=2
        )
        assert resp.choices[0].model_extra["weights"] == {"model": "remote", "step": 1}
        assert not train.done()
        service.gate.set()
        result = await train
        assert result.step == 2 and math.isfinite(result.metrics["loss"])

        served = [m.id for m in (await model.openai_client().models.list()).data]
        assert {"remote", "remote@1", "remote@2"} <= set(served)
        resp = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=PROMPT, max_tokens=2
        )
        assert resp.choices[0].model_extra["weights"] == {"model": "remote", "step": 2}
        assert await model.get_step() == 2

        val = adv.TrajectoryGroup([adv.Trajectory(PROMPT, reward=0.25), adv.Trajectory(PROMPT, reward=0.75)])
        logged = await model.log([val], split="val")
        assert logged["val/reward"] == pytest.approx(0.5)
        # An evaluation of remote@1 that ended after step 2 was trained is logged at the step it evaluated.
        await model.log([val], split="dev", step=1)
        mdir = ckpt.model_dir(tmp_path, "t", "remote")
        rows = [json.loads(x) for x in (mdir / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["split"]) for r in rows if "/reward" in str(list(r))][-2:] == [
            (2, "val"),
            (1, "dev"),
        ]
        assert await model.delete_checkpoints(keep="latest") == [1]
        assert ckpt.list_steps(mdir) == [0, 2]
        assert (mdir / "trajectories" / "val" / "0002.jsonl").exists()
        assert (mdir / "trajectories" / "dev" / "0001.jsonl").exists()
    finally:
        await backend.close()


async def test_a_step_completes_when_its_client_leaves(
    tiny_model_dir: Path, server: BackgroundServer, service: GatedService
) -> None:
    backend = RemoteBackend(server.base_url, api_key=KEY, progress=False)
    model = adv.TrainableModel("leaver", project="t", base_model=str(tiny_model_dir))
    await model.register(backend)
    try:
        groups = await _groups(model)
        service.gate.clear()
        train = asyncio.create_task(model.train(groups, adv.TrainConfig(learning_rate=1e-2)))
        assert await asyncio.to_thread(service.in_step.wait, 30)
        train.cancel()  # the client goes away mid-step
        with pytest.raises(asyncio.CancelledError):
            await train
        service.gate.set()
        deadline = time.monotonic() + 30
        while await model.get_step() != 1:  # the step still completes, and is the latest
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        await backend.close()


async def test_wrong_or_missing_key_is_a_clear_auth_error(
    tiny_model_dir: Path, server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ADVANTAGE_API_KEY", raising=False)
    model = adv.TrainableModel("nokey", project="t", base_model=str(tiny_model_dir))
    for key in ("wrong", None):
        backend = RemoteBackend(server.base_url, api_key=key, progress=False)
        with pytest.raises(BackendAuthError, match="refused the API key") as info:
            await model.register(backend)
        assert info.value.status == 401 and "api_key=KEY" in str(info.value)
        await backend.close()
    monkeypatch.setenv("ADVANTAGE_API_KEY", KEY)  # the same variable `advantage serve` reads
    assert RemoteBackend(server.base_url).api_key == KEY


async def test_unreachable_server_is_a_clear_error() -> None:
    backend = RemoteBackend(f"http://127.0.0.1:{free_port()}", max_retries=1, progress=False)
    model = adv.TrainableModel("x", base_model="whatever")
    with pytest.raises(BackendUnavailableError, match="Cannot reach the advantage server .* 2 attempts"):
        await model.register(backend)
    await backend.close()


async def test_bad_input_is_a_4xx_that_says_what_to_do(
    tiny_model_dir: Path, server: BackgroundServer
) -> None:
    backend = RemoteBackend(server.base_url, api_key=KEY, progress=False)
    model = adv.TrainableModel("bad", project="t", base_model=str(tiny_model_dir))
    try:
        with pytest.raises(BackendRequestError, match="Invalid model name") as info:
            await adv.TrainableModel("../escape", base_model=str(tiny_model_dir)).register(backend)
        assert info.value.status == 400
        await model.register(backend)

        with pytest.raises(ValueError, match="no trajectory groups; gather some rollouts") as info:
            await model.train([])
        assert isinstance(info.value, BackendRequestError) and info.value.status == 400
        with pytest.raises(BackendRequestError, match="Group 0 has no trajectories; drop groups"):
            await model.train([adv.TrajectoryGroup([])])
        groups = await _groups(model, n_groups=1, size=2)
        groups[0].trajectories[1].reward = float("nan")
        with pytest.raises(BackendRequestError, match="Trajectory 1 has reward nan; rewards must be finite"):
            await model.train(groups)
        with pytest.raises(BackendRequestError, match="Invalid split"):
            await model.log([adv.TrajectoryGroup([adv.Trajectory(PROMPT)])], split="../x")
        with pytest.raises(BackendRequestError, match="Cannot log at step 7 .*no such step") as info:
            await model.log([adv.TrajectoryGroup([adv.Trajectory(PROMPT, reward=1.0)])], split="dev", step=7)
        assert info.value.status == 400
        # Found while training, after the stream started: an error event, raised the same way.
        groups = await _groups(model, n_groups=1, size=2)
        groups[0].trajectories[0].reward, groups[0].trajectories[1].reward = 0.0, 1.0
        with pytest.raises(BackendRequestError, match="over the limit of 16. Raise max_seq_len") as info:
            await model.train(groups, adv.TrainConfig(max_seq_len=16))
        assert info.value.status == 400
        assert await model.get_step() == 0  # nothing above trained

        # The wire, as any HTTP client sees it: OpenAI's error shape, unknown fields refused.
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=f"{server.base_url}/training", headers=headers) as http:
            r = await http.get("/models/nobody/step")
            assert r.status_code == 404
            err = r.json()["error"]
            assert err["code"] == "model_not_registered" and "register" in err["message"]
            r = await http.post("/models/bad/train", json={"groups": [], "config": {}, "extra": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
            r = await http.post("/models/bad/train", json={"groups": [], "config": {"learning_rate": -1}})
            assert r.status_code == 400 and r.json()["error"]["param"] == "config.learning_rate"
            r = await http.post("/models/bad/delete_checkpoints", json={"keep": "all"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "keep"
    finally:
        await backend.close()


SERVER_SCRIPT = textwrap.dedent(
    """
    import time
    from advantage.server.runner import serve_forever
    from advantage.service import Service

    class SlowService(Service):  # each micro-batch takes a while, so a kill lands mid-step
        def train(self, name, groups, config, progress=None):
            def slow(done, total):
                progress(done, total)
                print("PROGRESS", self.model_entry(name).latest + 1, done, total, flush=True)
                time.sleep(0.5)
            return super().train(name, groups, config, slow)

    serve_forever(SlowService({root!r}), "127.0.0.1", {port}, {key!r})
    """
)


class ServerProcess:
    """`advantage serve` on a root and port, in a subprocess; its PROGRESS lines arrive on `lines`."""

    def __init__(self, root: Path, port: int, log: Path) -> None:
        code = SERVER_SCRIPT.format(root=str(root), port=port, key=KEY)
        self.log = open(log, "a")  # closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"the server died at start; see {log}"
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("PROGRESS"):
                self.lines.put(line)

    def kill_during_step(self, step: int) -> None:
        """SIGKILL after the first micro-batch of the step that will be `step`."""
        while int(self.lines.get(timeout=60).split()[1]) != step:
            pass
        os.kill(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


async def test_kill_9_mid_train_then_restart_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    root, port, log = tmp_path / "root", free_port(), tmp_path / "server.log"
    mdir = ckpt.model_dir(root, "t", "resume")
    server = ServerProcess(root, port, log)
    backend = RemoteBackend(server.url, api_key=KEY, progress=False, max_retries=1)
    model = adv.TrainableModel("resume", project="t", base_model=str(tiny_model_dir))
    try:
        await model.register(backend)
        assert (await model.train(await _groups(model), adv.TrainConfig(learning_rate=1e-2))).step == 1
        groups = await _groups(model)

        # kill -9 the server while the second step is in flight (after its first micro-batch).
        killer = asyncio.create_task(asyncio.to_thread(server.kill_during_step, 2))
        with pytest.raises(BackendUnavailableError) as info:
            await model.train(groups, adv.TrainConfig(learning_rate=1e-2))
        await killer
        message = str(info.value)
        assert "went away during a train step of 'resume'" in message
        assert "newest complete checkpoint is kept" in message
        assert "get_step()" in message and "train(...)" in message
        server.kill()
        assert ckpt.list_steps(mdir) == [0, 1]

        # Restart on the same root and port. The same client sends the same groups again (sampled from
        # step 1, the step the server resumes from): the server no longer knows the model, so the client
        # registers it again, and the step becomes 2.
        server = ServerProcess(root, port, log)
        result = await model.train(groups, adv.TrainConfig(learning_rate=1e-2))
        assert result.step == 2 and await model.get_step() == 2
        assert ckpt.list_steps(mdir) == [0, 1, 2] and not list(mdir.glob(".tmp-*"))

        # A fresh client (the user's script restarted too) resumes from the newest step as well.
        again = adv.TrainableModel("resume", project="t", base_model=str(tiny_model_dir))
        await again.register(RemoteBackend(server.url, api_key=KEY, progress=False))
        assert again.get_inference_name() == "resume@2"
        assert (await again.train(await _groups(again), adv.TrainConfig(learning_rate=1e-2))).step == 3
        await again.backend.close()
    finally:
        await backend.close()
        server.kill()

    trainer = Trainer(tiny_model_dir, adv.LoRAConfig())
    for s in ckpt.list_steps(mdir):  # every step on disk is complete and loads
        assert ckpt.read_state(mdir, s)["step"] == s
        trainer.load(ckpt.step_dir(mdir, s))
