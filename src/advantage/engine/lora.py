"""LoRA adapters served by merging them into the weights, for fp32 models on CPU.

peft applies an adapter as extra layers: every targeted linear layer runs its base matmul, then x·Aᵀ·Bᵀ
scaled, then an add, and the wrapper itself costs time even with the adapter off. At decode on a 2-core
CPU (SmolLM2-135M, 32 rows) that made a step ~30% slower than the plain model. Here the engine's model
stays plain: the batch's adapter is merged into the weights (W + s·B·A) when the batch starts, and the
base weights are swapped back in when another adapter (or none) is needed. Switching costs one
pass over the targeted weights, once per batch, not per token. The merge is made in a buffer of its own
per layer and swapped in: the base weights are never written, so a trainer may share them (`weights.py`).

Only for fp32 weights: merged into bf16 weights, a small update (a few optimizer steps of LoRA) would be
rounded away, so the engine keeps peft there. Standard LoRA only (no DoRA, no per-module rank patterns);
anything else raises and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

_PREFIX = "base_model.model."  # how peft names the wrapped model's modules in adapter_model.safetensors


@dataclass
class LoraWeights:
    """One adapter: per targeted module name, (A (r, in), B (out, r)) and the scale alpha / r."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float


def load_lora(path: str | Path, model: nn.Module) -> LoraWeights:
    """Read a PEFT LoRA adapter directory and check that it fits `model`."""
    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    unsupported = [
        k
        for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save")
        if cfg.get(k)
    ]
    if unsupported or cfg.get("bias", "none") != "none":
        raise ValueError(
            f"Adapter {path} uses {unsupported or ['bias']}, which merged serving does not support; "
            "serve it with the peft path (engine option merge_lora=False)."
        )
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scaling = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    tensors = load_file(path / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")].removeprefix(_PREFIX)
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        target = modules.get(name)
        if b is None or not isinstance(target, nn.Linear):
            raise ValueError(
                f"Adapter {path}: {name!r} is not a linear layer of this model (or lacks lora_B)."
            )
        if a.shape != (r, target.in_features) or b.shape != (target.out_features, r):
            raise ValueError(f"Adapter {path}: {name!r} has shapes {tuple(a.shape)}, {tuple(b.shape)}.")
        w = target.weight
        pairs[name] = (a.to(w.device, w.dtype), b.to(w.device, w.dtype))
    if not pairs:
        raise ValueError(f"Adapter {path} has no LoRA weights.")
    return LoraWeights(pairs, scaling)


class MergedLora:
    """Which adapter is merged into `model`'s weights now.

    The base weights are never written: they may be shared with a trainer (`weights.py`). A targeted layer's
    merged weight lives in a buffer of its own, made once, and is swapped in for the batch; going back to
    the base weights swaps the base tensor back in, which costs nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        # module name -> its base weight, kept the first time an adapter is merged into it
        self.base: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}  # module name -> the buffer its merged weight is made in
        self.active: str | None = None
        self._merged: list[str] = []  # modules whose weight is their merged buffer now

    @torch.no_grad()
    def activate(self, name: str | None, adapters: dict[str, LoraWeights]) -> None:
        """Make the weights base + adapter `name` (None: the base weights)."""
        if name == self.active:
            return
        self.restore()
        if name is not None:
            lora = adapters[name]
            for module, (a, b) in lora.pairs.items():
                w = self.modules[module].weight
                base = self.base.setdefault(module, w.data)
                buf = self.buffers.get(module)
                if buf is None:  # the base's layout (column-major on CPU: precision.py)
                    buf = torch.empty_strided(
                        base.size(), base.stride(), dtype=base.dtype, device=base.device
                    )
                    self.buffers[module] = buf
                buf.copy_(base).addmm_(b, a, alpha=lora.scaling)  # W + s * B @ A
                w.data = buf
                self._merged.append(module)
        self.active = name

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the base weights."""
        for module in self._merged:
            self.modules[module].weight.data = self.base[module]
        self._merged.clear()
        self.active = None
