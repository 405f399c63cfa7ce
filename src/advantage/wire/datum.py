"""`Datum`: one training sequence, as the trainer takes it and as the low-level API sends it.

What a datum can be checked for on its own (lengths, a 0/1 loss mask, finite numbers) is checked when it is
built; what needs the model (token ids in its vocabulary, its context length) is checked by the backend.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

GRAD_KEY = "logprob_grad"  # extras key of the per-token weights of the backend's "linear" loss
ADV_KEY = "advantages"  # extras key of per-token advantages, used instead of a datum's `advantage`
MAX_TOP_K = 64  # most soft-target tokens per position (a teacher's top-k)


class Datum(BaseModel):
    """One training sequence: token ids, which of them are trained, and per-token extras."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[int] = Field(description="The whole sequence: prompt and completion tokens.")
    loss_mask: list[float] = Field(description="1 on tokens the loss trains, 0 elsewhere (the prompt).")
    advantage: float = Field(0.0, description="The sequence's advantage (policy-gradient losses).")
    logprobs: list[float] | None = Field(
        None, description="The sampler's logprob of each token (importance ratios); 0.0 where unmasked."
    )
    extras: dict[str, list[float]] = Field(
        default_factory=dict, description="Per-token values for custom losses, aligned to input_ids."
    )
    target_ids: list[list[int]] | None = Field(
        None,
        description="Soft targets (the 'distill_topk' loss): at each trained position, the K token ids a "
        "teacher finds most likely there (the distribution over input_ids[j] given input_ids[:j]); "
        "an empty list at untrained positions.",
    )
    target_logprobs: list[list[float]] | None = Field(
        None, description="The teacher's logprobs of target_ids, aligned to them."
    )

    @model_validator(mode="after")
    def _check(self) -> Datum:
        n = len(self.input_ids)
        bad = [m for m in self.loss_mask if m not in (0.0, 1.0)]
        if bad:
            raise ValueError(f"loss_mask has {bad[0]!r}; its values must be 0 or 1 (1: trained).")
        if len(self.loss_mask) != n:
            raise ValueError(f"loss_mask has {len(self.loss_mask)} values for {n} input_ids.")
        if not math.isfinite(self.advantage):
            raise ValueError(f"advantage is {self.advantage}; it must be a finite number.")
        named = [("logprobs", self.logprobs)] if self.logprobs is not None else []
        for k, v in [*named, *((f"extras[{k!r}]", v) for k, v in self.extras.items())]:
            if len(v) != n:
                raise ValueError(f"{k} has {len(v)} values for {n} input_ids.")
            if not all(math.isfinite(x) for x in v):
                raise ValueError(f"{k} has a non-finite value (NaN or inf); fix or drop it.")
        self._check_targets()
        return self

    def _check_targets(self) -> None:
        ids, lps = self.target_ids, self.target_logprobs
        if ids is None and lps is None:
            return
        if ids is None or lps is None:
            raise ValueError("target_ids and target_logprobs go together; give both or neither.")
        n = len(self.input_ids)
        if len(ids) != n or len(lps) != n:
            raise ValueError(
                f"target_ids ({len(ids)}) and target_logprobs ({len(lps)}) need one list per token ({n})."
            )
        widths = {len(ids[j]) for j in range(n) if self.loss_mask[j]}
        if len(widths) > 1 or 0 in widths or any(w > MAX_TOP_K for w in widths):
            raise ValueError(
                f"Every trained position needs the same number K of target tokens, 1 <= K <= {MAX_TOP_K}; "
                f"got {sorted(widths)}."
            )
        for j in range(n):
            if len(ids[j]) != len(lps[j]):
                raise ValueError(f"Position {j}: {len(ids[j])} target_ids but {len(lps[j])} target_logprobs.")
            if not all(math.isfinite(x) and x <= 0.0 for x in lps[j]):
                raise ValueError(f"Position {j}: a target logprob is not a finite number <= 0.")

    @property
    def top_k(self) -> int:
        """K, the soft-target tokens per trained position (0 without targets)."""
        if self.target_ids is None:
            return 0
        return next((len(t) for t, m in zip(self.target_ids, self.loss_mask, strict=True) if m), 0)

    @property
    def n_trained(self) -> int:
        return sum(1 for m in self.loss_mask if m)
