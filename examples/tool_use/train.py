"""Train the bundled SmolLM2-135M on the tool-use task with GRPO, on CPU. This is `advantage demo`.

It prints a held-out baseline, the reward step by step, and a final held-out evaluation, and leaves a run
dir with checkpoints, metrics.jsonl and trajectories. Only the public API is used.

    python -m examples.tool_use.train --steps 20        # or: advantage demo --steps 20
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import advantage as adv

from .env import make_scenarios
from .reward import success
from .rollout import rollout


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "tool-use-001", description="Model name (checkpoints go under <root>/demo/models/<name>)."
    )
    root: Path = Field(Path(".advantage"), description="Checkpoint and run root.")
    base_model: str = Field("smollm2-135m-instruct", description="Bundled model name or HF model dir.")
    steps: int = Field(12, ge=0, description="Training steps (about 80 s each on 2 CPU cores).")
    groups_per_step: int = Field(4, ge=1, description="Scenarios per step.")
    group_size: int = Field(8, ge=2, description="Rollouts per scenario.")
    val_size: int = Field(32, ge=1, description="Held-out scenarios for the baseline and final evaluation.")
    eval_every: int = Field(
        0, ge=0, description="Evaluate on the held-out split every N steps (0: only at the ends)."
    )
    learning_rate: float = Field(1.5e-3, gt=0, description="AdamW learning rate.")
    force_first_call: bool = Field(
        True,
        description="Send the first turn with tool_choice='required' (a grammar forces a well-formed call).",
    )
    temperature: float = Field(
        0.7,
        ge=0,
        le=2,
        description="Sampling temperature of training rollouts (the 135M model falls apart at 1.0).",
    )
    seed: int = Field(0, description="Scenario seed.")
    backend: str | None = Field(
        None, description="URL of `advantage serve` to train on (key: ADVANTAGE_API_KEY); default: embedded."
    )
    reward: Literal["programmatic", "ruler"] = Field(
        "programmatic", description="Train on the task's reward, or on RULER's relative judge scores."
    )
    judge_model: str | None = Field(
        None, description="RULER's judge (default: the base model, on the backend)."
    )
    judge_url: str | None = Field(
        None, description="OpenAI-compatible URL of the judge (key: OPENAI_API_KEY); default: the backend."
    )


def _rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 2**20
    except (OSError, StopIteration):
        return float("nan")


async def evaluate(model: adv.TrainableModel, scenarios: list, desc: str, force: bool) -> tuple[float, float]:
    """Greedy held-out evaluation: (success rate, mean reward), logged as the `val` split."""
    groups = await adv.gather_trajectory_groups(
        [[rollout(model, s, temperature=0.0, force_first_call=force)] for s in scenarios],
        max_exceptions=len(scenarios),
        desc=desc,
    )
    trajs = [t for g in groups for t in g.trajectories]
    await model.log(groups, split="val")
    rate = sum(success(t) for t in trajs) / len(scenarios)
    return rate, sum(t.reward for t in trajs) / max(len(trajs), 1)


async def run(cfg: DemoConfig) -> dict[str, float]:
    start = time.perf_counter()
    backend: adv.Backend = adv.RemoteBackend(cfg.backend) if cfg.backend else adv.LocalBackend(cfg.root)
    model = adv.TrainableModel(cfg.name, project="demo", base_model=cfg.base_model)
    await model.register(backend)
    first_step = await model.get_step()
    val = make_scenarios(cfg.val_size, seed=cfg.seed, split="val")
    train_config = adv.TrainConfig(learning_rate=cfg.learning_rate)
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

    base_rate, base_reward = await evaluate(model, val, "baseline eval", cfg.force_first_call)
    print(f"baseline held-out success {base_rate:.0%}  reward {base_reward:.3f}")

    for i in range(cfg.steps):
        scenarios = make_scenarios(
            cfg.groups_per_step, seed=cfg.seed * 100_003 + first_step + i, split="train"
        )
        t0 = time.perf_counter()
        groups = await adv.gather_trajectory_groups(
            [
                [
                    rollout(model, s, temperature=cfg.temperature, force_first_call=cfg.force_first_call)
                    for _ in range(cfg.group_size)
                ]
                for s in scenarios
            ],
            max_exceptions=0.25,
            after_each=after_each,
            desc=f"step {first_step + i + 1} rollouts",
        )
        t_gen = time.perf_counter() - t0
        result = await model.train(groups, config=train_config)
        m = result.metrics
        print(
            f"step {result.step:3d}  reward {m.get('train/reward', float('nan')):.3f}  "
            + (
                f"(task {m.get('train/independent_reward', float('nan')):.3f})  "
                if cfg.reward == "ruler"
                else ""
            )
            + f"success {m.get('train/success', float('nan')):.2f}  "
            f"zero-var groups {m.get('frac_zero_variance_groups', 0):.2f}  "
            f"drift {m.get('logprob_drift_mean_abs', float('nan')):.3f}  "
            f"gen {t_gen:.0f}s  train {m.get('seconds', 0):.0f}s  elapsed {time.perf_counter() - start:.0f}s  "
            f"rss {_rss_gib():.1f} GiB"
        )
        if cfg.eval_every and (i + 1) % cfg.eval_every == 0 and i + 1 < cfg.steps:
            rate, reward = await evaluate(model, val, f"eval step {result.step}", cfg.force_first_call)
            print(f"  held-out success {rate:.0%}  reward {reward:.3f}")

    final_rate, final_reward = await evaluate(model, val, "final eval", cfg.force_first_call)
    elapsed = time.perf_counter() - start
    print(
        f"held-out success {base_rate:.0%} -> {final_rate:.0%}, reward {base_reward:.3f} -> {final_reward:.3f} "
        f"in {elapsed / 60:.1f} min (step {await model.get_step()})"
    )
    await backend.close()
    return {"baseline_success": base_rate, "final_success": final_rate, "baseline_reward": base_reward,
            "final_reward": final_reward, "seconds": elapsed}  # fmt: skip


def main(cfg: DemoConfig | None = None) -> dict[str, float]:
    return asyncio.run(run(cfg or DemoConfig()))


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    overrides = {args[i].lstrip("-").replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    main(DemoConfig(**overrides))
