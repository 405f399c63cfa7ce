"""Seconds per optimizer step: the single-process trainer against M data-parallel workers (gloo, one process
each, `training/distributed.py`), on the same synthetic GRPO batch. Prints one markdown row per M.

    .venv/bin/python benchmarks/dp_step.py --model-dir DIR [--workers 1 2] [--steps 4] [--dtype float32]

The batch: 8 prompts x 4 completions (a 48-token system prompt shared by all, 16 tokens of each prompt's
own, 32-token completions), micro-batches of 4, CISPO. The first step is a warm-up and is not counted.
Each worker gets cpu_count / M torch threads. On a two-core box no speed-up is expected: the figure shows
the overhead (a second process, the all-reduce, each worker's own shared-prefix pass).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from advantage.config import LoRAConfig, TrainConfig
from advantage.training.distributed import GroupSpec, TrainerWorker, worker_threads
from advantage.training.primitives import forward_backward
from advantage.training.trainer import Trainer
from advantage.wire.datum import Datum

CONFIG = TrainConfig(learning_rate=1e-4, micro_batch_size=4, loss="cispo")
LORA = LoRAConfig(r=8)


def batch() -> list[Datum]:
    system = [1 + (7 * k) % 4000 for k in range(48)]
    out = []
    for g in range(8):
        prompt = system + [5000 + 16 * g + k for k in range(16)]
        for c in range(4):
            comp = [6000 + 97 * g + 31 * c + k for k in range(31)] + [2]
            old = [0.0] * len(prompt) + [-2.0] * len(comp)
            mask = [0.0] * len(prompt) + [1.0] * len(comp)
            out.append(Datum(input_ids=prompt + comp, loss_mask=mask, logprobs=old, advantage=float(c) - 1.5))
    return out


def single(model_dir: str, dtype: str, steps: int) -> list[float]:
    trainer = Trainer(model_dir, LORA, dtype=dtype)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        forward_backward(trainer, batch(), CONFIG.loss, CONFIG, CONFIG.micro_batch_size)
        trainer.optim_step(CONFIG)
        times.append(time.perf_counter() - t0)
    return times[1:]


def _worker(rank: int, world: int, init: str, model_dir: str, dtype: str, steps: int, out: str) -> None:
    spec = GroupSpec(rank, world, init)
    w = TrainerWorker(model_dir, LORA, spec, dtype=dtype, threads=worker_threads(world))
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        w.train_datums(batch(), CONFIG, step)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(" ".join(f"{t:.4f}" for t in times[1:]))
    w.close()


def parallel(model_dir: str, dtype: str, steps: int, world: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        init = f"file://{tmp}/rendezvous"
        out = f"{tmp}/times"
        args = (world, init, model_dir, dtype, steps, out)
        procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return [float(x) for x in Path(out).read_text().split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print("| trainer workers | s/step (median) | steps |")
    print("|---|---|---|")
    for m in a.workers:
        times = (
            single(a.model_dir, a.dtype, a.steps) if m == 1 else parallel(a.model_dir, a.dtype, a.steps, m)
        )
        print(f"| {m} | {statistics.median(times):.3f} | {len(times)} |", flush=True)


if __name__ == "__main__":
    main()
