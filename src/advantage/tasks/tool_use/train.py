"""Train the bundled SmolLM2-135M on the tool-use task with GRPO, on CPU. This is `advantage demo`.

It prints a held-out baseline, the reward step by step, and a final held-out evaluation, and leaves a run
dir with checkpoints, metrics.jsonl and trajectories. Only the public API is used.

    python -m advantage.tasks.tool_use.train --steps 20        # or: advantage demo --steps 20
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Literal

import advantage as adv

from .config import DemoConfig
from .env import TOOL_NAMES
from .evaluation import Evaluation, evaluate, held_out
from .steps import ENGINE_THREADS, ROLLOUTS_IN_FLIGHT, step_rollouts, tool_results, train_config

__all__ = ["DemoConfig", "main", "run"]


def _rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 2**20
    except (OSError, StopIteration):
        return float("nan")


def step_line(
    cfg: DemoConfig,
    result: adv.TrainResult,
    groups: list[adv.TrajectoryGroup],
    t_gen: float,
    elapsed: float,
    warnings: list[str],
) -> str:
    """The progress line of one trained step."""
    m = result.metrics
    nan = float("nan")
    parts = [f"step {result.step:3d}  reward {m.get('train/reward', nan):.3f}  "]
    if cfg.reward == "ruler":
        parts.append(f"(task {m.get('train/independent_reward', nan):.3f})  ")
    parts.append(f"success {m.get('train/success', nan):.2f}  ")
    if cfg.min_informative_groups:
        parts.append(f"groups {len(groups)} ({sum(adv.is_informative(g) for g in groups)} informative)  ")
    if cfg.focus_groups:  # the tools' shares of this step's scenarios
        shares = {k.split("_", 1)[1]: len(v) // cfg.group_size for k, v in tool_results(groups).items()}
        parts.append("mix " + " ".join(f"{k}:{shares[k]}" for k in sorted(shares)) + "  ")
    if m.get("skipped_step"):
        parts.append(f"not trained: all {len(groups)} groups tied (the step stays)  ")
    else:
        parts.append(
            f"entropy {m.get('entropy', nan):.2f}  drift {m.get('logprob_drift_mean_abs', nan):.3f}  "
            f"lr {m.get('lr', nan):.1e}  "
        )
        if cfg.overlap:  # how many updates behind the sampling weights were (tracking.policy_lag)
            parts.append(f"lag {m.get('policy_lag_mean', nan):.1f}  ")
    parts.append(
        f"gen {t_gen:.0f}s  train {m.get('seconds', 0):.0f}s  elapsed {elapsed:.0f}s  rss {_rss_gib():.1f} GiB"
    )
    if warnings:
        parts.append(f"  WARNING: {'; '.join(warnings)}")
    return "".join(parts)


async def run(cfg: DemoConfig) -> dict[str, float]:
    """The demo: baseline, `cfg.steps` GRPO steps, the best step by dev success, the held-out result.

    An evaluation runs alongside the next step's rollouts: both use the same weights, so the engine decodes
    them in one batch, and the evaluation's latency (a few long greedy episodes decoding alone at the end)
    hides behind the rollouts instead of adding to the step. The verdict is read before that step trains:
    a stop or a roll-back drops the rollouts, which came from the weights it judged. The base weights'
    evaluations (the baseline and step 0's dev) run beside the first update instead, on `name@0`: the engine
    sits idle then otherwise, and decodes on fewer threads while the trainer runs (the first step's work
    1.03-1.07x faster, `benchmarks/base_evals.py`). Later dev evaluations stay beside rollouts: 16 greedy
    episodes beside an update added more to it than beside rollouts.

    With `cfg.overlap` the next step's rollouts gather while this step trains (the engine on one thread, the
    trainer on the rest), so each step trains on rollouts one step behind; a stop or a roll-back drops
    those in flight too."""
    start = time.perf_counter()
    backend: adv.Backend = (
        adv.RemoteBackend(cfg.backend)
        if cfg.backend
        else adv.LocalBackend(
            cfg.root, max_batch_size=ROLLOUTS_IN_FLIGHT, threads=ENGINE_THREADS if cfg.overlap else None
        )
    )
    model = adv.TrainableModel(cfg.name, project="demo", base_model=cfg.base_model)
    await model.register(backend)
    first_step = await model.get_step()
    val, dev = held_out(cfg.seed, cfg.val_size, cfg.dev_size)
    lr = cfg.learning_rate
    where = cfg.backend or cfg.root / "demo" / "models" / cfg.name
    print(f"model {model.name} at step {first_step}; runs in {where}")
    after_each = None
    if cfg.reward == "ruler":
        judge = adv.RulerJudge(
            cfg.judge_model or cfg.base_model,
            base_url=cfg.judge_url or backend.base_url,
            api_key=None if cfg.judge_url else backend.api_key,
        )
        print(f"reward: RULER, judge {judge.model} at {judge.base_url}")

        async def after_each(g: adv.TrajectoryGroup) -> adv.TrajectoryGroup | None:
            return await adv.ruler_score_group(g, judge=judge, swallow_exceptions=True)

    force = cfg.force_first_call
    guard = adv.CollapseGuard(tolerance=0.15, patience=2)
    dev_scores: dict[int, float] = {}  # dev success of the steps evaluated
    baseline: asyncio.Future[Evaluation] | None = None
    dev_eval: asyncio.Future[Evaluation] | None = None
    dev_step = first_step
    base_rate = base_reward = float("nan")

    def evaluate_base() -> None:
        """Start the base weights' evaluations: the held-out baseline, and dev success at step 0."""
        nonlocal baseline, dev_eval
        baseline = asyncio.ensure_future(evaluate(model, val, "baseline eval", force, step=first_step))
        if cfg.eval_every:
            dev_eval = asyncio.ensure_future(evaluate(model, dev, "dev eval", force, "dev", step=first_step))

    async def read_baseline() -> None:
        nonlocal base_rate, base_reward
        if math.isnan(base_rate) and baseline is not None:
            base_rate, base_reward, _ = await baseline
            print(f"baseline held-out success {base_rate:.0%}  reward {base_reward:.3f}")

    history: list[dict[str, float]] = []
    mix = adv.TaskMix(TOOL_NAMES) if cfg.focus_groups else None
    at_target = 0  # dev evaluations in a row at stop_at
    upcoming: asyncio.Future[list[adv.TrajectoryGroup]] | None = None  # the next step's rollouts (overlap)

    async def verdict() -> Literal["stop", "rollback"] | None:
        """Read the last dev evaluation, if one is due: stop early, roll back (dropping the rollouts in
        flight, which came from the weights rolled back from), or go on."""
        nonlocal dev_eval, at_target, lr, upcoming
        if dev_eval is None:
            return None
        rate, _, outcomes = await dev_eval
        dev_eval = None
        dev_scores[dev_step] = rate
        action = guard.update(dev_step, rate, outcomes)
        print(
            f"  dev success {rate:.0%} (step {dev_step}; best {guard.best_score:.0%} at step {guard.best_step})"
        )
        at_target = at_target + 1 if rate >= cfg.stop_at and dev_step != first_step else 0
        if at_target >= cfg.stop_after:
            print(f"  dev success at {cfg.stop_at:.0%} {at_target} times in a row: stopping early")
            return "stop"
        if action == "rollback" and cfg.guard:
            await _dropped(upcoming)
            upcoming = None
            lr *= guard.lr_factor
            step = await model.restore(guard.best_step, metric="dev/success")
            print(
                f"  rolled back to step {guard.best_step} (now step {step}); learning rate x{guard.lr_factor}; "
                "the rollouts of the weights rolled back from are dropped"
            )
            return "rollback"
        if action == "stop" and cfg.guard:
            print("  dev success fell again after the last roll-back: stopping")
            return "stop"
        return None

    try:
        for i in range(cfg.steps):
            t0 = time.perf_counter()
            groups = await (upcoming or step_rollouts(model, cfg, first_step + i, after_each, mix))
            upcoming = None
            t_gen = time.perf_counter() - t0
            if mix:
                mix.update(tool_results(groups))
            if cfg.overlap and i + 1 < cfg.steps:  # gathers while this step trains
                upcoming = asyncio.ensure_future(
                    step_rollouts(model, cfg, first_step + i + 1, after_each, mix)
                )
            if baseline is None:
                evaluate_base()  # beside this first update
            # Without overlap, the evaluation of the weights these rollouts came from is read before they
            # train (step 0's, beside this update, before the next); with overlap, after (it ran beside the
            # update; the trainer does not wait for it).
            elif not cfg.overlap and (action := await verdict()):
                if action == "stop":
                    break
                continue
            result = await model.train(groups, config=train_config(cfg, lr, groups))
            warnings = adv.health_warnings(result.metrics, history)
            history.append(result.metrics)
            print(step_line(cfg, result, groups, t_gen, time.perf_counter() - start, warnings))
            await read_baseline()
            if cfg.overlap and (action := await verdict()):
                if action == "stop":
                    break
                continue
            if cfg.eval_every and (i + 1) % cfg.eval_every == 0 and i + 1 < cfg.steps:
                dev_step = result.step
                dev_eval = asyncio.ensure_future(
                    evaluate(model, dev, f"dev eval step {dev_step}", force, "dev", step=dev_step)
                )
        await _dropped(upcoming)  # a stop left the next step's rollouts in flight
        upcoming = None
        if baseline is None:  # steps=0
            evaluate_base()
        await read_baseline()
        if dev_eval is not None:  # no step came after it (steps=0, or a roll-back at the end)
            rate, _, outcomes = await dev_eval
            dev_eval = None
            dev_scores[dev_step] = rate
            guard.update(dev_step, rate, outcomes)

        best_note = ""
        last = await model.get_step()
        final: asyncio.Future[Evaluation] = asyncio.ensure_future(
            evaluate(model, val, "final eval", force, step=last)
        )  # of the last step, which is usually the best: alongside its dev evaluation
        if cfg.eval_every:  # the last step, or the best by dev success if the last fell far and surely
            if last not in dev_scores:
                dev_scores[last], _, outcomes = await evaluate(
                    model, dev, "dev eval (last step)", force, "dev", step=last
                )
                guard.update(last, dev_scores[last], outcomes)
            end = guard.end_step(last, dev_scores[last])
            drop = f"dev success {dev_scores[last]:.0%} against the best, {guard.best_score:.0%} at step {guard.best_step}"
            p = guard.drop_p(last)
            sign_test = "" if p is None else f"; a paired sign test gives p = {p:.2g} against {guard.alpha:g}"
            if end != last:
                await final  # held-out success of the last step, logged; the best one is evaluated below
                restored = await model.restore(end, metric="dev/success")
                best_note = f", rolled back to step {end}: {drop}, more than {guard.tolerance:.0%} below it{sign_test}"
                final = asyncio.ensure_future(evaluate(model, val, "final eval", force, step=restored))
            elif guard.best_step == last:
                best_note = f", the best by dev success {guard.best_score:.0%}"
            elif dev_scores[last] >= guard.best_score - guard.tolerance:
                best_note = f", the last step: {drop}, within {guard.tolerance:.0%} of it"
            else:
                best_note = f", the last step: {drop}, more than {guard.tolerance:.0%} below it but not a significant drop{sign_test}"
        final_rate, final_reward, _ = await final
    finally:
        await _dropped(upcoming)  # an error left them in flight
        for task in (baseline, dev_eval):
            if task is not None and not task.done():
                task.cancel()
    elapsed = time.perf_counter() - start
    served = await model.get_step()
    print(
        f"held-out success {base_rate:.0%} -> {final_rate:.0%}, reward {base_reward:.3f} -> {final_reward:.3f} "
        f"in {elapsed / 60:.1f} min (serving step {served}{best_note})"
    )
    await backend.close()
    return {"baseline_success": base_rate, "final_success": final_rate, "baseline_reward": base_reward,
            "final_reward": final_reward, "seconds": elapsed, "best_step": float(guard.best_step),
            "served_step": float(served)}  # fmt: skip


async def _dropped(task: asyncio.Future[list[adv.TrajectoryGroup]] | None) -> None:
    """Cancel a step's rollouts in flight and wait until they are gone (their requests leave the engine)."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main(cfg: DemoConfig | None = None) -> dict[str, float]:
    return asyncio.run(run(cfg or DemoConfig()))


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    overrides = {args[i].lstrip("-").replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    main(DemoConfig(**overrides))
