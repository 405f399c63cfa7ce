"""Forks: a new model whose step 0 is a copy of `other@step` (adapter and optimizer state), served and trained
on from there, on LocalBackend and over HTTP; a source that does not exist is a clear error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import PROMPT, same_weights_logprob_tol, toy_rollout

import advantage as adv
from advantage.backends.remote import BackendRequestError
from advantage.server.runner import BackgroundServer
from advantage.service import Service
from advantage.training import checkpoints as ckpt

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
KEY = "k"
LR = adv.TrainConfig(learning_rate=1e-2)


async def _groups(model: adv.TrainableModel) -> list[adv.TrajectoryGroup]:
    return await adv.gather_trajectory_groups(
        [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
    )


async def _greedy(model: adv.TrainableModel, served: str) -> tuple[list[int], list[float], dict[str, object]]:
    resp = await model.openai_client().chat.completions.create(
        model=served, messages=PROMPT, max_tokens=8, temperature=0
    )
    extra = resp.choices[0].model_extra
    return extra["token_ids"], extra["token_logprobs"], extra["weights"]


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[adv.LocalBackend]:
    backend = adv.LocalBackend(tmp_path, progress=False)
    yield backend
    await backend.close()


async def test_fork_copies_the_step_serves_it_and_trains_on(
    local: adv.LocalBackend, tiny_model_dir: Path, tmp_path: Path
) -> None:
    src = adv.TrainableModel("src", project="p", base_model=str(tiny_model_dir))
    await src.register(local)
    for _ in range(2):
        await src.train(await _groups(src), LR)

    fork = adv.TrainableModel("fork", project="p", base_model=str(tiny_model_dir), fork_from="src@1")
    await fork.register(local)
    assert fork.get_inference_name() == "fork@0"

    # Step 0 is a byte copy of src@1: adapter and optimizer state, and it says where it came from.
    src_dir, fork_dir = ckpt.model_dir(tmp_path, "p", "src"), ckpt.model_dir(tmp_path, "p", "fork")
    for f in ("adapter_model.safetensors", "optimizer.pt"):
        assert (ckpt.step_dir(fork_dir, 0) / f).read_bytes() == (ckpt.step_dir(src_dir, 1) / f).read_bytes()
    state = ckpt.read_state(fork_dir, 0)
    assert state["forked_from"] == {"project": "p", "model": "src", "step": 1}
    rows = [json.loads(line) for line in (fork_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "split": "fork", "time": rows[0]["time"], "forked_from": "p/src@1"}]

    # fork@0 answers with src@1's weights, not the base's.
    ids, lps, weights = await _greedy(fork, "fork@0")
    assert weights == {"model": "fork", "step": 0}
    src_ids, src_lps, _ = await _greedy(src, "src@1")
    base_ids, base_lps, _ = await _greedy(src, "src@0")
    # (Logprobs to float tolerance: a prompt prefilled in another batch, or taken from the prefix cache,
    # is summed in another order; in bf16 the tiny model's ~-9.9 logprobs differed by 4.6e-4.)
    assert ids == src_ids and lps == pytest.approx(src_lps, abs=same_weights_logprob_tol())
    assert (ids, lps) != (base_ids, base_lps)

    # It trains on from there, apart from its source.
    result = await fork.train(await _groups(fork), LR)
    assert result.step == 1 and await src.get_step() == 2

    # Registering it again (say, a restarted process) resumes it; the source's step may be gone by then.
    (ckpt.step_dir(src_dir, 1) / ckpt.STATE_FILE).unlink()
    again = adv.LocalBackend(tmp_path, progress=False)
    try:
        fork2 = adv.TrainableModel("fork", project="p", base_model=str(tiny_model_dir), fork_from="src@1")
        await fork2.register(again)
        assert fork2.get_inference_name() == "fork@1"
        # A different source for a model that has checkpoints is refused, not silently ignored.
        other = adv.TrainableModel("fork", project="p", base_model=str(tiny_model_dir), fork_from="src@2")
        with pytest.raises(ValueError, match="already has checkpoints .forked from p/src@1"):
            await other.register(again)
    finally:
        await again.close()


@pytest.mark.parametrize(
    ("fork_from", "lora", "message"),
    [
        ("src@7", None, r"src@7: that step is not on disk; steps on disk: \[0\]"),
        ("ghost@0", None, "p/ghost: it has no checkpoints"),
        ("elsewhere/src@0", None, "elsewhere/src: it has no checkpoints"),
        ("src@x", None, "Bad step"),
        ("src@0", adv.LoRAConfig(r=4), "Give the fork the same LoRAConfig"),
        ("fork@0", None, "cannot be forked from itself"),
    ],
)
async def test_bad_fork_sources_are_clear_errors(
    local: adv.LocalBackend, tiny_model_dir: Path, tmp_path: Path, fork_from: str, lora, message: str
) -> None:
    await adv.TrainableModel("src", project="p", base_model=str(tiny_model_dir)).register(local)
    fork = adv.TrainableModel(
        "fork", project="p", base_model=str(tiny_model_dir), lora=lora, fork_from=fork_from
    )
    with pytest.raises(ValueError, match=message):
        await fork.register(local)
    assert not ckpt.model_dir(tmp_path, "p", "fork").exists()  # nothing was written
    assert "fork" not in local.service.served_names()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BackgroundServer]:
    service = Service(tmp_path)
    srv = BackgroundServer(service, api_key=KEY).start()
    yield srv
    srv.stop()
    service.close()


async def test_fork_over_http(server: BackgroundServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = adv.RemoteBackend(server.base_url, api_key=KEY, progress=False)
    try:
        src = adv.TrainableModel("src", project="p", base_model=str(tiny_model_dir))
        await src.register(backend)
        await src.train(await _groups(src), LR)

        fork = adv.TrainableModel("fork", project="p", base_model=str(tiny_model_dir), fork_from="src")
        assert await backend.register(fork) == 0
        await fork.register(backend)
        assert ckpt.read_state(ckpt.model_dir(tmp_path, "p", "fork"), 0)["forked_from"]["step"] == 1
        ids, lps, weights = await _greedy(fork, "fork@0")
        assert weights == {"model": "fork", "step": 0} and (ids, lps) == (await _greedy(src, "src@1"))[:2]

        missing = adv.TrainableModel("fork2", project="p", base_model=str(tiny_model_dir), fork_from="src@5")
        with pytest.raises(BackendRequestError, match="not on disk") as info:
            await missing.register(backend)
        assert info.value.status == 400
    finally:
        await backend.close()
