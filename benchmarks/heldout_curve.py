"""Held-out success of a demo run's saved steps: the demo's own greedy evaluation (the 32 val questions of its
seed, first call forced) of `name@step` for each step given, so a run that only measured its held-out set
at the start and the end gets a curve (the RL side of the distillation comparison in BENCHMARKS.md).

    .venv/bin/python benchmarks/heldout_curve.py --root .advantage --steps 0 2 4 6 8 10 12 [--seed 0]

The run is `<root>/demo/models/<name>/` (as `advantage demo` leaves it); nothing is trained or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import advantage as adv  # noqa: E402
from advantage.tasks.tool_use.evaluation import greedy_episodes, held_out  # noqa: E402
from advantage.tasks.tool_use.reward import success  # noqa: E402


async def curve(root: Path, name: str, steps: list[int], seed: int, val_size: int) -> dict[int, float]:
    backend = adv.LocalBackend(root, progress=False)
    model = adv.TrainableModel(name, project="demo", base_model="smollm2-135m-instruct")
    val, _ = held_out(seed, val_size, 16)
    out: dict[int, float] = {}
    try:
        await model.register(backend)
        for step in steps:
            served = adv.Model(f"{name}@{step}", base_url=backend.base_url, api_key=backend.api_key)
            groups = await greedy_episodes(served, val, f"{name}@{step}")
            out[step] = sum(success(t) for g in groups for t in g.trajectories) / len(val)
            print(f"step {step}: held-out success {out[step]:.0%}", flush=True)
    finally:
        await backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path(".advantage"))
    ap.add_argument("--name", default="tool-use-001")
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    ap.add_argument(
        "--seed", type=int, default=0, help="The demo run's seed (it picks the held-out questions)."
    )
    ap.add_argument("--val-size", type=int, default=32)
    args = ap.parse_args()
    got = asyncio.run(curve(args.root, args.name, args.steps, args.seed, args.val_size))
    print("| step | " + " | ".join(str(s) for s in got) + " |")
    print("|---|" + "---|" * len(got))
    print("| held-out success | " + " | ".join(f"{v:.0%}" for v in got.values()) + " |")


if __name__ == "__main__":
    main()
