"""The continual trainer (`model.train_online`): rated traffic -> groups -> a step -> the promotion gate.

Each test serves the tiny random Llama through a real embedded backend (the HTTP server on 127.0.0.1),
records traffic with the official `openai` SDK, rates it with `model.feedback`, and runs the trainer with
`max_steps` / `max_seconds` so it stops by itself.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
import torch
from typer.testing import CliRunner

import advantage as adv
from advantage.backends.remote import RemoteBackend
from advantage.cli import app
from advantage.online.feedback import give_feedback
from advantage.server.runner import BackgroundServer
from advantage.service import Service

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAIN = adv.TrainConfig(learning_rate=1e-2)
FAST = {"poll_s": 0.05, "train": TRAIN}


def test_the_store_keeps_what_was_trained_on(tmp_path: Path) -> None:
    from test_online import completion

    from advantage.online.records import Feedback, rewarded_from_dict, rewarded_to_dict
    from advantage.online.store import SQLiteTrafficStore

    s = SQLiteTrafficStore(tmp_path / "t.sqlite")
    s.record(completion("c1", n=2))
    s.record(completion("c2", n=1))
    s.set_feedback([Feedback("c1", 0, 1.0, updated=1), Feedback("c1", 1, 0.0, updated=2)])
    s.set_feedback([Feedback("c2", 0, 0.5, updated=3)])
    s.mark_trained([("c1", 0), ("c1", 1)], step=4, outcome="promoted")
    assert [(r.completion.id, r.choice.index) for r in s.untrained()] == [("c2", 0)]
    assert {(r.completion.id, r.choice.index) for r in s.trained("promoted")} == {("c1", 0), ("c1", 1)}
    assert s.trained("rejected") == []
    [row] = s.untrained()
    assert rewarded_from_dict(json.loads(json.dumps(rewarded_to_dict(row)))) == row  # the op's wire form
    with pytest.raises(ValueError, match="not recorded"):
        s.mark_trained([("c2", 0), ("nope", 0)], step=5, outcome="stale")
    assert len(s.untrained()) == 1  # the whole call was rolled back
    with pytest.raises(ValueError, match="outcome"):
        s.mark_trained([("c2", 0)], step=5, outcome="eaten")
    s.close()
    again = SQLiteTrafficStore(tmp_path / "t.sqlite")  # durable
    assert len(again.trained("promoted")) == 2 and len(again.untrained()) == 1
    again.close()


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Task {i}: say something."}]


async def start(root: Path, base: Path) -> tuple[adv.LocalBackend, adv.TrainableModel]:
    backend = adv.LocalBackend(root, progress=False, max_context=256)
    model = adv.TrainableModel("bot", project="p", base_model=str(base), record_traffic=True)
    await model.register(backend)
    return backend, model


async def serve_and_rate(model: adv.TrainableModel, task: int, n: int = 3) -> str:
    """One request with n choices for `task`, served by `name` (the default weights); choice i gets reward i."""
    resp = await model.openai_client().chat.completions.create(
        model=model.name, messages=prompt(task), n=n, max_tokens=4, temperature=1.0, seed=task
    )
    for i in range(n):
        await model.feedback(resp.id, reward=float(i), choice=i)
    return resp.id


def online_rows(backend: adv.LocalBackend, model: adv.TrainableModel) -> list[dict[str, float]]:
    lines = (backend.run_dir(model) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == "online"]


def optimizer_steps(backend: adv.LocalBackend, model: adv.TrainableModel, step: int) -> int:
    """How many optimizer updates the checkpoint `step` has been through (AdamW's own count)."""
    state = torch.load(backend.run_dir(model) / f"{step:04d}" / "optimizer.pt", weights_only=True)["state"]
    return int(next(iter(state.values()))["step"])


@pytest.mark.integration
def test_trains_each_rated_choice_once_and_serves_the_new_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        try:
            await serve_and_rate(model, 1)
            await serve_and_rate(model, 2)
            lone = await model.openai_client().chat.completions.create(
                model=model.name, messages=prompt(3), max_tokens=4
            )
            await model.feedback(lone.id, reward=1.0)  # one rated choice of its prompt: not a group yet
            with pytest.raises(ValueError, match="until stopped"):
                await model.train_online()
            out = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST))
            [s] = out.steps
            assert (s.step, s.promoted, s.groups, s.choices, out.default) == (1, True, 2, 6, 1)
            assert backend.service.resolve("bot").step == 1  # `name` serves the new step
            store = backend.service.traffic_stores("bot")[0]
            assert [r.completion.id for r in store.untrained()] == [lone.id]  # waits for a sibling
            # Run again: the traffic already trained on is not trained again, and nothing else is ready.
            again = await model.train_online(adv.OnlineConfig(max_seconds=0.5, **FAST))
            assert again.steps == [] and again.stopped == "max_seconds" and await model.get_step() == 1
            # min_groups: one new group is not enough for a step when two are asked for.
            await serve_and_rate(model, 4)
            wait = await model.train_online(adv.OnlineConfig(max_seconds=0.5, min_groups=2, **FAST))
            assert wait.steps == []
            stop = asyncio.Event()
            stop.set()
            assert (await model.train_online(stop=stop)).stopped == "stop"
            assert [r["promoted"] for r in online_rows(backend, model)] == [1.0]
            plain = adv.TrainableModel("plain", project="p", base_model=str(tiny_model_dir))
            await plain.register(backend)
            with pytest.raises(RuntimeError, match="record_traffic=True"):
                await plain.train_online(adv.OnlineConfig(max_steps=1, **FAST))
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_stale_choices_are_never_trained_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        try:
            old = await model.openai_client().chat.completions.create(
                model=model.name, messages=prompt(1), n=3, max_tokens=4, temperature=1.0
            )  # sampled from step 0, rated only after step 1 is out
            await serve_and_rate(model, 2)
            cfg = adv.OnlineConfig(max_steps=1, max_steps_off_policy=0, **FAST)
            assert (await model.train_online(cfg)).default == 1
            for i in range(3):
                await model.feedback(old.id, reward=float(i), choice=i)
            await serve_and_rate(model, 3)  # sampled from step 1: on policy
            out = await model.train_online(cfg)
            [s] = out.steps
            assert (out.stale, s.groups, s.choices, s.metrics["n_trajectories"]) == (3, 1, 3, 3.0)
            assert online_rows(backend, model)[-1]["staleness_max"] == 0.0
            store = backend.service.traffic_stores("bot")[0]
            assert store.untrained() == [] and {r.completion.id for r in store.trained("stale")} == {old.id}
            # With a looser limit the same age is trainable.
            late = await model.openai_client().chat.completions.create(
                model="bot@1", messages=prompt(4), n=3, max_tokens=4, temperature=1.0
            )
            for i in range(3):
                await model.feedback(late.id, reward=float(i), choice=i)
            loose = await model.train_online(adv.OnlineConfig(max_steps=1, max_steps_off_policy=1, **FAST))
            assert loose.stale == 0 and loose.steps[0].choices == 3
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_the_gate_rejects_a_worse_step_and_trains_on_from_the_default(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    scores = {"bot@0": 0.5, "bot@1": 0.6, "bot@2": 0.2, "bot@3": 0.58}
    asked: list[str] = []

    async def evaluate(name: str) -> float:
        asked.append(name)
        return scores[name]

    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        try:
            for task in (1, 2, 3):
                await serve_and_rate(model, task)
            cfg = adv.OnlineConfig(max_steps=3, max_groups=1, tolerance=0.05, **FAST)
            out = await model.train_online(cfg, evaluate=evaluate)
            assert asked == ["bot@0", "bot@1", "bot@2", "bot@3"]
            assert [s.promoted for s in out.steps] == [True, False, True] and out.rejected == [2]
            assert (out.steps[1].score, out.steps[1].default_score) == (0.2, 0.6)
            assert out.default == 3 and backend.service.resolve("bot").step == 3
            assert backend.service.resolve("bot@2").step == 2  # a rejected step stays addressable
            rows = online_rows(backend, model)
            assert [(r["step"], r["promoted"]) for r in rows] == [(1, 1.0), (2, 0.0), (3, 1.0)]
            assert rows[1]["default_step"] == 1.0
            # Step 3 trained from step 1's weights and optimizer state, not from the rejected step 2.
            assert [optimizer_steps(backend, model, s) for s in (1, 2, 3)] == [1, 2, 2]
            # The rejected step's choices are marked, not trained again.
            store = backend.service.traffic_stores("bot")[0]
            assert store.untrained() == [] and len(store.trained("rejected")) == 3
            assert await model.restore(2) == 4  # a restore is served at once: it moves the default
            assert backend.service.resolve("bot").step == 4
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
@pytest.mark.parametrize(
    ("against", "promoted"), [("default", [True, True, True]), ("best", [True, False, True])]
)
def test_the_gate_against_the_best_stops_a_drift_one_tolerance_at_a_time(
    tmp_path: Path, tiny_model_dir: Path, against: str, promoted: list[bool]
) -> None:
    """Each step 0.05 worse than the last is within a tolerance of 0.07 of the default; against the best
    promoted score (0.5), the second is not (0.40 < 0.43), and the third is measured against 0.5 again."""
    scores = {"bot@0": 0.5, "bot@1": 0.45, "bot@2": 0.40, "bot@3": 0.44}

    async def evaluate(name: str) -> float:
        return scores[name]

    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        try:
            for task in (1, 2, 3):
                await serve_and_rate(model, task)
            cfg = adv.OnlineConfig(max_steps=3, max_groups=1, tolerance=0.07, gate_against=against, **FAST)
            out = await model.train_online(cfg, evaluate=evaluate)
            assert [s.promoted for s in out.steps] == promoted
            rows = online_rows(backend, model)
            assert ("best_score" in rows[1]) is (against == "best")
            if against == "best":
                assert rows[1]["best_score"] == 0.5 and out.default == 3
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_forgetting_guards_replay_and_kl_anchor(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        try:
            await serve_and_rate(model, 1)
            await serve_and_rate(model, 2)
            first = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST))
            assert first.steps[0].replay_groups == 0 and "loss/kl" not in first.steps[0].metrics
            await serve_and_rate(model, 3)
            cfg = adv.OnlineConfig(
                max_steps=1, replay_share=0.5, replay_min_reward=2.0, poll_s=0.05,
                train=adv.TrainConfig(learning_rate=1e-2, kl_beta=0.1),
            )  # fmt: skip
            out = await model.train_online(cfg)
            [s] = out.steps
            assert (s.groups, s.replay_groups, s.choices) == (1, 1, 3)
            assert s.metrics["n_trajectories"] == 6.0 and s.metrics["loss/kl"] > 0  # the KL anchor is on
            lines = (
                (backend.run_dir(model) / "trajectories" / "train" / "0002.jsonl").read_text().splitlines()
            )
            trajs = [t for line in lines for t in json.loads(line)["trajectories"]]
            replayed = [t for t in trajs if t["metadata"].get("replay")]
            assert len(replayed) == 3 and {t["metadata"]["step"] for t in replayed} == {0}
            # No earlier group reaches the bar: nothing is replayed.
            await serve_and_rate(model, 4)
            high = cfg.model_copy(update={"replay_min_reward": 5.0})
            assert (await model.train_online(high)).steps[0].replay_groups == 0
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_a_trainer_killed_mid_step_resumes_from_the_default_and_loses_nothing(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        await serve_and_rate(model, 1)
        first = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST))
        assert first.default == 1
        ids = [await serve_and_rate(model, 2), await serve_and_rate(model, 3)]
        real_train = model.train

        async def dies_after_the_checkpoint(*args: object, **kwargs: object) -> adv.TrainResult:
            await real_train(*args, **kwargs)  # type: ignore[arg-type]
            raise RuntimeError("killed")  # before the step is judged or its traffic marked

        model.train = dies_after_the_checkpoint  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="killed"):
            await model.train_online(adv.OnlineConfig(max_steps=1, **FAST))
        assert backend.service.resolve("bot").step == 1 and backend.service.model_entry("bot").latest == 2
        assert await model.delete_checkpoints(keep="latest") == []  # the default step is never deleted
        await backend.close()

        # A restart: a new process on the same root. The default is still step 1, all traffic and feedback
        # are there, and the next step trains from step 1 (its optimizer has seen 2 updates, not 3).
        backend, model = await start(tmp_path, tiny_model_dir)
        try:
            assert backend.service.resolve("bot").step == 1
            trainer = backend.service.model_entry("bot").trainer
            assert trainer is not None  # registered from step 1, not from the newer, unjudged step 2:
            assert int(next(iter(trainer.optimizer.state.values()))["step"]) == 1
            store = backend.service.traffic_stores("bot")[0]
            assert sorted({r.completion.id for r in store.untrained()}) == sorted(ids)
            out = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST))
            [s] = out.steps
            assert (s.step, s.promoted, s.choices, out.default) == (3, True, 6, 3)
            assert [optimizer_steps(backend, model, k) for k in (1, 2, 3)] == [1, 2, 2]
            assert store.untrained() == [] and len(store.trained("promoted")) == 9
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_train_online_over_a_remote_backend(tmp_path: Path, tiny_model_dir: Path) -> None:
    svc = Service(tmp_path, engine_kwargs={"max_context": 256}, model_dirs=[tiny_model_dir.parent])
    srv = BackgroundServer(svc, api_key="k").start()

    async def main() -> None:
        backend = RemoteBackend(srv.base_url, api_key="k", progress=False)
        model = adv.TrainableModel("bot", project="p", base_model=str(tiny_model_dir), record_traffic=True)
        await model.register(backend)
        try:
            await serve_and_rate(model, 1)
            seen: list[str] = []

            async def evaluate(name: str) -> float:
                seen.append(name)
                return 1.0 if name == "bot@0" else 0.0  # every new step is worse: rejected

            out = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST), evaluate=evaluate)
            assert seen == ["bot@0", "bot@1"] and out.rejected == [1] and out.default == 0
            assert svc.resolve("bot").step == 0 and svc.model_entry("bot").latest == 1
        finally:
            await backend.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()
        svc.close()


