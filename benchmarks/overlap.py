"""A demo step trained while the next step's rollouts gather (`DemoConfig.overlap`), against one after the
other, side by side in one process.

Two embedded backends on the bundled SmolLM2-135M-Instruct (fp32, the demo's engine of 64 rows):

- `sequential`: the engine on torch's default threads; a round gathers one demo step's rollouts (G
  scenarios x 4, multi-turn, T = 0.7, first call forced, seeded), then trains one step on the previous
  round's groups (the demo's loss settings);
- `overlapped`: the engine on one thread (`LocalBackend(threads=1)`, what the demo sets), the trainer on the
  default; a round does the same two things at once.

Each round runs both sides, alternating which goes first, and prints the wall times and their ratio. Both
sides train on groups they gathered themselves, from the same seeds.

    .venv/bin/python benchmarks/overlap.py [--groups 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import advantage as adv  # noqa: E402
from advantage.tasks.tool_use.config import DemoConfig  # noqa: E402
from advantage.tasks.tool_use.env import make_scenarios  # noqa: E402
from advantage.tasks.tool_use.rollout import rollout  # noqa: E402
from advantage.tasks.tool_use.steps import ENGINE_THREADS, ROLLOUTS_IN_FLIGHT, train_config  # noqa: E402

TRAIN = train_config(DemoConfig(), lr=1e-4)  # the demo's loss settings; a small rate keeps rounds alike


async def gather(model: adv.TrainableModel, seed: int, groups: int) -> list[adv.TrajectoryGroup]:
    scenarios = make_scenarios(groups, seed=seed, split="train")
    return await adv.gather_trajectory_groups(
        [
            [
                rollout(model, s, temperature=0.7, force_first_call=True, seed=1000 * seed + 10 * g + i)
                for i in range(4)
            ]
            for g, s in enumerate(scenarios)
        ],
        max_exceptions=0,
        progress=False,
        concurrency=ROLLOUTS_IN_FLIGHT,
    )


async def timed_gather(
    model: adv.TrainableModel, seed: int, groups: int
) -> tuple[float, list[adv.TrajectoryGroup]]:
    t0 = time.perf_counter()
    got = await gather(model, seed, groups)
    return time.perf_counter() - t0, got


async def round_of(
    model: adv.TrainableModel, last: list[adv.TrajectoryGroup], seed: int, groups: int, overlapped: bool
) -> tuple[float, float, float, list[adv.TrajectoryGroup]]:
    """(wall s, rollouts s, update s, the groups gathered) of one step on one side."""
    t0 = time.perf_counter()
    nxt = asyncio.ensure_future(timed_gather(model, seed, groups))
    if not overlapped:
        await nxt
    t1 = time.perf_counter()
    await model.train(last, config=TRAIN)
    t_train = time.perf_counter() - t1
    t_gen, got = await nxt
    return time.perf_counter() - t0, t_gen, t_train, got


async def main(args: argparse.Namespace) -> None:
    with TemporaryDirectory() as root:
        sides: dict[str, tuple[adv.LocalBackend, adv.TrainableModel, list[adv.TrajectoryGroup]]] = {}
        for label, threads in (("sequential", None), ("overlapped", ENGINE_THREADS)):
            backend = adv.LocalBackend(
                Path(root) / label, progress=False, max_batch_size=ROLLOUTS_IN_FLIGHT, threads=threads
            )
            model = adv.TrainableModel("m", project="bench", base_model="smollm2-135m-instruct")
            await model.register(backend)
            sides[label] = (backend, model, await gather(model, 1, args.groups))  # warm-up; trained on next
        walls: dict[str, list[float]] = {k: [] for k in sides}
        order = list(sides)
        for r in range(args.rounds):
            for label in order:
                backend, model, last = sides[label]
                wall, t_gen, t_train, got = await round_of(
                    model, last, 2 + r, args.groups, label == "overlapped"
                )
                sides[label] = (backend, model, got)
                walls[label].append(wall)
                print(f"round {r + 1} {label:10s}: {wall:5.1f} s (rollouts {t_gen:5.1f} s, update {t_train:5.1f} s)", flush=True)  # fmt: skip
            order.reverse()
        seq, ovl = statistics.median(walls["sequential"]), statistics.median(walls["overlapped"])
        print(f"median: sequential {seq:.1f} s, overlapped {ovl:.1f} s: {seq / ovl:.2f}x")
        for backend, _, _ in sides.values():
            await backend.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--groups", type=int, default=12, help="scenarios per step (the demo's 8 + 4 focus groups)"
    )
    ap.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(ap.parse_args()))
