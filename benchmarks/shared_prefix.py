"""One real train step with the batch's shared prompt run once per step, against once per micro-batch.

    .venv/bin/python benchmarks/shared_prefix.py RUN_DIR/trajectories/train/0003.jsonl [--repeats 3]

Takes the trajectory groups of one recorded step (a demo run dir has them) and times `grpo.train_step` on
them, alternating the two ways in one process so the box's drift hits both alike; lr is tiny, so the weights
barely move between repeats. "per micro-batch" is what the trainer did before `trainer.SharedPrefix`: every
micro-batch recomputed the system prompt, tools and example, forward and backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from advantage.config import LoRAConfig, TrainConfig  # noqa: E402
from advantage.engine.models import resolve_model_path  # noqa: E402
from advantage.training import grpo, primitives  # noqa: E402
from advantage.training.trainer import Trainer  # noqa: E402
from advantage.trajectory import TrajectoryGroup  # noqa: E402


def load_step(path: Path) -> list[TrajectoryGroup]:
    """One recorded step's groups, each line as tracking.py writes it: {"group": index, **to_dict()}."""
    lines = path.read_text().splitlines()
    return [
        TrajectoryGroup.from_dict({k: v for k, v in json.loads(x).items() if k != "group"})
        for x in lines
        if x.strip()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", type=Path, help="a trajectories/train/NNNN.jsonl file of a run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    groups = load_step(args.groups)
    trainer = Trainer(resolve_model_path(args.model), LoRAConfig())
    config = TrainConfig(learning_rate=1e-7, micro_batch_size=args.micro_batch_size)
    shared_len = primitives.shared_prefix_len
    times: dict[str, list[float]] = {"shared": [], "per micro-batch": []}
    grpo.train_step(trainer, groups, config)  # warm-up
    for _ in range(args.repeats):
        for way in times:
            primitives.shared_prefix_len = shared_len if way == "shared" else (lambda _d: 0)
            t = time.perf_counter()
            m = grpo.train_step(trainer, groups, config)
            times[way].append(time.perf_counter() - t)
            print(f"{way:16s} {times[way][-1]:6.1f} s  ({m['micro_batches']:.0f} micro-batches)", flush=True)
    primitives.shared_prefix_len = shared_len
    a, b = statistics.median(times["shared"]), statistics.median(times["per micro-batch"])
    print(
        f"\n{m['n_trajectories']:.0f} trajectories, {m['sequence_tokens']:.0f} sequence tokens, "
        f"micro-batch {args.micro_batch_size}, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"median: shared {a:.1f} s, per micro-batch {b:.1f} s: {b / a:.2f}x")


if __name__ == "__main__":
    main()
