"""Closing a backend frees its models: the engine's and the trainer's weights are gone once it is closed.

FastAPI keeps endpoint functions in a process-wide cache, and the server's endpoints close over the service,
so the service object outlives `close`; before the service dropped its engines and trainers there, every
backend a process opened kept its model weights to the end (the test suite grew to 17.5 GB)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from helpers import toy_rollout

import advantage as adv


async def test_a_closed_backend_keeps_no_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("m", project="p", base_model=str(tiny_model_dir))
    await model.register(backend)
    groups = await adv.gather_trajectory_groups([[toy_rollout(model) for _ in range(2)]], progress=False)
    await model.train(groups, adv.TrainConfig(learning_rate=1e-3))
    entry = backend.service.model_entry("m")
    engine_model = weakref.ref(backend.service.engine(str(tiny_model_dir)).model)
    trainer_model = weakref.ref(entry.trainer.model)
    del entry
    await backend.close()
    gc.collect()
    assert engine_model() is None and trainer_model() is None
