"""Groups from traffic without explicit feedback: background samples (extra choices of a recorded request,
never returned to the caller) and the RULER judge that scores a request's sibling choices for the online
trainer.

The store and the feedback rule are tested on hand-built records. Recording goes through the real server
with the tiny random Llama, driven by the official `openai` SDK; the judge is the bundled SmolLM2 served by
the same backend where a real verdict is what is tested. Where the test needs verdicts it can predict (scores
that differ, scores that tie, junk), the judge's one network call is scripted: a real judge cannot be made to
answer junk, and a 135M judge may tie every score at random.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import PROMPT
from test_online import completion

import advantage as adv
from advantage.backends.remote import BackendRequestError, RemoteBackend
from advantage.engine.sampling import SamplingParams
from advantage.online.feedback import FeedbackError, give_feedback
from advantage.online.judging import judge_traffic
from advantage.online.records import Feedback, RecordedChoice
from advantage.online.store import FILENAME, SQLiteTrafficStore, TrafficStore
from advantage.server.background import background_params
from advantage.server.runner import BackgroundServer
from advantage.service import Service

pytestmark = pytest.mark.usefixtures("one_torch_thread")
JUDGE_MODEL = "smollm2-135m-instruct"
FAST = {"poll_s": 0.05, "train": adv.TrainConfig(learning_rate=1e-2)}


def background(i: int) -> RecordedChoice:
    return RecordedChoice(
        i, [20 + i], [-1.0], [1, 2, 3], [], "stop", {"role": "assistant", "content": "b"}, True
    )


def wait_background(store: TrafficStore, cid: str, timeout: float = 120.0) -> None:
    """Background samples are recorded after the response: wait until they are."""
    deadline = time.monotonic() + timeout
    while (rec := store.get(cid)) is None or rec.pending:
        assert time.monotonic() < deadline, f"the background samples of {cid} never came"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ the store


def test_background_samples_and_judge_scores_in_the_store(tmp_path: Path) -> None:
    s = SQLiteTrafficStore(tmp_path / FILENAME)
    rec = completion("c1", n=1, episode="ep")
    rec.pending = 2
    s.record(rec)
    assert s.unjudged(2, 0, 10) == []  # its background samples are on the way
    assert s.add_background("c1", [background(1), background(2)])
    assert not s.add_background("gone", [])  # nothing to attach to
    got = s.get("c1")
    assert got is not None and got.pending == 0
    assert [c.background for c in got.choices] == [False, True, True] and len(got.returned) == 1
    assert s.episode("m", '"ep"') == [("c1", 1)]  # background samples are not the episode's turns
    [found] = s.unjudged(2, 0, 10)
    assert found == got and s.unjudged(4, 0, 10) == [] and s.unjudged(2, 1, 10) == []  # size, step
    # Explicit feedback first: the judge's score for that choice is not written.
    s.set_feedback([Feedback("c1", 0, 1.0, "up", updated=1.0)])
    judged = [Feedback("c1", i, 0.1 * i, comment="why", updated=2.0, judge="j") for i in range(3)]
    s.set_judged("c1", "j", "scored", judged)
    fb = s.feedback("c1")
    assert (fb[0].reward, fb[0].judge) == (1.0, None)
    assert [(fb[i].reward, fb[i].judge) for i in (1, 2)] == [(0.1, "j"), (0.2, "j")]
    assert s.unjudged(2, 0, 10) == []  # judged once, never sent again
    # Explicit feedback after the judge replaces its score.
    s.set_feedback([Feedback("c1", 1, 0.0, "down", updated=3.0)])
    assert (s.feedback("c1")[1].reward, s.feedback("c1")[1].judge) == (0.0, None)
    assert {r.feedback.judge for r in s.untrained()} == {None, "j"}
    with pytest.raises(ValueError, match="outcome"):
        s.set_judged("c1", "j", "eaten", [])
    with pytest.raises(ValueError, match="names its judge"):
        s.set_judged("c1", "j", "scored", [Feedback("c1", 0, 1.0)])
    with pytest.raises(ValueError, match="not recorded"):
        s.set_judged("nope", "j", "failed", [])
    s.close()


def test_a_store_file_from_before_background_samples_opens(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with sqlite3.connect(path) as db:  # the first release's tables
        db.executescript(
            "CREATE TABLE completions (id TEXT PRIMARY KEY, model TEXT NOT NULL, step INTEGER NOT NULL, "
            "created REAL NOT NULL, episode TEXT, user TEXT, request_json TEXT NOT NULL, "
            "metadata_json TEXT NOT NULL);"
            "CREATE TABLE choices (completion_id TEXT NOT NULL, idx INTEGER NOT NULL, token_ids TEXT NOT NULL, "
            "logprobs TEXT NOT NULL, prompt_token_ids TEXT NOT NULL, forced_token_indices TEXT NOT NULL, "
            "finish_reason TEXT, message_json TEXT NOT NULL, PRIMARY KEY (completion_id, idx));"
            "CREATE TABLE feedback (completion_id TEXT NOT NULL, idx INTEGER NOT NULL, reward REAL NOT NULL, "
            "label TEXT, comment TEXT, source_id TEXT, updated REAL NOT NULL, PRIMARY KEY (completion_id, idx));"
            "INSERT INTO completions VALUES ('old', 'm', 0, 1e10, NULL, NULL, '{}', '{}');"
            "INSERT INTO choices VALUES ('old', 0, '[1]', '[-1.0]', '[1]', '[]', 'stop', '{}');"
            "INSERT INTO feedback VALUES ('old', 0, 0.5, NULL, NULL, NULL, 1.0);"
        )
    s = SQLiteTrafficStore(path)
    rec = s.get("old")
    assert rec is not None and rec.pending == 0 and not rec.choices[0].background
    assert s.feedback("old")[0].judge is None and len(s.untrained()) == 1
    s.close()


def test_feedback_on_a_background_sample_is_refused(tmp_path: Path) -> None:
    s = SQLiteTrafficStore(tmp_path / FILENAME)
    s.record(completion("c1", n=2))
    s.add_background("c1", [background(2)])
    with pytest.raises(FeedbackError, match="background sample, which the caller never saw") as info:
        give_feedback([s], "c1", choice=2, reward=1.0)
    assert info.value.status == 400
    with pytest.raises(FeedbackError, match=r"2 choices \(0..1\); choice 3 is out of range"):
        give_feedback([s], "c1", choice=3, reward=1.0)
    assert give_feedback([s], "c1", choice=1, reward=1.0).choices == 1
    s.close()


def test_background_samples_take_the_requests_parameters_but_not_its_seed() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.0, top_p=0.9, stop=["x"], seed=3, n=2, top_logprobs=5)
    bg = background_params(params, 3)
    assert (bg.n, bg.seed, bg.top_logprobs, bg.temperature) == (3, None, 0, 1.0)  # greedy copies: no signal
    assert (bg.max_tokens, bg.top_p, bg.stop) == (7, 0.9, ["x"])
    assert background_params(SamplingParams(temperature=0.7), 1).temperature == 0.7
    with pytest.raises(ValueError, match="record_traffic=True"):
        adv.TrainableModel("m", background_samples=2)
    with pytest.raises(ValueError, match="judge_model"):
        adv.OnlineConfig(judge_base_url="http://127.0.0.1:1/v1")


# ------------------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A model with 3 background samples ("bg"), one that records without ("rec"), and one that gets the
    service's default of 2 (`advantage serve --record --background-samples 2`)."""
    svc = Service(tmp_path_factory.mktemp("bg"), engine_kwargs={"max_context": 256}, background_samples=2)
    svc.register("p", "bg", str(tiny_model_dir), record_traffic=True, background_samples=3)
    svc.register("p", "rec", str(tiny_model_dir), record_traffic=True)
    srv = BackgroundServer(svc, api_key="k").start()
    yield svc, srv
    srv.stop()
    svc.close()


