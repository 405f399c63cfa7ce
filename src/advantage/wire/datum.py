"""`Datum`: one training sequence, as the trainer takes it and as the low-level API sends it.

What a datum can be checked for on its own (lengths, a 0/1 loss mask, finite numbers) is checked when it is
built; what needs the model (token ids in its vocabulary, its context length) is checked by the backend.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

GRAD_KEY = "logprob_grad"  # extras key of the per-token weights of the backend's "linear" loss
ADV_KEY = "advantages"  # extras key of per-token advantages, used instead of a datum's `advantage`


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
        return self

    @property
    def n_trained(self) -> int:
        return sum(1 for m in self.loss_mask if m)
