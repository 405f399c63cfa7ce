"""Batch-level primitives shared by `model.train` (grpo.py), the low-level API and SFT: one path, not three.

`forward_backward(trainer, datums, loss, cfg)` splits a batch into micro-batches (sequences with the same
prompt go together, so each micro-batch computes its prompt once), weights each micro-batch so that the
loss aggregates over the whole batch exactly as if it had run in one piece, and accumulates gradients.
`forward` gives the current weights' logprobs without gradients. Both return per-token logprobs aligned to
each datum's input_ids (0.0 where the loss mask is 0). It runs in three parts: `plan_step` cuts the batch
into weighted micro-batches, `run_share` runs some of them, `summarize` adds up the metrics; data-parallel
workers (`training/distributed.py`) each run a share of one plan.

Losses are named: the policy losses of `losses.py` (with per-token advantages when the datums carry
`extras["advantages"]`, else each datum's `advantage`), plus "linear", the loss Σ w·logp with per-token weights
w in `extras["logprob_grad"]`. "linear" is how a custom loss runs anywhere, even on a remote server: the
client computes its loss from `forward`'s logprobs, takes d(loss)/d(logprobs) with autograd, and sends those
gradients back as w; the gradient of Σ w·logp with respect to the weights is then the custom loss's
(chain rule), and it is summed, not averaged, across micro-batches.

"dpo" takes preference pairs laid out chosen, rejected, chosen, ...: its micro-batches keep each pair
whole and in order (`pair_micro_batches`), the loss is a mean over pairs, and the reference logprobs come
from the same trainer with its adapter disabled (the base weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from advantage.config import LossConfig
from advantage.training.losses import get_loss
from advantage.training.packing import prompt_key, shared_prefix_len
from advantage.training.trainer import Batch, SharedPrefix, Trainer
from advantage.wire.datum import ADV_KEY, GRAD_KEY, Datum
from advantage.wire.ops import LINEAR

Progress = Callable[[int, int], None]  # (micro-batches done, total)
TOPK = "distill_topk"  # the soft-target loss: it reads the datums' target_ids, not their sampled tokens


def micro_batches(datums: list[Datum], size: int) -> list[list[int]]:
    """Indices into `datums`, in chunks of at most `size`, laid out so each chunk shares a long prefix.

    Sequences are grouped by prompt and the prompts sorted, so prompts with a common beginning (the same
    system prompt, tools and examples) are neighbours; a group starts a new chunk unless it fits whole in
    the current one. A chunk that spans prompts shares their common part (the trainer runs it once); one
    that does not, its whole prompt.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, d in enumerate(datums):
        by_prompt.setdefault(prompt_key(d), []).append(i)
    chunks: list[list[int]] = [[]]
    for key in sorted(by_prompt):
        members = by_prompt[key]
        if len(chunks[-1]) + len(members) > size:  # a group that does not fit starts a new chunk
            chunks.append([])
        for i in members:
            if len(chunks[-1]) == size:
                chunks.append([])
            chunks[-1].append(i)
    return [c for c in chunks if c]


def check_datums(datums: list[Datum], vocab_size: int, max_len: int) -> None:
    """Refuse what would crash or silently mis-train on this model, saying which datum and what to change.
    (A `Datum` checks its own lengths and numbers when it is built.)"""
    if not datums:
        raise ValueError("The batch is empty; pass at least one datum.")
    keys = set(datums[0].extras)
    k = datums[0].top_k
    for i, d in enumerate(datums):
        n = len(d.input_ids)
        if n < 2:
            raise ValueError(f"Datum {i} has {n} token(s); a trained token needs at least one before it.")
        if n > max_len:
            raise ValueError(f"Datum {i} has {n} tokens, over the limit of {max_len}; shorten it.")
        if d.loss_mask[0]:
            raise ValueError(f"Datum {i}: the first token has no context to predict it from; mask it out.")
        if any(not 0 <= t < vocab_size for t in d.input_ids):
            raise ValueError(f"Datum {i} has token ids outside the vocabulary [0, {vocab_size}).")
        if set(d.extras) != keys:
            raise ValueError(f"Datum {i} has extras {sorted(d.extras)}; datum 0 has {sorted(keys)}.")
        if (d.target_ids is None) != (datums[0].target_ids is None) or (d.top_k and d.top_k != k):
            raise ValueError(
                f"Datum {i} has {d.top_k or 'no'} soft-target tokens per position; datum 0 has {k or 'none'}. "
                "Give every datum of a batch the same number (or none)."
            )
        if d.target_ids is not None and any(not 0 <= t < vocab_size for ts in d.target_ids for t in ts):
            raise ValueError(f"Datum {i} has target_ids outside the vocabulary [0, {vocab_size}).")


