"""Online RL: the traffic a recording model serves is stored (SQLite, WAL, in its run dir), callers rate it
with `POST /v1/feedback` / `model.feedback`, and rated choices that share a prompt become GRPO groups.

The store and the feedback rules are tested on hand-built records; recording and the route go through the
real server on 127.0.0.1 with the tiny random Llama, driven by the official `openai` SDK and `httpx`.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import PROMPT

import advantage as adv
from advantage.backends.remote import BackendRequestError, RemoteBackend
from advantage.online.feedback import LABEL_REWARDS, FeedbackError, give_feedback, reward_for
from advantage.online.groups import groups_from_traffic
from advantage.online.records import Feedback, RecordedChoice, RecordedCompletion, RewardedChoice
from advantage.online.store import FILENAME, Retention, SQLiteTrafficStore
from advantage.server.runner import BackgroundServer
from advantage.service import Service
from advantage.training.tokenize import tokenize_trajectory

KEY = "k"


def completion(
    cid: str, n: int = 1, created: float | None = None, episode: object = None
) -> RecordedCompletion:
    metadata = {"task": "t1"} if episode is None else {"episode": episode}
    choices = [
        RecordedChoice(
            i, [10 + i, 11], [-0.5, -0.25], [1, 2, 3], [], "stop", {"role": "assistant", "content": "x"}
        )
        for i in range(n)
    ]
    request = {"model": "m@0", "messages": PROMPT, "temperature": 1.0, "n": n}
    created = time.time() if created is None else created
    return RecordedCompletion(cid, "m", 0, created, request, choices, metadata, user="u")


@pytest.fixture
def store(tmp_path: Path):
    s = SQLiteTrafficStore(tmp_path / FILENAME)
    yield s
    s.close()


# ------------------------------------------------------------------------------------------------ the store


def test_store_round_trip_survives_reopen_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "run" / FILENAME
    s = SQLiteTrafficStore(path)
    rec = completion("c1", n=2)
    s.record(rec)
    s.set_feedback([Feedback("c1", 1, 0.5, None, "ok", "c1", 5.0)])
    assert (tmp_path / "run" / f"{FILENAME}-wal").exists()  # writes go to the write-ahead log
    s.close()
    with sqlite3.connect(path) as db:  # WAL mode is a property of the file: it persists
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = SQLiteTrafficStore(path)
    try:
        assert again.get("c1") == rec and again.count() == 1
        assert again.feedback("c1") == {1: Feedback("c1", 1, 0.5, None, "ok", "c1", 5.0)}
        [row] = again.rewarded()
        assert (row.completion, row.choice, row.feedback.reward) == (rec, rec.choices[1], 0.5)
        assert again.get("nope") is None
    finally:
        again.close()


def test_retention_prunes_by_count_and_by_age(tmp_path: Path) -> None:
    s = SQLiteTrafficStore(tmp_path / FILENAME, Retention(max_age_s=1e12, max_completions=3))
    now = 2e9
    for i in range(5):
        s.record(completion(f"c{i}", created=now + i))
        s.set_feedback([Feedback(f"c{i}", 0, 1.0, updated=now + i)])
    # The two oldest are gone, with their choices and feedback (ON DELETE CASCADE).
    assert [s.get(f"c{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert s.count() == 3 and [r.completion.id for r in s.rewarded()] == ["c2", "c3", "c4"]
    s.close()

    s = SQLiteTrafficStore(tmp_path / FILENAME, Retention(max_age_s=10.0, max_completions=100))
    assert s.count() == 3  # counted again on open
    assert s.prune(now=now + 13.5) == 2  # c2 and c3 are over 10 s old then, c4 is 9.5 s old
    assert s.count() == 1 and s.get("c4") is not None
    s.close()


def test_retention_by_age_on_insert(tmp_path: Path) -> None:
    s = SQLiteTrafficStore(tmp_path / "aged.sqlite", Retention(max_age_s=60.0))
    s.record(completion("old", created=1.0))  # decades ago: pruned by the insert itself
    assert s.get("old") is None and s.count() == 0
    s.close()
    with pytest.raises(ValueError, match="max_completions"):
        Retention(max_completions=0)


# ------------------------------------------------------------------------------------------------ feedback


def test_labels_map_to_rewards_and_bad_input_says_what_to_send() -> None:
    assert reward_for(None, "thumbs_up") == reward_for(None, " Good ") == reward_for(None, "up") == 1.0
    assert reward_for(None, "thumbs_down") == reward_for(None, "BAD") == reward_for(None, "down") == 0.0
    assert reward_for(0.25, None) == 0.25 and reward_for(-3, None) == -3.0
    assert set(LABEL_REWARDS.values()) == {0.0, 1.0}
    for reward, label, needle in [
        (None, None, "neither"),
        (1.0, "up", "both"),
        (math.nan, None, "finite"),
        (math.inf, None, "finite"),
        (1e13, None, "finite"),
        (None, "meh", "Unknown label"),
    ]:
        with pytest.raises(FeedbackError, match=needle) as info:
            reward_for(reward, label)
        assert info.value.status == 400


def test_feedback_is_idempotent_and_checks_id_and_choice(store: SQLiteTrafficStore) -> None:
    store.record(completion("c1", n=2))
    r = give_feedback([store], "c1", choice=1, reward=0.3, comment="meh")
    assert (r.reward, r.choices, r.episode) == (0.3, 1, None)
    give_feedback([store], "c1", choice=1, label="up")  # replaces the first
    [fb] = store.feedback("c1").values()
    assert (fb.choice, fb.reward, fb.label, fb.comment) == (1, 1.0, "up", None)
    with pytest.raises(FeedbackError, match="No recorded completion") as info:
        give_feedback([store], "c9", reward=1.0)
    assert info.value.status == 404
    with pytest.raises(FeedbackError, match="No recorded completion"):
        give_feedback([store], "bad id \udc80", reward=1.0)  # never reaches SQLite
    with pytest.raises(FeedbackError, match=r"2 choices \(0..1\); choice 2 is out of range") as info:
        give_feedback([store], "c1", choice=2, reward=1.0)
    assert info.value.status == 400
    with pytest.raises(FeedbackError, match="out of range"):
        give_feedback([store], "c1", choice=-1, reward=1.0)
    with pytest.raises(FeedbackError, match="comment"):
        give_feedback([store], "c1", reward=1.0, comment="x" * 5000)


def test_feedback_on_an_episode_applies_to_all_its_turns(store: SQLiteTrafficStore) -> None:
    for i in range(3):
        store.record(completion(f"e{i}", created=2e9 + i, episode="ep-1"))
    store.record(completion("other", created=2e9 + 5, episode="ep-2"))
    store.record(completion("int7", created=2e9 + 6, episode=7))
    store.record(completion("str7", created=2e9 + 7, episode="7"))
    r = give_feedback([store], "e2", reward=0.9)
    assert (r.episode, r.choices) == ('"ep-1"', 3)
    rated = {(row.completion.id, row.feedback.source_id, row.feedback.reward) for row in store.rewarded()}
    assert rated == {("e0", "e2", 0.9), ("e1", "e2", 0.9), ("e2", "e2", 0.9)}
    assert give_feedback([store], "int7", reward=1.0).choices == 1  # 7 and "7" are different tags


# ------------------------------------------------------------------------------------------------ groups


def rated(cid: str, idx: int, prompt: list[int], reward: float) -> RewardedChoice:
    rec = completion(cid, n=idx + 1)
    for ch in rec.choices:
        ch.prompt_token_ids = prompt
    return RewardedChoice(rec, rec.choices[idx], Feedback(cid, idx, reward))


def test_groups_from_traffic_by_prompt_skipping_small_and_flat_groups() -> None:
    rows = [
        rated("a", 0, [1, 2], 1.0),  # one request with n=2 ...
        rated("a", 1, [1, 2], 0.0),
        rated("b", 0, [1, 2], 0.5),  # ... and a repeat of its prompt: one group of three
        rated("c", 0, [7], 1.0),  # alone: too small
        rated("d", 0, [8, 9], 0.25),  # two with the same reward: zero variance
        rated("e", 0, [8, 9], 0.25),
    ]
    out = groups_from_traffic(rows)
    assert (out.too_small, out.zero_variance, len(out.groups)) == (1, 1, 1)
    [group] = out.groups
    assert group.rewards() == [1.0, 0.0, 0.5]
    t = group.trajectories[1]
    assert t.messages_and_choices[:-1] == PROMPT and t.metadata["completion_id"] == "a"
    assert (t.metadata["choice"], t.metadata["task"], t.metadata["user"]) == (1, "t1", "u")
    extra = t.choices()[0].model_extra
    assert (extra["token_ids"], extra["token_logprobs"]) == ([11, 11], [-0.5, -0.25])
    assert extra["weights"] == {"model": "m", "step": 0} and t.weight_steps() == [0]
    assert groups_from_traffic(rows, min_size=4).too_small == 3
    with pytest.raises(ValueError, match="min_size"):
        groups_from_traffic(rows, min_size=1)


# ------------------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A recording model ("rec") and a plain one ("plain") on the tiny Llama, behind the real server."""
    svc = Service(tmp_path_factory.mktemp("online"), engine_kwargs={"max_context": 256})
    svc.register("p", "rec", str(tiny_model_dir), record_traffic=True)
    svc.register("p", "plain", str(tiny_model_dir))
    srv = BackgroundServer(svc, api_key=KEY).start()
    yield svc, srv
    srv.stop()
    svc.close()


