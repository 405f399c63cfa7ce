"""The demo's rollouts for one step (8 scenarios x 4, T = 0.7, forced first call, fixed seeds), gathered
several times on one `LocalBackend`, optionally with a training step between gathers; prints each gather's
wall time and the mean time of a decode step at the largest batch size. Session 28's ad-hoc probes saw
later gathers decode slower; this script did not reproduce it (BENCHMARKS.md).

    .venv/bin/python benchmarks/repeated_gather.py [--gathers 3] [--train]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time

import advantage as adv
from advantage.engine import torch_engine
from advantage.tasks.tool_use.env import make_scenarios
from advantage.tasks.tool_use.rollout import rollout

STEPS: list[tuple[int, float]] = []  # (rows, seconds) of every decode step


def _timed_decode_step(self: torch_engine.TorchEngine, _orig=torch_engine.TorchEngine._decode_step) -> None:
    rows, t = len(self._batch.rows), time.perf_counter()
    _orig(self)
    STEPS.append((rows, time.perf_counter() - t))


async def main(args: argparse.Namespace) -> None:
    torch_engine.TorchEngine._decode_step = _timed_decode_step  # type: ignore[method-assign]
    backend = adv.LocalBackend(tempfile.mkdtemp(), progress=False)
    model = adv.TrainableModel("probe", project="probe", base_model=args.model)
    await model.register(backend)
    scenarios = make_scenarios(8, seed=1, split="train")
    for n in range(args.gathers):
        STEPS.clear()
        t = time.perf_counter()
        groups = await adv.gather_trajectory_groups(
            [[rollout(model, s, temperature=0.7, force_first_call=True, seed=1000 + 10 * k) for k in range(4)]
             for s in scenarios],
            progress=False,
        )  # fmt: skip
        by: dict[int, list[float]] = collections.defaultdict(list)
        for rows, sec in STEPS:
            by[rows].append(sec)
        full = max(by)
        print(f"gather {n + 1} (step {await model.get_step()}): {time.perf_counter() - t:.1f} s, "
              f"{len(STEPS)} decode steps, at {full} rows {1000 * sum(by[full]) / len(by[full]):.0f} ms "
              f"({len(by[full])} steps)", flush=True)  # fmt: skip
        if args.train and n + 1 < args.gathers:
            await model.train(groups, config=adv.TrainConfig(learning_rate=1e-5))
    await backend.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gathers", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="a training step between gathers")
    asyncio.run(main(ap.parse_args()))
