"""Typed configs. Each field is documented once, here; unknown keys raise; cross-field rules are checked
when the config is built. Defaults finish on a laptop CPU in minutes with the bundled 135M model."""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

# An AdamW beta: 1 would freeze the moment estimate for good (and make the bias correction divide by 0).
Beta = Annotated[float, Field(ge=0, lt=1)]

# The names of the built-in losses: the keys of `advantage.training.losses.LOSSES`, declared here so that a
# config names a loss without importing torch. The policy losses train on rewards (`model.train`); the
# low-level API also has "cross_entropy" (SFT), "dpo" (preference pairs) and "distill_topk" (soft targets).
PolicyLoss = Literal["cispo", "ppo", "grpo", "gspo", "importance_sampling"]
LossName = Literal[PolicyLoss, "cross_entropy", "dpo", "distill_topk"]
Agg = Literal["token_mean", "seq_mean", "dr_grpo"]
ScheduleKind = Literal["constant", "linear", "cosine"]
TreeBaseline = Literal["group", "node"]

# Old names of AdamParams fields, kept for one release (see README, "Deprecated names").
_OLD_ADAM_NAMES = {"lr": "learning_rate", "grad_clip": "max_grad_norm"}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdamParams(_Config):
    """The AdamW knobs of one optimizer step (`TrainingClient.optim_step`); `TrainConfig` and `SFTConfig`
    take the same fields. `lr` and `grad_clip` are deprecated names of `learning_rate` and `max_grad_norm`."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    learning_rate: float = Field(
        1e-4,
        gt=0,
        le=1,
        validation_alias=AliasChoices("learning_rate", "lr"),
        description="AdamW learning rate for the LoRA weights.",
    )
    betas: tuple[Beta, Beta] = Field((0.9, 0.99), description="AdamW betas, each in [0, 1).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        1.0,
        gt=0,
        validation_alias=AliasChoices("max_grad_norm", "grad_clip"),
        description="Clip the gradient's global norm to this.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("validate_by_alias"):
            for old in _OLD_ADAM_NAMES.keys() & data.keys():
                _deprecated(f"AdamParams({old}=...)", f"AdamParams({_OLD_ADAM_NAMES[old]}=...)")
        return data

    @property
    def lr(self) -> float:
        _deprecated("AdamParams.lr", "AdamParams.learning_rate")
        return self.learning_rate

    @property
    def grad_clip(self) -> float:
        _deprecated("AdamParams.grad_clip", "AdamParams.max_grad_norm")
        return self.max_grad_norm


class LossConfig(_Config):
    """The knobs of the built-in losses (`advantage.training.losses`); `TrainConfig` takes the same fields."""

    eps: float = Field(0.2, ge=0, lt=1, description="PPO/GSPO lower clip range: ρ is clipped at 1 − eps.")
    eps_high: float = Field(
        0.28,
        ge=0,
        le=10,
        description="PPO/GSPO upper clip range: ρ is clipped at 1 + eps_high (clip-higher).",
    )
    cispo_eps_max: float = Field(
        4.0, gt=0, le=100, description="CISPO: cap on the importance weight, sg(clip(ρ, 0, cispo_eps_max))."
    )
    agg: Agg = Field(
        "token_mean", description="Loss aggregation: DAPO token mean, GRPO per-sequence mean, or Dr. GRPO."
    )
    kl_beta: float = Field(
        0.0, ge=0, le=10, description="Weight of the k3 KL to the base model; 0 turns it off."
    )
    max_len: int | None = Field(
        None, ge=1, description="Dr. GRPO's L_max in Σℓ / (B·L_max); None: the batch's longest sequence."
    )
    dpo_beta: float = Field(0.1, gt=0, le=100, description="DPO's β (the low-level API's \"dpo\" loss only).")


class LoRAConfig(_Config):
    r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, le=1024, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters; 'all-linear' means every projection."
    )


class LRSchedule(_Config):
    """The learning rate over steps: warm-up, then constant or a decay (`training/schedules.py`)."""

    kind: ScheduleKind = Field(
        "constant", description="After warm-up: keep the rate, or decay it linearly or along a cosine."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up from lr/(warmup_steps+1) to lr.")
    total_steps: int | None = Field(
        None, ge=1, description="Step at which the decay reaches min_lr_ratio * lr (needed to decay)."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Where the decay ends, as a fraction of lr.")

    @model_validator(mode="after")
    def _check(self) -> LRSchedule:
        if self.kind != "constant" and self.total_steps is None:
            raise ValueError(f"A {self.kind!r} schedule decays until total_steps: set total_steps.")
        if self.total_steps is not None and self.total_steps <= self.warmup_steps and self.kind != "constant":
            raise ValueError("total_steps must be larger than warmup_steps, or there is nothing to decay.")
        return self


class _SequenceLimits(_Config):
    """What both RL and SFT steps bound: memory per forward/backward, and sequence length."""

    micro_batch_size: int = Field(
        8, ge=1, le=256, description="Sequences per forward/backward; bounds memory."
    )
    max_seq_len: int = Field(
        2048, ge=16, le=131072, description="Longest trajectory, in tokens, that is trained on."
    )
    on_overflow: Literal["error", "truncate"] = Field(
        "error", description="A trajectory over max_seq_len raises, or is cut (counted in metrics)."
    )


class TrainConfig(LossConfig, _SequenceLimits, AdamParams):
    """One GRPO step (`model.train`): the AdamW knobs (`AdamParams`), the loss's (`LossConfig`), and these."""

    model_config = ConfigDict(validate_by_alias=False)  # AdamParams' deprecated names are not taken here

    loss: PolicyLoss = Field("cispo", description="Policy loss (see advantage.training.losses).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the group's std, the batch's std, or not at all (Dr. GRPO).",
    )
    schedule: LRSchedule = Field(
        default_factory=LRSchedule,
        description="Learning rate by step (the step trained from), e.g. warm-up then cosine decay.",
    )
    tied_groups_in_mean: bool = Field(
        True,
        description="Groups whose rewards are all equal (advantage 0, gradient 0) are skipped to save time "
        "but still count in the loss's mean, so the step is the one the whole batch gives: a step where "
        "most groups tied is proportionally smaller (GRPO's objective, as TRL computes it). False: the mean "
        "is over the trained groups only, so every step is as large as one where every group carried signal.",
    )
    tree_advantages: bool = Field(
        False,
        description="Credit per token where a group's completions share a start: each token gets the mean "
        "advantage of the rollouts that wrote the same tokens up to it (advantages.prefix_tree_advantages), "
        "so a token every rollout wrote (a tool name's first piece) is not pushed down with the failures.",
    )
    tree_baseline: TreeBaseline = Field(
        "group",
        description="With tree_advantages, what a token's mean is compared with: the group's (0: every "
        "token after a rollout parted from the others carries its branch's advantage), or the node's, the "
        "rollouts that reached the token's context, so only tokens chosen differently from one context are "
        "credited and a rollout running on alone after a fatal choice is not pushed down further.",
    )
    lr_by_signal: bool = Field(
        False,
        description="Multiply the step's learning rate by the fraction of the batch's sequences that carry "
        "signal (not in tied groups). AdamW divides a gradient's scale away, so counting tied groups in the "
        "mean alone does not make such a step smaller; this does. Once most groups are solved, a step "
        "trains on a few groups, and a full-size AdamW step on so little evidence can undo what was learnt.",
    )

    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping them: less "
        "memory for about one more forward pass, the same gradient. Prompt prefixes then run in every row "
        "rather than once as a KV cache.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.eps_high < self.eps * 0.5:
            raise ValueError("eps_high is usually >= eps (clip-higher); got eps_high much smaller than eps.")
        return self


