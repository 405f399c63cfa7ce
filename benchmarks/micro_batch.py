"""One recorded train step at several micro-batch sizes, side by side: seconds and peak memory.

    .venv/bin/python benchmarks/micro_batch.py RUN_DIR/trajectories/train/0003.jsonl [--sizes 8 16 32] [--repeats 2]

Takes the trajectory groups of one recorded step (a demo run dir has them) and times `grpo.train_step` on them
with each micro-batch size in turn, the order reversed every repeat so the box's drift hits all alike; lr is
tiny, so the weights barely move between repeats. A larger micro-batch runs fewer, wider forward/backward
passes (fewer per-pass costs: the vocabulary head's launch, the LoRA's small matmuls, the optimizer's
bookkeeping per micro-batch) but holds more activations: the peak resident memory of each step is read from
the kernel (VmHWM, reset before each step through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared_prefix import load_step  # noqa: E402  (benchmarks/, the script's own folder)

from advantage.config import LoRAConfig, TrainConfig  # noqa: E402
from advantage.engine.models import resolve_model_path  # noqa: E402
from advantage.training import grpo  # noqa: E402
from advantage.training.trainer import Trainer  # noqa: E402


def peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", type=Path, help="a trajectories/train/NNNN.jsonl file of a run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    groups = load_step(args.groups)
    trainer = Trainer(resolve_model_path(args.model), LoRAConfig())
    configs = {n: TrainConfig(learning_rate=1e-7, micro_batch_size=n) for n in args.sizes}
    grpo.train_step(trainer, groups, configs[args.sizes[0]])  # warm-up
    times: dict[int, list[float]] = {n: [] for n in args.sizes}
    peaks: dict[int, list[float]] = {n: [] for n in args.sizes}
    for r in range(args.repeats):
        for n in args.sizes if r % 2 == 0 else list(reversed(args.sizes)):
            reset_peak()
            t = time.perf_counter()
            m = grpo.train_step(trainer, groups, configs[n])
            times[n].append(time.perf_counter() - t)
            peaks[n].append(peak_gib())
            print(
                f"micro-batch {n:3d}: {times[n][-1]:6.1f} s, peak RSS {peaks[n][-1]:5.1f} GiB "
                f"({m['micro_batches']:.0f} micro-batches)",
                flush=True,
            )
    print(
        f"\n{m['n_trajectories']:.0f} trajectories, {m['sequence_tokens']:.0f} sequence tokens, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    base = statistics.median(times[args.sizes[0]])
    for n in args.sizes:
        t = statistics.median(times[n])
        print(
            f"micro-batch {n:3d}: median {t:6.1f} s ({base / t:.2f}x micro-batch {args.sizes[0]}), peak {max(peaks[n]):.1f} GiB"
        )


if __name__ == "__main__":
    main()
