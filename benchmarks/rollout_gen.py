"""Generation for one step of the CPU demo, with an engine feature on and off, side by side.

Two embedded backends in one process (the bundled SmolLM2-135M-Instruct), the same engine but for one
setting (`--compare`):

- `prefix-cache`: the prompt-prefix cache on, and off (`prefix_cache_mb=0`);
- `cascade`: cascade attention on (rows read one shared copy of the prompt prefix's KV), and off
  (`cascade=False`: every row holds and reads its own copy);
- `dtype`: the model in bf16 and in fp32 (a CPU with AMX multiplies bf16 natively; `--train` shows what
  that does to the update as well);
- `attention`: cascade attention's two parts in torch's CPU flash kernel, merged by their log-sum-exps (the
  default), and under one fp32 softmax (`two_part_attention`, the reference, which upcasts every key it
  reads);
- `batch`: the engine decoding up to 64 rows at once with 64 rollouts in flight, against 32 and 32;
- `head`: the vocabulary head in the form the engine timed fastest here (`engine/head.py`), against
  `F.linear` on the weight as laid out (`head_form="linear"`, what the engine did before it timed them).

Each round runs the demo's rollouts for one training step (G scenarios x N rollouts, T=0.7, multi-turn,
first call forced, seeded so both sides sample alike) on both, alternating which goes first, and prints the
wall times and their ratio; with `--train`, each side then trains one step on what it gathered (the demo's
loss settings) and that is timed too. The prompts repeat as in the demo: one system prompt, tool schemas and worked
example for every rollout, and each turn extends the last.

    .venv/bin/python benchmarks/rollout_gen.py [--compare cascade] [--groups 8] [--group-size 4]
        [--rounds 2] [--dtype float32] [--train] [--json out.json]
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
from advantage.engine.cascade import CASCADE_TWO_PART  # noqa: E402
from advantage.tasks.tool_use.config import DemoConfig  # noqa: E402
from advantage.tasks.tool_use.env import make_scenarios  # noqa: E402
from advantage.tasks.tool_use.rollout import rollout  # noqa: E402
from advantage.tasks.tool_use.steps import train_config  # noqa: E402

COMPARE = {  # label -> engine settings, the feature on first
    "prefix-cache": {"prefix cache": {"prefix_cache_mb": 512}, "no prefix cache": {"prefix_cache_mb": 0}},
    "cascade": {"cascade": {"cascade": True}, "no cascade": {"cascade": False}},
    "dtype": {"bf16": {"dtype": "bfloat16"}, "fp32": {"dtype": "float32"}},
    "attention": {"flash parts": {}, "fp32 two-part": {}},
    # rows decoded together, and rollouts in flight (gather's concurrency) to fill them
    "batch": {
        "64 rows": {"max_batch_size": 64, "concurrency": 64},
        "32 rows": {"max_batch_size": 32, "concurrency": 32},
    },
    "head": {  # at the demo's 64 rows
        "tuned head": {"head_form": "auto", "max_batch_size": 64, "concurrency": 64},
        "linear head": {"head_form": "linear", "max_batch_size": 64, "concurrency": 64},
    },
}
ATTENTION = {"fp32 two-part": CASCADE_TWO_PART}  # a side's attention implementation, where not the default
TRAIN = train_config(DemoConfig(), lr=1e-3)  # the demo's loss settings


async def one_step(
    model: adv.TrainableModel, seed: int, groups: int, group_size: int, train: bool, concurrency: int = 32
) -> tuple[float, float, float]:
    """Seconds to gather (and to train on, with `train`; else nan) one demo step, and its completion tokens."""
    scenarios = make_scenarios(groups, seed=seed, split="train")
    t0 = time.perf_counter()
    done = await adv.gather_trajectory_groups(
        [
            [
                rollout(model, s, temperature=0.7, force_first_call=True, seed=1000 * seed + 10 * g + i)
                for i in range(group_size)
            ]
            for g, s in enumerate(scenarios)
        ],
        max_exceptions=0,
        progress=False,
        concurrency=concurrency,
    )
    seconds = time.perf_counter() - t0
    tokens = sum(
        len((c.model_extra or {}).get("token_ids", []))
        for g in done
        for t in g.trajectories
        for c in t.choices()
    )
    train_seconds = float("nan")
    if train:
        t0 = time.perf_counter()
        await model.train(done, TRAIN)
        train_seconds = time.perf_counter() - t0
    return seconds, tokens, train_seconds


async def main(args: argparse.Namespace) -> dict[str, object]:
    with TemporaryDirectory() as tmp:
        sides = {}
        concurrency = {}
        for label, setting in COMPARE[args.compare].items():
            kwargs = {k: v for k, v in setting.items() if k != "concurrency"}
            concurrency[label] = int(setting.get("concurrency", 32))
            backend = adv.LocalBackend(
                Path(tmp) / label.replace(" ", "-"), progress=False, **{"dtype": args.dtype, **kwargs}
            )
            model = adv.TrainableModel("bench", project="bench", base_model="smollm2-135m-instruct")
            await model.register(backend)
            if label in ATTENTION:
                backend.service.engine(model.base_model).model.set_attn_implementation(ATTENTION[label])
            sides[label] = (backend, model)
        if args.compare == "head":  # the form each engine computes its head in (timed on its first request)
            for label, (_, model) in sides.items():
                await one_step(model, 99, 1, 1, False)
                engine = sides[label][0].service.engine(model.base_model)
                print(f"{label}: head plan {getattr(engine, 'head_plan', None)}", flush=True)
        times: dict[str, list[float]] = {k: [] for k in sides}
        tokens: dict[str, list[int]] = {k: [] for k in sides}
        train_times: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for label in order:
                s, n, ts = await one_step(
                    sides[label][1], r, args.groups, args.group_size, args.train, concurrency[label]
                )
                times[label].append(s)
                tokens[label].append(n)
                train_times[label].append(ts)
                trained = f", train {ts:5.1f} s" if args.train else ""
                print(f"round {r + 1} {label:>16}: {s:6.1f} s, {n} completion tokens{trained}", flush=True)
        for backend, _ in sides.values():
            await backend.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    on, off = COMPARE[args.compare]
    ratio = med[off] / med[on]
    print(f"median s per demo step: {on} {med[on]:.1f}, {off} {med[off]:.1f}; speed-up {ratio:.2f}x")
    result: dict[str, object] = {
        "seconds": times,
        "completion_tokens": tokens,
        "median_seconds": med,
        "speedup": ratio,
    }
    if args.train:
        tmed = {k: statistics.median(v) for k, v in train_times.items()}
        print(
            f"median s per train step: {on} {tmed[on]:.1f}, {off} {tmed[off]:.1f}; speed-up {tmed[off] / tmed[on]:.2f}x"
        )
        result |= {"train_seconds": train_times, "median_train_seconds": tmed}
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=sorted(COMPARE), default="cascade")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--dtype", default="auto", help="as the demo: fp32 on CPUs without bf16 units")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train", action="store_true", help="also train one step on each side's rollouts, timed")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
