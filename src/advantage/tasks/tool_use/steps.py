"""What one demo step trains on: its scenarios (equal shares of the tools, plus focus groups by failure
rate), their rollouts (seeded; with dynamic sampling, more rounds until enough groups carry signal), and the
step's `TrainConfig`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import advantage as adv

from .config import DemoConfig
from .env import TOOL_NAMES, Scenario, equal_mix, make_scenarios
from .rollout import rollout

# Rollouts gathered at once, and the engine's rows to decode them together (LocalBackend(max_batch_size=)):
# all of a step's 12 x 4, where gather's and the engine's default of 32 left 16 to start as others finished
# and run their two turns at the end, in small batches. 1.08x on a step's rollouts
# (`benchmarks/rollout_gen.py --compare batch --groups 12`, BENCHMARKS.md).
ROLLOUTS_IN_FLIGHT = 64
# The engine's torch threads when the next step's rollouts gather while a step trains (DemoConfig.overlap):
# decoding a few dozen rows gains little from a second core (1.08x), the update ~1.4x, and the two on
# threads of their own took 60-63 s where one after the other took 84-88 s (BENCHMARKS.md).
ENGINE_THREADS = 1


def train_config(
    cfg: DemoConfig, lr: float, groups: list[adv.TrajectoryGroup] | None = None
) -> adv.TrainConfig:
    """The step's `TrainConfig`. With dynamic sampling the mean is over the informative groups, and the rate
    is scaled by the share of the wanted informative groups that were found (`groups`: the step's)."""
    schedule = adv.LRSchedule(
        kind=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps,
        total_steps=max(cfg.steps, cfg.warmup_steps + 1),
        min_lr_ratio=cfg.min_lr_ratio,
    )
    dynamic = cfg.min_informative_groups > 0
    if dynamic and groups is not None:
        lr *= min(1.0, sum(adv.is_informative(g) for g in groups) / cfg.min_informative_groups)
    return adv.TrainConfig(
        learning_rate=lr,
        schedule=schedule,
        micro_batch_size=cfg.micro_batch_size,
        agg=cfg.agg,
        lr_by_signal=cfg.lr_by_signal and not dynamic,
        tied_groups_in_mean=not dynamic,
        tree_advantages=cfg.tree_advantages,
        tree_baseline=cfg.tree_baseline,
    )


def step_scenarios(cfg: DemoConfig, step: int, mix: adv.TaskMix | None = None) -> list[Scenario]:
    """The scenarios of step `step + 1`, seeded by `cfg.seed` and the step: `groups_per_step` in equal
    shares of the tools, `focus_groups` more shared by `mix` (equal shares without one), then with dynamic
    sampling the scenarios of its later rounds."""
    step_key = cfg.seed * 100_003 + step
    first = cfg.first_round
    counts = None
    if cfg.focus_groups:
        equal = equal_mix(cfg.groups_per_step)
        focus = (mix or adv.TaskMix(TOOL_NAMES)).counts(cfg.focus_groups)
        counts = {t: equal[t] + focus[t] for t in TOOL_NAMES}
    scenarios = make_scenarios(first, seed=step_key, split="train", mix=counts)
    if cfg.min_informative_groups:  # dynamic sampling's later rounds: other scenarios of the split
        scenarios += make_scenarios(cfg.max_groups_per_step - first, seed=-1 - step_key, split="train")
    return scenarios


async def step_rollouts(
    model: adv.TrainableModel,
    cfg: DemoConfig,
    step: int,
    after_each: Callable[[adv.TrajectoryGroup], Awaitable[adv.TrajectoryGroup | None]] | None,
    mix: adv.TaskMix | None = None,
) -> list[adv.TrajectoryGroup]:
    """The rollouts that train step `step + 1`: `group_size` of each of `step_scenarios`' first
    `groups_per_step + focus_groups`, and with dynamic sampling more until enough groups carry signal.
    The sampling is seeded too, so a rerun with the same results draws the same rollouts."""
    scenarios = step_scenarios(cfg, step, mix)
    first = cfg.first_round
    step_seed = (cfg.seed * 1_000_003 + step) * 1_000

    def group(k: int) -> list[Awaitable[adv.Trajectory]]:
        return [
            rollout(
                model,
                scenarios[k],
                temperature=cfg.temperature,
                force_first_call=cfg.force_first_call,
                seed=step_seed + 10 * (k * cfg.group_size + j),
            )
            for j in range(cfg.group_size)
        ]

    desc = f"step {step + 1} rollouts"
    if cfg.min_informative_groups:
        return await adv.gather_informative_groups(
            group,
            min_informative=cfg.min_informative_groups,
            max_groups=cfg.max_groups_per_step,
            first_round=first,
            max_exceptions=0.25,
            after_each=after_each,
            desc=desc,
        )
    return await adv.gather_trajectory_groups(
        [group(k) for k in range(first)],
        max_exceptions=0.25,
        after_each=after_each,
        desc=desc,
        concurrency=ROLLOUTS_IN_FLIGHT,
    )


def tool_results(groups: list[adv.TrajectoryGroup]) -> dict[str, list[float]]:
    """Each tool's rollouts' success in a step's groups, for `TaskMix.update`."""
    out: dict[str, list[float]] = {}
    for t in (t for g in groups for t in g.trajectories):
        out.setdefault(t.metadata["scenario"]["tool"], []).append(t.metrics["success"])
    return out
