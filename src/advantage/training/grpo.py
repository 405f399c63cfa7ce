"""One GRPO step over trajectory groups, composed from the trainer's primitives.

groups -> advantages per group (zero-variance groups skipped and counted) -> tokenize on the exact sampled
ids -> micro-batches of one group's members (prefix sharing) -> forward_backward with the chosen loss,
weighted so the aggregation is over the whole batch -> one AdamW step. Every step reports the diagnostics of
DESIGN §5, including the sampler-vs-trainer logprob drift.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from advantage.config import TrainConfig
from advantage.training.advantages import group_advantages
from advantage.training.losses import LossConfig, get_loss
from advantage.training.tokenize import tokenize_trajectory
from advantage.training.trainer import Batch, Datum, Trainer
from advantage.trajectory import TrajectoryGroup

Progress = Callable[[int, int], None]  # (micro-batches done, total)


def build_datums(
    trainer: Trainer, groups: list[TrajectoryGroup], config: TrainConfig
) -> tuple[list[Datum], dict[str, float]]:
    """Advantages and tokenization. Returns the datums of the groups that carry signal, and metrics."""
    if not groups:
        raise ValueError("train() got no trajectory groups; gather some rollouts first.")
    for g in groups:
        if not g.trajectories:
            raise ValueError("train() got an empty TrajectoryGroup; drop groups whose rollouts all failed.")
        g.validate_rewards()
    advs, metrics = group_advantages([g.rewards() for g in groups], scale=config.scale_rewards)
    datums: list[Datum] = []
    truncated = 0
    for gi, (g, adv_g) in enumerate(zip(groups, advs, strict=True)):
        if all(a == 0.0 for a in adv_g):
            continue
        for t, a in zip(g.trajectories, adv_g, strict=True):
            tok = tokenize_trajectory(trainer.tokenizer, t, config.max_seq_len, config.on_overflow)
            truncated += tok.truncated
            datums.append(Datum(tok.input_ids, tok.assistant_mask, tok.old_logprobs, a, gi))
    metrics["truncated_trajectories"] = float(truncated)
    metrics["n_trajectories"] = float(sum(len(g.trajectories) for g in groups))
    return datums, metrics


def micro_batches(datums: list[Datum], size: int) -> list[list[Datum]]:
    """Chunks of at most `size` datums, never mixing groups (so each chunk shares its prompt)."""
    out: list[list[Datum]] = []
    by_group: dict[int, list[Datum]] = {}
    for d in datums:
        by_group.setdefault(d.group, []).append(d)
    for members in by_group.values():
        out += [members[i : i + size] for i in range(0, len(members), size)]
    return out


def train_step(
    trainer: Trainer, groups: list[TrajectoryGroup], config: TrainConfig, progress: Progress | None = None
) -> dict[str, float]:
    t0 = time.perf_counter()
    datums, metrics = build_datums(trainer, groups, config)
    if not datums:
        metrics.update(skipped_step=1.0, seconds=time.perf_counter() - t0)
        return metrics  # every group had equal rewards: nothing to learn, nothing changed
    loss_fn = get_loss(config.loss)
    total_tokens = sum(sum(d.loss_mask) for d in datums)
    max_len = max(len(d.input_ids) for d in datums)
    lcfg = LossConfig(
        eps=config.eps,
        eps_high=config.eps_high,
        cispo_eps_max=config.cispo_eps_max,
        agg=config.agg,
        kl_beta=config.kl_beta,
        max_len=max_len,
    )

    def batch_loss(b: Batch) -> tuple[Any, dict[str, float]]:
        return loss_fn(b.logp, b.old_logp, b.adv, b.mask, lcfg, b.ref_logp)

    chunks = micro_batches(datums, config.micro_batch_size)
    sums: dict[str, float] = {}
    new_all: list[float] = []
    old_all: list[float] = []
    padded = 0
    for k, chunk in enumerate(chunks):
        n_tok = sum(sum(d.loss_mask) for d in chunk)
        weight = n_tok / total_tokens if config.agg == "token_mean" else len(chunk) / len(datums)
        m, new_lp = trainer.forward_backward(chunk, batch_loss, weight=weight, ref_model=config.kl_beta > 0)
        for key, v in m.items():
            sums[key] = sums.get(key, 0.0) + v * weight
        for d, lp in zip(chunk, new_lp, strict=True):
            new_all += lp
            old_all += [o for o, on in zip(d.old_logprobs or [], d.loss_mask, strict=True) if on]
        padded += len(chunk) * max(len(d.input_ids) for d in chunk)
        if progress:
            progress(k + 1, len(chunks))
    grad_norm = trainer.optim_step(
        config.learning_rate, config.betas, config.weight_decay, config.max_grad_norm
    )
    real = sum(len(d.input_ids) for d in datums)
    metrics.update({f"loss/{k}" if k != "loss" else "loss": v for k, v in sums.items()})
    metrics.update(drift_metrics(new_all, old_all))
    metrics.update(
        grad_norm=grad_norm,
        trained_tokens=float(total_tokens),
        sequence_tokens=float(real),
        packing_efficiency=real / padded if padded else 1.0,
        micro_batches=float(len(chunks)),
        seconds=time.perf_counter() - t0,
    )
    metrics["tokens_per_second"] = real / metrics["seconds"]
    return metrics


def drift_metrics(new: list[float], old: list[float]) -> dict[str, float]:
    """Sampler-vs-trainer logprob agreement on the trained tokens: a weight-sync or tokenization bug shows
    up here as a large mean |Δ| or a low correlation."""
    n = len(new)
    if n == 0 or len(old) != n:
        return {}
    mean_abs = sum(abs(a - b) for a, b in zip(new, old, strict=True)) / n
    ma, mb = sum(new) / n, sum(old) / n
    cov = sum((a - ma) * (b - mb) for a, b in zip(new, old, strict=True))
    va = sum((a - ma) ** 2 for a in new)
    vb = sum((b - mb) ** 2 for b in old)
    corr = cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 1.0
    return {"logprob_drift_mean_abs": mean_abs, "logprob_drift_corr": corr}
