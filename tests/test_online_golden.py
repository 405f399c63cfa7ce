"""The recorded golden set: rated answers of requests tagged `metadata={"golden": true}`, an evaluation set the
online trainer scores steps on (`OnlineConfig(golden_set=True)`) and never trains on, replays or judges.

The store and the score's arithmetic are unit tests; the rest serve the tiny random Llama through a real
backend (embedded, or `advantage serve` on 127.0.0.1 with the remote client and the CLI) and record traffic
with the official `openai` SDK.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest
from test_online import completion
from test_online_background import scripted, verdict
from test_online_trainer import FAST, online_rows, prompt, serve_and_rate, start
from typer.testing import CliRunner

import advantage as adv
from advantage.backends.remote import RemoteBackend
from advantage.cli import app
from advantage.online.golden import golden_score, golden_set, mean_token_logprob, read_golden
from advantage.online.records import Feedback, RecordedChoice, RewardedChoice, is_golden
from advantage.online.store import SQLiteTrafficStore, golden_sql
from advantage.online.trainer import check_gate
from advantage.server.runner import BackgroundServer
from advantage.service import Service

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOLDEN = {"golden": True}


# ------------------------------------------------------------------------------------------- the store


@pytest.mark.parametrize(
    "value",
    [True, False, None, 0, 1, -2, 0.0, 0.5, "", "x", "false", [], [0], {}, {"a": 1}],
)
def test_the_sql_test_of_golden_is_python_truthiness(tmp_path: Path, value: object) -> None:
    s = SQLiteTrafficStore(tmp_path / "t.sqlite")
    try:
        for metadata in ({"golden": value}, {"task": 1}):
            [(sql,)] = s._db.execute(f"SELECT {golden_sql(':m')}", {"m": json.dumps(metadata)}).fetchall()
            assert bool(sql) == is_golden(metadata) == bool(metadata.get("golden"))
    finally:
        s.close()


def test_the_store_reads_the_golden_set_and_never_hands_it_to_training(tmp_path: Path) -> None:
    s = SQLiteTrafficStore(tmp_path / "t.sqlite")
    try:
        for cid, meta in (("g1", GOLDEN), ("g2", {"golden": "yes"}), ("n1", {}), ("g3", GOLDEN)):
            s.record(dataclasses.replace(completion(cid, n=3), metadata=meta))
        s.set_feedback([Feedback("g1", i, r, updated=1 + i) for i, r in enumerate((1.0, 0.0, 2.0))])
        s.set_feedback([Feedback("g2", 0, 1.0, updated=5)])
        s.set_feedback([Feedback("n1", i, float(i), updated=6 + i) for i in range(3)])
        # A judge's score on a golden choice (the trainer's judge never sends one) is not golden feedback.
        s.set_judged("g3", "j", "scored", [Feedback("g3", 0, 1.0, updated=9, judge="j")])

        keys = [(r.completion.id, r.choice.index) for r in s.golden(1.0)]
        assert keys == [("g2", 0), ("g1", 2), ("g1", 0)]  # rated at least 1.0, newest rating first
        assert [(r.completion.id, r.choice.index) for r in s.golden(1.5)] == [("g1", 2)]
        assert len(s.golden(0.0)) == 4 and len(s.golden(limit=2)) == 2
        assert [r.feedback.reward for r in s.golden()] == [1.0, 2.0, 0.0, 1.0]  # any explicit rating
        # Never training data: not untrained (so never marked, never replayed), never for the judge.
        assert {r.completion.id for r in s.untrained()} == {"n1"}
        assert [c.id for c in s.unjudged(min_choices=2, min_step=0, limit=10)] == []  # n1 is all rated
        s.record(completion("n2", n=3))
        assert [c.id for c in s.unjudged(min_choices=2, min_step=0, limit=10)] == ["n2"]
    finally:
        s.close()


# ------------------------------------------------------------------------------------------- the score


def rated(cid: str, prompt_ids: list[int], token_ids: list[int], forced: list[int]) -> RewardedChoice:
    choice = RecordedChoice(0, token_ids, [0.0] * len(token_ids), prompt_ids, forced, "stop", {})
    rec = dataclasses.replace(completion(cid), choices=[choice], metadata=GOLDEN)
    return RewardedChoice(rec, choice, Feedback(cid, 0, 1.0))


def test_the_golden_score_by_hand() -> None:
    rows = [
        rated("a", [1, 2, 3], [10, 11, 12], forced=[1]),  # the forced token (11, position 4) does not count
        rated("b", [5], [20], forced=[]),
        rated("c", [5], [21], forced=[0]),  # nothing chosen at all: left out
    ]
    g = golden_set(rows)
    assert g.keys == [("a", 0), ("b", 0)] and g.tokens == 3
    assert g.sequences == [[1, 2, 3, 10, 11, 12], [5, 20]] and g.scored == [[3, 5], [1]]
    logprobs = [[0.0, -9.0, -9.0, -1.0, -7.0, -3.0], [0.0, -0.5]]
    # Pooled over the 3 scored tokens: (-1.0 + -3.0 + -0.5) / 3 = -1.5
    # (a mean of per-answer means would be (-2.0 + -0.5) / 2 = -1.25: not this)
    assert mean_token_logprob(logprobs, g.scored) == pytest.approx(-1.5)
    assert mean_token_logprob([[0.0, 0.0]], [[1]]) == 0.0  # certain tokens: the best score
    with pytest.raises(ValueError, match="at least one"):
        mean_token_logprob([], [])


# ------------------------------------------------------------------------------------------- the config


def test_config_and_gate_rules() -> None:
    cfg = adv.OnlineConfig(golden_set=True, golden_min_reward=0.5, golden_max_choices=8, tolerance=0.01)
    assert (cfg.golden_set, cfg.golden_min_reward, cfg.golden_max_choices) == (True, 0.5, 8)
    with pytest.raises(ValueError, match="golden set is off, so golden_min_reward would do nothing"):
        adv.OnlineConfig(golden_min_reward=0.5)
    with pytest.raises(ValueError, match="golden_max_choices"):
        adv.OnlineConfig(golden_set=True, golden_max_choices=0)
    with pytest.raises(ValueError, match="finite"):
        adv.OnlineConfig(golden_set=True, golden_min_reward=math.nan)
    with pytest.raises(ValueError, match="golden_sett"):
        adv.OnlineConfig(golden_sett=True)  # type: ignore[call-arg]

    async def evaluate(name: str) -> float:
        return 0.0

    check_gate(cfg, None)
    check_gate(adv.OnlineConfig(), evaluate)
    with pytest.raises(ValueError, match="Two promotion gates"):
        check_gate(cfg, evaluate)
    model = adv.TrainableModel("bot", project="p")  # refused before it is ever used
    with pytest.raises(ValueError, match="Two promotion gates"):
        asyncio.run(model.train_online(adv.OnlineConfig(golden_set=True, max_steps=1), evaluate=evaluate))


# ------------------------------------------------------------------------------------------- the trainer


async def golden_request(model: adv.TrainableModel, task: int, n: int, seed: int = 0) -> str:
    resp = await model.openai_client().chat.completions.create(
        model=model.name, messages=prompt(task), n=n, max_tokens=6, temperature=1.0, seed=seed,
        metadata=GOLDEN,  # type: ignore[arg-type]  # the SDK types metadata values as str
    )  # fmt: skip
    return resp.id


@pytest.mark.integration
def test_golden_choices_are_never_trained_on_replayed_or_judged(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        store = backend.service.traffic_stores("bot")[0]
        try:
            rated_golden = await golden_request(model, 1, n=3)
            for i in range(3):  # rewards that differ: a group, were it not golden
                await model.feedback(rated_golden, reward=float(i), choice=i)
            unrated_golden = await golden_request(model, 2, n=3)  # a sibling group, were it not golden
            await serve_and_rate(model, 3)
            unrated = (
                await model.openai_client().chat.completions.create(
                    model=model.name, messages=prompt(4), n=3, max_tokens=4, temperature=1.0
                )
            ).id
            judge, script = scripted(verdict(0.1, 0.5, 0.9))  # one verdict: for `unrated` only
            out = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST), judge=judge)
            assert (out.judge.scored, len(script.sizes)) == (1, 1)
            assert store.feedback(unrated_golden) == {} and set(store.feedback(unrated)) == {0, 1, 2}
            [s] = out.steps
            assert (s.promoted, s.groups, s.choices) == (True, 2, 6)
            # Replay draws from promoted traffic: the golden choices were never among it.
            await serve_and_rate(model, 5)
            replayed = await model.train_online(adv.OnlineConfig(max_steps=1, replay_share=0.5, **FAST))
            assert replayed.steps[0].replay_groups == 1
            golden_ids = {rated_golden, unrated_golden}
            assert not golden_ids & {r.completion.id for r in store.trained("promoted")}
            assert not golden_ids & {r.completion.id for r in store.untrained()}
            golden_keys = {(r.completion.id, r.choice.index) for r in store.golden(1.0)}
            assert golden_keys == {(rated_golden, 1), (rated_golden, 2)}
            trained = backend.run_dir(model) / "trajectories" / "train"
            metas = [
                t["metadata"]
                for f in sorted(trained.glob("*.jsonl"))
                for line in f.read_text().splitlines()
                for t in json.loads(line)["trajectories"]
            ]
            assert len(metas) == 6 + 6 and not any(m.get("golden") for m in metas)
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_the_golden_score_is_computed_from_compute_logprobs_over_the_server(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    svc = Service(tmp_path, engine_kwargs={"max_context": 256}, model_dirs=[tiny_model_dir.parent])
    srv = BackgroundServer(svc, api_key="k").start()
    cfg = adv.OnlineConfig(golden_set=True, max_steps=1, tolerance=100.0, **FAST)

    async def main() -> float:
        backend = RemoteBackend(srv.base_url, api_key="k", progress=False)
        model = adv.TrainableModel("bot", project="p", base_model=str(tiny_model_dir), record_traffic=True)
        await model.register(backend)
        try:
            await serve_and_rate(model, 1)
            with pytest.raises(ValueError, match="no golden set"):  # nothing tagged golden yet
                await model.train_online(cfg)
            gid = await golden_request(model, 2, n=3)
            for i, reward in enumerate((1.0, 0.0, 1.0)):
                await model.feedback(gid, reward=reward, choice=i)
            golden = await read_golden(model, cfg)  # through the `online_traffic` op's HTTP route
            assert sorted(golden.keys) == [(gid, 0), (gid, 2)]
            # By hand: every sampled token's logprob under bot@0, summed, over how many there are.
            rows = svc.traffic_stores("bot")[0].golden(1.0)
            seqs = [r.choice.prompt_token_ids + r.choice.token_ids for r in rows]
            tc = await model.training_client()
            lps = await tc.compute_logprobs(seqs, model="bot@0")
            picked = [
                lp[len(r.choice.prompt_token_ids) + k]
                for r, lp in zip(rows, lps, strict=True)
                for k in range(len(r.choice.token_ids))
                if k not in r.choice.forced_token_indices
            ]
            hand = sum(picked) / len(picked)
            assert len(picked) == golden.tokens and hand < 0
            assert await golden_score(model, golden, "bot@0") == pytest.approx(hand, abs=1e-6)
            return hand
        finally:
            await backend.close()

    try:
        hand = asyncio.run(main())
        # `advantage online --golden-set` (an option generated from OnlineConfig): the default's score is
        # the same number; with a tolerance of 100 nats per token, the step is promoted.
        args = ["online", "bot", "--server", srv.base_url, "--api-key", "k", "--project", "p"]
        args += ["--base-model", str(tiny_model_dir), "--max-steps", "1", "--poll-s", "0.05"]
        args += ["--golden-set", "--tolerance", "100", "--train", '{"learning_rate": 0.01}']
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
        assert "golden set: 2 choices" in out.output and "bot@1: promoted" in out.output
        assert f"(default {hand:.4f})" in out.output
        both = CliRunner().invoke(app, [*args, "--eval", "test_online_trainer:always_worse"])
        assert both.exit_code != 0 and "Two promotion gates" in both.output
        assert svc.resolve("bot").step == 1
    finally:
        srv.stop()
        svc.close()


@pytest.mark.integration
def test_the_golden_gate_rejects_a_step_that_makes_the_golden_answers_less_likely(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    async def main() -> None:
        backend, model = await start(tmp_path, tiny_model_dir)
        store = backend.service.traffic_stores("bot")[0]
        try:
            gid = await golden_request(model, 1, n=1, seed=1)
            await model.feedback(gid, reward=1.0)
            golden = store.get(gid)
            assert golden is not None

            async def traffic(copy_reward: float, seed: int) -> None:
                """The golden answer, recorded again as plain traffic (as a sampler that drew the same
                tokens would record it), rated `copy_reward`; and two siblings rated the opposite."""
                copy = dataclasses.replace(golden, id=f"copy-{seed}", metadata={})
                await asyncio.to_thread(store.record, copy)
                await model.feedback(copy.id, reward=copy_reward)
                sib = await model.openai_client().chat.completions.create(
                    model=model.name, messages=prompt(1), n=2, max_tokens=6, temperature=1.0, seed=seed
                )
                for i in range(2):
                    await model.feedback(sib.id, reward=1.0 - copy_reward, choice=i)

            # Rated against the golden answer: the step makes it less likely, and is rejected.
            await traffic(0.0, seed=2)
            cfg = adv.OnlineConfig(golden_set=True, max_steps=1, tolerance=0.0, **FAST)
            worse = await model.train_online(cfg)
            [s] = worse.steps
            assert (s.step, s.promoted, worse.default, worse.golden_choices) == (1, False, 0, 1)
            assert s.score is not None and s.default_score is not None and s.score < s.default_score
            assert backend.service.resolve("bot").step == 0
            # Rated for it: more likely, promoted (trained from step 0, the default).
            await traffic(1.0, seed=3)
            better = await model.train_online(cfg)
            [b] = better.steps
            assert (b.step, b.promoted, better.default) == (2, True, 2)
            assert b.score is not None and b.default_score == pytest.approx(s.default_score)
            assert b.score > b.default_score
            # The tolerance is in nats per token: against the golden answer again, within a wide tolerance.
            await traffic(0.0, seed=4)
            wide = await model.train_online(cfg.model_copy(update={"tolerance": 50.0}))
            [w] = wide.steps
            assert w.promoted and w.score is not None and w.score < b.score
            rows = online_rows(backend, model)
            assert [(r["step"], r["promoted"]) for r in rows] == [(1, 0.0), (2, 1.0), (3, 1.0)]
            assert rows[0]["score"] == pytest.approx(s.score) and rows[0]["default_score"] == s.default_score
            tokens = float(len(golden.choices[0].token_ids))
            assert (rows[0]["golden_choices"], rows[0]["golden_tokens"]) == (1.0, tokens)
        finally:
            await backend.close()

    asyncio.run(main())
