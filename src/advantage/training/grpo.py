"""One GRPO step over trajectory groups, composed from the trainer's primitives.

groups -> advantages per group (per token with `tree_advantages`; zero-variance groups skipped, counted, and
kept in the loss's mean with `tied_groups_in_mean`) -> tokenize on the exact sampled ids ->
`primitives.forward_backward` with the chosen loss (micro-batches that share a prompt, weighted so the
aggregation is over the whole batch) -> one AdamW step (its rate scaled by the share of the batch that
carried signal with `lr_by_signal`). The low-level API runs the same two primitives. Every step reports the
diagnostics of DESIGN §5, including the sampler-vs-trainer logprob drift.
"""

from __future__ import annotations

import statistics
import time

from advantage.config import TrainConfig
from advantage.training.advantages import group_advantages, prefix_tree_advantages
from advantage.training.primitives import MeanOver, Progress, forward_backward
from advantage.training.schedules import step_lr
from advantage.training.tokenize import tokenize_for_training
from advantage.training.trainer import Trainer
from advantage.trajectory import TrajectoryGroup
from advantage.wire.datum import ADV_KEY, Datum


def build_datums(
    trainer: Trainer, groups: list[TrajectoryGroup], config: TrainConfig, skip_zero_variance: bool = True
) -> tuple[list[Datum], dict[str, float]]:
    """Advantages and tokenization of groups that passed `trajectory.check_groups` (the backends check them
    where they come in). Returns the datums of the groups that carry signal (of every group, with
    advantage 0 where the rewards are equal, when not `skip_zero_variance`), and metrics."""
    datums, metrics, _ = _datums_and_mean(trainer, groups, config, skip_zero_variance)
    return datums, metrics


def _datums_and_mean(
    trainer: Trainer, groups: list[TrajectoryGroup], config: TrainConfig, skip_zero_variance: bool
) -> tuple[list[Datum], dict[str, float], MeanOver]:
    advs, metrics = group_advantages([g.rewards() for g in groups], scale=config.scale_rewards)
    datums: list[Datum] = []
    truncated = tied_seqs = tied_tokens = 0
    for g, adv_g in zip(groups, advs, strict=True):
        tied = all(a == 0.0 for a in adv_g)
        first = len(datums)
        for t, a in zip(g.trajectories, adv_g, strict=True):
            # One sequence, or one per sampled turn when the chat template rewrites history; each carries
            # the trajectory's advantage.
            toks = tokenize_for_training(trainer.tokenizer, t, config.max_seq_len, config.on_overflow)
            truncated += any(tok.truncated for tok in toks)
            if tied and skip_zero_variance:  # counted (MeanOver), not run: its gradient is 0
                tied_seqs += len(toks)
                tied_tokens += sum(sum(tok.assistant_mask) for tok in toks)
                continue
            datums += [
                Datum(
                    input_ids=tok.input_ids,
                    loss_mask=tok.assistant_mask,
                    logprobs=tok.old_logprobs,
                    advantage=a,
                )
                for tok in toks
            ]
        if config.tree_advantages:
            mine = datums[first:]
            per_token = prefix_tree_advantages(
                [d.input_ids for d in mine], [d.advantage for d in mine], config.tree_baseline
            )
            datums[first:] = [
                d.model_copy(update={"extras": {**d.extras, ADV_KEY: a}})
                for d, a in zip(mine, per_token, strict=True)
            ]
    metrics["truncated_trajectories"] = float(truncated)
    metrics["n_trajectories"] = float(sum(len(g.trajectories) for g in groups))
    metrics["n_sequences"] = float(len(datums))
    if not config.tied_groups_in_mean:
        tied_seqs = tied_tokens = 0
    trained = sum(sum(1 for m in d.loss_mask if m) for d in datums)
    return datums, metrics, MeanOver(len(datums) + tied_seqs, trained + int(tied_tokens))


def step_datums(
    trainer: Trainer, groups: list[TrajectoryGroup], config: TrainConfig, t0: float
) -> tuple[list[Datum], dict[str, float], MeanOver]:
    """A step's datums, its metrics so far, and the batch its loss is a mean over; with no datums, the
    metrics of a skipped step."""
    datums, metrics, mean_over = _datums_and_mean(trainer, groups, config, skip_zero_variance=True)
    metrics.update(completion_metrics(groups))
    if not datums:
        metrics.update(skipped_step=1.0, seconds=time.perf_counter() - t0)
    return datums, metrics, mean_over


def train_step(
    trainer: Trainer,
    groups: list[TrajectoryGroup],
    config: TrainConfig,
    progress: Progress | None = None,
    step: int = 0,
) -> dict[str, float]:
    """One optimizer step from `step` completed steps (the schedule's position)."""
    t0 = time.perf_counter()
    datums, metrics, mean_over = step_datums(trainer, groups, config, t0)
    if not datums:
        return metrics  # every group had equal rewards: nothing to learn, nothing changed
    with trainer.gradient_checkpointing(config.gradient_checkpointing):
        fb_metrics, new_lp = forward_backward(
            trainer, datums, config.loss, config, config.micro_batch_size, progress, mean_over
        )
    lr = step_lr(config, step, len(datums), mean_over.sequences)
    grad_norm = trainer.optim_step(config, lr=lr)  # a TrainConfig is an AdamParams
    new_all = [x for d, lp in zip(datums, new_lp, strict=True) for x in _masked(lp, d.loss_mask)]
    old_all = [x for d in datums for x in _masked(d.logprobs or [], d.loss_mask)]
    metrics.update(fb_metrics)
    metrics.update(drift_metrics(new_all, old_all))
    metrics.update(grad_norm=grad_norm, lr=lr, seconds=time.perf_counter() - t0)
    metrics["tokens_per_second"] = metrics["sequence_tokens"] / metrics["seconds"]
    return metrics


def completion_metrics(groups: list[TrajectoryGroup]) -> dict[str, float]:
    """How the sampled turns ended: the fraction cut off at max_tokens (a policy that starts to ramble shows
    up here first) and their mean length in tokens."""
    choices = [c for g in groups for t in g.trajectories for c in t.choices()]
    if not choices:
        return {}
    cut = sum(1 for c in choices if c.finish_reason == "length")
    lengths = [len((c.model_extra or {}).get("token_ids") or []) for c in choices]
    return {
        "frac_truncated_completions": cut / len(choices),
        "completion_tokens_mean": sum(lengths) / len(choices),
    }


def _masked(values: list[float], mask: list[float]) -> list[float]:
    return [x for x, m in zip(values, mask, strict=True) if m]


def drift_metrics(new: list[float], old: list[float]) -> dict[str, float]:
    """Sampler-vs-trainer logprob agreement on the trained tokens: a weight-sync or tokenization bug shows
    up here as a large mean |Δ| or a low correlation."""
    n = len(new)
    if n == 0 or len(old) != n:
        return {}
    mean_abs = statistics.fmean(abs(a - b) for a, b in zip(new, old, strict=True))
    try:
        corr = statistics.correlation(new, old)
    except statistics.StatisticsError:  # one token, or a constant side: nothing to disagree on
        corr = 1.0
    return {"logprob_drift_mean_abs": mean_abs, "logprob_drift_corr": corr}
