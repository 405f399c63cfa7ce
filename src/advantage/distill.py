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

`examples/cookbook/distill.py` distills a trained demo step into a fresh LoRA this way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from advantage.lowlevel import ADV_KEY, Datum


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
