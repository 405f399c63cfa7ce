"""Forks: a new model whose step 0 is a copy of another model's checkpoint (`other@step`).

The copy holds the adapter and the optimizer state, so training the fork goes on from the same weights and
the same AdamW moments. Step 0's `trainer_state.json` records where it came from (`forked_from`), and a row
with split "fork" in the fork's `metrics.jsonl` says so too. The source is read from disk, so it need not be
registered; it must share the fork's base model and LoRA shape. Registering the fork again (a restarted
server, a second process) resumes it like any other model, as long as it names the same source.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advantage.config import LoRAConfig
from advantage.engine.models import resolve_model_path
from advantage.training import checkpoints as ckpt

SPLIT = "fork"  # the metrics.jsonl row that records a fork


@dataclass(frozen=True)
class ForkSource:
    project: str
    name: str
    step: int
    dir: Path  # the source's step dir

    def ref(self) -> str:
        return f"{self.project}/{self.name}@{self.step}"

    def record(self) -> dict[str, Any]:
        return {"project": self.project, "model": self.name, "step": self.step}


def find_source(
    root: Path, project: str, name: str, step: int | None, base_model: str, lora: LoRAConfig
) -> ForkSource:
    """The checkpoint `project/name@step` (its latest step when `step` is None), checked against the fork's
    base model and LoRA shape. Raises ValueError, saying what exists, when it cannot be forked from."""
    mdir = ckpt.model_dir(root, project, name)
    steps = ckpt.list_steps(mdir)
    if not steps:
        raise ValueError(
            f"Cannot fork from {project}/{name}: it has no checkpoints under {root} (is the project right?)."
        )
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(
            f"Cannot fork from {project}/{name}@{step}: that step is not on disk; steps on disk: {steps}."
        )
    origin = ckpt.read_state(mdir, 0) if 0 in steps else {}
    theirs = origin.get("base_model")
    if theirs is not None and not _same_base(theirs, base_model):
        raise ValueError(
            f"Cannot fork {project}/{name}@{step} onto base model {base_model!r}: it was trained on "
            f"{theirs!r}. Give the fork the same base_model."
        )
    if "lora" in origin and LoRAConfig(**origin["lora"]) != lora:
        raise ValueError(
            f"Cannot fork {project}/{name}@{step} with LoRA {lora.model_dump()}: its adapter has "
            f"{origin['lora']}. Give the fork the same LoRAConfig."
        )
    return ForkSource(project, name, step, ckpt.step_dir(mdir, step))


def write_fork(mdir: Path, source: ForkSource, state: dict[str, Any]) -> Path:
    """Step 0 of `mdir` as a copy of the source's step dir (adapter and optimizer state), atomically."""

    def copy(tmp: Path) -> None:
        try:
            for f in source.dir.iterdir():
                if f.is_file() and f.name != ckpt.STATE_FILE:
                    shutil.copy2(f, tmp / f.name)
        except FileNotFoundError as exc:  # deleted (delete_checkpoints) while we copied
            raise ValueError(f"Cannot fork from {source.ref()}: it was deleted while being copied.") from exc

    return ckpt.write_step(mdir, 0, copy, {**state, "forked_from": source.record()})


def forked_from(mdir: Path) -> dict[str, Any] | None:
    """Where step 0 of `mdir` was copied from, or None for a model that started from the base weights."""
    if 0 not in ckpt.list_steps(mdir):
        return None
    origin = ckpt.read_state(mdir, 0).get("forked_from")
    return dict(origin) if isinstance(origin, dict) else None


def check_resumable(mdir: Path, name: str, ref: tuple[str, str, int | None]) -> None:
    """A model that has checkpoints may be registered with `fork_from` again only if it was forked from
    that same model (and step, when `ref` names one): registering a fork again then just resumes it, even
    once the source's step has been deleted. `ref` is (project, name, step or None)."""
    project, source, step = ref
    origin = forked_from(mdir) or {}
    same_model = (origin.get("project"), origin.get("model")) == (project, source)
    if same_model and step in (None, origin.get("step")):
        return
    was = (
        f"forked from {origin.get('project')}/{origin.get('model')}@{origin.get('step')}"
        if origin
        else "started from the base weights"
    )
    wanted = f"{project}/{source}" + ("" if step is None else f"@{step}")
    raise ValueError(
        f"Model {name!r} already has checkpoints ({was}), so it cannot be forked from {wanted}. Fork into a "
        "new name, or register without fork_from to resume it."
    )


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return resolve_model_path(a).resolve() == resolve_model_path(b).resolve()
    except Exception:  # one of them no longer loads: they cannot be shown to be the same
        return False
