"""On-policy distillation: the student samples, a teacher scores the sampled tokens, and each token's
advantage is how much more likely the teacher found it than the student did.

For a token x_t that the student sampled in context c_t, log π_S(x_t | c_t) − log π_T(x_t | c_t) is a one-sample
estimate of the reverse KL, KL(π_S ‖ π_T), at that position. Its negative is the token's advantage:

    A_t = coef · (log π_T(x_t | c_t) − log π_S(x_t | c_t))

A policy-gradient step with these advantages lowers the reverse KL on the states the student itself reaches
(GKD, Agarwal et al. 2024; Thinking Machines, "On-Policy Distillation", 2025): a dense, per-token signal
where RL has one number per episode, and no reward function. Choices made here:

- **Student logprobs are the sampler's** (the datum's `logprobs`): the policy that acted, as in the
  importance ratio of the RL losses. The teacher's come from the same engine code (`compute_logprobs`), so
  both sides are computed the same way.
- **No discounting**: each token's advantage is its own reverse-KL term, not a sum over later tokens.
- **Masked tokens** (the prompt, tool results, tokens a grammar forced) get advantage 0 and are not trained.

    tc = await student.training_client()
    datums = await tc.datums_from_groups(groups, skip_zero_variance=False)   # the student's rollouts
    teacher = await tc.compute_logprobs(datums, model="teacher@12")         # shares the tokenizer
    batch, metrics = distill_datums(datums, teacher)
    await tc.forward_backward(batch, "importance_sampling")
    await tc.optim_step(adv.AdamParams(learning_rate=1e-3))

**Soft targets** carry more than the one sampled token: the teacher's top-K distribution at every state the
student reached, trained with the "distill_topk" loss: KL(π_T ‖ π_S) over those K tokens and "any other"
(`training/losses.py`; GKD's supervised KL on the student's own samples). Where a single token decides an episode (which tool,
which unit), the sampled-token estimate above sees it only when the student happens to sample it wrongly;
the soft target shows the teacher's preference on every sample:

    teacher = await tc.compute_top_logprobs(datums, top_k=20, model="teacher@12")
    batch, metrics = topk_datums(datums, teacher)
    await tc.forward_backward(batch, "distill_topk")

`examples/cookbook/distill.py` distills a trained demo step into a fresh LoRA either way (`--top-k`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from advantage.lowlevel import ADV_KEY, Datum
from advantage.wire.ops import LogprobsReply


def reverse_kl_advantages(
    student_logprobs: Sequence[float],
    teacher_logprobs: Sequence[float],
    mask: Sequence[float],
    coef: float = 1.0,
) -> list[float]:
    """Per-token advantage coef · (teacher − student) where `mask` is on, 0.0 elsewhere (all aligned)."""
    n = len(mask)
    if len(student_logprobs) != n or len(teacher_logprobs) != n:
        raise ValueError(
            f"student ({len(student_logprobs)}), teacher ({len(teacher_logprobs)}) and mask ({n}) "
            "must have one value per token."
        )
    return [
        coef * (t - s) if m else 0.0 for s, t, m in zip(student_logprobs, teacher_logprobs, mask, strict=True)
    ]


def distill_datums(
    datums: Sequence[Datum], teacher_logprobs: Sequence[Sequence[float]], coef: float = 1.0
) -> tuple[list[Datum], dict[str, float]]:
    """The datums with per-token advantages in `extras["advantages"]` (module docstring), and metrics:
    `distill/reverse_kl` (the mean over trained tokens of student − teacher logprob: the reverse-KL
    estimate the step lowers) and `distill/tokens`."""
    if len(teacher_logprobs) != len(datums):
        raise ValueError(f"{len(teacher_logprobs)} teacher logprob lists for {len(datums)} datums.")
    if not math.isfinite(coef):
        raise ValueError(f"coef is {coef}; it must be a finite number.")
    out: list[Datum] = []
    kl_sum, tokens = 0.0, 0
    for i, (d, teacher) in enumerate(zip(datums, teacher_logprobs, strict=True)):
        if d.logprobs is None:
            raise ValueError(
                f"Datum {i} has no sampler logprobs; build it from sampled tokens (datums_from_groups, "
                "or sample()'s logprobs) so the student's own logprobs are known."
            )
        advs = reverse_kl_advantages(d.logprobs, teacher, d.loss_mask, coef)
        if not all(math.isfinite(a) for a in advs):
            raise ValueError(f"Datum {i}: a teacher or student logprob is not finite.")
        kl_sum += sum(s - t for s, t, m in zip(d.logprobs, teacher, d.loss_mask, strict=True) if m)
        tokens += d.n_trained
        out.append(d.model_copy(update={"extras": {**d.extras, ADV_KEY: advs}}))
    return out, {"distill/reverse_kl": kl_sum / max(tokens, 1), "distill/tokens": float(tokens)}


def topk_datums(datums: Sequence[Datum], teacher: LogprobsReply) -> tuple[list[Datum], dict[str, float]]:
    """The datums with the teacher's top-K tokens and logprobs as soft targets at their trained positions
    (`target_ids`, `target_logprobs`; empty lists elsewhere), for the "distill_topk" loss. `teacher` is
    `compute_top_logprobs` of these datums. Metrics: `distill/teacher_mass` (the mean share of the teacher's
    distribution its top K hold at trained positions), `distill/tokens`, and `distill/reverse_kl` (as in
    `distill_datums`) when the datums carry the sampler's logprobs."""
    if len(teacher.top_ids) != len(datums) or len(teacher.logprobs) != len(datums):
        raise ValueError(
            f"The teacher's reply has {len(teacher.top_ids)} top-k lists for {len(datums)} datums; call "
            "compute_top_logprobs on these datums."
        )
    out: list[Datum] = []
    mass, kl_sum, tokens, sampled = 0.0, 0.0, 0, True
    for i, (d, ids, lps, lp) in enumerate(
        zip(datums, teacher.top_ids, teacher.top_logprobs, teacher.logprobs, strict=True)
    ):
        if len(ids) != len(d.input_ids):
            raise ValueError(f"Datum {i}: {len(ids)} teacher positions for {len(d.input_ids)} tokens.")
        on = [bool(m) for m in d.loss_mask]
        target_ids = [list(t) if m else [] for t, m in zip(ids, on, strict=True)]
        target_lps = [list(t) if m else [] for t, m in zip(lps, on, strict=True)]
        mass += sum(math.exp(x) for t in target_lps for x in t)
        tokens += d.n_trained
        if d.logprobs is None:
            sampled = False
        else:
            kl_sum += sum(s - t for s, t, m in zip(d.logprobs, lp, on, strict=True) if m)
        # built anew (not model_copy), so the targets are checked like any datum's
        out.append(
            Datum.model_validate({**d.model_dump(), "target_ids": target_ids, "target_logprobs": target_lps})
        )
    metrics = {"distill/teacher_mass": mass / max(tokens, 1), "distill/tokens": float(tokens)}
    if sampled:
        metrics["distill/reverse_kl"] = kl_sum / max(tokens, 1)
    return out, metrics