@pytest.fixture
def client(served):
    with openai.OpenAI(base_url=served[1].base_url, api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def post_feedback(srv: BackgroundServer, key: str | None = KEY, **body: object) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{srv.base_url}/feedback", content=json.dumps(body), headers=headers, timeout=30)


@pytest.mark.integration
def test_a_served_completion_is_recorded_with_its_token_ids(served, client: openai.OpenAI) -> None:
    svc, _ = served
    r = client.chat.completions.create(
        model="rec", messages=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=3,
        metadata={"task": "greet"}, user="alice",
    )  # fmt: skip
    rec = svc.recorder("rec").get(r.id)
    assert rec is not None and (rec.model, rec.step, rec.user, rec.metadata) == (
        "rec",
        0,
        "alice",
        {"task": "greet"},
    )
    assert rec.request["messages"] == PROMPT and rec.request["n"] == 2 and rec.request["seed"] == 3
    assert "metadata" not in rec.request and "user" not in rec.request
    assert len(rec.choices) == 2
    for choice, stored in zip(r.choices, rec.choices, strict=True):
        extra = choice.model_extra
        assert stored.index == choice.index
        assert stored.token_ids == extra["token_ids"] and stored.logprobs == extra["token_logprobs"]
        assert stored.prompt_token_ids == extra["prompt_token_ids"]
        assert stored.forced_token_indices == extra["forced_token_indices"]
        assert stored.finish_reason == choice.finish_reason
        assert stored.message["content"] == choice.message.content


@pytest.mark.integration
def test_a_streamed_completion_is_recorded_too(served, client: openai.OpenAI) -> None:
    svc, _ = served
    stream = client.chat.completions.create(model="rec@0", messages=PROMPT, max_tokens=5, stream=True)
    chunks = list(stream)
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason is not None)
    rec = svc.recorder("rec").get(chunks[0].id)
    assert rec is not None and rec.request["model"] == "rec@0"
    assert rec.choices[0].token_ids == last.choices[0].model_extra["token_ids"]


