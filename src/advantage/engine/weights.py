"""A base model's frozen weights, held once per process and read by the engine and the trainers alike.

`TorchEngine` loads a base model; its `base_weights` name every tensor of it. A `Trainer` of the same model,
device and dtypes builds its model around those tensors (`shared_model`) instead of loading a second copy:
on one device the base weights are held once, however many models train on them.

Nothing writes into them. The engine merges an adapter into a separate buffer that it swaps in for the
batch (`lora.py`); peft's LoRA layers (the engine's on bf16 or CUDA, the trainer's) add to the base layer's
output; the trainer's optimizer holds only the adapter's parameters, and the shared ones never require a
gradient. Where the trainer's model would differ (another directory, device or dtype, or one fp32 head and one
not), `shared_model` returns None and the trainer loads its own copy, as a remote (Ray) trainer always does.

`own_memory`: the engine's weights are copies of its own, not views of the mapped checkpoint file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseWeights:
    """The tensors of a loaded base model by name (tied names both, as one tensor), and where it came from."""

    source: Path  # the model's directory, resolved
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, source: str | Path) -> BaseWeights:
        """Every parameter and buffer of `model`, detached: the storage stays the model's own."""
        seen: dict[int, torch.Tensor] = {}  # keeps tied weights one tensor
        named = [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
        tensors = {name: seen.setdefault(id(t), t.detach()) for name, t in named}
        return cls(Path(source).resolve(), tensors)


def own_memory(model: nn.Module) -> nn.Module:
    """Give every CPU tensor of `model` still laid out as loaded a copy in memory of its own, in place.

    transformers maps a safetensors checkpoint into memory, and the loaded tensors are views of that mapping.
    The engine lays its linear layers out anew (`precision.column_major_linears`), reading every page of the
    file; then one tensor left on the mapping (a norm's weight) keeps the whole file mapped, and every page
    read stays in the process's resident memory: a second copy of the weights, file-backed. Measured with
    SmolLM2-135M in fp32 (`benchmarks/memory.py`): 526 MB of RSS freed. The values are unchanged."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.is_contiguous():  # the relaid linears are not: they stay
                t.data = t.data.clone()
    return model


def shared_model(
    model_path: str | Path, weights: BaseWeights, dtype: torch.dtype, device: torch.device, *, fp32_head: bool
) -> Any | None:
    """The causal LM at `model_path` with `weights`' tensors as its own (no copy), frozen; None when they do
    not fit: another model, device, dtype or head precision (the caller then loads its own copy).

    The model is built on the meta device, given the fp32 head if asked (`precision.use_fp32_head`, as the
    engine's), and then every one of its tensors is taken from `weights` by name: parameters (frozen) and
    buffers (the rotary tables, the fp32 head's copy) alike."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from advantage.engine.precision import use_fp32_head

    if Path(model_path).resolve() != weights.source:
        return None
    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights(include_buffers=True):  # no storage: every tensor comes from `weights`
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if fp32_head:
        use_fp32_head(model)
    wanted = [
        *((n, t, True) for n, t in model.named_parameters(remove_duplicate=False)),
        *((n, t, False) for n, t in model.named_buffers(remove_duplicate=False)),
    ]
    for name, t, _ in wanted:
        src = weights.tensors.get(name)
        if src is None or (src.shape, src.dtype, src.device) != (t.shape, t.dtype, device):
            found = None if src is None else (tuple(src.shape), src.dtype, src.device)
            log.info(
                "Not sharing the base weights of %s: %s is %s here, %s in the engine.",
                model_path,
                name,
                (tuple(t.shape), t.dtype, device),
                found,
            )
            return None
    params: dict[int, nn.Parameter] = {}  # one Parameter per shared tensor: tied weights stay tied
    for name, _, is_param in wanted:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        src = weights.tensors[name]
        if is_param:
            setattr(owner, leaf, params.setdefault(id(src), nn.Parameter(src, requires_grad=False)))
        else:
            setattr(owner, leaf, src)
    return model.eval()