async def always_worse(name: str) -> float:
    """The gate `advantage online --eval test_online_trainer:always_worse` uses: step 0 is the best."""
    return 1.0 if name.endswith("@0") else 0.0


@pytest.mark.integration
def test_the_online_command_trains_a_served_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    svc = Service(tmp_path, engine_kwargs={"max_context": 256})
    svc.register("p", "bot", str(tiny_model_dir), record_traffic=True)
    srv = BackgroundServer(svc, api_key="k").start()
    try:
        with openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0) as client:
            for task in (1, 2):
                r = client.chat.completions.create(model="bot", messages=prompt(task), n=2, max_tokens=4)
                for i in range(2):
                    give_feedback(svc.traffic_stores("bot"), r.id, choice=i, reward=float(i))
        args = ["online", "bot", "--server", srv.base_url, "--api-key", "k", "--project", "p"]
        args += ["--base-model", str(tiny_model_dir), "--max-steps", "2", "--max-groups", "1"]
        args += ["--poll-s", "0.05", "--train", '{"learning_rate": 0.01}']
        out = CliRunner().invoke(app, [*args, "--eval", "test_online_trainer:always_worse"])
        assert out.exit_code == 0, out.output
        assert "bot@1: rejected" in out.output and "bot@2: rejected" in out.output
        assert "2 steps, 2 rejected" in out.output and "bot serves step 0" in out.output
        assert svc.resolve("bot").step == 0 and svc.model_entry("bot").latest == 2
        bad = CliRunner().invoke(app, [*args, "--train", '{"learning_rat": 1}'])
        assert bad.exit_code != 0 and "learning_rat" in bad.output
    finally:
        srv.stop()
        svc.close()
