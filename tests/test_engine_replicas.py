"""Engine replicas as Ray actors (`engine/replicas.py`) and their router (`engine/routing.py`).

The router's tests are pure. The rest run on one local Ray cluster (8 logical CPUs on however many cores)
and skip when Ray is not installed. On the tiny random Llama: the engine contract suite against 2 replicas,
per-token streaming and cancelling, and a streamed request whose replica dies. On the bundled SmolLM2, one
test of issue 15's done-when: two GRPO steps through `LocalBackend(engine_replicas=2, trainer_workers=2)`
with an engine replica killed during a gather and a trainer worker killed during a step (83-132 s on the
shared two-core box under load: the model loads in seven actor processes).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import arm_trainer_worker_to_die, toy_rollout

# The contract suite (engine/base.py), run here against the replicas: its fixtures and tests, imported.
from test_engine_contract import (  # noqa: F401 - fixtures and tests pytest collects from this module
    CONTEXT,
    PROMPT,
    EngineSpec,
    adapters,
    model_dir,
    reference,
    test_adapters_load_replace_and_unload,
    test_bad_requests_fail_at_submit,
    test_concurrent_requests_each_match_the_forward_pass,
    test_forced_tool_call_follows_its_grammar,
    test_generate_is_submit_awaited,
    test_greedy_tokens_and_logprobs_are_the_forward_pass,
    test_is_an_engine,
    test_max_tokens_and_length_finish,
    test_response_format_json_schema,
    test_sampled_logprobs_are_the_forward_pass,
    test_seed_reproduces_and_n_gives_distinct_choices,
    test_stop_string_cuts_the_text,
    test_streamed_text_adds_up,
)

import advantage as adv
from advantage.engine.base import Engine
from advantage.engine.replicas import RayEngineReplicas, ReplicaPlacement, ReplicaUnavailable, engine_factory
from advantage.engine.routing import BLOCK, PrefixRouter
from advantage.engine.sampling import SamplingParams

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed; it is the optional extra: pip install 'advantage[ray]'",
)


# ---------------------------------------------------------------------------------------------- pure parts
def test_one_replica_needs_no_ray_and_bad_placements_are_refused() -> None:
    assert engine_factory(ReplicaPlacement()) is None
    assert engine_factory(ReplicaPlacement(replicas=2)) is not None
    assert engine_factory(ReplicaPlacement(ray_address="auto")) is not None
    for bad in ({"replicas": 0}, {"cpus_per_replica": 0}, {"gpus_per_replica": -1}, {"max_restarts": -1}):
        with pytest.raises(ValueError):
            ReplicaPlacement(**bad)  # type: ignore[arg-type]


def test_replicas_without_ray_say_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'advantage\[ray\]'"):
        RayEngineReplicas.start(tiny_model_dir, ReplicaPlacement(replicas=2))


SYSTEM = list(range(1000, 1000 + 3 * BLOCK))  # a long shared system prompt: three whole blocks


def test_a_group_and_its_next_turns_stay_on_one_replica() -> None:
    """The same prompt (a group's rollouts) and a prompt extending it (the next turn) go where it was served,
    however loaded that replica is."""
    router = PrefixRouter()
    prompt = SYSTEM + [7, 8, 9]
    assert router.route(prompt, {0: 0, 1: 0}) == 0  # nothing known: the least loaded, lowest index on a tie
    assert router.route(prompt, {0: 5, 1: 0}) == 0  # the group's next rollout: affinity beats load
    turn2 = prompt + [11, 12, 13] * 20  # the reply and a tool result appended: past the next block
    assert router.route(turn2, {0: 9, 1: 0}) == 0
    assert router.route(turn2 + [14], {0: 9, 1: 0}) == 0  # and the turn after it
    short = [1, 2, 3]  # shorter than a block: matched by its exact hash
    assert router.route(short, {0: 3, 1: 2}) == 1
    assert router.route(short, {0: 0, 1: 9}) == 1


def test_a_shared_system_prompt_alone_goes_by_load() -> None:
    """Two groups share only their system prompt: no earlier prompt is a prefix of the other, so the second
    goes to the least loaded replica; a prompt that differs within its last, partial block too."""
    router = PrefixRouter()
    assert router.route(SYSTEM + [7, 8, 9], {0: 0, 1: 0}) == 0
    assert router.route(SYSTEM + [7, 8, 10], {0: 1, 1: 0}) == 1
    assert router.route(SYSTEM + [5], {0: 1, 1: 1, 2: 0}) == 2
    assert router.route(SYSTEM[:40], {0: 0, 1: 1, 2: 1}) == 0  # a prefix of served prompts, not extending one


def test_a_lost_replica_is_routed_around_and_forgotten() -> None:
    router = PrefixRouter()
    prompt = SYSTEM + [1]
    assert router.route(prompt, {0: 4, 1: 0}) == 1
    assert router.route(prompt, {0: 0, 2: 3}) == 0  # replica 1 is not live: the least loaded of the others
    assert router.affine(prompt, {0, 1, 2}) == 0  # the most recent replica to serve it
    router.forget(0)  # replica 0 restarted: its prefix cache is empty
    assert router.affine(prompt, {0, 1, 2}) is None  # and nothing else served it since
    with pytest.raises(ValueError):
        router.route(prompt, {})


# ------------------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the module; 8 logical CPUs (actors reserve 1 each, they mostly wait)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def spec() -> EngineSpec:
    """The contract's fp32 CPU tolerances: the replicas are fp32 `TorchEngine`s on the CPU."""

    def make(d: Path) -> Engine:
        return RayEngineReplicas.start(
            d, ReplicaPlacement(replicas=2), {"max_context": CONTEXT, "dtype": "float32"}
        )

    return EngineSpec(make, "cpu", 2e-4, 5e-5)


@pytest.fixture(scope="module")
def engine(ray_cluster: None, spec: EngineSpec, model_dir: Path) -> Iterator[Engine]:  # noqa: F811 - the fixture
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed")
    e = spec.make(model_dir)
    yield e
    e.close()


def _slow_decoding(replicas: RayEngineReplicas, seconds: float) -> None:
    """Each replica's engine sleeps `seconds` before every decode step (0: back to full speed), so a test sees
    its requests in flight."""
    import ray

    def slow_down(actor: Any) -> None:
        """Runs in the replica (a nested function: Ray ships it by value)."""
        engine = actor.engine
        step = engine.__dict__.setdefault("_fast_decode_step", engine._decode_step)

        def slow() -> None:
            import time

            time.sleep(seconds)
            step()

        engine._decode_step = slow if seconds > 0 else step

    ray.get([a.__ray_call__.remote(slow_down) for a in replicas.actors])


@pytest.mark.parametrize("streamed", [False, True])
def test_a_cancelled_request_leaves_its_replica(engine: Engine, streamed: bool) -> None:
    """Cancelling the future cancels the actor's task, a streamed one's too (and so the engine's rows):
    nothing stays in flight."""
    assert isinstance(engine, RayEngineReplicas)
    pieces: list[str] = []
    on_token = (lambda i, t: pieces.append(t)) if streamed else None
    fut = engine.submit([1, 17, 923, 88], SamplingParams(max_tokens=200, temperature=1.0), on_token=on_token)
    deadline = time.monotonic() + 30
    while not any(engine.in_flight()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    fut.cancel()
    while any(engine.in_flight()):
        assert time.monotonic() < deadline, engine.in_flight()
        time.sleep(0.05)
    assert engine.live() == [0, 1]


def test_a_streamed_request_arrives_token_by_token_from_a_replica(engine: Engine) -> None:
    """`on_token` fires while the replica decodes (a Ray streaming generator), not once at the end: a seeded
    request of two choices arrives in many chunks, each choice's in order, and they join to the text of the
    same request not streamed."""
    assert isinstance(engine, RayEngineReplicas)
    params = SamplingParams(max_tokens=12, n=2, temperature=1.0, seed=11)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    _slow_decoding(engine, 0.1)  # a decode step takes ~1 ms here: the chunks might merge on a loaded box
    try:
        fut = engine.submit(PROMPT, params, on_token=lambda i, t: pieces[i].append(t))
        deadline = time.monotonic() + 60
        while not (pieces[0] or pieces[1]):  # the first text comes while the request is still decoding
            assert time.monotonic() < deadline and not fut.done()
            time.sleep(0.005)
        assert not fut.done()
        streamed = fut.result(timeout=120)
    finally:
        _slow_decoding(engine, 0)
    plain = engine.submit(PROMPT, params).result(timeout=120)
    assert [c.token_ids for c in streamed] == [c.token_ids for c in plain]
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in plain]
    assert len(pieces[0]) > 1 and len(pieces[1]) > 1, pieces
    assert engine.stats["streams_broken"] == 0


@needs_ray
def test_a_streamed_request_is_retried_only_if_none_of_it_was_streamed(
    ray_cluster: None,
    model_dir: Path,  # noqa: F811 - the fixture
) -> None:
    """A replica dies with two streamed requests on it. The one that had streamed text fails with
    ReplicaUnavailable (retrying it would stream its start twice); the one that had streamed nothing is
    retried on the other replica, and its chunks join to its text exactly once."""
    import ray

    replicas = RayEngineReplicas.start(
        model_dir, ReplicaPlacement(replicas=2), {"max_context": CONTEXT, "dtype": "float32"}
    )
    try:
        _slow_decoding(replicas, 0.3)
        started: list[str] = []
        first = replicas.submit(
            PROMPT, SamplingParams(max_tokens=40), on_token=lambda i, t: started.append(t)
        )
        deadline = time.monotonic() + 60
        while not started:
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.01)
        [victim] = [i for i, n in enumerate(replicas.in_flight()) if n]

        def hold_new_requests(actor: Any) -> None:
            """Runs in the victim: a request submitted from now on is queued and never decoded."""
            import concurrent.futures

            actor.engine.submit = lambda *args, **kwargs: concurrent.futures.Future()

        ray.get(replicas.actors[victim].__ray_call__.remote(hold_new_requests))
        pieces: list[str] = []
        # PROMPT is a prefix of it: routed to the victim, where PROMPT's request runs
        second = replicas.submit(
            PROMPT + [42], SamplingParams(max_tokens=6), on_token=lambda i, t: pieces.append(t)
        )
        while replicas.in_flight()[victim] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(replicas.pids[victim], signal.SIGKILL)
        with pytest.raises(ReplicaUnavailable, match="after streaming part of its text"):
            first.result(timeout=60)
        [out] = second.result(timeout=60)
        assert "".join(pieces) == out.text and pieces
        assert replicas.stats["streams_broken"] == 1 and replicas.stats["requests_retried"] == 1
    finally:
        replicas.close()


