"""The online demo (`advantage demo --online`): the served model learns the tool-use task from its own
production traffic and its users' feedback alone.

A pool of simulated users runs the tool-use agent against the served model (`name`, the default weights)
through the plain `openai` SDK, concurrently, and after each answer reports the task's hidden reward through
`POST /v1/feedback`, tagged by episode so it rates every turn. That is all a user does: no rollout, gather
or training code. Beside the traffic, the continual trainer (`model.train_online`) trains a step whenever
enough rated groups are ready, and its promotion gate scores each step on dev questions that no user ever
sends; only a step at least as good as the current default becomes the default.

Groups come from repeated prompts: each task is asked by `askers` users (a popular question), so their
first turns share a prompt token for token; second turns group wherever the first calls were the same.
Held-out success is measured greedily on the val split (never sent) at the start and the end.

With `invert_at`, the users lie for `invert_minutes` from that minute on (reward 1 - r): the gate must
keep the default's held-out success from falling.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import openai
from pydantic import BaseModel, ConfigDict, Field

import advantage as adv
from advantage.online.trainer import OnlineStep

from .env import Scenario, make_scenarios
from .rollout import grade, run_episode
from .train import held_out


class OnlineDemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("tool-use-online", description="Model name (runs go under <root>/demo/models/<name>).")
    root: Path = Field(Path(".advantage"), description="Checkpoint and run root.")
    base_model: str = Field("smollm2-135m-instruct", description="Bundled model name or HF model dir.")
    minutes: float = Field(30.0, gt=0, description="How long the whole run lasts, evaluations included.")
    users: int = Field(32, ge=1, description="Simulated users sending requests at the same time.")
    askers: int = Field(
        4,
        ge=2,
        description="Users who ask each task: their first turns share a prompt, so they form a group.",
    )
    min_groups: int = Field(8, ge=1, description="Rated groups the trainer waits for before a step.")
    max_groups: int = Field(16, ge=1, description="At most this many groups per step.")
    max_steps_off_policy: int = Field(
        2, ge=0, description="Traffic sampled from weights older than this many steps is not trained on."
    )
    tolerance: float = Field(
        0.07,
        ge=0,
        le=1,
        description="Promotion gate: a step becomes the default only if its dev success is at least the "
        "default's minus this (0.07: one dev question of 16; this task's success dips before it climbs).",
    )
    gate_against: Literal["default", "best"] = Field(
        "best",
        description="Compare a step with the default's dev success or with the best promoted so far "
        "(OnlineConfig.gate_against): against the default, the tolerance let two runs drift down a "
        "question per step.",
    )
    learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate (constant).")
    temperature: float = Field(0.7, ge=0, le=2, description="The users' sampling temperature.")
    val_size: int = Field(32, ge=1, description="Held-out questions for the start and end evaluation.")
    dev_size: int = Field(16, ge=1, description="Other held-out questions, the promotion gate's.")
    invert_at: float | None = Field(
        None, ge=0, description="Minute at which the users start sending inverted feedback (None: never)."
    )
    invert_minutes: float = Field(10.0, gt=0, description="How long the inverted feedback lasts.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many judged steps (None: run for `minutes`)."
    )
    seed: int = Field(0, description="Seed of the tasks and of the held-out sets.")


@dataclass
class Traffic:
    """What the simulated users did (the server records the rest)."""

    episodes: int = 0
    requests: int = 0
    feedback: int = 0
    inverted: int = 0
    errors: int = 0
    successes: list[tuple[float, float]] = field(default_factory=list)  # (time, success) per episode


def _tasks(cfg: OnlineDemoConfig) -> Iterator[Scenario]:
    """An endless stream of fresh train tasks, each repeated `askers` times in a row."""
    for batch in itertools.count():
        for s in make_scenarios(64, seed=cfg.seed * 1_000_003 + batch, split="train"):
            yield from [s] * cfg.askers


async def _user(
    uid: int,
    tasks: Iterator[Scenario],
    client: openai.AsyncOpenAI,
    http: httpx.AsyncClient,
    cfg: OnlineDemoConfig,
    traffic: Traffic,
    start: float,
    stop: asyncio.Event,
) -> None:
    """One user: ask, let the agent run, rate the answer; again until stopped."""
    for n in itertools.count():
        if stop.is_set():
            return
        scenario = next(tasks)
        try:
            ep = await run_episode(
                client,
                cfg.name,
                scenario,
                temperature=cfg.temperature,
                force_first_call=True,
                metadata={"episode": f"user{uid}-{n}", "task": scenario.id},
            )
            reward = grade(ep, scenario).total
            minute = (time.monotonic() - start) / 60
            inverted = (
                cfg.invert_at is not None and cfg.invert_at <= minute < cfg.invert_at + cfg.invert_minutes
            )
            r = await http.post(
                "feedback",
                json={"completion_id": ep.completion_ids[-1], "reward": 1.0 - reward if inverted else reward},
            )
            r.raise_for_status()
        except (openai.APIError, httpx.HTTPError) as e:
            traffic.errors += 1
            print(f"  user {uid}: {type(e).__name__}: {e}")
            await asyncio.sleep(1.0)
            continue
        traffic.episodes += 1
        traffic.requests += len(ep.completion_ids)
        traffic.feedback += 1
        traffic.inverted += int(inverted)
        traffic.successes.append((time.monotonic(), float(reward >= 1.0 - 1e-9)))


async def success_rate(
    client: openai.AsyncOpenAI, model_name: str, scenarios: list[Scenario], tag: str
) -> float:
    """Greedy success on `scenarios` of the weights served as `model_name`."""

    async def one(s: Scenario) -> float:
        ep = await run_episode(
            client, model_name, s, temperature=0.0, force_first_call=True, metadata={"eval": tag}
        )
        return float(grade(ep, s).total >= 1.0 - 1e-9)

    results = await asyncio.gather(*(one(s) for s in scenarios))
    return sum(results) / len(scenarios)


def online_config(cfg: OnlineDemoConfig, seconds: float) -> adv.OnlineConfig:
    return adv.OnlineConfig(
        train=adv.TrainConfig(
            learning_rate=cfg.learning_rate,
            lr_by_signal=True,
            tree_advantages=True,
            agg="seq_mean",
            micro_batch_size=8,
        ),
        min_groups=cfg.min_groups,
        max_groups=cfg.max_groups,
        group_size=cfg.askers,
        max_steps_off_policy=cfg.max_steps_off_policy,
        tolerance=cfg.tolerance,
        gate_against=cfg.gate_against,
        max_seconds=seconds,
        max_steps=cfg.max_steps,
        poll_s=2.0,
    )


async def run(cfg: OnlineDemoConfig) -> dict[str, float]:
    backend = adv.LocalBackend(cfg.root, progress=False)
    try:
        return await _run(cfg, backend)
    finally:
        await backend.close()


async def _run(cfg: OnlineDemoConfig, backend: adv.LocalBackend) -> dict[str, float]:
    start = time.monotonic()
    model = adv.TrainableModel(cfg.name, project="demo", base_model=cfg.base_model, record_traffic=True)
    await model.register(backend)
    client = openai.AsyncOpenAI(base_url=backend.base_url, api_key=backend.api_key, max_retries=2)
    auth = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
    http = httpx.AsyncClient(base_url=backend.base_url.rstrip("/") + "/", headers=auth, timeout=60)
    val, dev = held_out(cfg.seed, cfg.val_size, cfg.dev_size)
    print(f"model {cfg.name}; runs in {cfg.root / 'demo' / 'models' / cfg.name}")
    base_rate = await success_rate(client, cfg.name, val, "val")
    print(f"baseline held-out success {base_rate:.0%} (greedy, {len(val)} questions no user sends)")

    traffic = Traffic()
    stop = asyncio.Event()
    deadline = start + cfg.minutes * 60 - (60.0 + 2.0 * len(val))  # the rest is the final evaluation
    recent: list[float] = []  # the last steps' lengths: no step starts that could not end before the deadline
    since = [time.monotonic(), 0]  # when the last step was judged, and the episodes by then

    def progress(step: OnlineStep) -> None:
        now = time.monotonic()
        recent[:] = [*recent[-2:], step.seconds]
        window = [s for t, s in traffic.successes if t >= since[0]]
        users_rate = sum(window) / len(window) if window else float("nan")
        verdict = "promoted" if step.promoted else "rejected"
        print(
            f"step {step.step:3d} {verdict}  dev success {step.score or 0:4.0%} (default {step.default_score or 0:4.0%})  "
            f"users' success {users_rate:4.0%}  episodes {traffic.episodes - since[1]:3d} "
            f"({traffic.episodes / (now - start) * 3600:,.0f}/h)  groups {step.groups}  "
            f"rated {traffic.feedback}  inverted {traffic.inverted}  step {step.seconds:.0f}s  "
            f"elapsed {(now - start) / 60:4.1f} min"
        )
        since[:] = [now, traffic.episodes]

    async def watch() -> None:
        while not stop.is_set():
            if time.monotonic() + 1.1 * max(recent, default=0.0) >= deadline:
                stop.set()
            await asyncio.sleep(1.0)

    tasks = _tasks(cfg)
    users = [
        asyncio.create_task(_user(u, tasks, client, http, cfg, traffic, start, stop))
        for u in range(cfg.users)
    ]
    watcher = asyncio.create_task(watch())
    try:
        result = await model.train_online(
            online_config(cfg, max(1.0, deadline - time.monotonic())),
            evaluate=lambda name: success_rate(client, name, dev, "dev"),
            stop=stop,
            on_step=progress,
        )
    finally:
        stop.set()
        await asyncio.gather(*users, watcher, return_exceptions=True)
    final_rate = await success_rate(client, cfg.name, val, "val")
    elapsed = time.monotonic() - start
    print(
        f"held-out success {base_rate:.0%} -> {final_rate:.0%} in {elapsed / 60:.1f} min: {len(result.steps)} steps, "
        f"{len(result.steps) - len(result.rejected)} promoted (rejected: {result.rejected or 'none'}), serving step "
        f"{result.default}; {traffic.episodes} episodes ({traffic.requests} requests), {traffic.feedback} rated, "
        f"{traffic.inverted} inverted, {result.stale} choices too stale to train on"
    )
    await http.aclose()
    return {"baseline_success": base_rate, "final_success": final_rate, "seconds": elapsed,
            "steps": float(len(result.steps)), "rejected": float(len(result.rejected)),
            "episodes": float(traffic.episodes), "default_step": float(result.default)}  # fmt: skip


def main(cfg: OnlineDemoConfig | None = None) -> dict[str, float]:
    return asyncio.run(run(cfg or OnlineDemoConfig()))
