"""Policy-gradient losses as pure functions of per-token logprobs.

Every loss has the signature `(logp, old_logp, adv, mask, cfg, ref_logp=None) -> (loss, metrics)`:
`logp` (B, T) are the trainer's logprobs of the sampled tokens (with grad), `old_logp` (B, T) the sampler's
recorded logprobs, `adv` (B,) one advantage per sequence or (B, T) one per token, `mask` (B, T) 1.0 on trained
tokens. B is the
number of sequences and T the number of token positions; shapes are written as `# (B, T)` comments.
`LOSSES` maps names to these functions; `get_loss(name)` picks one.

How this departs from the GRPO paper (DeepSeekMath: PPO-clip with ε = 0.2, per-sequence mean then mean,
a k3 KL penalty to the reference model with β = 0.04, std-scaled group advantages):

- **Default loss is CISPO** (MiniMax-M1, ScaleRL's and later ART's default), not PPO-clip. PPO's clip
  zeroes the gradient of a token whose ratio left the trust region, which silences exactly the rare
  "fork" tokens that matter; CISPO instead clips the *importance weight* sg(clip(ρ, 0, ε_max)) and keeps a
  gradient on every token. PPO/GRPO, GSPO and plain importance sampling are available by name.
- **Clip-higher**: PPO and GSPO clip ρ to [1 − ε, 1 + ε_high] with ε = 0.2 and ε_high = 0.28 (DAPO), so
  a token whose probability is rising gets more room than one that is falling, which slows entropy
  collapse. Set ε_high = ε for the paper's symmetric clip. GSPO's paper uses much smaller ranges (~3e-4,
  4e-4) because its ratio is a per-token geometric mean; set them in the config when using it.
- **Aggregation is a choice** (`LossConfig.agg`): "seq_mean" (the paper: mean over each sequence's tokens,
  then over sequences), "token_mean" (DAPO: Σℓ / Σtokens; the default, as in CISPO's own formulation, so
  a long answer's tokens are not down-weighted), or "dr_grpo" (Σℓ / (B·L_max), a constant normaliser).
- **KL is off by default** (β = 0). When β > 0 it is the k3 estimator exp(ref − logp) − (ref − logp) − 1
  against the base model (the adapter disabled), aggregated like the policy term and added times β.
- **The ratio is against the sampler's logprobs**, not a trainer recompute, so it also corrects for the
  sampler/trainer mismatch (different kernels, quantisation).
- **Per-token advantages** (`adv` of shape (B, T)) are accepted by PPO/GRPO, CISPO and importance sampling:
  each token's term uses its own advantage. On-policy distillation (`advantage.distill`) needs this: its
  advantage is the teacher-minus-student logprob of each sampled token. GSPO's ratio is per sequence, so it
  takes only (B,).
- **Zero-variance groups are skipped upstream** (see `advantages.py`): their advantage is zero, so they
  would add no gradient here, only tokens to the denominators.

Masked positions never matter: their log-ratio and logprob are replaced by 0 before use, so any value
there, even -inf, changes neither the loss nor the gradient.

**Soft targets** (`"distill_topk"`): at each trained position a teacher's K most likely next tokens and
their logprobs; the loss is the forward KL(teacher ‖ student) of both distributions coarsened to K + 1
outcomes, the K tokens and "any other": Σ_k q_k (log q_k − log p_k) + q_o (log q_o − log p_o), with
q_o = 1 − Σ_k q_k and p_o likewise. It is 0 exactly when the student agrees with the teacher on those K
tokens (and so on the rest's total), and a lower bound on the full KL (GKD's supervised KL at the
student's own states, Agarwal et al. 2024). Here `logp` and `old_logp` are (B, T, K): the student's and
the teacher's logprobs of the K target tokens; `adv` is unused.

**DPO** (Rafailov et al. 2023) is here too, for preference pairs: `dpo_loss` is the pure function of
summed sequence logprobs, −log σ(β·((π_c − ref_c) − (π_r − ref_r))) averaged over pairs, where the
reference is the base model (the adapter disabled, as for the KL). In the registry (`"dpo"`) the batch's
rows are pairs, chosen then rejected ((0, 1), (2, 3), ...); each row's logprob is summed over its masked
tokens, not averaged, as in the paper; `old_logp` and `adv` are unused, and β is `LossConfig.dpo_beta`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from advantage.config import LossConfig, LossName

DEFAULT_LOSS: LossName = "cispo"


class LossFn(Protocol):
    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        adv: Tensor,
        mask: Tensor,
        cfg: LossConfig,
        ref_logp: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]: ...


def aggregate(per_token: Tensor, mask: Tensor, cfg: LossConfig) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the masked tokens, as `cfg.agg` says."""
    m = mask.to(per_token.dtype)  # (B, T)
    masked = per_token * m  # (B, T)
    if cfg.agg == "seq_mean":
        # A sequence with no trained tokens contributes 0 but still counts in the mean over B.
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1.0)  # (B,)
        return per_seq.mean()
    if cfg.agg == "token_mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    b, t = per_token.shape
    return masked.sum() / (b * (cfg.max_len or t))


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1.0))


