"""What a backend serves: its registered models (`ModelEntry`), the weights a request's model name resolves to
(`Weights`), and the names it accepts (`check_name`: they become directory names). `Service` keeps them."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from advantage.engine.base import Engine
from advantage.online.store import TrafficStore
from advantage.tracking import RunLog

if TYPE_CHECKING:  # torch and transformers load only where a trainer is made
    from advantage.training.trainer import Trainer

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

    engine: Engine
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
    trainer: Trainer | None = None
    run_dir: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one train step at a time per model
    record: bool = False  # record the chat completions it serves in `traffic`
    background: int = 0  # background samples recorded with each served request (`server/background.py`)
    traffic: TrafficStore | None = None  # opened when recording is first on, or for feedback on old traffic
    default: int | None = None  # the step `name` serves (None: the latest), set by `Service.promote`

    @property
    def latest(self) -> int:
        return max(self.steps, default=0)

    @property
    def served(self) -> int:
        """The step `name` without `@` answers with."""
        return self.latest if self.default is None else self.default

    @property
    def log(self) -> RunLog:
        assert self.run_dir is not None
        return RunLog(self.run_dir)
