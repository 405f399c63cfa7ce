"""The body of one engine replica's Ray actor (`engine/replicas.py` places and routes to them): a
`TorchEngine` for the base model, adapters written from the files the router sends, and the process id in
every reply, so the router sees that Ray restarted it (a new process has none of the adapters).

The actor is async: its requests run concurrently and join one engine's continuous batch; cancelling a
request's Ray task cancels its engine rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from advantage.engine.base import Completion
from advantage.engine.sampling import SamplingParams


class ReplicaActor:
    """One replica (see the module docstring). Adapter files go to a temporary directory of its own, removed
    with the adapter; a killed process leaves its directory behind in the system's temp dir."""

    def __init__(self, model_dir: str, engine_kwargs: dict[str, Any], threads: int, gpu: bool) -> None:
        import torch

        from advantage.engine.torch_engine import TorchEngine

        torch.set_num_threads(threads)
        self.engine = TorchEngine(model_dir, **{"device": "cuda" if gpu else "cpu", **engine_kwargs})
        self.dir = Path(tempfile.mkdtemp(prefix="advantage-replica-"))
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

    async def score(self, sequences: list[list[int]], adapter: str | None) -> tuple[int, list[list[float]]]:
        return self.pid, await asyncio.wrap_future(self.engine.score(sequences, adapter))

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
