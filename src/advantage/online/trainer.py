"""The continual trainer: the served model keeps learning from its own recorded, rated traffic.

`train_online(model, config, evaluate=..., stop=...)` loops until stopped (`stop` set, `config.max_steps`
steps, or `config.max_seconds`):
0. with a judge (`config.judge_model`, or `judge=`), score the recorded requests whose sibling choices are not
   all rated (`judging.py`: explicit feedback wins; a failed verdict is counted and skipped);
1. read the rated choices not used yet (`TrafficStore.untrained`, through the backend's `online_traffic`
   op); the ones sampled from weights more than `max_steps_off_policy` steps before the default step (or
   from a later, unpromoted step) are marked "stale" and never trained on;
2. form groups from the rest (`groups_from_traffic`); with fewer than `min_groups`, wait `poll_s` and look
   again (choices of prompts not yet a group, or of zero-variance groups, wait for more feedback);
3. add `replay_share` of earlier groups from promoted steps (those with a choice rated at least
   `replay_min_reward`), then train one step (`model.train`, with `config.train`; its loss corrects for the
   recorded sampler logprobs, and `train.kl_beta` anchors it to the base model);
4. the promotion gate: with an `evaluate` function, or with `config.golden_set` (the recorded golden set,
   `golden.py`: the mean logprob per token of known-good answers, read once at the start), the new step's
   score must be at least the default step's minus `tolerance`. Passed, the step becomes the default (`name`
   without `@` serves it); refused, it stays addressable as `name@step`, and the trainer goes back to the
   default's weights and optimizer state, so the next step trains from the last promoted weights. Without
   either every step is promoted; with both, `train_online` refuses to start (`check_gate`). The verdict is a
   row with split "online" in metrics.jsonl (`promoted` 1 or 0, the scores, and the golden set's size);
5. the fresh choices are marked trained (outcome "promoted" or "rejected"; "skipped" if the step trained
   nothing, say every sequence was over `train.max_seq_len`): they are never trained on again, whatever
   feedback comes later.

Crash safety: the default step is kept in the run dir (`default_step.json`) and what was trained on in the
traffic store, both written only after a step is judged. A trainer that dies mid-step (or between a step and
its verdict) leaves that step on disk, addressable but never the default; on restart, `online_start`
reloads the default's weights and optimizer state, and the choices of the lost step, still unmarked, are
trained again. Recorded traffic and feedback live in the store, which a crash of the trainer never touches.
One narrow window remains: a crash after a step is promoted and before its choices are marked would train
them once more; nothing is ever lost.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from advantage.config import OnlineConfig
from advantage.online.golden import golden_score, read_golden
from advantage.online.groups import groups_from_traffic
from advantage.online.judging import JudgeCounts, judge_for, judge_traffic
from advantage.online.records import RewardedChoice, rewarded_from_dict
from advantage.rewards.ruler import JudgeUsage, RulerJudge
from advantage.trajectory import TrajectoryGroup
from advantage.wire.ops import MarkTrainedRequest, OnlineStartRequest, OnlineTrafficRequest, PromoteRequest

if TYPE_CHECKING:
    from advantage.model import TrainableModel

Evaluate = Callable[[str], Awaitable[float]]  # a served name (`name@step`) -> a score, higher is better
OnStep = Callable[["OnlineStep"], None]  # called with each step once it is judged
REPLAY_POOL = 2000  # the most recent promoted choices replay picks from


@dataclass
class OnlineStep:
    step: int  # the step trained
    promoted: bool
    score: float | None  # its evaluation score (None without a gate): `evaluate`'s, or the golden score
    default_score: float | None  # the default's score it was compared with
    groups: int  # fresh groups trained on
    replay_groups: int
    choices: int  # fresh choices trained on (marked trained)
    metrics: dict[str, float] = field(default_factory=dict)  # the train step's
    seconds: float = 0.0  # wall time of the step: training, the evaluation, the verdict


@dataclass
class OnlineResult:
    steps: list[OnlineStep] = field(default_factory=list)
    default: int = 0  # the default step when the trainer stopped
    stale: int = 0  # choices never trained on: sampled from weights too old
    stopped: str = ""  # "stop", "max_steps" or "max_seconds"
    zero_variance: int = 0  # distinct groups seen whose rewards all tied (skipped, as in `model.train`)
    judge: JudgeCounts = field(default_factory=JudgeCounts)  # requests the judge scored, failed on, ...
    judge_usage: JudgeUsage | None = None  # the judge's tokens and cost, apart from the policy's
    golden_choices: int = 0  # the golden set the gate scored on (0 without `golden_set`): choices, tokens
    golden_tokens: int = 0

    @property
    def rejected(self) -> list[int]:
        return [s.step for s in self.steps if not s.promoted]


async def train_online(
    model: TrainableModel,
    config: OnlineConfig | None = None,
    *,
    evaluate: Evaluate | None = None,
    stop: asyncio.Event | None = None,
    judge: RulerJudge | None = None,
    on_step: OnStep | None = None,
) -> OnlineResult:
    """Train `model` on its recorded, rated traffic until stopped (see the module docstring). `judge`
    replaces the judge `config.judge_model` names (a custom rubric, say). `on_step` is called with each
    step once it is judged (progress lines, a deadline's estimate of a step's length)."""
    config = config or OnlineConfig()
    if config.max_steps is None and config.max_seconds is None and stop is None:
        raise ValueError(
            "train_online runs until stopped: pass a `stop` event, or set max_steps or max_seconds."
        )
    check_gate(config, evaluate)
    out = OnlineResult()
    gate_info: dict[str, float] = {}
    if config.golden_set:
        golden = await read_golden(model, config)
        out.golden_choices, out.golden_tokens = len(golden.sequences), golden.tokens
        gate_info = {"golden_choices": float(out.golden_choices), "golden_tokens": float(out.golden_tokens)}

        async def evaluate(name: str) -> float:
            return await golden_score(model, golden, name)

    default = (await model.backend.online_start(model.spec, OnlineStartRequest())).default
    default_score = await evaluate(model.get_inference_name(default)) if evaluate is not None else None
    best_score = default_score  # the best promoted score so far (the bar with gate_against="best")
    rng = random.Random(config.seed)
    t0 = time.monotonic()
    out.default = default
    judge = judge or judge_for(config, model)
    out.judge_usage = judge.usage if judge is not None else None
    tied: set[tuple[tuple[str, int], ...]] = set()
    while not (reason := _stop_reason(config, stop, len(out.steps), time.monotonic() - t0)):
        if judge is not None:
            limit = config.max_steps_off_policy
            out.judge.add(
                await judge_traffic(
                    model,
                    judge,
                    min_choices=config.group_size,
                    min_step=0 if limit is None else max(0, default - limit),
                    limit=config.judge_max_groups,
                )
            )
        fresh, stale = await _fresh_traffic(model, default, config)
        if stale:
            await _mark(model, [_key(r) for r in stale], default, "stale")
            out.stale += len(stale)
        formed = groups_from_traffic(fresh, config.group_size)
        tied.update(formed.tied)
        out.zero_variance = len(tied)
        groups = formed.groups[: config.max_groups]
        if len(groups) < config.min_groups:
            await _wait(stop, config.poll_s, t0, config.max_seconds)
            continue
        replay = await _replay(model, config, len(groups), rng) if config.replay_share > 0 else []
        began = time.monotonic()
        step = await _step(
            model, config, groups, replay, default, default_score, evaluate, gate_info, out.stale, best_score
        )
        step.seconds = time.monotonic() - began
        out.steps.append(step)
        if on_step is not None:
            on_step(step)
        if step.promoted:
            default, default_score = step.step, step.score
            if step.score is not None:
                best_score = step.score if best_score is None else max(best_score, step.score)
        out.default = default
    out.stopped = reason
    return out


async def _step(
    model: TrainableModel,
    config: OnlineConfig,
    groups: list[TrajectoryGroup],
    replay: list[TrajectoryGroup],
    default: int,
    default_score: float | None,
    evaluate: Evaluate | None,
    gate_info: dict[str, float],
    stale_total: int,
    best_score: float | None = None,
) -> OnlineStep:
    """Train one step on `groups` (+ `replay`), judge it, and mark the fresh choices. The bar is the
    default's score, or with `gate_against="best"` the best promoted score so far (`best_score`)."""
    trajs = [t for g in groups for t in g.trajectories]
    used = [(str(t.metadata["completion_id"]), int(t.metadata["choice"])) for t in trajs]
    result = await model.train(groups + replay, config.train)
    counts = (len(groups), len(replay), len(used))
    if result.metrics.get("skipped_step"):  # nothing trainable after all (say, all truncated): no new step
        await _mark(model, used, default, "skipped")
        return OnlineStep(result.step, False, None, default_score, *counts, result.metrics)
    score = await evaluate(model.get_inference_name(result.step)) if evaluate is not None else None
    bar = best_score if config.gate_against == "best" and best_score is not None else default_score
    accept = score is None or bar is None or score >= bar - config.tolerance
    staleness = [default - int(t.metadata["step"]) for t in trajs]
    gate = {
        "groups": float(len(groups)),
        "replay_groups": float(len(replay)),
        "choices": float(len(used)),
        "staleness_mean": statistics.mean(staleness),
        "staleness_max": float(max(staleness)),
        "stale_total": float(stale_total),
    }
    if score is not None and default_score is not None:
        gate.update(score=score, default_score=default_score, default_step=float(default), **gate_info)
        if config.gate_against == "best" and bar is not None:
            gate["best_score"] = bar
    await model.backend.promote(model.spec, PromoteRequest(step=result.step, accept=accept, metrics=gate))
    await _mark(model, used, result.step, "promoted" if accept else "rejected")
    return OnlineStep(result.step, accept, score, default_score, *counts, result.metrics)