@pytest.mark.integration
def test_recording_is_off_by_default(served, client: openai.OpenAI) -> None:
    svc, srv = served
    r = client.chat.completions.create(model="plain", messages=PROMPT, max_tokens=3)
    assert svc.recorder("plain") is None and svc.traffic_stores("plain") == []
    assert not (svc.model_entry("plain").run_dir / FILENAME).exists()
    resp = post_feedback(srv, completion_id=r.id, reward=1.0)
    assert resp.status_code == 404, resp.text
    assert "record_traffic=True" in resp.json()["error"]["message"]


@pytest.mark.integration
def test_feedback_route(served, client: openai.OpenAI) -> None:
    svc, srv = served
    r = client.chat.completions.create(model="rec", messages=PROMPT, max_tokens=3, n=2)
    resp = post_feedback(srv, completion_id=r.id, choice=1, reward=0.5, comment="fine")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "completion_id": r.id, "choice": 1, "reward": 0.5, "label": None, "episode": None, "choices": 1
    }  # fmt: skip
    resp = post_feedback(srv, completion_id=r.id, choice=1, label="thumbs_down")  # replaces it
    assert resp.status_code == 200 and resp.json()["reward"] == 0.0
    [fb] = svc.recorder("rec").feedback(r.id).values()
    assert (fb.choice, fb.reward, fb.label, fb.comment) == (1, 0.0, "thumbs_down", None)

    def error(resp: httpx.Response, status: int) -> dict:
        assert resp.status_code == status, resp.text
        return resp.json()["error"]

    assert (
        error(post_feedback(srv, None, completion_id=r.id, reward=1.0), 401)["type"] == "authentication_error"
    )
    unknown = error(post_feedback(srv, completion_id="chatcmpl-nope", reward=1.0), 404)
    assert unknown["code"] == "completion_not_found" and "No recorded completion" in unknown["message"]
    # NaN goes out as a bare NaN token (json.dumps writes it) and is refused by the rules, not the parser.
    nan = error(post_feedback(srv, completion_id=r.id, reward=math.nan), 400)
    assert nan["param"] == "reward" and "finite" in nan["message"]
    assert (
        "out of range" in error(post_feedback(srv, completion_id=r.id, choice=2, reward=1.0), 400)["message"]
    )
    assert "neither" in error(post_feedback(srv, completion_id=r.id), 400)["message"]
    assert "Unknown label" in error(post_feedback(srv, completion_id=r.id, label="meh"), 400)["message"]
    assert error(post_feedback(srv, completion_id=r.id, reward=1.0, extra=1), 400)["param"] == "extra"
    assert error(post_feedback(srv, completion_id=r.id, reward=1.0, model="ghost"), 404)["code"] == (
        "model_not_registered"
    )
    assert "/v1/feedback" in httpx.get(f"{srv.base_url.removesuffix('/v1')}/openapi.json",
                                       headers={"Authorization": f"Bearer {KEY}"}).json()["paths"]  # fmt: skip


