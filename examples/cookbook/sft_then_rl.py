"""Distil, then reinforce: collect a teacher's trajectories on the tool-use task, keep those that pass a
filter, fine-tune the small model on them (SFT), then go on with GRPO.

The teacher is any OpenAI-compatible endpoint (`--teacher-url URL --teacher MODEL`, e.g. a vLLM box or a
hosted API), or a model this backend serves (`--teacher tool-use-001@8`, a trained demo checkpoint), or by
default the student's own base model: keeping only its successful samples is rejection-sampling
fine-tuning, which needs no stronger model at all.

    python -m examples.cookbook.sft_then_rl                      # base model as its own teacher
    python -m examples.cookbook.sft_then_rl --teacher tool-use-001@8 --rl-steps 4
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pydantic import BaseModel, ConfigDict, Field

import advantage as adv
from advantage.tasks.tool_use.env import make_scenarios
from advantage.tasks.tool_use.reward import success
from advantage.tasks.tool_use.rollout import rollout


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("distilled-001", description="Student model name.")
    root: str = Field(".advantage", description="Checkpoint root of the embedded backend.")
    teacher: str | None = Field(None, description="Teacher model name (default: the student's base model).")
    teacher_url: str | None = Field(None, description="OpenAI-compatible URL of the teacher (default: ours).")
    teacher_api_key: str | None = Field(None, description="API key for --teacher-url.")
    collect: int = Field(16, ge=1, description="Train scenarios to collect teacher trajectories on.")
    samples: int = Field(4, ge=1, description="Teacher samples per scenario.")
    temperature: float = Field(0.7, ge=0, le=2, description="Teacher and RL sampling temperature.")
    min_reward: float = Field(1.0, description="Keep a teacher trajectory when its reward is at least this.")
    sft: adv.SFTConfig = Field(default_factory=lambda: adv.SFTConfig(learning_rate=5e-4, epochs=2))
    rl_steps: int = Field(2, ge=0, description="GRPO steps after SFT.")
    rl_groups: int = Field(4, ge=1, description="Scenarios per GRPO step.")
    rl_group_size: int = Field(8, ge=2, description="Rollouts per scenario.")
    rl_learning_rate: float = Field(7e-4, gt=0)
    val_size: int = Field(
        16, ge=0, description="Held-out scenarios for the before/after evaluation (0: none)."
    )


async def held_out(model: adv.TrainableModel, n: int) -> float:
    scenarios = make_scenarios(n, seed=0, split="val")
    groups = await adv.gather_trajectory_groups(
        [[rollout(model, s, temperature=0.0)] for s in scenarios], desc="eval"
    )
    return sum(success(g.trajectories[0]) for g in groups) / n


async def run(r: Recipe) -> dict[str, float]:
    backend = adv.LocalBackend(r.root)
    student = adv.TrainableModel(r.name, project="cookbook")
    await student.register(backend)
    out: dict[str, float] = {}
    try:
        if r.val_size:
            out["val_success_before"] = await held_out(student, r.val_size)
            print(f"held-out success before: {out['val_success_before']:.0%}")

        teacher = adv.Model(
            r.teacher or (student.base_model if r.teacher_url else student.get_inference_name(0)),
            base_url=r.teacher_url or backend.base_url,
            api_key=r.teacher_api_key if r.teacher_url else backend.api_key,
        )
        t0 = time.perf_counter()
        scenarios = make_scenarios(r.collect, seed=7, split="train")
        groups = await adv.gather_trajectory_groups(
            [[rollout(teacher, s, temperature=r.temperature) for _ in range(r.samples)] for s in scenarios],
            max_exceptions=0.25,
            desc=f"teacher {teacher.name}",
        )
        collected = [t for g in groups for t in g.trajectories]
        kept = [t for t in collected if t.reward >= r.min_reward]
        out.update(collected=len(collected), kept=len(kept))
        print(f"kept {len(kept)}/{len(collected)} teacher trajectories ({time.perf_counter() - t0:.0f} s)")

        if kept:
            result = await student.train_sft(kept, r.sft)
            out.update(result.metrics)
            print(
                f"SFT -> {student.get_inference_name()}: loss {result.metrics['sft/loss_first']:.3f} -> {result.metrics['sft/loss_last']:.3f}"
            )
        else:
            print(
                "no teacher trajectory passed the filter: skipping SFT (lower --min-reward or collect more)"
            )

        config = adv.TrainConfig(learning_rate=r.rl_learning_rate)
        for i in range(r.rl_steps):
            scenarios = make_scenarios(r.rl_groups, seed=100 + i, split="train")
            groups = await adv.gather_trajectory_groups(
                [
                    [rollout(student, s, temperature=r.temperature) for _ in range(r.rl_group_size)]
                    for s in scenarios
                ],
                max_exceptions=0.25,
                desc=f"RL step {i + 1}",
            )
            result = await student.train(groups, config)
            print(
                f"RL step {i + 1} -> step {result.step}: reward {result.metrics.get('train/reward', float('nan')):.3f}"
            )

        if r.val_size:
            out["val_success_after"] = await held_out(student, r.val_size)
            print(f"held-out success after: {out['val_success_after']:.0%}")
    finally:
        await backend.close()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in Recipe.model_fields.items():
        if name != "sft":
            ap.add_argument(
                f"--{name.replace('_', '-')}",
                type=type(field.default) if field.default is not None else str,
                default=None,
                help=field.description,
            )
    given = {k: v for k, v in vars(ap.parse_args()).items() if v is not None}
    asyncio.run(run(Recipe(**given)))