@pytest.mark.integration
def test_background_choices_are_recorded_but_not_returned(served) -> None:
    svc, srv = served
    assert svc.background_samples_of("bg") == 3 and svc.background_samples_of("rec") == 2
    store = svc.recorder("bg")
    with openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0, timeout=60) as client:
        r = client.chat.completions.create(
            model="bg", messages=PROMPT, n=2, max_tokens=6, temperature=1.0, seed=5
        )
        assert [c.index for c in r.choices] == [0, 1]  # n and k combine: the caller gets its n
        assert r.usage is not None
        assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices)
        wait_background(store, r.id)
        rec = store.get(r.id)
        assert rec is not None and len(rec.choices) == 5 and rec.pending == 0
        assert [c.background for c in rec.choices] == [False, False, True, True, True]
        assert [c.index for c in rec.choices] == [0, 1, 2, 3, 4]
        for got, stored in zip(r.choices, rec.returned, strict=True):
            assert stored.token_ids == got.model_extra["token_ids"]
        for c in rec.choices[2:]:  # exact ids, sampler logprobs, the caller's prompt and weights step
            assert c.token_ids and len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            assert c.prompt_token_ids == r.choices[0].model_extra["prompt_token_ids"]
            assert c.message["role"] == "assistant" and c.finish_reason in ("stop", "length")
        assert rec.step == 0 and rec.request["n"] == 2

        chunks = list(
            client.chat.completions.create(model="bg@0", messages=PROMPT, max_tokens=4, stream=True)
        )
        assert {c.choices[0].index for c in chunks if c.choices} == {0}
        wait_background(store, chunks[0].id)
        streamed = store.get(chunks[0].id)
        assert streamed is not None and [c.background for c in streamed.choices] == [False, True, True, True]

        plain = client.chat.completions.create(model="rec", messages=PROMPT, max_tokens=3)
        wait_background(svc.recorder("rec"), plain.id)
        assert len(svc.recorder("rec").get(plain.id).choices) == 3  # the service's default

    headers = {"Authorization": "Bearer k"}
    bad = httpx.post(
        f"{srv.base_url}/feedback", json={"completion_id": r.id, "choice": 3, "reward": 1}, headers=headers
    )
    assert bad.status_code == 400 and "background sample" in bad.json()["error"]["message"]
    ok = httpx.post(
        f"{srv.base_url}/feedback", json={"completion_id": r.id, "choice": 1, "label": "up"}, headers=headers
    )
    assert ok.status_code == 200 and ok.json()["choices"] == 1


