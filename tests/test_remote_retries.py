"""RemoteBackend's retry policy against a scripted server (httpx.MockTransport): which calls are sent again
on a 429, a 502-504 and a broken connection, and that a 429's Retry-After is the wait. No model, no socket.
Connection retries belong to httpx's transport and are covered by the unreachable-server test in
test_remote_backend.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

import advantage as adv
from advantage.backends.remote import BackendRequestError, BackendUnavailableError, RemoteBackend

Handler = Callable[[httpx.Request], httpx.Response]


def scripted(*answers: httpx.Response | Exception, max_retries: int = 2) -> tuple[RemoteBackend, list[str]]:
    """A backend whose requests get `answers` in order (an exception is raised as the transport's), and the
    list of the paths it was asked for."""
    seen: list[str] = []
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    backend = RemoteBackend("http://advantage.test", max_retries=max_retries, progress=False)
    client = httpx.AsyncClient(
        base_url=f"{backend.base_url}/training", transport=httpx.MockTransport(handler)
    )
    backend._client = lambda: client  # type: ignore[method-assign]  # the scripted server in place of HTTP
    return backend, seen


def busy(seconds: str = "0.1") -> httpx.Response:
    return httpx.Response(429, headers={"Retry-After": seconds}, json={"error": {"message": "queue full"}})


MODEL = adv.TrainableModel("m", project="p", base_model="base")
STEP = httpx.Response(200, json={"step": 3})


async def test_a_429_is_sent_again_after_its_retry_after() -> None:
    backend, seen = scripted(busy("0.3"), STEP)
    start = time.monotonic()
    assert await backend.get_step(MODEL) == 3
    assert time.monotonic() - start >= 0.3 and len(seen) == 2


async def test_a_429_on_a_call_that_is_not_idempotent_is_sent_again_too() -> None:
    logged = httpx.Response(200, json={"metrics": {"val/reward": 0.5}})
    backend, seen = scripted(busy(), logged)
    assert await backend.log(MODEL, [], "val") == {"val/reward": 0.5}
    assert len(seen) == 2


async def test_a_429_that_persists_is_raised_after_max_retries() -> None:
    backend, seen = scripted(busy(), busy(), max_retries=1)
    with pytest.raises(BackendRequestError, match="queue full") as info:
        await backend.get_step(MODEL)
    assert info.value.status == 429 and info.value.retry_after == pytest.approx(0.1) and len(seen) == 2


async def test_a_502_is_retried_only_when_idempotent() -> None:
    backend, seen = scripted(httpx.Response(502), STEP, max_retries=1)
    assert await backend.get_step(MODEL) == 3 and len(seen) == 2
    backend, seen = scripted(httpx.Response(503), max_retries=1)
    with pytest.raises(BackendUnavailableError, match="HTTP 503"):
        await backend.log(MODEL, [], "val")
    assert len(seen) == 1


async def test_a_broken_connection_is_retried_only_when_idempotent() -> None:
    backend, seen = scripted(httpx.ReadError("reset"), STEP, max_retries=1)
    assert await backend.get_step(MODEL) == 3 and len(seen) == 2
    backend, seen = scripted(httpx.ReadError("reset"), max_retries=1)
    with pytest.raises(BackendUnavailableError, match="broke during log"):
        await backend.log(MODEL, [], "val")
    assert len(seen) == 1


async def test_a_train_step_is_never_sent_twice_once_it_went_out() -> None:
    backend, seen = scripted(httpx.ReadError("reset"), max_retries=2)
    with pytest.raises(BackendUnavailableError, match="went away during a train step"):
        await backend.train(MODEL, [], adv.TrainConfig())
    assert len(seen) == 1
    result = httpx.Response(200, text='{"event": "result", "step": 4, "metrics": {"loss": 0.5}}\n')
    backend, seen = scripted(busy(), result)  # a full training queue queued nothing: sent again
    assert (await backend.train(MODEL, [], adv.TrainConfig())).step == 4 and len(seen) == 2


async def test_a_restarted_server_gets_the_model_registered_again() -> None:
    unknown = httpx.Response(404, json={"error": {"message": "register it", "code": "model_not_registered"}})
    backend, seen = scripted(unknown, STEP, httpx.Response(200, json={"step": 5}))
    assert await backend.get_step(MODEL) == 5
    assert seen == ["/v1/training/models/m/step", "/v1/training/models", "/v1/training/models/m/step"]