def check_gate(config: OnlineConfig, evaluate: Evaluate | None) -> None:
    """One promotion gate at most: an `evaluate` function or the golden set, not both."""
    if config.golden_set and evaluate is not None:
        raise ValueError(
            "Two promotion gates: an evaluate function (--eval) and golden_set=True (--golden-set). Pick one: "
            "the step's score is either the function's or the golden set's, never a mix."
        )


def _stop_reason(config: OnlineConfig, stop: asyncio.Event | None, steps: int, elapsed: float) -> str:
    if stop is not None and stop.is_set():
        return "stop"
    if config.max_steps is not None and steps >= config.max_steps:
        return "max_steps"
    if config.max_seconds is not None and elapsed >= config.max_seconds:
        return "max_seconds"
    return ""


async def _mark(model: TrainableModel, keys: list[tuple[str, int]], step: int, outcome: str) -> None:
    req = MarkTrainedRequest.model_validate({"keys": keys, "step": step, "outcome": outcome})
    await model.backend.mark_trained(model.spec, req)


async def _fresh_traffic(
    model: TrainableModel, default: int, config: OnlineConfig
) -> tuple[list[RewardedChoice], list[RewardedChoice]]:
    """The untrained rated choices, split into (fresh enough, stale)."""
    answer = await model.backend.online_traffic(model.spec, OnlineTrafficRequest(kind="untrained"))
    if not answer.recording:
        raise RuntimeError(
            f"{model.name!r} has no recorded traffic: register it with `TrainableModel(..., "
            "record_traffic=True)` (or serve with `advantage serve --record`) so there is something to train on."
        )
    rows = [rewarded_from_dict(d) for d in answer.rows]
    limit = config.max_steps_off_policy
    fresh: list[RewardedChoice] = []
    stale: list[RewardedChoice] = []
    for r in rows:
        age = default - r.completion.step
        (stale if age < 0 or (limit is not None and age > limit) else fresh).append(r)
    return fresh, stale