@needs_ray
def test_no_scratch_directory_outlives_the_replica_set(
    ray_cluster: None,
    model_dir: Path,  # noqa: F811 - the fixture
    adapters: dict[str, str],  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replicas write adapter files under one scratch directory of the set. A replica killed and restarted
    by Ray empties its killed process's files; one killed for good, and every other, leaves nothing behind
    once the set is closed."""
    import ray

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the set's scratch directory goes here
    replicas = RayEngineReplicas.start(
        model_dir, ReplicaPlacement(replicas=2, max_restarts=1), {"max_context": CONTEXT}
    )
    try:
        replicas.load_adapter("a", adapters["a"])
        [scratch] = tmp_path.glob("advantage-replica-*")
        files = lambda i: sorted(p.name for p in (scratch / str(i)).iterdir())  # noqa: E731
        assert sorted(p.name for p in scratch.iterdir()) == ["0", "1"] and len(files(0)) == len(files(1)) == 1
        killed = files(0)
        os.kill(replicas.pids[0], signal.SIGKILL)
        replicas.load_adapter("b", adapters["b"])  # replica 0 is found lost and restarted, then catches up
        deadline = time.monotonic() + 180
        while replicas.live() != [0, 1]:
            assert time.monotonic() < deadline, "the killed replica did not come back"
            time.sleep(0.2)
        # "a" and "b" from the restarted process; the killed process's files are gone
        assert len(files(0)) == 2 and not set(killed) & set(files(0))
        ray.kill(replicas.actors[1], no_restart=True)  # dies without removing its directory
        assert len(files(1)) == 2
    finally:
        replicas.close()
    assert list(tmp_path.iterdir()) == []


def _replicas(backend: adv.LocalBackend, base_model: str) -> RayEngineReplicas:
    engine = backend.service.engine(base_model)
    assert isinstance(engine, RayEngineReplicas)
    return engine


async def _short_rollout(model: adv.TrainableModel, topic: str) -> adv.Trajectory:
    """One short turn (16 tokens at most), rewarded by its length in characters: varied within a group."""
    messages = [{"role": "user", "content": f"One sentence about {topic}."}]
    resp = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=messages, max_tokens=16, temperature=1.0
    )
    choice = resp.choices[0]
    return adv.Trajectory([*messages, choice], reward=len(choice.message.content or "") / 64)


async def _gather(model: adv.TrainableModel, **kwargs: Any) -> list[adv.TrajectoryGroup]:
    """Two groups of three."""
    return await adv.gather_trajectory_groups(
        [[_short_rollout(model, topic) for _ in range(3)] for topic in ("cats", "rain")],
        progress=False,
        **kwargs,
    )


@needs_ray
async def test_two_steps_on_the_bundled_model_with_two_replicas_two_trainer_workers_and_both_kills(
    ray_cluster: None, tmp_path: Path
) -> None:
    """The bundled SmolLM2 through `LocalBackend(engine_replicas=2, trainer_workers=2)`, two GRPO steps by the
    public API, with both faults of issue 15 on the way:

    1. Step 1 is on both replicas when it is announced, and the replicas' logprobs are the trainer workers'.
    2. The replica serving a gather is killed (SIGKILL) with requests in flight: they are retried on the other
       replica (none fails), Ray restarts it and it serves step 1 again, loaded before it takes a request.
    3. Trainer worker 1 dies in the middle of step 2 (before the all-reduce): the step fails with a clear
       error, nothing is saved or served; the next `train` restarts the workers on step 1's checkpoint (the
       sampler's step-1 logprobs are the trainer's again) and publishes step 2, on the restarted replica too.
    4. The weights moved: step 2's logprobs of step 0's samples are not step 0's. A streamed, seeded chat
       completion arrives in several chunks that join to the same request's text unstreamed."""
    import ray

    from advantage.training.ray_workers import RayTrainerGroup

    backend = adv.LocalBackend(tmp_path, progress=False, engine_replicas=2, trainer_workers=2)
    model = adv.TrainableModel("bundled", project="t", base_model="smollm2-135m-instruct")
    await model.register(backend)
    config = adv.TrainConfig(learning_rate=1e-3, micro_batch_size=3)
    try:
        replicas = _replicas(backend, "smollm2-135m-instruct")
        # 1. step 1
        first = await _gather(model)
        result = await model.train(first, config)
        assert result.step == 1 and model.get_inference_name() == "bundled@1"
        assert result.metrics["trainer_workers"] == 2.0
        assert result.metrics["frac_zero_variance_groups"] < 1.0  # the rewards differed within a group
        # sampled on the replicas, scored by the workers: the same weights
        assert result.metrics["logprob_drift_mean_abs"] < 1e-3
        for actor in replicas.actors:
            assert "bundled@1" in ray.get(actor.adapters.remote())[1]

        # 2. an engine replica killed during a gather
        _slow_decoding(replicas, 0.2)  # so the gather's requests are still running when it is killed
        gather = asyncio.ensure_future(_gather(model, max_exceptions=6))
        deadline = time.monotonic() + 120
        while not any(replicas.in_flight()):
            assert time.monotonic() < deadline and not gather.done()
            await asyncio.sleep(0.05)
        victim = max(range(2), key=lambda i: replicas.in_flight()[i])
        old_pid = replicas.pids[victim]
        os.kill(old_pid, signal.SIGKILL)
        second = await gather
        failed = sum(len(g.exceptions) for g in second)
        assert failed == 0 and sum(len(g.trajectories) for g in second) == 6, [g.exceptions for g in second]
        assert replicas.stats["requests_retried"] >= 1 and replicas.stats["replicas_lost"] == 1
        deadline = time.monotonic() + 300  # Ray restarts it; its engine loads the model again
        while victim not in replicas.live():
            assert time.monotonic() < deadline, "the killed replica did not come back"
            await asyncio.sleep(0.5)
        pid, loaded = ray.get(replicas.actors[victim].adapters.remote())
        assert pid != old_pid and replicas.pids[victim] == pid and "bundled@1" in loaded
        assert replicas.stats["replicas_back"] == 1
        _slow_decoding(replicas, 0)

        # 3. a trainer worker killed during step 2
        group = backend.service.model_entry("bundled").trainer
        assert isinstance(group, RayTrainerGroup)

        arm_trainer_worker_to_die(group)
        with pytest.raises(RuntimeError, match="trainer worker failed during step 2; nothing was saved"):
            await model.train(second, config)
        assert await model.get_step() == 1 and model.get_inference_name() == "bundled@1"
        assert not (backend.run_dir(model) / "0002").exists()
        assert "bundled@2" not in [m.id for m in (await model.openai_client().models.list()).data]
        result = await model.train(second, config)
        assert result.step == 2 and model.get_inference_name() == "bundled@2"
        # `second` was sampled under step 1: fresh workers that did not start from step 1 would drift here
        assert result.metrics["logprob_drift_mean_abs"] < 1e-3
        for actor in replicas.actors:  # the restarted replica included
            assert "bundled@2" in ray.get(actor.adapters.remote())[1]

        # 4. the weights moved; streaming
        extras = [c.model_extra or {} for g in first for t in g.trajectories for c in t.choices()]
        seqs = [e["prompt_token_ids"] + e["token_ids"] for e in extras]
        sampled = [x for e in extras for x in e["token_logprobs"]]  # under step 0, on the replicas
        for adapter, moved in ((None, False), ("bundled@2", True)):  # None: the base weights, i.e. step 0
            scored = (await asyncio.wrap_future(replicas.score(seqs, adapter))).logprobs
            again = [x for e, s in zip(extras, scored, strict=True) for x in s[len(e["prompt_token_ids"]) :]]
            mean = sum(abs(a - b) for a, b in zip(sampled, again, strict=True)) / len(sampled)
            assert (mean > 1e-2) if moved else (mean < 1e-4), (adapter, mean)

        client = model.openai_client()
        request: dict[str, Any] = dict(
            model="bundled@2", messages=[{"role": "user", "content": "Hi"}], max_tokens=16, seed=7
        )
        plain = await client.chat.completions.create(**request)
        chunks = await client.chat.completions.create(**request, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in chunks if c.choices]
        pieces = [p for p in pieces if p]
        assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].message.content, pieces
    finally:
        await backend.close()


@needs_ray
@pytest.mark.slow
async def test_serve_with_engine_replicas_and_trainer_workers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`advantage serve --engine-replicas 2 --trainer-workers 2` (its own local Ray cluster, sized for both): a
    RemoteBackend registers, gathers on the replicas and trains one step; SIGTERM stops it all."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "advantage", "serve", "--engine-replicas", "2", "--trainer-workers", "2"]
    cmd += ["--port", str(port), "--root", str(tmp_path / "root"), "--base-model", str(tiny_model_dir)]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([*cmd, "--api-key", "k"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 420  # Ray, then two replicas loading torch: minutes on a loaded box
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        backend = adv.RemoteBackend(f"http://127.0.0.1:{port}", api_key="k", progress=False)
        model = adv.TrainableModel("remote-rep", project="t", base_model=str(tiny_model_dir))
        await model.register(backend)
        groups = await adv.gather_trajectory_groups(
            [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
        )
        result = await model.train(groups, adv.TrainConfig(learning_rate=1e-2))
        assert result.step == 1 and result.metrics["trainer_workers"] == 2.0
        assert result.metrics["logprob_drift_mean_abs"] < 0.05
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
