"""Whole GRPO steps per hour through `LocalBackend(engine_replicas=N, trainer_workers=M)`: each step gathers
4 prompts x 8 rollouts (up to 32 tokens) from the latest weights and trains on them (tokenize, step,
checkpoint, publish to every replica). One markdown row per N,M layout.

    .venv/bin/python benchmarks/engine_replicas.py --base-model DIR_OR_NAME [--layouts 1,1 2,1 1,2] [--steps 3]

The first step is a warm-up and not counted; neither is starting the Ray cluster and the actors. N or M > 1
needs Ray (`pip install 'advantage[ray]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from trainer_workers import PROMPTS, rollout  # the same toy workload (benchmarks/ is on sys.path)

import advantage as adv


async def step_times(base_model: str, replicas: int, workers: int, steps: int) -> list[tuple[float, float]]:
    """(gather seconds, train seconds) of each counted step."""
    with tempfile.TemporaryDirectory() as root:
        backend = adv.LocalBackend(root, progress=False, engine_replicas=replicas, trainer_workers=workers)
        model = adv.TrainableModel("bench", project="bench", base_model=base_model)
        await model.register(backend)
        try:
            config = adv.TrainConfig(learning_rate=1e-5, micro_batch_size=8)
            times = []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                groups = await adv.gather_trajectory_groups(
                    [[rollout(model, p) for _ in range(8)] for p in PROMPTS], progress=False
                )
                t1 = time.perf_counter()
                await model.train(groups, config)
                times.append((t1 - t0, time.perf_counter() - t1))
            return times[1:]
        finally:
            await backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", required=True)
    ap.add_argument("--layouts", nargs="+", default=["1,1", "2,1", "1,2"], help="N,M: replicas,workers")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    print("| engine replicas | trainer workers | gather s (median) | train s (median) | steps/hour | steps |")
    print("|---|---|---|---|---|---|")
    for layout in a.layouts:
        n, m = (int(x) for x in layout.split(","))
        times = asyncio.run(step_times(a.base_model, n, m, a.steps))
        gather = statistics.median(g for g, _ in times)
        train = statistics.median(t for _, t in times)
        total = statistics.median(g + t for g, t in times)
        print(f"| {n} | {m} | {gather:.2f} | {train:.2f} | {3600 / total:.0f} | {len(times)} |", flush=True)


if __name__ == "__main__":
    main()
