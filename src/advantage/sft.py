"""Supervised fine-tuning on the low-level primitives: `model.train_sft` and the `advantage sft` command.

Data is trajectories (any model's: a teacher's, a prompted baseline's) or a JSONL file in OpenAI's chat
fine-tuning format (`training/sft_data.py`). All of it, the validation set included, is read, checked and
tokenized before the first step, so a bad line fails the run before it trains, naming the file and line.

Every optimizer step is a model step: a checkpoint, served at once, whose row in metrics.jsonl (split
"train") has the step's `loss` (mean cross-entropy per trained token), `grad_norm`, `lr` and `epoch`. With
a validation set, a "val" row with `val/loss` is written before the first step and every `eval_every` steps
(and after the last), so `advantage report` draws both curves on its loss chart.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

from advantage.backends.base import TrainResult
from advantage.config import LoRAConfig, SFTConfig
from advantage.lowlevel import Datum, TrainingClient
from advantage.training.sft_data import read_file, split_val
from advantage.trajectory import Trajectory

SFTData = Sequence[Trajectory] | str | Path  # trajectories, or a JSONL file in the OpenAI chat format


def _named(data: SFTData) -> list[tuple[Trajectory, str]]:
    """The trajectories of `data`, each with the name errors give it ("FILE, line N" or "Trajectory i")."""
    if isinstance(data, str | Path):
        return [(e.to_trajectory(), e.where) for e in read_file(data)]
    return [(t, f"Trajectory {i}") for i, t in enumerate(data)]


async def _datums(tc: TrainingClient, named: list[tuple[Trajectory, str]], cfg: SFTConfig) -> list[Datum]:
    trajs, where = [t for t, _ in named], [w for _, w in named]
    return await tc.sft_datums(trajs, cfg.max_seq_len, cfg.on_overflow, where=where)


async def val_loss(tc: TrainingClient, datums: list[Datum], micro_batch_size: int = 8) -> float:
    """Mean cross-entropy per trained token of `datums` under the current weights (no gradient)."""
    logprobs = await tc.forward(datums, micro_batch_size)
    nll = [
        -lp
        for d, lps in zip(datums, logprobs, strict=True)
        for lp, m in zip(lps, d.loss_mask, strict=True)
        if m
    ]
    return sum(nll) / max(len(nll), 1)


async def train_sft(
    tc: TrainingClient, data: SFTData, config: SFTConfig | None = None, val: SFTData | None = None
) -> dict[str, float]:
    """Fine-tune the model of `tc` on `data` (module docstring); `val` is a validation set, or
    `config.val_fraction` holds part of `data` out. Returns the run's summary metrics."""
    cfg = config or SFTConfig()
    if val is not None and cfg.val_fraction > 0:
        raise ValueError("Give a validation set or a val_fraction, not both.")
    named = _named(data)
    if not named:
        raise ValueError("train_sft() got no trajectories; collect some first.")
    val_named = _named(val) if val is not None else []
    named, held = split_val(named, cfg.val_fraction, cfg.seed)
    val_named += held
    datums = await _datums(tc, named, cfg)
    val_datums = await _datums(tc, val_named, cfg) if val_named else []

    rng = random.Random(cfg.seed)
    per_epoch = -(-len(datums) // cfg.batch_size)
    total = per_epoch * cfg.epochs
    losses: list[float] = []
    val_losses: list[float] = []

    async def evaluate() -> None:
        val_losses.append(await val_loss(tc, val_datums, cfg.micro_batch_size))
        await tc.log_metrics({"val/loss": val_losses[-1]}, split="val")

    if val_datums:
        await evaluate()
    for epoch in range(cfg.epochs):
        order = list(range(len(datums)))
        if epoch:
            rng.shuffle(order)
        for k in range(0, len(order), cfg.batch_size):
            t0 = time.perf_counter()
            batch = [datums[i] for i in order[k : k + cfg.batch_size]]
            out = await tc.forward_backward(batch, "cross_entropy", micro_batch_size=cfg.micro_batch_size)
            opt = await tc.optim_step(cfg)  # an SFTConfig is an AdamParams
            losses.append(out.metrics["loss"])
            row = {
                "loss": out.metrics["loss"],
                "grad_norm": opt["grad_norm"],
                "lr": cfg.learning_rate,
                "epoch": float(epoch + 1),
                "trained_tokens": out.metrics["trained_tokens"],
                "seconds": time.perf_counter() - t0,
            }
            await tc.save_weights(row, split="train")
            if val_datums and (len(losses) % cfg.eval_every == 0 or len(losses) == total):
                await evaluate()
    metrics = {"sft/loss_first": losses[0], "sft/loss_last": losses[-1], "sft/steps": float(len(losses))}
    if val_losses:
        metrics.update({"sft/val_loss_first": val_losses[0], "sft/val_loss_last": val_losses[-1]})
    return metrics


async def train_sft_file(
    data: str | Path,
    *,
    model: str,
    project: str = "default",
    base_model: str = "smollm2-135m-instruct",
    root: str | Path = ".advantage",
    config: SFTConfig | None = None,
    val: str | Path | None = None,
    lora: LoRAConfig | None = None,
) -> TrainResult:
    """`advantage sft`: fine-tune the model `model` (created, or resumed from its latest step) on a JSONL
    file, on an embedded backend whose checkpoints and metrics.jsonl go under `root`."""
    from advantage.backends.local import LocalBackend
    from advantage.model import TrainableModel

    cfg = config or SFTConfig()
    _named(data)  # a bad file fails here, before a model loads
    if val is not None:
        _named(val)
    backend = LocalBackend(root, progress=False)
    try:
        tm = TrainableModel(model, project=project, base_model=base_model, lora=lora)
        await tm.register(backend)
        return await tm.train_sft(data, cfg, val=val)
    finally:
        await backend.close()