@pytest.mark.integration
def test_feedback_on_an_episodes_last_turn_rates_the_episode(served, client: openai.OpenAI) -> None:
    svc, srv = served
    messages = list(PROMPT)
    ids = []
    for _ in range(3):  # a three-turn episode, tagged
        r = client.chat.completions.create(
            model="rec", messages=messages, max_tokens=3, metadata={"episode": "ep-42"}
        )
        ids.append(r.id)
        messages += [{"role": "assistant", "content": r.choices[0].message.content}, PROMPT[0]]
    untagged = client.chat.completions.create(model="rec", messages=PROMPT, max_tokens=3).id
    resp = post_feedback(srv, completion_id=ids[-1], reward=0.75)
    assert resp.status_code == 200 and resp.json()["episode"] == '"ep-42"' and resp.json()["choices"] == 3
    store = svc.recorder("rec")
    for cid in ids:
        assert {i: (f.reward, f.source_id) for i, f in store.feedback(cid).items()} == {0: (0.75, ids[-1])}
    assert store.feedback(untagged) == {}


@pytest.mark.integration
async def test_model_feedback_through_the_remote_backend(served, tiny_model_dir: Path) -> None:
    svc, srv = served
    model = adv.TrainableModel("remote-rec", project="p", base_model=str(tiny_model_dir), record_traffic=True)
    backend = RemoteBackend(srv.base_url, api_key=KEY, progress=False)
    await model.register(backend)
    try:
        r = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=PROMPT, max_tokens=3
        )
        result = await model.feedback(r.id, label="good", comment="nice")
        assert (result.completion_id, result.choice, result.reward, result.label) == (r.id, 0, 1.0, "good")
        assert svc.recorder("remote-rec").feedback(r.id)[0].comment == "nice"
        with pytest.raises(BackendRequestError, match="out of range") as info:
            await model.feedback(r.id, reward=1.0, choice=1)
        assert info.value.status == 400
        with pytest.raises(BackendRequestError, match="finite"):
            await model.feedback(r.id, reward=math.nan)
    finally:
        await backend.close()


