"""The backend's core: engines, registered models, and which weights a served model name resolves to.

Both the HTTP server and `LocalBackend` wrap one `Service`. Served names are:
- a base model's name (`smollm2-135m-instruct`, or the path it was given as);
- a trainable model's `name` (its latest step) and `name@step` (any step still on disk).
Step 0 of a trainable model is the empty adapter, i.e. the base weights.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advantage.engine.models import resolve_model_path
from advantage.engine.torch_engine import TorchEngine

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UnknownServedModel(KeyError):
    pass


def check_name(kind: str, value: str) -> str:
    """Model and project names become directory names: refuse anything that could escape the root."""
    if not _NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"Invalid {kind} {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."
        )
    return value


@dataclass
class Weights:
    """Which weights answer a request: an engine, and a LoRA adapter on it (None: the base weights)."""

    engine: TorchEngine
    adapter: str | None
    model: str
    step: int

    def info(self) -> dict[str, Any]:
        return {"model": self.model, "step": self.step}


@dataclass
class ModelEntry:
    project: str
    name: str
    base_model: str
    steps: dict[int, Path] = field(default_factory=dict)  # step -> adapter dir (step 0 has none)

    @property
    def latest(self) -> int:
        return max(self.steps, default=0)


class Service:
    def __init__(self, root: str | Path, engine_kwargs: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.engine_kwargs = engine_kwargs or {}
        self._engines: dict[str, TorchEngine] = {}
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ engines and names
    def engine(self, base_model: str) -> TorchEngine:
        with self._lock:
            if base_model not in self._engines:
                self._engines[base_model] = TorchEngine(resolve_model_path(base_model), **self.engine_kwargs)
            return self._engines[base_model]

    def add_model(self, entry: ModelEntry) -> None:
        with self._lock:
            old = self._models.get(entry.name)
            if old is not None and (old.project, old.base_model) != (entry.project, entry.base_model):
                raise ValueError(
                    f"A model named {entry.name!r} is already registered (project {old.project!r}, base "
                    f"{old.base_model!r}); pick another name."
                )
            self.engine(entry.base_model)
            self._models[entry.name] = entry

    def model_entry(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownServedModel(f"Model {name!r} is not registered on this backend.") from None

    def publish_step(self, name: str, step: int, adapter_dir: Path) -> None:
        """Make `name@step` servable at once (hot swap: no restart, running batches are not torn)."""
        entry = self.model_entry(name)
        self.engine(entry.base_model).load_adapter(f"{name}@{step}", adapter_dir)
        entry.steps[step] = adapter_dir

    def unpublish_step(self, name: str, step: int) -> None:
        entry = self.model_entry(name)
        if entry.steps.pop(step, None) is not None:
            self.engine(entry.base_model).remove_adapter(f"{name}@{step}")

    def resolve(self, served: str) -> Weights:
        """Map a request's `model` field to the weights that answer it."""
        with self._lock:
            if served in self._engines:
                return Weights(self._engines[served], None, served, 0)
            name, _, step_s = served.partition("@")
            entry = self._models.get(name)
            if entry is None:
                if not self._models and not self._engines:
                    raise UnknownServedModel("No model is loaded on this backend yet.")
                raise UnknownServedModel(
                    f"The model {served!r} does not exist. Available: {', '.join(self.served_names())}."
                )
            if step_s:
                if not step_s.isdigit():
                    raise UnknownServedModel(f"Bad step in {served!r}: use name@<integer step>.")
                step = int(step_s)
            else:
                step = entry.latest
            if step != 0 and step not in entry.steps:
                raise UnknownServedModel(
                    f"Step {step} of {name!r} is not available; served steps: {sorted([0, *entry.steps])}."
                )
            adapter = f"{name}@{step}" if step else None
            return Weights(self._engines[entry.base_model], adapter, name, step)

    def served_names(self) -> list[str]:
        with self._lock:
            names = list(self._engines)
            for entry in self._models.values():
                names.append(entry.name)
                names += [f"{entry.name}@{s}" for s in sorted({0, *entry.steps})]
            return names

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