def pair_micro_batches(n_datums: int, size: int) -> list[list[int]]:
    """For DPO: indices in order, chunked so each chunk holds whole pairs (2k, 2k+1), at least one pair."""
    if n_datums % 2:
        raise ValueError(f"DPO takes pairs (chosen, rejected); got an odd number of datums, {n_datums}.")
    step = max(2, size - size % 2)
    return [list(range(k, min(k + step, n_datums))) for k in range(0, n_datums, step)]


def forward(trainer: Trainer, datums: list[Datum], micro_batch_size: int = 8) -> list[list[float]]:
    """The current weights' per-token logprobs (no gradients), aligned to each datum's input_ids."""
    out: list[list[float]] = [[] for _ in datums]
    for idx in micro_batches(datums, micro_batch_size):
        for i, lp in zip(idx, trainer.forward([datums[i] for i in idx]), strict=True):
            out[i] = lp
    return out


@dataclass(frozen=True)
class MeanOver:
    """The whole batch a loss's mean is over, when only part of it runs. `model.train` skips tied groups
    (equal rewards: advantage 0, gradient 0) to save time; counting them here keeps the step the one the whole
    batch gives, so a step with few informative groups is proportionally smaller (as in GRPO and TRL, which
    train on every group) instead of as large as a step where every group carried signal."""

    sequences: int  # the divisor of "seq_mean" and "dr_grpo"
    tokens: int  # the divisor of "token_mean": trained tokens of every sequence


@dataclass
class StepPlan:
    """How one batch is cut into weighted micro-batches: the same on every data-parallel worker, so each can
    run any share of them and the summed gradients equal the whole batch's (`training/distributed.py`)."""

    loss: str
    cfg: LossConfig
    chunks: list[list[int]]  # indices into the datums, one list per micro-batch
    weights: list[float]  # each micro-batch's share of the whole batch's aggregation
    total_tokens: int  # trained tokens in the whole batch


@dataclass
class Partial:
    """What running some of a plan's micro-batches produced, besides the gradients in the adapter's .grad:
    weighted metric sums, token counts and the datums' new logprobs. Partials of disjoint shares add up."""

    sums: dict[str, float] = field(default_factory=dict)
    entropy_sum: float = 0.0  # token-weighted policy entropy
    computed: int = 0  # tokens the model ran on, padding excluded
    padded: int = 0  # tokens the model ran on, padding included
    logprobs: dict[int, list[float]] = field(default_factory=dict)  # datum index -> per-token logprobs


def plan_step(
    datums: list[Datum],
    loss: str,
    cfg: LossConfig | None,
    micro_batch_size: int,
    mean_over: MeanOver | None = None,
) -> StepPlan:
    """The micro-batches of the whole batch and their weights, so the loss aggregates as if in one piece
    (over `mean_over`, when the datums are only part of the batch; DPO's and "linear"'s are always theirs)."""
    cfg = cfg or LossConfig()
    if cfg.max_len is None:  # Dr. GRPO's constant normaliser: the batch's longest sequence
        cfg = cfg.model_copy(update={"max_len": max(len(d.input_ids) for d in datums)})
    total_tokens = sum(sum(1 for m in d.loss_mask if m) for d in datums)
    n_seq, n_tok = (mean_over.sequences, mean_over.tokens) if mean_over else (len(datums), total_tokens)
    if n_seq < len(datums) or n_tok < total_tokens:
        raise ValueError(f"mean_over {mean_over} is smaller than the datums it is over.")
    dpo = loss == "dpo"  # pairs stay together, in order; the loss is a mean over pairs
    chunks = (
        pair_micro_batches(len(datums), micro_batch_size) if dpo else micro_batches(datums, micro_batch_size)
    )
    weights = []
    for idx in chunks:
        chunk = [datums[i] for i in idx]
        if loss == LINEAR:
            weights.append(1.0)  # a sum: each micro-batch's part adds up to the whole
        elif cfg.agg == "token_mean" and not dpo:
            weights.append(sum(sum(1 for m in d.loss_mask if m) for d in chunk) / max(n_tok, 1))
        elif dpo:
            weights.append(len(chunk) / len(datums))
        else:
            weights.append(len(chunk) / n_seq)
    return StepPlan(loss, cfg, chunks, weights, total_tokens)


