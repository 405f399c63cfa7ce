"""Precision of the output head: the final norm, the vocabulary head and so the log-softmax run in fp32 on
top of a bf16 decoder. The sampler (engine) and the trainer both use it, so they compute logprobs the same
way."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _FP32Norm(nn.Module):
    """The model's final norm, run on fp32 input so that its output stays fp32 (RMSNorm variants cast back
    to their input's dtype)."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Any) -> Any:
        return self.inner(x.float())


class _FP32Head(nn.Module):
    """The vocabulary head with an fp32 copy of its (frozen) weight: logits in fp32."""

    def __init__(self, head: Any) -> None:
        super().__init__()
        self.register_buffer("weight", head.weight.detach().to(torch.float32).clone(), persistent=False)
        bias = getattr(head, "bias", None)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float().clone(), persistent=False
        )

    def forward(self, h: Any) -> Any:
        return torch.nn.functional.linear(h.float(), self.weight, self.bias)


def use_fp32_head(model: Any) -> Any:
    """Run the final norm, the vocabulary head (and so the log-softmax) of a bf16 causal LM in fp32.

    Sampler and trainer both do this. In bf16, logits of magnitude ~20 are rounded to steps of ~0.06, and the
    same token's logprob then differs between the engine's batch and the trainer's by up to ~0.1 nats; in fp32
    only the (much smaller) differences of the bf16 decoder layers are left. Costs one fp32 copy of the head
    (113 MB for SmolLM2) and an fp32 matmul over the positions whose logits are needed."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not isinstance(decoder.norm, _FP32Norm):
        decoder.norm = _FP32Norm(decoder.norm)
    if not isinstance(model.lm_head, _FP32Head):
        model.lm_head = _FP32Head(model.lm_head)
    return model
