"""Generation for one step of the CPU demo, with the engine's prefix cache on and off, side by side.

Two embedded backends in one process (the bundled SmolLM2-135M-Instruct, bf16), one with the prefix cache
and one without (`prefix_cache_mb=0`); everything else is the same engine. Each round runs the demo's
rollouts for one training step (G scenarios x N rollouts, T=0.7, multi-turn, first call forced) on both,
alternating which goes first, and prints the wall times and their ratio. The prompts repeat as in the
demo: one system prompt, tool schemas and worked example for every rollout, and each turn extends the last.

    .venv/bin/python benchmarks/rollout_gen.py [--groups 4] [--group-size 8] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `examples`

import advantage as adv  # noqa: E402
from advantage.tasks.tool_use.env import make_scenarios  # noqa: E402
from advantage.tasks.tool_use.rollout import rollout  # noqa: E402


async def one_step(model: adv.TrainableModel, seed: int, groups: int, group_size: int) -> tuple[float, float]:
    scenarios = make_scenarios(groups, seed=seed, split="train")
    t0 = time.perf_counter()
    done = await adv.gather_trajectory_groups(
        [
            [rollout(model, s, temperature=0.7, force_first_call=True) for _ in range(group_size)]
            for s in scenarios
        ],
        max_exceptions=0,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    tokens = sum(
        len((c.model_extra or {}).get("token_ids", []))
        for g in done
        for t in g.trajectories
        for c in t.choices()
    )
    return seconds, tokens


async def main(args: argparse.Namespace) -> dict[str, object]:
    with TemporaryDirectory() as tmp:
        sides = {}
        for label, mb in (("prefix cache", 512), ("no prefix cache", 0)):
            backend = adv.LocalBackend(
                Path(tmp) / label.replace(" ", "-"), progress=False, prefix_cache_mb=mb
            )
            model = adv.TrainableModel("bench", project="bench", base_model="smollm2-135m-instruct")
            await model.register(backend)
            sides[label] = (backend, model)
        times: dict[str, list[float]] = {k: [] for k in sides}
        tokens: dict[str, list[int]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for label in order:
                s, n = await one_step(sides[label][1], seed=r, groups=args.groups, group_size=args.group_size)
                times[label].append(s)
                tokens[label].append(n)
                print(f"round {r + 1} {label:>16}: {s:6.1f} s, {n} completion tokens", flush=True)
        for backend, _ in sides.values():
            await backend.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["no prefix cache"] / med["prefix cache"]
    print(f"median s per demo step: with {med['prefix cache']:.1f}, without {med['no prefix cache']:.1f}; "
          f"speed-up {ratio:.2f}x")  # fmt: skip
    return {"seconds": times, "completion_tokens": tokens, "median_seconds": med, "speedup": ratio}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
