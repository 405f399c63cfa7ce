"""A train step's freed memory stays in the process for the next step, unless the machine runs short of memory:
then it goes back to the OS (`training/thread.py`: `memory_short`, read from /proc/meminfo)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import toy_rollout

import advantage as adv
import advantage.service as service


def _meminfo(tmp_path: Path, total_kib: int, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        f"MemTotal:       {total_kib} kB\nMemFree:        1000 kB\nMemAvailable:   {available_kib} kB\n"
        "HugePages_Total:       0\n"
    )
    return path


def test_memory_is_short_below_a_share_of_the_total(tmp_path: Path) -> None:
    total = 24 * 2**20  # 24 GiB in KiB
    assert not service.memory_short(_meminfo(tmp_path, total, total // 2))
    assert service.memory_short(_meminfo(tmp_path, total, total // 5))  # 20 % < 25 %
    assert not service.memory_short(_meminfo(tmp_path, total, total // 5), below=0.1)
    # No /proc (another OS) or a file that cannot be read: never short, the memory stays
    assert not service.memory_short(tmp_path / "missing")
    (tmp_path / "junk").write_text("not a meminfo\n")
    assert not service.memory_short(tmp_path / "junk")


@pytest.mark.integration
@pytest.mark.parametrize("short", [False, True])
async def test_a_train_step_hands_memory_back_only_when_short(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    released: list[bool] = []
    monkeypatch.setattr(service, "memory_short", lambda: short)
    monkeypatch.setattr(service, "release_freed_memory", lambda: released.append(True))
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("mem", project="t", base_model=str(tiny_model_dir))
    await model.register(backend)
    try:
        groups = await adv.gather_trajectory_groups(
            [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
        )
        result = await model.train(groups, adv.TrainConfig(learning_rate=1e-2))
        assert result.step == 1
        assert released == ([True] if short else [])
    finally:
        await backend.close()
