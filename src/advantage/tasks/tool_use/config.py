"""The demo's settings: one pydantic model, whose fields are `advantage demo`'s options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from advantage.config import Agg, ScheduleKind, TreeBaseline


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "tool-use-001", description="Model name (checkpoints go under <root>/demo/models/<name>)."
    )
    root: Path = Field(Path(".advantage"), description="Checkpoint and run root.")
    base_model: str = Field("smollm2-135m-instruct", description="Bundled model name or HF model dir.")
    steps: int = Field(
        12,
        ge=0,
        description="Training steps (each 40-90 s on a 2-core Xeon, 60-100 s on Zen 4, 1.5-4 min on Zen 3).",
    )
    groups_per_step: int = Field(
        8,
        ge=1,
        description="Scenarios per step. 8 x 4 rather than 4 x 8 (the same 32 rollouts): twice the questions "
        "per step is what generalizes to the held-out ones, and a group whose 4 rollouts all succeed is "
        "skipped, so the update shrinks as the policy learns.",
    )
    group_size: int = Field(4, ge=2, description="Rollouts per scenario.")
    focus_groups: int = Field(
        4,
        ge=0,
        description="Scenarios per step beyond groups_per_step, shared among the tools by their running "
        "failure rate in the training rollouts (`advantage.TaskMix`); groups_per_step stay in equal shares. "
        "With 4, seed 1 went 66 -> 97 % and seed 4 72 -> 81 % held-out (94 % and 72 % without), for about "
        "a third more time per step. Re-weighting the groups_per_step themselves instead starved the tools "
        "already solved: on seed 1, steps with 6 conversion groups of 8 sent weather questions to the "
        "convert_* tools (train success on weather 1.0 -> 0.0 in four steps).",
    )
    min_informative_groups: int = Field(
        0,
        ge=0,
        description="Dynamic sampling (DAPO; 0: off): after the step's groups_per_step scenarios, gather more "
        "until this many groups carry signal (rewards not all equal), up to max_groups_per_step. The step then "
        "averages over its informative groups only, at the learning rate times the share of them found.",
    )
    max_groups_per_step: int = Field(
        16, ge=1, description="With min_informative_groups: the most scenarios one step gathers."
    )
    overlap: bool = Field(
        False,
        description="Gather the next step's rollouts while this step trains (the engine on one torch thread, "
        "the trainer on the rest), so each step trains on rollouts sampled mostly by the weights one update "
        "behind (policy_lag_mean ~1). A step took ~60 s instead of ~80, but on this task it learnt worse: "
        "seed 0 went 62 -> 69 % held-out in 16.8 min, where on-policy runs of it reached 91-100 % "
        "(BENCHMARKS.md). Off: every step gathers, then trains on its own rollouts.",
    )
    val_size: int = Field(32, ge=1, description="Held-out scenarios for the baseline and final evaluation.")
    dev_size: int = Field(
        16,
        ge=1,
        description="Other held-out scenarios, evaluated every eval_every steps: the run ends on its last "
        "step, or on the best by them if the last is more than 15 points below it and the drop is significant "
        "in a paired sign test on the same questions (p < 0.05: on 16, at least 5 lost and none gained). "
        "Without the test, seed 3 read 94 % at step 6 and 75 % at step 12 and ended on step 6 (84 % held-out), "
        "where step 12 scored 100 %.",
    )
    eval_every: int = Field(
        3,
        ge=0,
        description="Evaluate on the dev scenarios every N steps (0: never; the run ends on its last step).",
    )
    learning_rate: float = Field(1.5e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    lr_schedule: ScheduleKind = Field(
        "cosine", description="Decay after warm-up, down to min_lr_ratio of the peak at the last step."
    )
    min_lr_ratio: float = Field(
        0.25, ge=0, le=1, description="Where the decay ends, as a fraction of the peak."
    )
    warmup_steps: int = Field(
        2, ge=0, description="Steps of linear warm-up (Adam's first steps move every LoRA weight by ~lr)."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward; bounds memory.")
    tree_advantages: bool = Field(
        True,
        description="Credit per token where a group's rollouts share a start (TrainConfig.tree_advantages). "
        "Without it, one rollout that called get_weather for a calendar question pushed down `get` for "
        "both get_* tools: the next step sent weather and calendar questions to the convert_* tools.",
    )
    tree_baseline: TreeBaseline = Field(
        "group",
        description="With tree_advantages, credit a token against the group's mean or the node's "
        "(TrainConfig.tree_baseline).",
    )
    lr_by_signal: bool = Field(
        True,
        description="Scale each step's learning rate by the fraction of its groups that were not tied "
        "(TrainConfig.lr_by_signal). Once most questions are solved a step trains on 2-3 groups, and a "
        "full-size AdamW step on them undid what was learnt: train success 0.91 -> 0.34 in one step.",
    )
    agg: Agg = Field(
        "seq_mean",
        description="Loss aggregation. Per sequence here: a failed episode that rambles until max_tokens "
        "has three times the tokens of a good one, and with token_mean its push on each sampled token "
        "(down, flattening the distribution) outweighs the good ones; the policy's entropy then climbs "
        "and it collapses.",
    )
    guard: bool = Field(
        False,
        description="Roll back to the best step and halve the learning rate when two dev evaluations in a "
        "row fall 15 points below the best. Off by default: this task's reward dips after its first "
        "updates before it climbs, and a guard on 16 dev questions mistakes that dip for a collapse.",
    )
    stop_at: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Stop early once stop_after dev evaluations in a row reach this success rate.",
    )
    stop_after: int = Field(
        2,
        ge=1,
        description="Dev evaluations in a row at stop_at before stopping early. Two, not one: 16 dev "
        "questions all right once is weak evidence (a run stopped on it at step 6 scored 84% held-out).",
    )
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
    seed: int = Field(0, description="Seed of the scenarios and of the rollouts' sampling.")
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

    @property
    def first_round(self) -> int:
        """Scenarios every step gathers (dynamic sampling may add more)."""
        return self.groups_per_step + self.focus_groups

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        first = self.first_round
        if self.min_informative_groups and self.max_groups_per_step < max(first, self.min_informative_groups):
            raise ValueError(
                f"max_groups_per_step ({self.max_groups_per_step}) must be at least groups_per_step + "
                f"focus_groups ({first}) and min_informative_groups ({self.min_informative_groups})"
            )
        return self
