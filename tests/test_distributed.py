"""Data-parallel training (`training/distributed.py`) on the CPU with gloo: two worker processes give the
same adapter as the single-process trainer on the same datums, and the micro-batches are shared fairly."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from advantage.config import LoRAConfig, TrainConfig
from advantage.training.distributed import GroupSpec, TrainerWorker, shares
from advantage.training.grpo import loss_config
from advantage.training.primitives import forward_backward, plan_step
from advantage.training.schedules import lr_at
from advantage.training.trainer import Datum, Trainer

LORA = LoRAConfig(r=4)
# Four micro-batches of 3 (one per prompt), so each of two workers runs two and shares a prefix over them.
CONFIG = TrainConfig(learning_rate=1e-2, micro_batch_size=3, loss="cispo", agg="token_mean")
STEPS = 2  # the second step also moves LoRA A (its gradient is 0 while B is still 0)


def _datums() -> list[Datum]:
    system = [1, 5, 9, 13, 17, 21, 25, 29]  # shared by every datum: the batch-wide prefix
    out = []
    for g in range(4):
        prompt = system + [100 + g, 200 + g, 300 + g][: 1 + g % 3]
        for c, adv in enumerate([1.0, -0.25, -0.75]):
            comp = [400 + 7 * g + c, 500 + c, 600 + g, 700 + c * g][: 2 + (g + c) % 3] + [2]
            n = len(prompt) + len(comp)
            old = [0.0] * len(prompt) + [-1.5 - 0.1 * k for k in range(len(comp))]
            out.append(Datum(prompt + comp, [0] * len(prompt) + [1] * len(comp), old[:n], adv * (1 + g)))
    return out


def test_shares_are_contiguous_balanced_and_cover_every_micro_batch() -> None:
    ds = _datums()
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


def _single_process(model_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    trainer = Trainer(model_dir, LORA, dtype="float32", seed=0)
    metrics = []
    for step in range(STEPS):
        m, _ = forward_backward(trainer, _datums(), CONFIG.loss, loss_config(CONFIG), CONFIG.micro_batch_size)
        lr = lr_at(CONFIG.schedule, CONFIG.learning_rate, step)
        m["grad_norm"] = trainer.optim_step(lr, CONFIG.betas, CONFIG.weight_decay, CONFIG.max_grad_norm)
        metrics.append(m)
    state = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return state, metrics


def _worker(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    w = TrainerWorker(model_dir, LORA, GroupSpec(rank, world, init), dtype="float32", seed=rank, threads=1)
    t0 = time.perf_counter()
    metrics = [w.train_datums(_datums(), CONFIG, step) for step in range(STEPS)]
    seconds = (time.perf_counter() - t0) / STEPS
    w.save(Path(out) / "ckpt")
    torch.save({"state": w.adapter_state(), "metrics": metrics, "seconds": seconds}, Path(out) / f"{rank}.pt")
    w.close()


def _run_workers(world: int, model_dir: Path, out: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    init = f"file://{out / 'rendezvous'}"
    procs = [ctx.Process(target=_worker, args=(r, world, init, str(model_dir), str(out))) for r in range(world)]
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
    want_state, want_metrics = _single_process(tiny_model_dir)
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
    reloaded = Trainer(tiny_model_dir, LORA, dtype="float32")
    reloaded.load(tmp_path / "ckpt")
    for n, p in reloaded.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), got[0]["state"][n])
