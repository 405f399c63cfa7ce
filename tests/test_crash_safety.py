"""Crash safety of what a run keeps on disk: a step dir survives a crash while it is being rewritten, a file
written atomically is old or new whole, and metrics.jsonl keeps every whole row when a write is torn (its
neighbours too), with one fsynced append at a time. Also the run log's own rules: reserved column names,
numeric metrics, huge rewards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from advantage import tracking
from advantage.files import write_text_atomic
from advantage.registry import ModelEntry
from advantage.service import Service
from advantage.tracking import RunLog, group_metrics
from advantage.training import checkpoints as ckpt
from advantage.trajectory import Trajectory, TrajectoryGroup


def _write(text: str) -> Callable[[Path], None]:
    return lambda d: (d / "a.bin").write_text(text)


# ------------------------------------------------------------------------------------- checkpoint rewrites


def test_rewrite_replaces_the_step_whole(tmp_path: Path) -> None:
    ckpt.write_step(tmp_path, 1, _write("old"), {"v": 1})
    ckpt.write_step(tmp_path, 1, _write("new"), {"v": 2})
    assert ckpt.read_state(tmp_path, 1)["v"] == 2 and (tmp_path / "0001" / "a.bin").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["0001"]  # nothing aside, nothing temporary


def test_rewrite_that_fails_to_land_keeps_the_old_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt.write_step(tmp_path, 1, _write("old"), {"v": 1})
    real_rename = os.rename

    def rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if Path(src).name.startswith(".tmp-"):
            raise OSError("device gone")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="device gone"):
        ckpt.write_step(tmp_path, 1, _write("new"), {"v": 2})
    monkeypatch.undo()
    assert ckpt.list_steps(tmp_path) == [1] and (tmp_path / "0001" / "a.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["0001"]


def test_kill_between_the_renames_keeps_the_step(tmp_path: Path) -> None:
    """A process killed after the old step went aside and before the new one landed: the next start (the
    sweep `register` runs) puts the old step back. Before, the old dir was deleted first: the step was lost."""
    ckpt.write_step(tmp_path, 1, _write("old"), {"v": 1})
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from advantage.training import checkpoints as ckpt

        real_rename = os.rename

        def rename(src, dst):
            if Path(src).name.startswith(".tmp-"):  # the old step is aside: die before the new one lands
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)

        ckpt.os.rename = rename
        ckpt.write_step(Path({str(tmp_path)!r}), 1, lambda d: (d / "a.bin").write_text("new"), {{"v": 2}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert ckpt.list_steps(tmp_path) == []  # the step is aside, not lost
    ckpt.sweep_partial(tmp_path)
    assert ckpt.list_steps(tmp_path) == [1] and (tmp_path / "0001" / "a.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["0001"]


def test_sweep_drops_the_old_step_once_the_new_one_landed(tmp_path: Path) -> None:
    ckpt.write_step(tmp_path, 2, _write("new"), {})
    aside = tmp_path / ".old-0002-abc"
    aside.mkdir()
    (aside / ckpt.STATE_FILE).write_text("{}")
    assert ckpt.sweep_partial(tmp_path) == [aside]
    assert (tmp_path / "0002" / "a.bin").read_text() == "new" and not aside.exists()


def test_an_atomic_file_write_is_old_or_new_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "report.html"
    write_text_atomic(path, "old")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and len(synced) == 2  # the file, then the directory holding its name

    def replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        raise OSError("device gone")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="device gone"):
        write_text_atomic(path, "newer")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


# ------------------------------------------------------------------------------------------- metrics.jsonl


def _steps(log: RunLog) -> list[int]:
    return [int(r["step"]) for r in log.rows()]


def _row(step: int) -> str:
    return json.dumps({"step": step, "split": "train", "time": 0.0, "loss": 0.5}) + "\n"


def test_every_append_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(tracking.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = RunLog(tmp_path)
    for step in range(3):
        log.append(step, "train", {"loss": 1.0})
    assert len(synced) == 3 and _steps(log) == [0, 1, 2]


def test_a_cut_last_line_loses_only_itself(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(_row(1) + _row(2) + _row(3)[:20])
    assert _steps(RunLog(tmp_path)) == [1, 2]


def test_the_next_row_after_a_cut_line_is_kept(tmp_path: Path) -> None:
    """The writer ends a torn last line first, so its own row is not glued to the fragment."""
    (tmp_path / "metrics.jsonl").write_text(_row(1) + _row(2)[:25])
    log = RunLog(tmp_path)
    log.append(3, "train", {"loss": 0.1})
    log.append(4, "val", {"val/reward": 0.9})
    assert _steps(log) == [1, 3, 4]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[2])["step"] == 3  # the fragment stays on its own line


def test_rows_glued_to_a_torn_line_are_recovered(tmp_path: Path) -> None:
    """A file written before the writer ended torn lines: a fragment with the next row glued on, then more
    rows. Only the fragment is dropped (before, the glued row went with it)."""
    torn = _row(2)[:30]
    (tmp_path / "metrics.jsonl").write_text(_row(1) + torn + _row(3) + _row(4) + torn + _row(5))
    assert _steps(RunLog(tmp_path)) == [1, 3, 4, 5]


def test_a_torn_multibyte_character_does_not_hide_the_file(tmp_path: Path) -> None:
    row = json.dumps({"step": 2, "split": "train", "note_é": 1.0}, ensure_ascii=False).encode()
    (tmp_path / "metrics.jsonl").write_bytes(_row(1).encode() + row[: row.index("é".encode()) + 1])
    assert _steps(RunLog(tmp_path)) == [1]


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    wide = {f"metric_{i}": float(i) for i in range(300)}  # rows of ~6 KB: larger than one write buffer

    def writer(k: int) -> None:
        for i in range(20):
            log.append(k * 100 + i, "train", wide)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 80 and all(json.loads(line)["metric_299"] == 299.0 for line in lines)


def test_log_waits_for_a_train_step_and_records_the_step_it_lands_on(tmp_path: Path) -> None:
    """`log` runs under the model's lock, like a train step: before, it could record its row at a step that
    a concurrent train step was about to replace as the latest."""
    service = Service(tmp_path)
    entry = ModelEntry("p", "m", "base", run_dir=tmp_path / "m")
    service._models["m"] = entry  # a registered model, without loading one
    group = TrajectoryGroup([Trajectory([], reward=1.0), Trajectory([], reward=0.0)])
    logged = threading.Event()
    try:
        with entry.lock:  # a train step is under way
            t = threading.Thread(target=lambda: (service.log_groups("m", [group], "val"), logged.set()))
            t.start()
            assert not logged.wait(0.5)  # waits for the step
            entry.steps[1] = tmp_path / "m" / "0001"  # the step publishes step 1
        assert logged.wait(30)
        t.join()
    finally:
        service.close()
    [row] = RunLog(tmp_path / "m").rows()
    assert row["split"] == "val" and row["step"] == 1 and row["val/reward"] == 0.5


# --------------------------------------------------------------------------------------- the run log's rules


def test_reserved_column_names_are_refused(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    with pytest.raises(ValueError, match=r"metrics \['split', 'step'\] use reserved names"):
        log.append(1, "train", {"step": 5.0, "split": 1.0, "loss": 0.1})
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("metric", ["split", "step", "time", "note"])
def test_ranking_by_a_non_metric_names_the_numeric_ones(tmp_path: Path, metric: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "split": "val", "time": 1.0, "val/reward": 0.5, "note": "hi"}) + "\n"
    )
    with pytest.raises(ValueError, match="numeric metrics: val/reward") as ei:
        RunLog(tmp_path).metric_by_step(metric)
    assert "could not convert" not in str(ei.value)
    assert RunLog(tmp_path).metric_by_step("val/reward") == {1: 0.5}


def test_group_metrics_survive_rewards_at_the_float_limit() -> None:
    group = TrajectoryGroup([Trajectory([], reward=1e308), Trajectory([], reward=-1e308)])
    metrics = group_metrics([group], "val")
    # statistics sums exactly: the mean is 0 and the population std is the true 1e308, not an overflow.
    assert metrics["val/reward"] == 0.0 and metrics["val/reward_std"] == 1e308
