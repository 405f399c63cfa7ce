"""Numeric precision, chosen once for the engine and the trainer alike.

- `default_dtype`: the decoder's dtype: bf16 on CUDA, fp32 on every CPU. A CPU without native bf16
  emulates it: on a 2-core Xeon without avx512_bf16 a 1024^2 matmul ran at 48 GFLOPS in bf16 against 222 in
  fp32, and a demo train step took 110 s against 82 s. A CPU with AMX multiplies a 1024^2 bf16 matmul ~9x
  faster than fp32, but the bundled 135M model's small matmuls gain little of it: on a 2-core AMX Xeon a
  demo step's rollouts took 37.8 s in bf16 against 32.4 s in fp32 and its update 28.0 against 30.0 s
  (`benchmarks/rollout_gen.py --compare dtype --train`), while the demo's sampler-trainer logprob drift
  was 0.008-0.045 nats a step in bf16 against 0.001-0.010 in fp32. Ask for `dtype="bfloat16"` (or set ADVANTAGE_DTYPE) on a
  CPU where a bigger model makes it pay.
- `use_fp32_head`: on a bf16 decoder, the final norm, the vocabulary head and so the log-softmax still run
  in fp32, in the sampler and in the trainer, so both compute logprobs the same way.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

DTYPE_ENV = "ADVANTAGE_DTYPE"  # what "auto" means in this process, when set: bfloat16, float32 or float16
DTYPES = ("bfloat16", "float32", "float16")


def default_dtype(device: torch.device) -> str:
    """ "bfloat16" on CUDA, "float32" on CPUs (see the module docstring); the environment variable
    ADVANTAGE_DTYPE, when set, overrides both (the test suite sets float32, so that its tolerances hold on a
    GPU box too)."""
    override = os.environ.get(DTYPE_ENV)
    if override:
        if override not in DTYPES:
            raise ValueError(
                f"{DTYPE_ENV} must be one of {', '.join(DTYPES)}, got {override!r}; unset it for auto."
            )
        return override
    return "bfloat16" if device.type == "cuda" else "float32"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A dtype name ("auto", "bfloat16", "float32", "float16") as a torch dtype; "auto" asks default_dtype."""
    name = default_dtype(device) if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float32' or 'float16', got {dtype!r}.")
    return getattr(torch, name)


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

    weight: torch.Tensor  # buffers, registered in __init__
    bias: torch.Tensor | None

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
    if model.lm_head.weight.dtype == torch.float32:
        return model  # an fp32 model computes its head in fp32 already
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not isinstance(decoder.norm, _FP32Norm):
        decoder.norm = _FP32Norm(decoder.norm)
    if not isinstance(model.lm_head, _FP32Head):
        model.lm_head = _FP32Head(model.lm_head)
    return model


def column_major_linears(model: Any) -> Any:
    """Store every linear layer's (out, in) weight column-major (its transpose contiguous), in place.

    The values are unchanged; only the memory layout is. `F.linear` multiplies by the weight's transpose, and
    with this layout that transpose is an ordinary row-major matrix. Measured on a 2-core CPU with 2 torch
    threads at 32 rows (a decode step of a full batch): a 1536x576 layer in 0.27 ms against 0.68 ms, the
    49k-vocabulary head in 13 ms against 26 ms; at 64 rows and more both layouts run the same. CPU only:
    CUDA's kernels do not need it. Tied weights (SmolLM2's head is its embedding) are laid out once."""
    if next(model.parameters()).device.type != "cpu":
        return model
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear | _FP32Head) and isinstance(w, torch.Tensor) and w.dim() == 2:
            if w.is_contiguous():
                w.data = w.data.t().contiguous().t()
    return model