async def _replay(
    model: TrainableModel, config: OnlineConfig, fresh: int, rng: random.Random
) -> list[TrajectoryGroup]:
    """`replay_share` of the step's groups, drawn from groups already trained in promoted steps."""
    want = math.ceil(config.replay_share * fresh / (1 - config.replay_share))
    req = OnlineTrafficRequest(kind="promoted", limit=REPLAY_POOL)
    rows = [rewarded_from_dict(d) for d in (await model.backend.online_traffic(model.spec, req)).rows]
    pool = [
        g
        for g in groups_from_traffic(rows, config.group_size).groups
        if config.replay_min_reward is None or max(g.rewards()) >= config.replay_min_reward
    ]
    picked = rng.sample(pool, min(want, len(pool)))
    for g in picked:
        for t in g.trajectories:
            t.metadata["replay"] = True
    return picked


async def _wait(stop: asyncio.Event | None, seconds: float, t0: float, max_seconds: float | None) -> None:
    if max_seconds is not None:
        seconds = max(0.0, min(seconds, max_seconds - (time.monotonic() - t0)))
    if stop is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def _key(row: RewardedChoice) -> tuple[str, int]:
    return row.completion.id, row.choice.index


def load_evaluate(spec: str) -> Evaluate:
    """`module:function` (importable from the working directory) -> the async evaluation function."""
    import importlib
    import inspect
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"--eval takes module:function (an async function of the served name), got {spec!r}."
        )
    if "" not in sys.path:
        sys.path.insert(0, "")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if fn is None or not inspect.iscoroutinefunction(fn):
        raise ValueError(f"{spec!r} is not an async function: define `async def {attr}(name: str) -> float`.")
    return fn


async def run_online(
    server: str,
    name: str,
    *,
    api_key: str | None = None,
    project: str = "default",
    base_model: str = "smollm2-135m-instruct",
    config: OnlineConfig | None = None,
    evaluate: Evaluate | None = None,
) -> OnlineResult:
    """`advantage online`: train the model `name` on `advantage serve` at `server` from its recorded traffic
    until interrupted (SIGINT or SIGTERM stop it between steps) or a limit of `config` is reached. The model
    is registered with recording on, so its traffic is recorded from now on if it was not already."""
    import signal

    from advantage.backends.remote import RemoteBackend
    from advantage.model import TrainableModel

    backend = RemoteBackend(server, api_key=api_key)
    model = TrainableModel(name, project=project, base_model=base_model, record_traffic=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await model.register(backend)
        return await train_online(model, config, evaluate=evaluate, stop=stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await backend.close()