def run_share(
    trainer: Trainer,
    datums: list[Datum],
    plan: StepPlan,
    share: Sequence[int],
    progress: Progress | None = None,
) -> Partial:
    """Accumulate the gradients of the micro-batches `share` (indices into plan.chunks) into the adapter."""
    dpo = plan.loss == "dpo"
    batch_loss = _linear_loss if plan.loss == LINEAR else _named_loss(plan.loss, plan.cfg)
    out = Partial()
    mine = [datums[i] for k in share for i in plan.chunks[k]]
    # A prompt start shared by several micro-batches runs once for all of them (trainer.SharedPrefix).
    # Not under gradient checkpointing, which drops KV caches (Trainer.gradient_checkpointing).
    P = shared_prefix_len(mine) if len(share) > 1 and not dpo and not trainer.checkpointing else 0
    prefix = SharedPrefix(trainer, mine[0].input_ids[:P]) if P > 0 else None
    if prefix is not None:
        out.computed, out.padded = P, P
    for n, k in enumerate(share):
        idx, weight = plan.chunks[k], plan.weights[k]
        chunk = [datums[i] for i in idx]
        m, lps = trainer.forward_backward(
            chunk, batch_loss, weight=weight, ref_model=plan.cfg.kl_beta > 0 or dpo, prefix=prefix
        )
        out.entropy_sum += m.pop("entropy", 0.0) * sum(sum(1 for x in d.loss_mask if x) for d in chunk)
        for key, v in m.items():
            out.sums[key] = out.sums.get(key, 0.0) + v * weight
        out.logprobs.update(zip(idx, lps, strict=True))
        # What the model ran on: the shared parts once, padding included (packing.py).
        out.computed += trainer.last_slots[0]
        out.padded += trainer.last_slots[1]
        if progress:
            progress(n + 1, len(share))
    if prefix is not None:
        prefix.backward()
    return out


def summarize(
    datums: list[Datum], plan: StepPlan, partials: Sequence[Partial]
) -> tuple[dict[str, float], list[list[float]]]:
    """The whole batch's metrics and per-datum logprobs from the partials of disjoint shares."""
    sums: dict[str, float] = {}
    logprobs: list[list[float]] = [[] for _ in datums]
    for part in partials:
        for key, v in part.sums.items():
            sums[key] = sums.get(key, 0.0) + v
        for i, lp in part.logprobs.items():
            logprobs[i] = lp
    computed = sum(p.computed for p in partials)
    padded = sum(p.padded for p in partials)
    metrics = {f"loss/{k}" if k != "loss" else "loss": v for k, v in sums.items()}
    metrics.update(
        trained_tokens=float(plan.total_tokens),
        sequence_tokens=float(sum(len(d.input_ids) for d in datums)),
        packing_efficiency=computed / padded if padded else 1.0,
        micro_batches=float(len(plan.chunks)),
        entropy=sum(p.entropy_sum for p in partials) / max(plan.total_tokens, 1),
    )
    return metrics, logprobs


def forward_backward(
    trainer: Trainer,
    datums: list[Datum],
    loss: str,
    cfg: LossConfig | None = None,
    micro_batch_size: int = 8,
    progress: Progress | None = None,
    mean_over: MeanOver | None = None,
) -> tuple[dict[str, float], list[list[float]]]:
    """Accumulate the gradient of `loss` over the whole batch (or `mean_over`). Returns (metrics, per-token
    logprobs)."""
    plan = plan_step(datums, loss, cfg, micro_batch_size, mean_over)
    part = run_share(trainer, datums, plan, range(len(plan.chunks)), progress)
    return summarize(datums, plan, [part])


def _named_loss(name: str, cfg: LossConfig) -> Callable[[Batch], tuple[Any, dict[str, float]]]:
    loss_fn = get_loss(name)

    def batch_loss(b: Batch) -> tuple[Any, dict[str, float]]:
        adv = b.extras.get(ADV_KEY, b.adv)  # (B, T) per-token advantages (distillation), else (B,)
        if name == TOPK:  # soft targets: the student's and the teacher's logprobs of the target tokens
            if b.target_logp is None or b.teacher_logp is None:
                raise ValueError(
                    "The 'distill_topk' loss needs datums with target_ids and target_logprobs "
                    "(advantage.distill.topk_datums builds them from compute_top_logprobs)."
                )
            return loss_fn(b.target_logp, b.teacher_logp, adv, b.mask, cfg)
        return loss_fn(b.logp, b.old_logp, adv, b.mask, cfg, b.ref_logp)

    return batch_loss


def _linear_loss(b: Batch) -> tuple[Any, dict[str, float]]:
    if GRAD_KEY not in b.extras:
        raise ValueError(f"The 'linear' loss needs per-token weights in extras[{GRAD_KEY!r}].")
    loss = (b.extras[GRAD_KEY] * b.logp * b.mask).sum()
    return loss, {"loss": float(loss.detach())}
