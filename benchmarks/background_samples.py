"""What background samples cost the caller: chat-completion latency of a recording model without them (k=0)
and with k of them, on the bundled SmolLM2 through the real server, at 1 and at C concurrent callers.

    .venv/bin/python benchmarks/background_samples.py [--k 3] [--requests 12] [--concurrency 1 4] [--max-tokens 32]

Both models serve the same base weights (step 0) from one engine; rounds alternate k=0 and k=K so that load
from other processes falls on both alike. Prints, per (k, concurrency): the caller's mean and p90 latency,
and a round's wall time until its last background sample is recorded (the engine's extra work).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import openai

from advantage.server.runner import BackgroundServer
from advantage.service import Service

MODEL = "smollm2-135m-instruct"


async def round_(
    base_url: str, name: str, requests: int, concurrency: int, max_tokens: int
) -> list[tuple[str, float]]:
    sem = asyncio.Semaphore(concurrency)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=600)

    async def one(i: int) -> tuple[str, float]:
        async with sem:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": f"Write one sentence about the number {i}."}],
                max_tokens=max_tokens,
                temperature=1.0,
            )
            return r.id, time.perf_counter() - t0

    try:
        return await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    svc = Service(tempfile.mkdtemp(prefix="bg-cost-"))
    svc.register("bench", "k0", MODEL, record_traffic=True)
    svc.register("bench", f"k{args.k}", MODEL, record_traffic=True, background_samples=args.k)
    srv = BackgroundServer(svc, api_key="k").start()
    print("| k | callers | requests | mean latency s | p90 latency s | round, until all recorded s |")
    print("|---|---|---|---|---|---|")
    try:
        for c in args.concurrency:
            lat: dict[str, list[float]] = {}
            drain: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for name in ("k0", f"k{args.k}"):
                    t0 = time.perf_counter()
                    done = asyncio.run(round_(srv.base_url, name, args.requests, c, args.max_tokens))
                    store = svc.recorder(name)
                    while any((rec := store.get(cid)) is None or rec.pending for cid, _ in done):
                        time.sleep(0.01)
                    drain.setdefault(name, []).append(time.perf_counter() - t0)
                    lat.setdefault(name, []).extend(t for _, t in done)
            for name in ("k0", f"k{args.k}"):
                xs = sorted(lat[name])
                p90 = xs[int(0.9 * (len(xs) - 1))]
                print(
                    f"| {name[1:]} | {c} | {len(xs)} | {statistics.mean(xs):.2f} | {p90:.2f} | "
                    f"{statistics.mean(drain[name]):.2f} |"
                )
    finally:
        srv.stop()
        svc.close()


if __name__ == "__main__":
    main()
