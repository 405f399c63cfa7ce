"""Train an email agent (ART-E) with GRPO. Only the public API is used.

    python -m advantage.tasks.email_agent.train --steps 2            # CPU: the bundled SmolLM2-135M, tiny groups

CPU config (`EmailTrainConfig()`): a smoke-sized run that finishes in minutes on 2 cores. Honest
expectations: the 135M model almost never writes a tool call on this multi-turn task (see BENCHMARKS.md),
so most groups have equal rewards and are skipped; the CPU run proves the pipeline, not the learning.

GPU config (`gpu_config()`, documented, not run here): Qwen2.5-14B-Instruct (or 7B) served by vLLM behind
`advantage serve` on a GPU box, reached with `backend`. The numbers follow the ART-E recipe: 12
questions x 6 rollouts a step, up to 10 turns, lr 1.2e-5, T = 1.0. Published result of that recipe with
Qwen2.5-14B: 41% -> 96% correct on held-out inboxes (DESIGN §1).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

import advantage as adv

from .questions import load_questions
from .rollout import MAX_TURNS, rollout


class EmailTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("email-agent-001", description="Model name (checkpoints: <root>/email/models/<name>).")
    root: Path = Field(Path(".advantage"), description="Checkpoint and run root (local backend).")
    base_model: str = Field("smollm2-135m-instruct", description="Bundled model name or HF model dir.")
    backend: str | None = Field(None, description="URL of `advantage serve` (GPU); None: embedded CPU.")
    api_key: str | None = Field(None, description="API key of the remote backend.")
    steps: int = Field(2, ge=0, description="Training steps.")
    groups_per_step: int = Field(2, ge=1, description="Questions per step.")
    group_size: int = Field(4, ge=2, description="Rollouts per question.")
    max_turns: int = Field(3, ge=1, le=MAX_TURNS, description="Model turns per episode (ART-E uses 10).")
    max_tokens: int = Field(96, ge=8, description="Tokens per model turn.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature of training rollouts.")
    learning_rate: float = Field(
        5e-4, gt=0, description="AdamW learning rate (a 135M LoRA needs a high one)."
    )
    max_seq_len: int = Field(4096, ge=256, description="Longest trajectory trained on; longer ones are cut.")
    val_size: int = Field(
        0, ge=0, description="Held-out (test-inbox) questions evaluated at the end; 0: none."
    )
    seed: int = Field(0, description="Question order seed.")


def gpu_config() -> EmailTrainConfig:
    """The documented GPU recipe; point `backend` at `advantage serve` running on the GPU box."""
    return EmailTrainConfig(
        name="email-agent-qwen14b", base_model="Qwen/Qwen2.5-14B-Instruct", backend="http://gpu-box:7999",
        steps=100, groups_per_step=12, group_size=6, max_turns=10, max_tokens=512, temperature=1.0,
        learning_rate=1.2e-5, max_seq_len=16384, val_size=100,
    )  # fmt: skip


async def run(cfg: EmailTrainConfig) -> dict[str, float]:
    start = time.perf_counter()
    backend: adv.LocalBackend | adv.RemoteBackend = (
        adv.RemoteBackend(cfg.backend, api_key=cfg.api_key) if cfg.backend else adv.LocalBackend(cfg.root)
    )
    model = adv.TrainableModel(cfg.name, project="email", base_model=cfg.base_model)
    await model.register(backend)
    first = await model.get_step()
    train_q = load_questions("train", seed=cfg.seed)
    train_config = adv.TrainConfig(
        learning_rate=cfg.learning_rate, max_seq_len=cfg.max_seq_len, on_overflow="truncate"
    )
    out: dict[str, float] = {"steps": 0.0}
    step_seconds: list[float] = []
    for i in range(cfg.steps):
        t0 = time.perf_counter()
        at = ((first + i) * cfg.groups_per_step) % len(train_q)
        batch = (train_q + train_q)[at : at + cfg.groups_per_step]
        groups = await adv.gather_trajectory_groups(
            [[rollout(model, q, temperature=cfg.temperature, max_turns=cfg.max_turns, max_tokens=cfg.max_tokens)
              for _ in range(cfg.group_size)] for q in batch],
            max_exceptions=0.25, desc=f"step {first + i + 1} rollouts",
        )  # fmt: skip
        t_gen = time.perf_counter() - t0
        result = await model.train(groups, config=train_config)
        trajs = [t for g in groups for t in g.trajectories]
        reward = sum(t.reward for t in trajs) / max(len(trajs), 1)
        correct = sum(t.metrics.get("is_correct", 0.0) for t in trajs) / max(len(trajs), 1)
        step_seconds.append(time.perf_counter() - t0)
        m = result.metrics
        print(
            f"step {result.step:3d}  reward {reward:.3f}  correct {correct:.2f}  "
            f"zero-var groups {m.get('frac_zero_variance_groups', 0):.2f}  gen {t_gen:.0f}s  "
            f"train {m.get('seconds', 0):.0f}s  step {step_seconds[-1]:.0f}s"
        )
        out.update(steps=float(i + 1), last_reward=reward, last_correct=correct)
    if cfg.val_size:
        val = load_questions("test", limit=cfg.val_size, seed=cfg.seed)
        groups = await adv.gather_trajectory_groups(
            [[rollout(model, q, temperature=0.0, max_turns=cfg.max_turns, max_tokens=cfg.max_tokens)] for q in val],
            max_exceptions=len(val), desc="held-out eval",
        )  # fmt: skip
        await model.log(groups, split="val")
        trajs = [t for g in groups for t in g.trajectories]
        out["val_correct"] = sum(t.metrics["is_correct"] for t in trajs) / len(val)
        print(f"held-out correct {out['val_correct']:.0%} on {len(val)} test-inbox questions")
    out["seconds"] = time.perf_counter() - start
    out["seconds_per_step"] = sum(step_seconds) / len(step_seconds) if step_seconds else 0.0
    out["final_step"] = float(await model.get_step())
    await backend.close()
    return out


def main(cfg: EmailTrainConfig | None = None) -> dict[str, float]:
    return asyncio.run(run(cfg or EmailTrainConfig()))


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    overrides = {args[i].lstrip("-").replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    print(main(EmailTrainConfig(**overrides)))
