"""Checkpoint dirs: atomic writes, partial dirs ignored and swept, and which steps delete_checkpoints keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from advantage.training import checkpoints as ckpt


def test_write_step_is_atomic_and_listed(tmp_path: Path) -> None:
    ckpt.write_step(tmp_path, 0, lambda d: (d / "a.bin").write_bytes(b"x"), {})
    ckpt.write_step(tmp_path, 1, lambda d: (d / "a.bin").write_bytes(b"y"), {"metrics": {"loss": 1.0}})
    assert ckpt.list_steps(tmp_path) == [0, 1]
    assert ckpt.read_state(tmp_path, 1) == {"step": 1, "metrics": {"loss": 1.0}}
    assert (tmp_path / "0001" / "a.bin").read_bytes() == b"y"


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def boom(d: Path) -> None:
        (d / "half").write_bytes(b"...")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.write_step(tmp_path, 3, boom, {})
    assert ckpt.list_steps(tmp_path) == [] and not list(tmp_path.iterdir())


def test_partial_dirs_are_ignored_then_swept(tmp_path: Path) -> None:
    (tmp_path / ".tmp-0004-abc").mkdir()
    (tmp_path / "0005").mkdir()  # no trainer_state.json: not complete
    assert ckpt.list_steps(tmp_path) == []
    assert [p.name for p in ckpt.sweep_partial(tmp_path)] == [".tmp-0004-abc"]


@pytest.mark.parametrize(
    ("scores", "latest", "keep", "expected"),
    [
        ({1: 0.2, 2: 0.9, 3: 0.5, 4: None}, 4, "best+latest", [1, 3]),  # keeps best (2) and latest (4)
        ({1: None, 2: None, 3: None}, 3, "best+latest", [1, 2]),  # nothing measured: only the latest
        ({1: 0.2, 2: 0.9, 3: 0.5}, 3, "latest", [1, 2]),
        ({0: None, 1: 0.5}, 1, "best+latest", []),  # step 0 (base weights) is never deleted
    ],
)
def test_steps_to_delete(scores: dict[int, float | None], latest: int, keep: str, expected: list[int]) -> None:
    assert ckpt.steps_to_delete(scores, latest, keep) == expected


def test_steps_to_delete_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="keep must be"):
        ckpt.steps_to_delete({1: 0.1}, 1, "best")
