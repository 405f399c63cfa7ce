"""Shared test helpers (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import advantage as adv
from advantage.config import LoRAConfig, TrainConfig
from advantage.training.primitives import forward_backward
from advantage.training.schedules import lr_at
from advantage.training.trainer import Trainer
from advantage.wire.datum import Datum

PROMPT = [{"role": "user", "content": "Say something."}]


def same_weights_logprob_tol() -> float:
    """How far one logprob, computed twice under the same weights (another batch, another summation order,
    from the prefix cache or not), may differ in the engine's default precision (ADVANTAGE_DTYPE may make
    that bf16)."""
    from advantage.engine.precision import default_dtype

    return 5e-3 if default_dtype(torch.device("cpu")) == "bfloat16" else 1e-4


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def toy_rollout(model: adv.TrainableModel) -> adv.Trajectory:
    """A one-turn rollout with an arbitrary but varied reward, so every group carries signal."""
    resp = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=PROMPT, max_tokens=6, temperature=1.0
    )
    choice = resp.choices[0]
    ids = choice.model_extra["token_ids"]
    return adv.Trajectory([*PROMPT, choice], reward=float(sum(ids) % 7) / 7)


DP_LORA = LoRAConfig(r=4)
# Four micro-batches of 3 (one per prompt), so each of two workers runs two and shares a prefix over them.
DP_CONFIG = TrainConfig(learning_rate=1e-2, micro_batch_size=3, loss="cispo", agg="token_mean")
DP_STEPS = 2  # the second step also moves LoRA A (its gradient is 0 while B is still 0)


def dp_datums() -> list[Datum]:
    system = [1, 5, 9, 13, 17, 21, 25, 29]  # shared by every datum: the batch-wide prefix
    out = []
    for g in range(4):
        prompt = system + [100 + g, 200 + g, 300 + g][: 1 + g % 3]
        for c, a in enumerate([1.0, -0.25, -0.75]):
            comp = [400 + 7 * g + c, 500 + c, 600 + g, 700 + c * g][: 2 + (g + c) % 3] + [2]
            n = len(prompt) + len(comp)
            old = [0.0] * len(prompt) + [-1.5 - 0.1 * k for k in range(len(comp))]
            mask = [0.0] * len(prompt) + [1.0] * len(comp)
            out.append(
                Datum(input_ids=prompt + comp, loss_mask=mask, logprobs=old[:n], advantage=a * (1 + g))
            )
    return out


def single_process_steps(model_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """The reference for the data-parallel tests: DP_STEPS steps of the single-process trainer."""
    trainer = Trainer(model_dir, DP_LORA, dtype="float32", seed=0)
    metrics = []
    for step in range(DP_STEPS):
        m, _ = forward_backward(trainer, dp_datums(), DP_CONFIG.loss, DP_CONFIG, DP_CONFIG.micro_batch_size)
        lr = lr_at(DP_CONFIG.schedule, DP_CONFIG.learning_rate, step)
        m["grad_norm"] = trainer.optim_step(DP_CONFIG, lr=lr)
        metrics.append(m)
    state = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return state, metrics


def arm_trainer_worker_to_die(group: Any, worker: int = 1) -> None:
    """Make trainer worker `worker` of a `RayTrainerGroup` kill its own process at its next micro-batch,
    before the gradient all-reduce, so the other workers are left waiting in the collective."""
    import ray

    def die_in_the_middle_of_the_step(actor: Any) -> None:  # nested: Ray ships it by value
        import os

        actor.worker.trainer.forward_backward = lambda *args, **kwargs: os._exit(1)

    ray.get(group.actors[worker].__ray_call__.remote(die_in_the_middle_of_the_step))
