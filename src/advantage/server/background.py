"""Background samples: extra choices of a recorded request, sampled and recorded, never returned to the caller.

A model registered with `background_samples=k` (`TrainableModel(..., record_traffic=True,
background_samples=k)`, or `advantage serve --record --background-samples K` for every recording model that
asks for none itself) gets k more samples of each chat completion it serves: the same prompt ids, weights and
parameters, recorded as choices n..n+k-1 of the same completion with `background` set (`online/store.py`).
So every production request is a group of n + k attempts once a judge scores it (`online/judging.py`). The
caller never sees them: not in the response, not in a stream, not in `usage`; feedback on one is refused
(`online/feedback.py`).

**When they are sampled.** Right after the caller's request is queued, as an engine request of its own: it
joins the same continuous batch, and its prompt, identical to the caller's, is prefilled once (the engine
prefills identical prompts together, or finds them in the prefix cache). The caller's response goes out as
soon as its own n choices are done and recorded; it never waits for the background rows, which are
appended to the recorded completion when they finish. The cost is the engine's: k more rows in the batch
while they decode, which every row in it shares, and a place in the engine's queue while they wait. Callers'
rows have no priority over them: on a saturated engine, later callers wait behind them (measured in the
README's online section: ~15 % latency for one caller at a time, 2x at 4 concurrent callers on CPU, k=3).

**Their parameters** are the request's, except: n is k; no `seed` (seeded, they would repeat the caller's
choices); no `top_logprobs`; and a greedy request (temperature 0) is sampled at temperature 1, since k copies
of the greedy answer carry no signal. Their logprobs are those of the unmodified distribution, as for every
recorded choice, and they carry the same weights step.

**Best effort.** When the engine's queue is full they are skipped: a caller is never refused, nor slowed,
for them. A skipped or failed sample set still clears the completion's `pending` count, so the judge does
not wait for it; one lost to a server stop is given up after `PENDING_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from advantage.engine.base import Completion, QueueFull
from advantage.engine.sampling import SamplingParams
from advantage.online.records import RecordedChoice
from advantage.online.store import TrafficStore
from advantage.registry import Weights

log = logging.getLogger(__name__)

BackgroundFuture = asyncio.Future[list[Completion]]
_TASKS: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references to tasks


def background_params(params: SamplingParams, k: int) -> SamplingParams:
    """The parameters of a request's k background samples (see the module docstring)."""
    return dataclasses.replace(params, n=k, seed=None, top_logprobs=0, temperature=params.temperature or 1.0)


def submit_background(
    weights: Weights, prompt_ids: list[int], params: SamplingParams, k: int
) -> BackgroundFuture | None:
    """Queue k background samples of a request just queued; None when k is 0 or the engine is full."""
    if k <= 0:
        return None
    try:
        fut = weights.engine.submit(prompt_ids, background_params(params, k), weights.adapter, None)
    except QueueFull:
        log.info("engine busy: no background samples for a request to %s", weights.model)
        return None
    except Exception:  # never the caller's problem
        log.exception("could not queue background samples for %s", weights.model)
        return None
    return asyncio.wrap_future(fut)


def cancel_background(fut: BackgroundFuture | None) -> None:
    """The caller's completion was not recorded (it failed, or its stream was dropped): nothing to attach to."""
    if fut is not None:
        fut.cancel()


def attach_background(
    fut: BackgroundFuture | None,
    store: TrafficStore,
    completion_id: str,
    build: Callable[[list[Completion]], list[RecordedChoice]],
) -> None:
    """Once the samples finish, append them to the recorded completion (`build` makes their records, on a
    worker thread). Returns at once: the caller's response does not wait."""
    if fut is None:
        return
    task = asyncio.ensure_future(_record_when_done(fut, store, completion_id, build))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _record_when_done(
    fut: BackgroundFuture,
    store: TrafficStore,
    completion_id: str,
    build: Callable[[list[Completion]], list[RecordedChoice]],
) -> None:
    try:
        choices = await asyncio.to_thread(build, await fut)
    except Exception:
        log.exception("background samples of %s failed", completion_id)
        choices = []
    try:
        await asyncio.to_thread(store.add_background, completion_id, choices)
    except Exception:  # a full disk must not take the server down
        log.exception("could not record the background samples of %s", completion_id)
