"""Train steps per hour through `LocalBackend(trainer_workers=M)`: the whole `model.train` (tokenize, the
data-parallel step, checkpoint, publish), on the same gathered groups each step. One markdown row per M.

    .venv/bin/python benchmarks/trainer_workers.py --base-model DIR_OR_NAME [--workers 1 2] [--steps 4]

The groups (4 prompts x 8 rollouts of up to 32 tokens) are gathered once from the base weights and trained
on again each step, so the figure is the training side alone. The first step is a warm-up and not counted.
M > 1 needs Ray (`pip install 'advantage[ray]'`) and starts a local cluster (not counted either).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import advantage as adv

PROMPTS = [f"Write one short sentence about the number {k}." for k in range(4)]


async def rollout(model: adv.TrainableModel, prompt: str) -> adv.Trajectory:
    messages = [{"role": "user", "content": prompt}]
    resp = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=messages, max_tokens=32, temperature=1.0
    )
    choice = resp.choices[0]
    ids = (choice.model_extra or {}).get("token_ids") or []
    return adv.Trajectory([*messages, choice], reward=float(sum(ids) % 7))  # varied: every group trains


async def seconds_per_step(base_model: str, workers: int, steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as root:
        backend = adv.LocalBackend(root, progress=False, trainer_workers=workers)
        model = adv.TrainableModel("bench", project="bench", base_model=base_model)
        await model.register(backend)
        try:
            groups = await adv.gather_trajectory_groups(
                [[rollout(model, p) for _ in range(8)] for p in PROMPTS], progress=False
            )
            config = adv.TrainConfig(learning_rate=1e-5, micro_batch_size=8)
            times = []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                result = await model.train(groups, config)
                if result.metrics.get("skipped_step"):
                    raise RuntimeError(
                        "A step was skipped (equal rewards in every group): nothing was timed."
                    )
                times.append(time.perf_counter() - t0)
            return times[1:]
        finally:
            await backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", required=True)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    print("| trainer workers | s/step (median) | steps/hour | steps |")
    print("|---|---|---|---|")
    for m in a.workers:
        times = asyncio.run(seconds_per_step(a.base_model, m, a.steps))
        med = statistics.median(times)
        print(f"| {m} | {med:.2f} | {3600 / med:.0f} | {len(times)} |", flush=True)


if __name__ == "__main__":
    main()
