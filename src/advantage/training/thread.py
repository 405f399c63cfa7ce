"""The training thread: the one thread every use of an in-process trainer runs on, behind a bounded queue.

One thread, not a pool: train steps spread over a pool each left their peak (~6 GiB on the demo) in a
different glibc malloc arena, and the process grew by that much per step until the OOM killer stepped in;
one thread reuses one arena. That memory stays there for the next step unless the machine runs short
(`memory_short`); then `release_freed_memory` hands it back to the OS.

While a job runs, `busy` is set: an in-process engine decodes on fewer threads then
(`TorchEngine(threads_while_training=)`), leaving the cores to the update.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from advantage.engine.base import QueueFull
from advantage.threads import set_torch_threads

T = TypeVar("T")
RETRY_AFTER_S = 5  # what a full queue advises: a job takes seconds to minutes
# A train step frees its peak (~5 GiB on the demo) into glibc's arena, which keeps it for the next step unless
# less than this share of the machine's memory is available; then it goes back to the OS. Handing it back
# after every step cost the next ~1.5 million page faults (~0.15 million without), and the update ran 1.11x
# slower (benchmarks/trim.py, BENCHMARKS.md).
TRIM_BELOW_AVAILABLE = 0.25


class TrainingThread:
    def __init__(self, max_queue: int = 16) -> None:
        """`max_queue`: jobs that may wait besides the one running; past that `submit` raises `QueueFull`."""
        if max_queue < 0:
            raise ValueError(f"max_train_queue must be >= 0, got {max_queue}.")
        self.max_queue = max_queue
        self.busy = threading.Event()  # set while a job runs
        self._jobs = 0  # submitted and not finished
        self._jobs_lock = threading.Lock()
        # torch's intra-op thread count is kept per thread, and a new thread starts with the last count set on
        # any thread: after an engine on threads of its own (`TorchEngine(threads=1)`) this thread would start
        # on one as well. It takes the count of the thread that made it.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1,
            thread_name_prefix="advantage-train",
            initializer=set_torch_threads,
            initargs=(torch.get_num_threads(),),
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue `fn(*args)`, or raise `QueueFull` if `max_queue` jobs wait already."""
        with self._jobs_lock:
            waiting = max(self._jobs - 1, 0)
            if waiting >= self.max_queue:
                raise QueueFull(
                    f"The training queue is full: {waiting} jobs are waiting for the training thread (at "
                    f"most {self.max_queue}). Retry in {RETRY_AFTER_S} s, or send one step at a time.",
                    RETRY_AFTER_S,
                )
            self._jobs += 1
        fut = self._executor.submit(self._run_busy, functools.partial(fn, *args))
        fut.add_done_callback(self._done)
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the thread, awaitable. Cancelling the await drops the job if it has not started."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        """Finish the jobs queued, then stop the thread."""
        self._executor.shutdown(wait=True)

    def _run_busy(self, job: Callable[[], T]) -> T:
        self.busy.set()
        try:
            return job()
        finally:
            self.busy.clear()

    def _done(self, _: concurrent.futures.Future[Any]) -> None:
        with self._jobs_lock:
            self._jobs -= 1


def memory_short(meminfo: Path = Path("/proc/meminfo"), below: float = TRIM_BELOW_AVAILABLE) -> bool:
    """Whether less than `below` of the machine's memory is available (False where /proc/meminfo is not)."""
    try:
        kib = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in meminfo.read_text().splitlines())}
        return kib["MemAvailable"] < below * kib["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return False


def release_freed_memory() -> None:
    """Hand freed memory back to the OS (glibc keeps it in its arenas otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