def _prepare(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, ref_logp: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Check shapes; return (logp, logp − old_logp), both with 0 at masked positions."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    for name, x in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(x.shape)}")
    if adv.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"adv must be (B,) = {tuple(logp.shape[:1])} or (B, T) = {tuple(logp.shape)}, got {tuple(adv.shape)}"
        )
    keep = mask > 0  # (B, T) bool
    zero = logp.new_zeros(())
    logp_m = torch.where(keep, logp, zero)  # (B, T)
    log_ratio = torch.where(keep, logp - old_logp.detach(), zero)  # (B, T)
    return logp_m, log_ratio


def _token_adv(adv: Tensor) -> Tensor:
    """The advantage of each token, without grad: (B, 1) from a per-sequence (B,), or the (B, T) as given."""
    a = adv.detach()
    return a[:, None] if a.dim() == 1 else a


def _finish(
    policy_tok: Tensor,
    logp: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    ref_logp: Tensor | None,
    ratio: Tensor,
    clipped: Tensor,
) -> tuple[Tensor, dict[str, float]]:
    """Aggregate the (B, T) policy loss, add β·KL, and report the shared metrics."""
    loss = aggregate(policy_tok, mask, cfg)
    metrics = {
        "clip_frac": _masked_mean(clipped.to(logp.dtype), mask),
        "ratio_mean": _masked_mean(ratio.detach(), mask),
    }
    if cfg.kl_beta > 0.0:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs ref_logp (the base model's logprobs, adapter disabled)")
        keep = mask > 0
        d = torch.where(keep, ref_logp.detach() - logp, logp.new_zeros(()))  # (B, T)
        kl = aggregate(torch.exp(d) - d - 1.0, mask, cfg)  # k3 estimator, >= 0
        loss = loss + cfg.kl_beta * kl
        metrics["kl"] = float(kl.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def ppo_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig, ref_logp: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip / GRPO: ℓ = −min(ρA, clip(ρ, 1−eps, 1+eps_high)·A) per token."""
    _, log_ratio = _prepare(logp, old_logp, adv, mask, ref_logp)
    ratio = torch.exp(log_ratio)  # (B, T)
    a = _token_adv(adv)  # (B, 1) or (B, T)
    unclipped = ratio * a  # (B, T)
    clipped_obj = ratio.clamp(1.0 - cfg.eps, 1.0 + cfg.eps_high) * a  # (B, T)
    # Where the clip is active the min picks the constant clipped term: no gradient for that token.
    clipped = clipped_obj < unclipped  # (B, T)
    return _finish(-torch.minimum(unclipped, clipped_obj), logp, mask, cfg, ref_logp, ratio, clipped)


def cispo_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig, ref_logp: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """CISPO: ℓ = −sg(clip(ρ, 0, cispo_eps_max))·A·logp per token; every token keeps a gradient."""
    logp_m, log_ratio = _prepare(logp, old_logp, adv, mask, ref_logp)
    ratio = torch.exp(log_ratio)  # (B, T)
    weight = ratio.detach().clamp(0.0, cfg.cispo_eps_max)  # (B, T), no grad
    per_token = -weight * _token_adv(adv) * logp_m  # (B, T)
    return _finish(per_token, logp, mask, cfg, ref_logp, ratio, ratio > cfg.cispo_eps_max)


def gspo_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig, ref_logp: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: PPO-clip on the sequence ratio s = exp(mean over masked tokens of (logp − old_logp)).

    Each sequence's loss is spread over its tokens, so "seq_mean" gives the paper's mean over sequences
    and the other aggregations weight sequences by length. Metrics count a clipped sequence's tokens.
    """
    if adv.dim() != 1:
        raise ValueError(f"GSPO takes one advantage per sequence, (B,); got shape {tuple(adv.shape)}.")
    _, log_ratio = _prepare(logp, old_logp, adv, mask, ref_logp)
    n_tok = mask.to(logp.dtype).sum(-1).clamp(min=1.0)  # (B,)
    seq_ratio = torch.exp(log_ratio.sum(-1) / n_tok)  # (B,)
    a = adv.detach()
    unclipped = seq_ratio * a  # (B,)
    clipped_obj = seq_ratio.clamp(1.0 - cfg.eps, 1.0 + cfg.eps_high) * a  # (B,)
    per_seq = -torch.minimum(unclipped, clipped_obj)  # (B,)
    per_token = per_seq[:, None].expand_as(logp)  # (B, T)
    ratio_tok = seq_ratio[:, None].expand_as(logp)  # (B, T)
    clipped_tok = (clipped_obj < unclipped)[:, None].expand_as(logp)  # (B, T)
    return _finish(per_token, logp, mask, cfg, ref_logp, ratio_tok, clipped_tok)


def importance_sampling_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig, ref_logp: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Plain off-policy REINFORCE: ℓ = −ρ·A per token, no clip (so clip_frac is always 0)."""
    _, log_ratio = _prepare(logp, old_logp, adv, mask, ref_logp)
    ratio = torch.exp(log_ratio)  # (B, T)
    per_token = -ratio * _token_adv(adv)  # (B, T)
    return _finish(per_token, logp, mask, cfg, ref_logp, ratio, torch.zeros_like(mask, dtype=torch.bool))


def cross_entropy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig, ref_logp: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """SFT: mean negative logprob over the masked tokens. Ignores old_logp, adv, cfg and ref_logp."""
    if logp.shape != mask.shape:
        raise ValueError(f"mask must have logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    logp_m = torch.where(mask > 0, logp, logp.new_zeros(()))  # (B, T)
    m = mask.to(logp.dtype)  # (B, T)
    loss = -(logp_m * m).sum() / m.sum().clamp(min=1.0)
    return loss, {"loss": float(loss.detach())}


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, dict[str, float]]:
    """DPO over P pairs, each input (P,) summed sequence logprobs: ℓ = −log σ(β·((π_c − ref_c) − (π_r − ref_r))),
    mean over pairs. The reference gets no gradient. Metrics: reward_margin, the mean of β·(...) (the
    implicit reward of chosen minus rejected), accuracy (the fraction of pairs where it is > 0), and each
    side's mean implicit reward."""
    shapes = {tuple(x.shape) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise ValueError(f"DPO needs four (P,) tensors of one shape, got shapes {sorted(shapes)}")
    chosen_reward = beta * (policy_chosen - ref_chosen.detach())  # (P,)
    rejected_reward = beta * (policy_rejected - ref_rejected.detach())  # (P,)
    margin = chosen_reward - rejected_reward  # (P,)
    loss = -F.logsigmoid(margin).mean()
    return loss, {
        "loss": float(loss.detach()),
        "reward_margin": float(margin.detach().mean()),
        "accuracy": float((margin.detach() > 0).to(margin.dtype).mean()),
        "chosen_reward": float(chosen_reward.detach().mean()),
        "rejected_reward": float(rejected_reward.detach().mean()),
    }


def dpo_pairs_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig, ref_logp: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """DPO in the registry's signature: rows (2k, 2k+1) are pair k's chosen and rejected sequences; each
    row's masked logprobs are summed. Needs ref_logp (the base model's)."""
    if logp.shape != mask.shape:
        raise ValueError(f"mask must have logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    if ref_logp is None:
        raise ValueError("DPO needs ref_logp (the base model's logprobs, adapter disabled)")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if logp.shape[0] % 2:
        raise ValueError(f"DPO takes pairs (chosen, rejected) of rows; got an odd number, {logp.shape[0]}")
    keep = mask > 0  # (B, T)
    zero = logp.new_zeros(())
    seq = torch.where(keep, logp, zero).sum(-1).view(-1, 2)  # (P, 2): chosen, rejected
    ref = torch.where(keep, ref_logp, zero).sum(-1).view(-1, 2)  # (P, 2)
    return dpo_loss(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], cfg.dpo_beta)


def topk_distill_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, cfg: LossConfig, ref_logp: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """KL(teacher ‖ student) over the K target tokens and "any other" (module docstring), per trained token,
    aggregated as `cfg.agg` says: `logp` (B, T, K) the student's logprobs of the K target tokens (with grad),
    `old_logp` (B, T, K) the teacher's. Metrics: loss, teacher_mass (Σ_k exp(teacher logprob): how much of
    the teacher's distribution the K tokens hold) and student_mass (the same under the student)."""
    if logp.dim() != 3 or old_logp.shape != logp.shape or mask.shape != logp.shape[:2]:
        raise ValueError(
            "distill_topk needs logp and old_logp of one (B, T, K) shape and a (B, T) mask; got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}. Datums need target_ids and "
            "target_logprobs (advantage.distill.topk_datums)."
        )
    keep = (mask > 0).unsqueeze(-1)  # (B, T, 1)
    lo = -30.0  # masked positions get logprob -30 on every side: finite, and no mass
    t = torch.where(keep, old_logp.detach(), logp.new_full((), lo))  # (B, T, K)
    s = torch.where(keep, logp, logp.new_full((), lo))  # (B, T, K)
    top = (t.exp() * (t - s)).sum(-1)  # (B, T)
    t_other = _log_rest(t)  # (B, T) log of the mass outside the K tokens
    s_other = _log_rest(s)
    rest = t_other.exp() * (t_other - s_other)  # (B, T)
    loss = aggregate(top + rest, mask, cfg)
    return loss, {
        "loss": float(loss.detach()),
        "teacher_mass": _masked_mean(t.exp().sum(-1), mask),
        "student_mass": _masked_mean(s.detach().exp().sum(-1), mask),
    }


def _log_rest(lp: Tensor) -> Tensor:
    """log(1 − Σ_k exp(lp_k)) over the last axis, kept finite when the K tokens hold (nearly) everything."""
    return torch.log1p(-lp.exp().sum(-1).clamp(max=1.0 - 1e-6))


# The one registry of losses; its keys are `advantage.config.LossName` (a test checks they agree).
LOSSES: dict[LossName, LossFn] = {
    "ppo": ppo_loss,
    "grpo": ppo_loss,
    "cispo": cispo_loss,
    "gspo": gspo_loss,
    "importance_sampling": importance_sampling_loss,
    "cross_entropy": cross_entropy_loss,
    "dpo": dpo_pairs_loss,
    "distill_topk": topk_distill_loss,
}


def get_loss(name: str) -> LossFn:
    """The loss registered under `name`; raises ValueError listing the choices otherwise."""
    try:
        return LOSSES[name]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}") from None