@pytest.mark.integration
async def test_model_feedback_through_the_local_backend(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False, max_context=256)
    model = adv.TrainableModel("local-rec", project="p", base_model=str(tiny_model_dir), record_traffic=True)
    await model.register(backend)
    try:
        r = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=PROMPT, max_tokens=3, n=2
        )
        assert (await model.feedback(r.id, reward=0.2, choice=1)).reward == 0.2
        with pytest.raises(ValueError, match="No recorded completion"):
            await model.feedback("chatcmpl-unknown", reward=1.0)
        with pytest.raises(ValueError, match="either `reward`"):
            await model.feedback(r.id)
        assert (backend.run_dir(model) / FILENAME).exists()
    finally:
        await backend.close()


@pytest.mark.integration
def test_rated_traffic_trains_a_step(served, client: openai.OpenAI, tokenizer) -> None:
    """Recorded, rated traffic -> groups -> a GRPO step, on the exact sampled ids (last: "rec" moves to step 1)."""
    svc, srv = served
    store = svc.recorder("rec")
    since = max((r.feedback.updated for r in store.rewarded()), default=0.0)
    for seed in (1, 2):
        r = client.chat.completions.create(model="rec", messages=PROMPT, max_tokens=6, n=2, seed=seed)
        for i in range(2):
            assert post_feedback(srv, completion_id=r.id, choice=i, reward=float(i + seed)).status_code == 200
    out = groups_from_traffic(store.rewarded(since=since))
    [group] = out.groups  # four choices of one prompt, from two requests
    assert sorted(group.rewards()) == [1.0, 2.0, 2.0, 3.0]
    for t in group.trajectories:
        tok = tokenize_trajectory(tokenizer, t, 256)
        extra = t.choices()[0].model_extra
        [(start, end)] = tok.choice_spans
        assert (
            tok.input_ids[:start] == extra["prompt_token_ids"]
            and tok.input_ids[start:end] == extra["token_ids"]
        )
    step, metrics = svc.train("rec", out.groups, adv.TrainConfig(learning_rate=1e-2))
    assert step == 1 and metrics["trained_tokens"] > 0
    assert metrics["logprob_drift_mean_abs"] < 0.05  # the recorded logprobs are the trainer's


@pytest.mark.integration
def test_a_restarted_service_still_rates_old_traffic(
    served, client: openai.OpenAI, tiny_model_dir: Path
) -> None:
    svc, _ = served
    old = client.chat.completions.create(model="rec", messages=PROMPT, max_tokens=3).id
    again = Service(svc.root, engine_kwargs={"max_context": 256})  # the same root: a restart
    try:
        again.register("p", "rec", str(tiny_model_dir))  # recording off now
        assert again.recorder("rec") is None
        result = give_feedback(again.traffic_stores("rec"), old, label="down")  # the store opens on demand
        assert result.reward == 0.0 and svc.recorder("rec").feedback(old)[0].label == "down"
    finally:
        again.close()
