"""Where the demo's step-0 evaluations go: beside the first step's rollouts (before), or beside its update
(now), side by side in one process.

The demo evaluates the base weights twice before it can report anything: 32 held-out questions (the
baseline) and 16 dev questions, 48 greedy episodes. One embedded backend on the bundled SmolLM2-135M-Instruct
(fp32, the demo's engine of 64 rows); every episode runs on the base weights (`name@0`), so each round does
the same work both ways:

- `with rollouts`: the evaluations and the first step's 12 x 4 rollouts (multi-turn, T = 0.7, first call
  forced, seeded) at once, then the update;
- `with update`: the rollouts, then the update with the evaluations at once (the engine decodes on
  `threads_while_training` while the trainer runs).

The update trains on the groups the round gathered, at a learning rate too small to move the weights much.
Each round runs both ways, alternating which goes first, and prints the wall times and their ratio.

    .venv/bin/python benchmarks/base_evals.py [--rounds 2]
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

from overlap import gather  # noqa: E402  (benchmarks/, the script's own folder)

import advantage as adv  # noqa: E402
from advantage.tasks.tool_use.config import DemoConfig  # noqa: E402
from advantage.tasks.tool_use.evaluation import AtStep, greedy_episodes, held_out  # noqa: E402
from advantage.tasks.tool_use.steps import ROLLOUTS_IN_FLIGHT, train_config  # noqa: E402

TRAIN = train_config(DemoConfig(), lr=1e-9)  # the demo's loss settings; the weights stay the base's


async def evaluations(base: AtStep) -> None:
    val, dev = held_out(0, 32, 16)
    await greedy_episodes(base, val + dev, "", True)


async def one_round(model: adv.TrainableModel, seed: int, beside_update: bool) -> tuple[float, float, float]:
    """(wall s, rollouts s, update s) of a first step with the base weights' evaluations."""
    base = AtStep(model, 0)
    t0 = time.perf_counter()
    evals = None if beside_update else asyncio.ensure_future(evaluations(base))
    groups = await gather(base, seed, 12)  # type: ignore[arg-type]  # a ChatModel is all a rollout needs
    t1 = time.perf_counter()
    if beside_update:
        evals = asyncio.ensure_future(evaluations(base))
    await model.train(groups, config=TRAIN)
    await evals
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0, t2 - t1


async def main(args: argparse.Namespace) -> None:
    with TemporaryDirectory() as root:
        backend = adv.LocalBackend(Path(root), progress=False, max_batch_size=ROLLOUTS_IN_FLIGHT)
        model = adv.TrainableModel("m", project="bench", base_model="smollm2-135m-instruct")
        await model.register(backend)
        await evaluations(AtStep(model, 0))  # warm-up: the prompt's KV, the grammars, the head's form
        walls: dict[str, list[float]] = {"with rollouts": [], "with update": []}
        order = list(walls)
        for r in range(args.rounds):
            for label in order:
                wall, t_gen, t_train = await one_round(model, 2 + r, label == "with update")
                walls[label].append(wall)
                print(f"round {r + 1} {label:13s}: {wall:5.1f} s (rollouts {t_gen:5.1f} s, update {t_train:5.1f} s)", flush=True)  # fmt: skip
            order.reverse()
        before, now = statistics.median(walls["with rollouts"]), statistics.median(walls["with update"])
        print(f"median: with rollouts {before:.1f} s, with update {now:.1f} s: {before / now:.2f}x")
        await backend.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(ap.parse_args()))
