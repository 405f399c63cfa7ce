"""A train step after its freed memory went back to the OS, against one after it stayed: the update's seconds.

A demo step's update allocates ~5 GiB of activations and frees them. The service used to `malloc_trim` after
every step, handing that memory back to the OS, so the next step took it again page by page (~1.5 million
page faults, each a few microseconds of kernel time on these VMs). Now it trims only when the machine runs
short of memory (`service.memory_short`). This measures what the trim costs.

One backend, one model, one recorded step's groups (a demo run's `trajectories/train/NNNN.jsonl`). Each round
gathers a demo step's rollouts (the engine's allocations between two updates, as in the demo) and trains one
step on the recorded groups; on the "trim" side the freed memory is handed back first, before the rollouts,
where the service used to do it; the "keep" side leaves it. The sides alternate; the first round finds no
freed memory either way and is a warm-up. The lr is tiny, so the weights barely move between rounds. Printed:
each round's rollout and update seconds, the update's page faults and kernel time, and the medians' ratios.

    .venv/bin/python benchmarks/trim.py RUN/trajectories/train/0003.jsonl [--rounds 3] [--groups 12]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared_prefix import load_step  # noqa: E402  (benchmarks/, the script's own folder)

import advantage as adv  # noqa: E402
import advantage.service as service  # noqa: E402
from advantage.tasks.tool_use.config import DemoConfig  # noqa: E402
from advantage.tasks.tool_use.steps import step_rollouts, train_config  # noqa: E402


def usage() -> tuple[int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", type=Path, help="a trajectories/train/NNNN.jsonl file of a demo run")
    ap.add_argument("--rounds", type=int, default=3, help="updates on each side")
    ap.add_argument(
        "--groups", dest="n_groups", type=int, default=12, help="scenarios of each round's rollouts"
    )
    args = ap.parse_args()
    groups = load_step(args.groups)
    cfg = DemoConfig(groups_per_step=args.n_groups, focus_groups=0)
    config = train_config(cfg, 1e-7, groups)
    service.memory_short = lambda *a, **k: False  # the service keeps freed memory; "trim" trims below
    backend = adv.LocalBackend(tempfile.mkdtemp(prefix="trim-"), max_batch_size=64)
    model = adv.TrainableModel("trim", project="bench", base_model=cfg.base_model)
    await model.register(backend)
    seconds: dict[str, list[float]] = {"trim": [], "keep": []}
    gen: dict[str, list[float]] = {"trim": [], "keep": []}
    sides = ["warm-up"] + [s for _ in range(args.rounds) for s in ("trim", "keep")]
    for i, side in enumerate(sides):
        if side == "trim":  # where the service trimmed: after the last update, before these rollouts
            service.release_freed_memory()
        t0 = time.perf_counter()
        await step_rollouts(model, cfg, i, None)
        t_gen = time.perf_counter() - t0
        faults, sys_s = usage()
        result = await model.train(groups, config=config)
        faults2, sys2 = usage()
        s = result.metrics["seconds"]
        print(f"{side:8s} rollouts {t_gen:5.1f} s  update {s:5.1f} s  page faults {faults2 - faults:9,d}  "
              f"kernel {sys2 - sys_s:4.1f} s CPU", flush=True)  # fmt: skip
        if side in seconds:
            seconds[side].append(s)
            gen[side].append(t_gen)
    await backend.close()
    trim, keep = statistics.median(seconds["trim"]), statistics.median(seconds["keep"])
    g_trim, g_keep = statistics.median(gen["trim"]), statistics.median(gen["keep"])
    n = sum(len(g.trajectories) for g in groups)
    print(f"median rollouts: trim {g_trim:.1f} s, keep {g_keep:.1f} s: keeping is {g_trim / g_keep:.2f}x")
    print(
        f"\n{n} trajectories; median update: trim {trim:.1f} s, keep {keep:.1f} s: keeping is {trim / keep:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
