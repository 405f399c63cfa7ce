"""Load: N concurrent chat clients against a real `advantage serve` on 127.0.0.1 for a fixed time.

The server is the `advantage serve` command in its own process (bundled SmolLM2, API key on), so the clients'
event loop does not share a GIL with it. Each client sends short chat requests back to back (a one-line
question, max_tokens 48, T = 0.7) through the official `openai` SDK with no retries, for --duration seconds;
requests in flight at the deadline are waited for and counted. Reported: requests, errors (must be 0),
latency p50/p90/p99/max, requests/s and generated tokens/s (the server's usage.completion_tokens).

With --train the clients ask for a trainable model by its bare name (its latest step) while a RemoteBackend
runs GRPO steps back to back on the same server (toy rollouts: 2 groups of 4). A step runs on the server's
training thread; chat requests that arrive meanwhile are served from the previous weights, and the new step
is published when it is checkpointed. The table then also says which steps answered, and how many requests
were in flight during a step.

    .venv/bin/python benchmarks/load_test.py [--clients 64] [--duration 60] [--max-tokens 48] [--train]
        [--threads N] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

import advantage as adv
from advantage.backends.remote import RemoteBackend
from advantage.server.runner import free_port

KEY = "load-key"
TRAINABLE = "load"
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "What is 12 times 7?", "Give me a synonym for happy.", "What do bees make?",
    "Which planet is closest to the sun?", "Translate 'thank you' into Spanish.", "What is the boiling point of water?",
    "Name a fruit that is yellow.", "What is the opposite of cold?", "Who wrote Romeo and Juliet?",
    "How many days are in a week?", "What gas do plants breathe in?", "Spell the word 'necessary'.",
    "What is the largest ocean?",
]  # fmt: skip
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}


@dataclass
class Result:
    start: float
    seconds: float
    tokens: int = 0
    step: int | None = None
    error: str | None = None


@dataclass
class TrainLog:
    steps: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, new step)
    error: str | None = None


def start_server(model: str, port: int, root: str, threads: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("advantage")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [str(exe), "serve", "--port", str(port), "--api-key", KEY, "--base-model", model, "--root", root]
    log = open(Path(root) / "server.log", "wb")  # noqa: SIM115 - the server process owns it until it exits
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`advantage serve` exited with {proc.returncode}; see {root}/server.log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("`advantage serve` did not come up in 300 s")


async def client_loop(
    client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int, deadline: float, out: list[Result]
) -> None:
    k = i
    while time.monotonic() < deadline:
        messages = [SYSTEM, {"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]
        k += 7
        t0 = time.monotonic()
        try:
            r = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=0.7,  # type: ignore[arg-type]
            )
            step = (r.choices[0].model_extra or {}).get("weights", {}).get("step")
            tokens = r.usage.completion_tokens if r.usage else 0
            out.append(Result(t0, time.monotonic() - t0, tokens, step))
        except Exception as exc:  # an error is a result to count, not a reason to stop the load
            out.append(Result(t0, time.monotonic() - t0, error=f"{type(exc).__name__}: {exc}"[:200]))


async def toy_rollout(model: adv.TrainableModel, i: int) -> adv.Trajectory:
    messages = [SYSTEM, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
    resp = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        max_tokens=16,
        temperature=1.0,  # type: ignore[arg-type]
    )
    choice = resp.choices[0]
    reward = min(len(choice.message.content or ""), 60) / 60  # shorter is worse: any varied signal will do
    return adv.Trajectory([*messages, choice], reward=reward)


async def train_loop(model: adv.TrainableModel, deadline: float, log: TrainLog) -> None:
    config = adv.TrainConfig(learning_rate=1e-4)
    try:
        while time.monotonic() < deadline:
            groups = await adv.gather_trajectory_groups(
                [[toy_rollout(model, g) for _ in range(4)] for g in range(2)], progress=False
            )
            t0 = time.monotonic()
            result = await model.train(groups, config)
            log.steps.append((t0, time.monotonic(), result.step))
    except Exception as exc:
        log.error = f"{type(exc).__name__}: {exc}"


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


async def run(args: argparse.Namespace, base_url: str) -> tuple[list[Result], TrainLog, float]:
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    http = httpx.AsyncClient(limits=limits, timeout=600)
    backend: RemoteBackend | None = None
    train_log = TrainLog()
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, http_client=http
    ) as client:
        served = args.model
        trainable: adv.TrainableModel | None = None
        if args.train:
            backend = RemoteBackend(base_url, api_key=KEY, progress=False, timeout=3600)
            trainable = adv.TrainableModel(TRAINABLE, project="bench", base_model=args.model)
            await trainable.register(backend)
            served = TRAINABLE  # the bare name: whichever step is the latest when the request arrives
        # Warm-up: HTTP connections, first-call allocations, per-shape kernels.
        warm: list[Result] = []
        await asyncio.gather(
            *(client_loop(client, served, i, 8, time.monotonic() + 0.01, warm) for i in range(args.clients))
        )
        results: list[Result] = []
        t0 = time.monotonic()
        deadline = t0 + args.duration
        tasks = [
            client_loop(client, served, i, args.max_tokens, deadline, results) for i in range(args.clients)
        ]
        if trainable is not None:
            tasks.append(train_loop(trainable, deadline, train_log))
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
        if backend is not None:
            await backend.close()
    return [r for r in results if r.start >= t0], train_log, wall


def report(args: argparse.Namespace, results: list[Result], train: TrainLog, wall: float) -> None:
    ok = [r for r in results if r.error is None]
    errors = Counter(r.error for r in results if r.error is not None)
    lat = sorted(r.seconds for r in ok)
    tokens = sum(r.tokens for r in ok)
    rows = [
        ("clients", f"{args.clients}"),
        ("duration (s, incl. drain)", f"{wall:.1f}"),
        ("requests completed", f"{len(ok)}"),
        ("errors", f"{sum(errors.values())}"),
        ("requests/s", f"{len(ok) / wall:.2f}"),
        ("generated tokens/s", f"{tokens / wall:.1f}"),
        ("mean completion tokens", f"{tokens / max(len(ok), 1):.1f}"),
        ("latency p50 (s)", f"{pct(lat, 50):.2f}"),
        ("latency p90 (s)", f"{pct(lat, 90):.2f}"),
        ("latency p99 (s)", f"{pct(lat, 99):.2f}"),
        ("latency max (s)", f"{max(lat, default=float('nan')):.2f}"),
    ]
    if args.train:
        during = [
            r for r in results if any(a < r.start + r.seconds and r.start < b for a, b, _ in train.steps)
        ]
        steps = Counter(r.step for r in ok)
        rows += [
            ("train steps completed", f"{len(train.steps)}"),
            ("train step seconds", ", ".join(f"{b - a:.1f}" for a, b, _ in train.steps) or "-"),
            ("requests in flight during a step", f"{len(during)}"),
            ("  of which errors", f"{sum(r.error is not None for r in during)}"),
            ("answered by step", ", ".join(f"{s}: {n}" for s, n in sorted(steps.items(), key=str))),
        ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"| {'metric':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    for err, n in errors.most_common(5):
        print(f"error x{n}: {err}")
    if train.error:
        print(f"train loop failed: {train.error}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64, help="concurrent chat clients")
    ap.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load (in-flight requests then drain)"
    )
    ap.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each chat request")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or HF model dir")
    ap.add_argument("--train", action="store_true", help="run GRPO steps on the server during the load")
    ap.add_argument(
        "--threads", type=int, default=0, help="the server's OMP_NUM_THREADS (0: torch's default)"
    )
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="advantage-load-")
    port = free_port()
    print(
        f"{args.clients} clients x {args.duration:.0f} s, max_tokens {args.max_tokens}, model {args.model}, "
        f"train {'on' if args.train else 'off'}, {os.cpu_count()} CPUs, server log {root}/server.log"
    )
    proc = start_server(args.model, port, root, args.threads)
    try:
        results, train, wall = asyncio.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(args, results, train, wall)
    if any(r.error for r in results) or train.error:
        sys.exit(1)


if __name__ == "__main__":
    main()
