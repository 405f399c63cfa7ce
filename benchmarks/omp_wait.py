"""How OpenMP's idle threads wait, measured on one demo step: rollouts and the update.

`advantage` sets `OMP_WAIT_POLICY=PASSIVE` where an engine starts: the engine and the trainer run torch on
threads of their own, and OpenMP's default (spin for a while before sleeping) let one's idle pool burn the
cores the other needed. But PASSIVE puts a worker to sleep at the end of every parallel region, and a decode
step of the 135M model is hundreds of small ones, each waking the pool again. libgomp's `GOMP_SPINCOUNT`
sets how long a worker spins first (it overrides the policy's 0): a short spin keeps the pool awake between
the ops of one forward pass and still sleeps between passes.

Each setting runs in a fresh process (OpenMP reads the variables when torch loads), in turn, repeated in
alternating order; each run gathers the demo's 8 x 4 rollouts of one step twice (the second timed) and then
trains one step on them. Printed: seconds per setting (median over rounds) and the ratio to PASSIVE.

    .venv/bin/python benchmarks/omp_wait.py [--rounds 2] [--spin 0 1000 10000 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

HERE = Path(__file__).resolve()


def env_for(spin: int | None) -> dict[str, str]:
    """PASSIVE (spin None), or PASSIVE with a spin count of `spin`: libgomp spins that many times (about
    100,000 a millisecond) before a worker sleeps, whatever OMP_WAIT_POLICY says, once GOMP_SPINCOUNT is set."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = str(spin)
    return env


async def child() -> dict[str, float]:
    sys.path.insert(0, str(HERE.parent))
    from rollout_gen import TRAIN

    import advantage as adv
    from advantage.tasks.tool_use.env import make_scenarios
    from advantage.tasks.tool_use.rollout import rollout

    with TemporaryDirectory() as tmp:
        backend = adv.LocalBackend(tmp, progress=False)
        model = adv.TrainableModel("bench", project="bench", base_model="smollm2-135m-instruct")
        await model.register(backend)
        out: dict[str, float] = {}
        for r in range(2):  # the first gather warms the prefix cache and the allocator
            scenarios = make_scenarios(8, seed=r, split="train")
            t0 = time.perf_counter()
            groups = await adv.gather_trajectory_groups(
                [
                    [
                        rollout(model, s, temperature=0.7, force_first_call=True, seed=10 * g + i)
                        for i in range(4)
                    ]
                    for g, s in enumerate(scenarios)
                ],
                max_exceptions=0,
                progress=False,
            )
            out["rollouts"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await model.train(groups, TRAIN)
        out["update"] = time.perf_counter() - t0
        await backend.close()
    return out


def main(args: argparse.Namespace) -> dict[str, object]:
    settings: list[int | None] = [None, *args.spin]
    label = {s: "PASSIVE" if s is None else f"GOMP_SPINCOUNT={s}" for s in settings}
    runs: dict[str, list[dict[str, float]]] = {label[s]: [] for s in settings}
    for r in range(args.rounds):
        for s in settings if r % 2 == 0 else list(reversed(settings)):
            proc = subprocess.run(
                [sys.executable, str(HERE), "--child"],
                env=env_for(s),
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[label[s]].append(res)
            print(
                f"round {r + 1} {label[s]:>22}: rollouts {res['rollouts']:5.1f} s, update {res['update']:5.1f} s",
                flush=True,
            )
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ("rollouts", "update")} for k, v in runs.items()
    }
    base = med["PASSIVE"]
    for k, m in med.items():
        print(
            f"{k:>22}: rollouts {m['rollouts']:5.1f} s ({base['rollouts'] / m['rollouts']:.2f}x PASSIVE's speed), "
            f"update {m['update']:5.1f} s ({base['update'] / m['update']:.2f}x)"
        )
    return {"runs": runs, "median": med}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--spin", type=int, nargs="*", default=[1000, 10000, 100000])
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.child:
        print(json.dumps(asyncio.run(child())))
    else:
        result = main(a)
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))
