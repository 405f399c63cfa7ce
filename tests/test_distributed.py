"""Data-parallel training (`training/distributed.py`) on the CPU with gloo: two worker processes give the
same adapter as the single-process trainer on the same datums, and the micro-batches are shared fairly."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from helpers import DP_CONFIG, DP_LORA, DP_STEPS, dp_datums, single_process_steps

from advantage.training.distributed import GroupSpec, TrainerWorker, shares
from advantage.training.primitives import plan_step
from advantage.training.trainer import Trainer


def test_shares_are_contiguous_balanced_and_cover_every_micro_batch() -> None:
    ds = dp_datums()
    plan = plan_step(ds, "cispo", None, 3)
    assert len(plan.chunks) == 4
    assert shares(plan, ds, 1) == [[0, 1, 2, 3]]
    two = shares(plan, ds, 2)
    assert two == [[0, 1], [2, 3]]
    four = shares(plan, ds, 4)
    assert sorted(k for s in four for k in s) == [0, 1, 2, 3] and all(len(s) == 1 for s in four)
    # More workers than micro-batches: some get none, every micro-batch still runs exactly once.
    eight = shares(plan, ds, 8)
    assert sorted(k for s in eight for k in s) == [0, 1, 2, 3]
    assert sum(1 for s in eight if not s) == 4


def _worker(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    w = TrainerWorker(model_dir, DP_LORA, GroupSpec(rank, world, init), dtype="float32", seed=rank, threads=1)
    t0 = time.perf_counter()
    metrics = [w.train_datums(dp_datums(), DP_CONFIG, step) for step in range(DP_STEPS)]
    seconds = (time.perf_counter() - t0) / DP_STEPS
    if rank == 0:
        w.save(Path(out) / "ckpt")
    torch.save({"state": w.adapter_state(), "metrics": metrics, "seconds": seconds}, Path(out) / f"{rank}.pt")
    w.close()


def _run_workers(world: int, model_dir: Path, out: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    init = f"file://{out / 'rendezvous'}"
    procs = [
        ctx.Process(target=_worker, args=(r, world, init, str(model_dir), str(out))) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a worker failed; see its traceback above"
    return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)]


def test_two_workers_give_the_same_adapter_as_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """M = 2 (gloo) against the single-process trainer, two AdamW steps on the same datums. The workers start
    from different seeds: the broadcast at start makes their adapters equal anyway."""
    want_state, want_metrics = single_process_steps(tiny_model_dir)
    got = _run_workers(2, tiny_model_dir, tmp_path)
    # The two workers hold identical adapters (same summed gradient, same AdamW state): bit for bit.
    for n, v in got[0]["state"].items():
        assert torch.equal(v, got[1]["state"][n]), n
    moved = 0
    for n, v in want_state.items():
        assert not torch.equal(v, torch.zeros_like(v)) or "lora_B" in n
        torch.testing.assert_close(got[0]["state"][n], v, atol=1e-6, rtol=1e-4)
        moved += int("lora_A" in n)
    assert moved > 0
    for want, have in zip(want_metrics, got[0]["metrics"], strict=True):
        for key in ("loss", "grad_norm", "entropy", "trained_tokens", "micro_batches"):
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        assert have["trainer_workers"] == 2.0
    # Worker 0 wrote a checkpoint the single-process trainer loads.
    reloaded = Trainer(tiny_model_dir, DP_LORA, dtype="float32")
    reloaded.load(tmp_path / "ckpt")
    for n, p in reloaded.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), got[0]["state"][n])
