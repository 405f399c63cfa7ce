"""The body of one engine replica's Ray actor (`engine/replicas.py` places and routes to them): a
`TorchEngine` for the base model, adapters written from the files the router sends, and the process id in
every reply, so the router sees that Ray restarted it (a new process has none of the adapters).

Adapter files go to a scratch directory of the replica's own, `<scratch>/<index>`, under the replica set's
`scratch` directory (the router's, made and removed by it; a replica on another node makes it there). A
replica Ray restarts empties the directory its killed process left; `close` (and, failing that, the process's
normal exit) removes it.

The actor is async: its requests run concurrently and join one engine's continuous batch; cancelling a
request's Ray task cancels its engine rows. `generate_stream` is the streamed form of `generate`: an async
generator that the router calls as a Ray streaming generator (`num_returns="streaming"`), yielding the text
as the engine decodes it and the completions last.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from advantage.engine.base import Completion, Scores
from advantage.engine.sampling import SamplingParams


class ReplicaActor:
    """One replica (see the module docstring): replica `index` of the set whose scratch directory is `scratch`."""

    def __init__(
        self, model_dir: str, engine_kwargs: dict[str, Any], threads: int, gpu: bool, scratch: str, index: int
    ) -> None:
        import torch

        from advantage.engine.torch_engine import TorchEngine

        torch.set_num_threads(threads)
        self.engine = TorchEngine(model_dir, **{"device": "cuda" if gpu else "cpu", **engine_kwargs})
        self.dir = Path(scratch) / str(index)
        shutil.rmtree(self.dir, ignore_errors=True)  # a killed process's, when Ray restarted this replica
        self.dir.mkdir(parents=True)
        atexit.register(self.close)
        self.dirs: dict[str, Path] = {}  # adapter name -> the directory its files were written to
        self.pid = os.getpid()

    def limits(self) -> tuple[int, int, int, int]:
        """(pid, context length, default max_tokens, requests that fit in flight)."""
        e = self.engine
        return self.pid, e.context_len, e.default_max_tokens, e.max_pending + e.max_batch_size

    def adapters(self) -> tuple[int, list[str]]:
        return self.pid, self.engine.adapters()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None
    ) -> tuple[int, list[Completion]]:
        return self.pid, await self.engine.generate(prompt_ids, params, adapter)

    async def generate_stream(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None
    ) -> AsyncIterator[tuple[int, list[tuple[int, str]], list[Completion] | None]]:
        """`generate`, streamed: yields (pid, text deltas as (choice index, text), None) whenever the engine
        has decoded more (one token's text each when the router keeps up, several when it does not), then
        (pid, the last deltas, the completions). An engine error is raised from the generator; closing it
        (Ray cancelling the task) cancels the request's rows."""
        loop = asyncio.get_running_loop()
        deltas: list[tuple[int, str]] = []
        more = asyncio.Event()

        def push(index: int, text: str) -> None:  # on this loop, in the order the engine emitted them
            deltas.append((index, text))
            more.set()

        def on_token(index: int, text: str) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(push, index, text)

        done = asyncio.wrap_future(self.engine.submit(prompt_ids, params, adapter, on_token))
        done.add_done_callback(lambda _: more.set())
        try:
            while not done.done():
                await more.wait()
                more.clear()
                if deltas and not done.done():
                    chunk, deltas[:] = list(deltas), []
                    yield self.pid, chunk, None
            # The engine emits a row's last text before it settles the request, and both reach this loop in
            # that order (call_soon_threadsafe), so `deltas` now holds every delta not yet yielded.
            yield self.pid, list(deltas), done.result()
        finally:
            done.cancel()  # a no-op once done; else the engine drops the request's rows

    async def score(self, sequences: list[list[int]], adapter: str | None, top_k: int) -> tuple[int, Scores]:
        return self.pid, await asyncio.wrap_future(self.engine.score(sequences, adapter, top_k))

    async def load(self, name: str, files: dict[str, bytes]) -> int:
        out = Path(tempfile.mkdtemp(dir=self.dir))
        for fname, data in files.items():
            (out / fname).write_bytes(data)
        await asyncio.to_thread(self.engine.load_adapter, name, out)
        old, self.dirs[name] = self.dirs.get(name), out
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.pid

    async def remove(self, name: str) -> int:
        await asyncio.to_thread(self.engine.remove_adapter, name)
        if name in self.dirs:
            shutil.rmtree(self.dirs.pop(name), ignore_errors=True)
        return self.pid

    def close(self) -> None:
        """Remove the scratch directory (and the set's, if this was the last replica in it on this node)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()