# ------------------------------------------------------------------------------------------------ the judge


def verdict(*scores: float) -> str:
    items = [
        {"trajectory_id": str(i + 1), "explanation": f"#{i + 1}", "score": s} for i, s in enumerate(scores)
    ]
    return json.dumps({"scores": items})


class Script:
    """Stands in for `RulerJudge._complete`: the next reply (or raises it), and counts the calls."""

    def __init__(self, *replies: str | Exception) -> None:
        self.replies = list(replies)
        self.sizes: list[int] = []

    async def __call__(self, request: dict[str, Any]) -> tuple[str, int, int]:
        self.sizes.append(
            request["response_format"]["json_schema"]["schema"]["properties"]["scores"]["minItems"]
        )
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply, 50, 10


def scripted(*replies: str | Exception) -> tuple[adv.RulerJudge, Script]:
    judge = adv.RulerJudge("scripted-judge", base_url="http://127.0.0.1:9/v1", max_retries=1)
    script = Script(*replies)
    judge._complete = script  # type: ignore[method-assign]
    return judge, script


async def ask(model: adv.TrainableModel, task: int, n: int = 1) -> str:
    resp = await model.openai_client().chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": f"Task {task}."}], n=n, max_tokens=4
    )
    return resp.id


async def asked(model: adv.TrainableModel, store: TrafficStore, tasks: int) -> list[str]:
    ids = [await ask(model, t) for t in range(tasks)]
    for cid in ids:
        await asyncio.to_thread(wait_background, store, cid)
    return ids


