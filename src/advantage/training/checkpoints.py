"""Checkpoint directories: `<root>/<project>/models/<name>/<step:04d>/`.

A step dir holds the adapter (peft's `adapter_model.safetensors` + `adapter_config.json`), the optimizer
state and `trainer_state.json`. It is written under a temporary name and renamed into place, so a dir with
a step name is always complete; a process killed mid-write leaves only a `.tmp-*` dir, which is ignored and
swept on the next start. Rewriting a step that exists moves the old dir aside (`.old-*`) before the new one
is renamed in, and deletes it only after: a process killed in between leaves the old dir aside, and the
next start puts it back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advantage.files import fsync_entry, write_dir_atomic

STATE_FILE = "trainer_state.json"


def model_dir(root: Path, project: str, name: str) -> Path:
    return root / project / "models" / name


def step_dir(mdir: Path, step: int) -> Path:
    return mdir / f"{step:04d}"


def list_steps(mdir: Path) -> list[int]:
    """Complete steps on disk, ascending."""
    if not mdir.is_dir():
        return []
    return sorted(
        int(p.name) for p in mdir.iterdir() if p.is_dir() and p.name.isdigit() and (p / STATE_FILE).exists()
    )


def sweep_partial(mdir: Path) -> list[Path]:
    """Remove leftovers of interrupted writes; returns what was removed. A step moved aside by a rewrite
    that died before its replacement was renamed in is put back."""
    if not mdir.is_dir():
        return []
    removed = [p for p in mdir.glob(".tmp-*") if p.is_dir()]
    for old in sorted(p for p in mdir.glob(".old-*") if p.is_dir()):
        step = old.name.split("-")[1]
        final = step_dir(mdir, int(step)) if step.isascii() and step.isdigit() else None
        if final is not None and not (final / STATE_FILE).exists() and (old / STATE_FILE).exists():
            if final.exists():
                shutil.rmtree(final)
            os.rename(old, final)
            fsync_entry(mdir)
        else:
            removed.append(old)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def write_step(mdir: Path, step: int, write: Callable[[Path], None], state: dict[str, Any]) -> Path:
    """Atomically create step dir `step`: `write(tmp_dir)` fills it, then it is renamed into place. A re-run
    of a step replaces it whole; the old one steps aside (`.old-*`) until then."""

    def fill(tmp: Path) -> None:
        write(tmp)
        # Fault injection for the kill -9 resume test: die with the step half written.
        if os.environ.get("ADVANTAGE_FAULT") == "kill-in-checkpoint-write":
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))

    return write_dir_atomic(step_dir(mdir, step), fill, f".tmp-{step:04d}-", f".old-{step:04d}-")


def read_state(mdir: Path, step: int) -> dict[str, Any]:
    return dict(json.loads((step_dir(mdir, step) / STATE_FILE).read_text()))


def steps_to_delete(scores: dict[int, float | None], latest: int, keep: str = "best+latest") -> list[int]:
    """Which steps `delete_checkpoints` removes. `scores` maps step -> metric (None when unmeasured).

    keep="best+latest" keeps the latest step and the best-scoring one; "latest" keeps only the latest.
    Step 0 (the base weights) is never deleted."""
    if keep not in ("best+latest", "latest"):
        raise ValueError(f"keep must be 'best+latest' or 'latest', got {keep!r}.")
    kept = {0, latest}
    measured = {s: v for s, v in scores.items() if v is not None}
    if keep == "best+latest" and measured:
        kept.add(best_step(measured))
    return sorted(s for s in scores if s not in kept)


def best_step(scores: dict[int, float]) -> int:
    """The step with the highest score; the later step on ties. `scores` must not be empty."""
    return max(scores, key=lambda s: (scores[s], s))


def parse_ref(ref: str, project: str) -> tuple[str, str, int | None]:
    """`name@step`, `name` (its latest step) or `project/name@step` -> (project, name, step or None)."""
    head, at, step_s = ref.partition("@")
    proj, slash, name = head.rpartition("/")
    if at and not (step_s.isascii() and step_s.isdigit()):
        raise ValueError(f"Bad step in {ref!r}: use name@<integer step>, e.g. {name or 'my-model'}@3.")
    if not name or (slash and not proj):
        raise ValueError(f"Bad checkpoint {ref!r}: use name@step, or project/name@step.")
    return (proj if slash else project), name, int(step_s) if at else None
