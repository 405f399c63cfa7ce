"""The grammar's token masks at each decode step: every row's mask computed on the engine's thread, one row
after another, against all rows' masks in llguidance's thread pool (`grammar.allowed_tokens`), side by side.

One embedded backend (the bundled SmolLM2-135M-Instruct) runs the demo's rollouts for one training step
(G scenarios x N rollouts, multi-turn, the first call forced, so most rows decode under a grammar). At each
decode step that masks two or more rows, the rows' matchers are copied twice (outside the timing; a fresh
copy has no mask cached) and the masks computed both ways, in alternating order; the two must agree bit for
bit. Prints the seconds each way summed over the step, by rows masked, and the ratio.

    .venv/bin/python benchmarks/grammar_masks.py [--groups 12] [--group-size 4]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for rollout_gen
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `examples`

import llguidance.torch as llt  # noqa: E402
import torch  # noqa: E402
from rollout_gen import one_step  # noqa: E402

import advantage as adv  # noqa: E402
import advantage.engine.torch_engine as torch_engine  # noqa: E402
from advantage.engine.grammar import Constraint, allowed_tokens  # noqa: E402

_SHIFTS = torch.arange(32, dtype=torch.int32)


def serial(matchers: list[object | None], vocab: int) -> torch.Tensor:
    """The engine's masks before: each row's filled on this thread in turn, unpacked by shifts."""
    bitmask = llt.allocate_token_bitmask(len(matchers), vocab)
    bitmask.fill_(-1)
    for row, m in enumerate(matchers):
        if m is not None:
            llt.fill_next_token_bitmask(m, bitmask, row)
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(len(matchers), -1)[:, :vocab].bool()


def pooled(matchers: list[object | None], vocab: int) -> torch.Tensor:
    """As the engine does it now: `grammar.allowed_tokens` (on the copies given)."""
    return allowed_tokens([Constraint(m) if m is not None else None for m in matchers], vocab)


def main(args: argparse.Namespace) -> None:
    seconds: dict[str, collections.Counter[int]] = {
        "serial": collections.Counter(),
        "pool": collections.Counter(),
    }
    calls: collections.Counter[int] = collections.Counter()
    real = torch_engine.allowed_tokens

    def timed(constraints: list[Constraint | None], vocab: int) -> torch.Tensor:
        masked = sum(c is not None for c in constraints)
        if masked >= 2:
            bucket = min(masked // 8 * 8, 48)
            ways = [("serial", serial), ("pool", pooled)]
            if calls[bucket] % 2:
                ways.reverse()
            masks = []
            for name, fn in ways:
                copies = [c.matcher.deep_copy() if c else None for c in constraints]
                t0 = time.perf_counter()
                masks.append(fn(copies, vocab))
                seconds[name][bucket] += time.perf_counter() - t0
            assert torch.equal(masks[0], masks[1]), "the two ways disagree"
            calls[bucket] += 1
        return real(constraints, vocab)

    torch_engine.allowed_tokens = timed  # type: ignore[assignment]

    async def run() -> None:
        with TemporaryDirectory() as tmp:
            backend = adv.LocalBackend(Path(tmp) / "b", progress=False, max_batch_size=args.group_size * 16)
            model = adv.TrainableModel("bench", project="bench", base_model="smollm2-135m-instruct")
            await model.register(backend)
            s, n, _ = await one_step(
                model, 0, args.groups, args.group_size, False, args.groups * args.group_size
            )
            print(f"a demo step's rollouts: {s:.1f} s, {n} completion tokens", flush=True)
            await backend.close()

    asyncio.run(run())
    print(f"torch threads {torch.get_num_threads()}")
    print("| rows masked | steps | one by one (ms/step) | thread pool (ms/step) | speed-up |")
    print("|---|---|---|---|---|")
    for b in sorted(calls):
        a, p = seconds["serial"][b], seconds["pool"][b]
        label = f"{b}-{b + 7}" if b < 48 else "48+"
        print(
            f"| {label} | {calls[b]} | {1e3 * a / calls[b]:.1f} | {1e3 * p / calls[b]:.1f} | {a / p:.2f}x |"
        )
    a, p = sum(seconds["serial"].values()), sum(seconds["pool"].values())
    print(f"all steps: one by one {a:.2f} s, thread pool {p:.2f} s; speed-up {a / p:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--group-size", type=int, default=4)
    main(parser.parse_args())
