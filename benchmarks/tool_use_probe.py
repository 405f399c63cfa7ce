"""How the base model does on the demo's task as it stands, before any training: greedy on held-out
questions, and sampled at the training temperature on training questions. Per rate: the first call's tool
and arguments, and whether the reply states the right value after a right call.

    .venv/bin/python benchmarks/tool_use_probe.py [--val 64] [--train 16] [--k 4] [--temperature 0.7]

Session 25 compared variants of the worked example's answer and of the tool schemas with an ad-hoc copy of
this script that swapped `rollout.EXAMPLE` / `rollout.TOOLS` in place (BENCHMARKS.md has the table).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

import advantage as adv
from advantage.tasks.tool_use.env import make_scenarios
from advantage.tasks.tool_use.rollout import rollout


def summary(name: str, trajs: list[adv.Trajectory]) -> str:
    n = len(trajs)
    rate = {k: sum(t.metrics[k] for t in trajs) / n for k in ("right_tool", "right_args", "success")}
    right = [t for t in trajs if t.metrics["right_args"]]
    answered = sum(t.metrics["answered"] for t in right) / max(len(right), 1)
    return (
        f"{name}: n={n}  right tool {rate['right_tool']:.0%}  right args {rate['right_args']:.0%}  "
        f"success {rate['success']:.0%}  right value after a right call {answered:.0%}"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as root:
        backend = adv.LocalBackend(root, progress=False)
        model = adv.TrainableModel("probe", project="probe", base_model=args.model)
        await model.register(backend)
        half = args.val // 2
        val = make_scenarios(half, seed=0, split="val") + make_scenarios(args.val - half, seed=1, split="val")
        train = make_scenarios(args.train, seed=7, split="train")
        greedy = await asyncio.gather(
            *[rollout(model, s, temperature=0.0, force_first_call=True) for s in val]
        )
        print(summary("greedy, val", list(greedy)), flush=True)
        sampled = await asyncio.gather(
            *[
                rollout(model, s, temperature=args.temperature, force_first_call=True, seed=1000 * i + j)
                for i, s in enumerate(train)
                for j in range(args.k)
            ]
        )
        print(summary(f"T={args.temperature}, train", list(sampled)), flush=True)
        await backend.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    asyncio.run(main(ap.parse_args()))