@pytest.mark.integration
def test_ruler_scores_a_traffic_group_with_the_real_judge(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def main() -> None:
        backend = adv.LocalBackend(tmp_path, progress=False)
        backend.service.engine(JUDGE_MODEL)  # the judge: the bundled SmolLM2, served by the same backend
        model = adv.TrainableModel(
            "bot", project="p", base_model=str(tiny_model_dir), record_traffic=True, background_samples=2
        )
        await model.register(backend)
        try:
            store = backend.service.traffic_stores("bot")[0]
            [cid] = await asked(model, store, 1)
            await model.feedback(cid, label="up")  # the caller's own verdict: it wins over the judge's
            config = adv.OnlineConfig(
                judge_model=JUDGE_MODEL, judge_base_url=backend.base_url, max_steps=1, max_seconds=1, **FAST
            )
            # The first look always runs whole (judge, then a step if the group has signal); max_seconds ends
            # the run soon after, should the judge tie every score. The judge gets the backend's API key.
            out = await model.train_online(config)
            assert (out.judge.scored, out.judge.failed, out.judge.unreachable) == (1, 0, 0)
            assert out.judge_usage is not None and out.judge_usage.completion_tokens > 0
            fb = store.feedback(cid)
            assert (fb[0].reward, fb[0].judge) == (1.0, None)
            for i in (1, 2):
                assert fb[i].judge == JUDGE_MODEL and 0.0 <= fb[i].reward <= 1.0 and fb[i].comment
            # The group [1.0, judge, judge] trained a step, or tied and was counted.
            assert (len(out.steps), out.zero_variance) in ((1, 0), (0, 1))
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_the_trainer_trains_on_judge_scored_groups(tmp_path: Path, tiny_model_dir: Path) -> None:
    async def main() -> None:
        backend = adv.LocalBackend(tmp_path, progress=False, max_context=256)
        model = adv.TrainableModel(
            "bot", project="p", base_model=str(tiny_model_dir), record_traffic=True, background_samples=3
        )
        await model.register(backend)
        try:
            store = backend.service.traffic_stores("bot")[0]
            ids = await asked(model, store, 3)
            # Scripted: two groups with spread scores, one whose scores all tie.
            judge, script = scripted(
                verdict(0.1, 0.9, 0.4, 0.6), verdict(1.0, 0.0, 0.5, 0.5), verdict(*[0.5] * 4)
            )
            out = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST), judge=judge)
            assert script.sizes == [4, 4, 4]  # each request judged once: its choice and 3 background samples
            assert (out.judge.scored, out.zero_variance) == (3, 1)
            [s] = out.steps
            assert (s.promoted, s.groups, s.choices) == (True, 2, 8)
            trained = store.trained("promoted")
            assert {r.completion.id for r in trained} == set(ids[:2])
            assert all(r.feedback.judge == "scripted-judge" for r in trained)
            rewards = {(r.completion.id, r.choice.index): r.feedback.reward for r in trained}
            assert [rewards[(ids[0], i)] for i in range(4)] == [0.1, 0.9, 0.4, 0.6]
            assert [r.choice.index for r in store.untrained()] == [0, 1, 2, 3]  # the tied group waits
        finally:
            await backend.close()

    asyncio.run(main())


@pytest.mark.integration
def test_a_judge_that_answers_junk_is_counted_and_skipped(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Over `advantage serve` (the judge's ops go through their routes): junk is a failed verdict, counted
    and never asked again; an unreachable judge is counted and asked again at the next look."""
    svc = Service(tmp_path, engine_kwargs={"max_context": 256}, model_dirs=[tiny_model_dir.parent])
    srv = BackgroundServer(svc, api_key="k").start()

    async def main() -> None:
        backend = RemoteBackend(srv.base_url, api_key="k", progress=False)
        model = adv.TrainableModel(
            "bot", project="p", base_model=str(tiny_model_dir), record_traffic=True, background_samples=1
        )
        await model.register(backend)
        try:
            store = svc.traffic_stores("bot")[0]
            ids = await asked(model, store, 2)
            down = httpx.ConnectError("judge down")
            judge, script = scripted("no json here", '{"scores": []}', down, verdict(0.2, 0.8))
            counts = await judge_traffic(model, judge, min_choices=2, min_step=0, limit=8)
            assert (counts.scored, counts.failed, counts.unreachable) == (0, 1, 1)
            assert judge.usage.calls == 2  # two attempts at the junk (a call that raised counts nothing)
            assert store.feedback(ids[0]) == {} and store.feedback(ids[1]) == {}
            out = await model.train_online(adv.OnlineConfig(max_steps=1, **FAST), judge=judge)
            assert (out.judge.scored, out.judge.failed) == (1, 0)  # the junk one is not asked again
            [s] = out.steps
            assert s.choices == 2 and {r.completion.id for r in store.trained("promoted")} == {ids[1]}
            assert script.replies == []
        finally:
            await backend.close()

    try:
        asyncio.run(main())
    finally:
        srv.stop()
        svc.close()


@pytest.mark.integration
def test_refused_background_feedback_through_the_client(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`model.feedback` on a background choice raises the server's 400 as a BackendRequestError."""

    async def main() -> None:
        svc = Service(tmp_path, engine_kwargs={"max_context": 256}, model_dirs=[tiny_model_dir.parent])
        srv = BackgroundServer(svc, api_key="k").start()
        backend = RemoteBackend(srv.base_url, api_key="k", progress=False)
        model = adv.TrainableModel(
            "bot", project="p", base_model=str(tiny_model_dir), record_traffic=True, background_samples=1
        )
        try:
            await model.register(backend)
            [cid] = await asked(model, svc.traffic_stores("bot")[0], 1)
            with pytest.raises(BackendRequestError, match="background sample"):
                await model.feedback(cid, reward=1.0, choice=1)
        finally:
            await backend.close()
            srv.stop()
            svc.close()

    asyncio.run(main())