class SFTConfig(_SequenceLimits, AdamParams):
    """Supervised fine-tuning (`model.train_sft`, `advantage sft`). Every optimizer step is a model step: a
    checkpoint, served at once, with its loss in metrics.jsonl. The AdamW knobs are `AdamParams`'."""

    model_config = ConfigDict(validate_by_alias=False)

    # AdamParams' field with a higher default: supervised targets take a larger step than RL's.
    learning_rate: Annotated[float, AdamParams.model_fields["learning_rate"]] = 2e-4
    epochs: int = Field(1, ge=1, description="Passes over the trajectories.")
    batch_size: int = Field(8, ge=1, description="Trajectories per optimizer step.")
    seed: int = Field(
        0, description="Shuffles the trajectories between epochs and picks the validation split."
    )
    val_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of the data held out to measure the validation loss (0: none, unless a "
        "validation set is given).",
    )
    eval_every: int = Field(
        1,
        ge=1,
        description="Steps between validation-loss measurements (also before the first and after the last).",
    )


class OnlineConfig(_Config):
    """The continual trainer (`model.train_online`, `advantage online`): it trains on the model's recorded,
    rated traffic whenever enough groups are ready, and a promotion gate decides which steps are served.
    The guards against forgetting are `train.kl_beta` (a KL anchor to the base model) and `replay_share`.
    With `judge_model`, a RULER judge scores recorded requests' choices that have no explicit feedback
    (`advantage.online.judging`), so traffic with background samples trains without any feedback. With
    `golden_set`, the gate scores steps on the recorded golden set (`advantage.online.golden`)."""

    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="The knobs of each step (learning rate, loss, ...); train.kl_beta > 0 anchors the policy "
        "to the base model against forgetting.",
    )
    min_groups: int = Field(1, ge=1, description="Train a step once at least this many groups are ready.")
    max_groups: int = Field(
        32, ge=1, description="At most this many fresh groups per step (oldest first); the rest wait."
    )
    group_size: int = Field(
        2, ge=2, description="Rated choices a prompt needs before it is a group (they are compared)."
    )
    max_steps_off_policy: int | None = Field(
        4,
        ge=0,
        description="Choices sampled from weights more than this many steps before the step trained from "
        "(or from a later, unpromoted step) are never trained on; None: no limit.",
    )
    tolerance: float = Field(
        0.0,
        ge=0,
        description="Promotion gate: a new step is served as the default only if its evaluation score is at "
        "least the default's minus this (with golden_set, in nats per token).",
    )
    gate_against: Literal["default", "best"] = Field(
        "default",
        description="What a new step's score is compared with: the current default's score, or the best "
        "score of any promoted step so far. With 'default', a tolerance lets the default drift down one "
        "tolerance per step; with 'best' it stays within one tolerance of the best.",
    )
    golden_set: bool = Field(
        False,
        description="Promotion gate on the recorded golden set (instead of an evaluate function): score "
        "each step by the mean logprob per token of the golden answers (choices of requests sent with "
        'metadata {"golden": true}, rated at least golden_min_reward), which are never trained on.',
    )
    golden_min_reward: float = Field(
        1.0,
        allow_inf_nan=False,
        description="A golden request's choice is in the golden set when its feedback reward is at least this.",
    )
    golden_max_choices: int = Field(
        64, ge=1, le=4096, description="The golden set holds at most this many choices (the newest rated)."
    )
    replay_share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of each step's groups replayed from traffic already trained in promoted steps.",
    )
    replay_min_reward: float | None = Field(
        None, description="A replayed group must hold a choice rated at least this (None: any group)."
    )
    poll_s: float = Field(2.0, gt=0, le=3600, description="Seconds between looks at the traffic store.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many steps (None: run until stopped)."
    )
    max_seconds: float | None = Field(
        None, gt=0, description="Stop after this long (None: run until stopped)."
    )
    seed: int = Field(0, description="Picks the replayed groups.")
    judge_model: str | None = Field(
        None,
        description="A RULER judge for choices without feedback: each recorded request with at least "
        "group_size choices (n > 1, or background samples) is scored as one group by this model, and its "
        "choices without explicit feedback get the judge's score (explicit feedback always wins). None: no "
        "judge; only explicit feedback trains.",
    )
    judge_base_url: str | None = Field(
        None,
        description="The judge's OpenAI-compatible server, e.g. the backend's own (then its API key is used); "
        "None: OpenAI's API (OPENAI_API_KEY), or litellm for a 'provider/model' judge_model.",
    )
    judge_max_groups: int = Field(
        8,
        ge=1,
        le=1000,
        description="At most this many requests judged per look at the store (oldest first).",
    )

    @model_validator(mode="after")
    def _check(self) -> OnlineConfig:
        if self.judge_base_url is not None and self.judge_model is None:
            raise ValueError("judge_base_url is where judge_model is served: set judge_model too.")
        golden = {"golden_min_reward", "golden_max_choices"} & self.model_fields_set
        if golden and not self.golden_set:
            raise ValueError(
                f"The golden set is off, so {' and '.join(sorted(golden))} would do nothing: set golden_set=True."
            )
        return self


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}.",
        DeprecationWarning,
        stacklevel=4,
    )
