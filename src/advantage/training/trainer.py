"""The LoRA trainer's primitives: per-token logprobs, forward_backward with any loss, and an AdamW step.

`train_step` (in `grpo.py`) composes these; the low-level API exposes them as they are.

Prefix sharing and packing (`packing.py`): the prompt part common to a whole micro-batch runs once, as a KV
cache every row attends to; each group's rest of the prompt runs once, followed in its row by the group's
completions, under a block-causal 4D mask. The gradient flows through the shared parts too, so the update
equals the one over full sequences (checked in tests). Logprobs are computed only where the loss mask is
on: the vocabulary head never runs over the prompt. `Trainer.pack_suffixes = False` gives each sequence its
own row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from advantage.config import AdamParams, LoRAConfig
from advantage.engine.kv import layer_kv
from advantage.engine.precision import column_major_linears, resolve_dtype, use_fp32_head
from advantage.engine.weights import BaseWeights, own_memory, shared_model
from advantage.training.packing import layout, shared_prefix_len
from advantage.wire.datum import Datum

# A loss over one micro-batch: (logp (B,T), datums' tensors) -> (scalar loss, metrics)
BatchLossFn = Callable[["Batch"], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Batch:
    """A micro-batch laid out for the loss: suffix-aligned tensors, all (B, S) but the soft targets (B, S, K)."""

    logp: torch.Tensor  # new logprobs of the suffix tokens (grad), 0 where mask is 0
    old_logp: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor  # (B,)
    ref_logp: torch.Tensor | None = None
    weight: float = 1.0  # this micro-batch's share of the whole batch, for the aggregation
    extras: dict[str, Any] = field(default_factory=dict)
    target_logp: torch.Tensor | None = None  # (B, S, K) new logprobs of the datums' target_ids (grad)
    teacher_logp: torch.Tensor | None = None  # (B, S, K) the datums' target_logprobs


def init_lora(model: torch.nn.Module, seed: int) -> None:
    """Give every LoRA layer of `model` the initial weights peft gives it under `torch.manual_seed(seed)`
    (A kaiming-uniform, B zero), drawn from a generator of its own.

    peft draws from torch's global generator, which every thread of the process shares: an engine sampling
    on its own thread while a trainer was built moved that generator between the trainer's seed and peft's
    draws, and two trainers of the same seed started from different adapters (two tests that compare updates
    failed when the box was loaded). The draws are replayed in peft's order (per layer: A's and B's
    `nn.Linear` inits, then A's reset), so a seed starts from the same adapter it always did."""
    gen = torch.Generator().manual_seed(seed)

    def kaiming(shape: torch.Size) -> torch.Tensor:
        return torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=gen)

    with torch.no_grad():
        for module in model.modules():
            loras: Any = module  # peft's LoraLayer: lora_A and lora_B are ModuleDicts of nn.Linear by adapter
            for name, lin_a in getattr(loras, "lora_A", {}).items():
                lin_b = loras.lora_B[name]
                kaiming(lin_a.weight.shape), kaiming(lin_b.weight.shape)  # the nn.Linear inits
                lin_a.weight.copy_(kaiming(lin_a.weight.shape))
                lin_b.weight.zero_()


class Trainer:
    def __init__(
        self,
        model_path: str | Path,
        lora: LoRAConfig,
        *,
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 0,
        head_dtype: str = "float32",
        base_weights: BaseWeights | None = None,
    ) -> None:
        """A LoRA on the base model at `model_path`. `base_weights` (an engine's, `TorchEngine.base_weights`):
        the frozen base is built on those tensors instead of a second copy loaded from disk, when they are
        this model's on this device in this dtype (and head precision); otherwise, and without them, the
        trainer loads its own copy (`self.shares_base` says which). Only the adapter is ever written."""
        from peft import LoraConfig, get_peft_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        torch_dtype = resolve_dtype(dtype, self.device)
        fp32_head = head_dtype == "float32"
        base = None
        if base_weights is not None:
            base = shared_model(model_path, base_weights, torch_dtype, self.device, fp32_head=fp32_head)
        self.shares_base = base is not None
        if base is None:
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
            base = base.to(self.device)  # type: ignore[arg-type]  # transformers' wrapped .to() hides its signature
            if fp32_head:  # the engine's logprobs are computed the same way (engine/precision.py)
                use_fp32_head(base)
            # Laid out as the engine lays out the weights a trainer may share instead: the matmuls then sum in
            # the same order, and a step is bit for bit the same with or without sharing.
            own_memory(column_major_linears(base))  # both in place
        base.config.use_cache = True
        peft_cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale is valid
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        self.model: Any = get_peft_model(base, peft_cfg)
        init_lora(self.model, seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pack_suffixes = True  # False: one row per sequence (kept for benchmarks and tests)
        self.last_entropy = (0.0, 0)  # (sum, tokens) of the policy entropy in the last sequence_logprobs
        self.last_slots = (0, 0)  # (sequence tokens, slots incl. padding) the last sequence_logprobs computed
        # (B, S, K) logprobs of the datums' target_ids (soft targets) in the last sequence_logprobs, else None
        self.last_targets: torch.Tensor | None = None
        self.checkpointing = False  # gradient checkpointing on (`gradient_checkpointing`)

    @contextlib.contextmanager
    def gradient_checkpointing(self, on: bool = True) -> Iterator[None]:
        """Recompute each decoder layer's activations in the backward pass instead of keeping them
        (`TrainConfig.gradient_checkpointing`): the activations held drop from one set per layer to one
        layer's, for about one more forward pass of compute. The gradients are the same.

        HF's checkpointed layers drop the KV cache, so while it is on no prompt prefix runs as a cache: not
        the batch's (`SharedPrefix`, which then refuses), nor a micro-batch's own. Every row runs its prompt
        itself; packing still runs each group's prompt once per row."""
        was = self.checkpointing
        self._set_checkpointing(on)
        try:
            yield
        finally:
            self._set_checkpointing(was)

    def _set_checkpointing(self, on: bool) -> None:
        if on == self.checkpointing:
            return
        base = self.model.get_base_model()
        if on:  # non-reentrant: the RNG (LoRA dropout) is replayed, and no input needs requires_grad
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            base.disable_input_require_grads()  # the hook it adds for reentrant use, and never removes
        else:
            base.activation_checkpointing_disable()
        self.checkpointing = on

    # ------------------------------------------------------------------ logprobs
    @property
    def decoder(self) -> Any:
        return self.model.get_base_model().model  # LoRA layers are injected in place

    def sequence_logprobs(
        self,
        datums: list[Datum],
        *,
        use_adapter: bool = True,
        prefix: SharedPrefix | None = None,
        prefix_len: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """New logprobs of each datum's tokens after the shared prefix: ((B, S), prefix length P).

        Position j of the suffix is token input_ids[P + j]; its logprob is filled where loss_mask is 1.
        With `prefix` (the whole batch's shared prefix, run once per step), P is its length and the datums'
        own common start after it is laid out as rows, not recomputed as a second prefix. `prefix_len`
        (without `prefix`): run that many leading tokens as the prefix, so that the result lines up with
        another pass's (the reference pass lines up with a pass that had the batch's prefix)."""
        if prefix is not None and self.checkpointing:
            raise ValueError(
                "A SharedPrefix is a KV cache, which gradient checkpointing drops: run without one while "
                "checkpointing (primitives.run_share does)."
            )
        if self.checkpointing:
            P = 0  # no prefix as a KV cache (gradient_checkpointing)
        else:
            P = len(prefix.ids) if prefix is not None else shared_prefix_len(datums)
            P = P if prefix_len is None else prefix_len
        inner = self.decoder
        head = self.model.get_base_model().lm_head
        ctx = self.model.disable_adapter() if not use_adapter else contextlib.nullcontext()
        lay = layout(datums, P, self.pad_id, share=self.pack_suffixes)
        shared = P if prefix is not None else 0  # computed once per step, not here
        self.last_slots = (lay.real_tokens - shared, lay.slot_tokens - shared)
        dev = self.device
        with ctx:
            cache = DynamicCache()
            h_last_1H = None
            if prefix is not None:
                cache, h_last_1H = prefix.attach()
                cache.batch_repeat_interleave(lay.ids_RS.shape[0])
            elif P > 0:
                ids = torch.tensor([datums[0].input_ids[:P]], device=dev)
                out = inner(input_ids=ids, past_key_values=cache, use_cache=True)
                h_last_1H = out.last_hidden_state[0, -1:, :]
                cache.batch_repeat_interleave(lay.ids_RS.shape[0])
            out = inner(
                input_ids=lay.ids_RS.to(dev),
                attention_mask=lay.see_RSK.unsqueeze(1).to(dev),  # (R, 1, S, P + S)
                position_ids=lay.pos_RS.to(dev),
                past_key_values=cache if P > 0 else None,
                use_cache=P > 0,
            )
            h_NH = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
            if h_last_1H is None:  # no shared prefix: the first token of a sequence is never trained
                h_last_1H = torch.zeros_like(h_NH[:1])
            h_all = torch.cat([h_last_1H, h_NH], dim=0)  # row 0: the prefix's last; flat slot f: row f + 1
            mask_BS = lay.mask_BS.to(dev)
            pred_NH = h_all[lay.pick_BS.to(dev)[mask_BS]]
            logits_NV = head(pred_NH).float()
            targets_N = lay.target_BS.to(dev)[mask_BS]
            logp_NV = torch.log_softmax(logits_NV, dim=-1)
            lp_N = logp_NV.gather(1, targets_N.unsqueeze(1)).squeeze(1)
            logp_BS = torch.zeros(mask_BS.shape, dtype=lp_N.dtype, device=dev).masked_scatter(mask_BS, lp_N)
            self.last_targets = _target_logprobs(datums, P, mask_BS, logp_NV)
            with torch.no_grad():  # the policy's entropy at the trained positions: a collapse shows here
                self.last_entropy = (float(-(logp_NV.exp() * logp_NV).sum()), int(lp_N.numel()))
        return logp_BS, P

    # ------------------------------------------------------------------ primitives
    def forward_backward(
        self,
        datums: list[Datum],
        loss_fn: BatchLossFn,
        *,
        weight: float = 1.0,
        ref_model: bool = False,
        prefix: SharedPrefix | None = None,
    ) -> tuple[dict[str, float], list[list[float]]]:
        """Accumulate gradients of `loss_fn` on one micro-batch. Returns its metrics and the new per-token
        logprobs, one list per datum aligned to its input_ids (0.0 where the loss mask is 0). With `prefix`,
        the gradient that reaches the shared prefix waits in it until `prefix.backward()`."""
        self.model.train()
        logp_BS, P = self.sequence_logprobs(datums, prefix=prefix)
        entropy_sum, n_tokens = self.last_entropy  # before the reference pass overwrites it
        batch = _layout(datums, logp_BS, P, weight, self.last_targets)
        if ref_model:
            slots = self.last_slots  # the policy pass's, which the metrics report
            with torch.no_grad():  # the base weights, laid out as the policy pass was (the same P)
                batch.ref_logp = self.sequence_logprobs(datums, use_adapter=False, prefix_len=P)[0]
            self.last_slots = slots
        loss, metrics = loss_fn(batch)
        metrics = {**metrics, "entropy": entropy_sum / max(n_tokens, 1)}
        (loss * weight).backward()
        if prefix is not None:
            prefix.collect()
        return metrics, aligned_logprobs(datums, logp_BS.detach(), P)

    @torch.no_grad()
    def forward(self, datums: list[Datum]) -> list[list[float]]:
        """The current weights' logprobs of one micro-batch, aligned to input_ids (0.0 where unmasked)."""
        logp_BS, P = self.sequence_logprobs(datums)
        return aligned_logprobs(datums, logp_BS, P)

    def optim_step(self, adam: AdamParams, lr: float | None = None) -> float:
        """One AdamW step on the accumulated gradients, which are then cleared. Returns the gradient's norm.
        `lr` overrides `adam.learning_rate` (a schedule's rate for this step).

        A non-finite gradient is not applied (the norm says so). A step that leaves any adapter weight
        non-finite is undone, weights and optimizer state both, and raises ValueError: served weights that
        answer NaN would break every later request, so such a step must never be checkpointed. A step that
        raises midway (torch refuses some overflowing values) is undone the same way."""
        lr = adam.learning_rate if lr is None else lr
        weight_decay = adam.weight_decay
        for group in self.optimizer.param_groups:
            group.update(lr=lr, betas=adam.betas, weight_decay=weight_decay)
        try:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, adam.max_grad_norm))
            if not math.isfinite(norm):
                return norm
            # The LoRA weights and their Adam moments are small: a copy per step is cheap insurance.
            weights = [p.detach().clone() for p in self.params]
            state = {
                p: {
                    k: v.clone() if isinstance(v, torch.Tensor) else v
                    for k, v in self.optimizer.state[p].items()
                }
                for p in self.params
                if p in self.optimizer.state
            }

            def undo() -> None:
                with torch.no_grad():
                    for p, w in zip(self.params, weights, strict=True):
                        p.copy_(w)
                for p in self.params:
                    if p in state:
                        self.optimizer.state[p] = state[p]
                    else:
                        self.optimizer.state.pop(p, None)

            try:
                self.optimizer.step()
                finite = bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all())
            except BaseException:
                undo()
                raise
            if not finite:
                undo()
                raise ValueError(
                    f"This optimizer step (lr={lr:g}, weight_decay={weight_decay:g}) made adapter weights "
                    "non-finite, so it was undone: the weights and optimizer state are as before it. Lower "
                    "the learning rate, or check the loss for huge values."
                )
            return norm
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state
    def save(self, out: Path) -> None:
        self.model.save_pretrained(out)
        torch.save(self.optimizer.state_dict(), out / "optimizer.pt")

    def load(self, src: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(src / "adapter_model.safetensors"))
        opt = src / "optimizer.pt"
        if opt.exists():
            # Read onto the CPU: a checkpoint written on a GPU then loads anywhere. load_state_dict moves
            # the moments to their parameters' device and keeps Adam's step counts on the CPU, as it makes them.
            self.optimizer.load_state_dict(torch.load(opt, weights_only=True, map_location="cpu"))
        else:  # an adapter saved without its moments: they start afresh, never left over from other weights
            self.optimizer.state.clear()


class SharedPrefix:
    """The prompt part common to a whole batch (system prompt, tools, examples), run once per optimizer step
    instead of once per micro-batch.

    Its forward pass runs once, with gradients, and its graph is kept. Each micro-batch attends to detached
    copies of its keys and values (and of its last hidden state, which predicts the first token after it);
    their gradients are summed over the micro-batches (`collect`) and sent through the prefix's graph once
    (`backward`). The adapter's gradient is the same as recomputing the prefix in every micro-batch, for a
    third to a half less work when a long system prompt is split over several micro-batches."""

    def __init__(self, trainer: Trainer, ids: list[int]) -> None:
        self.ids = ids
        trainer.model.train()  # as forward_backward runs the rows (LoRA dropout, if any)
        cache = DynamicCache()
        out = trainer.decoder(
            input_ids=torch.tensor([ids], device=trainer.device), past_key_values=cache, use_cache=True
        )
        self._outputs: list[torch.Tensor] = [t for kv in layer_kv(cache) for t in kv]
        self._outputs.append(out.last_hidden_state[0, -1:, :])
        self._leaves: list[torch.Tensor] = []
        self._grads: list[torch.Tensor | None] = [None] * len(self._outputs)

    def attach(self) -> tuple[DynamicCache, torch.Tensor]:
        """A fresh cache over detached copies of the prefix's keys and values, and its last hidden state."""
        self._leaves = [t.detach().requires_grad_() for t in self._outputs]
        kv = self._leaves[:-1]
        return DynamicCache(ddp_cache_data=list(zip(kv[0::2], kv[1::2], strict=True))), self._leaves[-1]

    def collect(self) -> None:
        """Add the last micro-batch's gradients w.r.t. the copies to the running sums."""
        for i, leaf in enumerate(self._leaves):
            if leaf.grad is not None:
                g = self._grads[i]
                self._grads[i] = leaf.grad if g is None else g + leaf.grad
        self._leaves = []

    def backward(self) -> None:
        """Send the summed gradients through the prefix's graph (into the adapter's .grad), then free it."""
        pairs = [(t, g) for t, g in zip(self._outputs, self._grads, strict=True) if g is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self._outputs, self._grads = [], []


def aligned_logprobs(datums: list[Datum], logp_BS: torch.Tensor, P: int) -> list[list[float]]:
    """Suffix-aligned (B, S) logprobs back to one list per datum over all its positions."""
    rows = logp_BS.float().tolist()
    return [[0.0] * P + rows[i][: len(d.input_ids) - P] for i, d in enumerate(datums)]


def _target_logprobs(
    datums: list[Datum], P: int, mask_BS: torch.Tensor, logp_NV: torch.Tensor
) -> torch.Tensor | None:
    """(B, S, K) logprobs of each datum's target_ids at its trained suffix positions (0 elsewhere), with
    grad, from the (N, V) log-softmax of the trained positions; None when the datums carry no targets."""
    K = datums[0].top_k
    if not K:
        return None
    B, S = mask_BS.shape
    ids_BSK = _per_position(datums, P, (B, S, K), lambda d: d.target_ids, torch.long)
    lp_NK = logp_NV.gather(1, ids_BSK.to(logp_NV.device)[mask_BS])
    out = torch.zeros((B, S, K), dtype=lp_NK.dtype, device=lp_NK.device)
    return out.masked_scatter(mask_BS.unsqueeze(-1).expand(B, S, K), lp_NK)


def _per_position(
    datums: list[Datum],
    P: int,
    shape: tuple[int, ...],
    lists: Callable[[Datum], list[list[Any]] | None],
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, S, K): each datum's per-position K-lists (soft targets) at its trained suffix positions, 0 elsewhere."""
    out = torch.zeros(shape, dtype=dtype)
    for i, d in enumerate(datums):
        rows = lists(d)
        assert rows is not None  # check_datums: all datums or none carry targets, with one K
        for j in range(len(d.input_ids) - P):
            if d.loss_mask[P + j]:
                out[i, j] = torch.tensor(rows[P + j], dtype=dtype)
    return out


def _layout(
    datums: list[Datum], logp_BS: torch.Tensor, P: int, weight: float, targets_BSK: torch.Tensor | None = None
) -> Batch:
    B, S = logp_BS.shape
    old_BS = torch.zeros((B, S))
    mask_BS = torch.zeros((B, S))
    extras = {k: torch.zeros((B, S)) for k in datums[0].extras}
    for i, d in enumerate(datums):
        n = len(d.input_ids) - P
        mask_BS[i, :n] = torch.tensor(d.loss_mask[P:], dtype=torch.float32)
        if d.logprobs is not None:
            old_BS[i, :n] = torch.tensor(d.logprobs[P:], dtype=torch.float32)
        for k, x_BS in extras.items():
            x_BS[i, :n] = torch.tensor(d.extras[k][P:], dtype=torch.float32)
    adv_B = torch.tensor([d.advantage for d in datums], dtype=torch.float32)
    dev = logp_BS.device
    teacher_BSK = None
    if targets_BSK is not None:
        shape = tuple(targets_BSK.shape)
        teacher_BSK = _per_position(datums, P, shape, lambda d: d.target_logprobs, torch.float32)
    return Batch(
        logp=logp_BS,
        old_logp=old_BS.to(dev),
        mask=mask_BS.to(dev),
        adv=adv_B.to(dev),
        weight=weight,
        extras={k: x.to(dev) for k, x in extras.items()},
        target_logp=targets_BSK,
        teacher_logp=None if teacher_BSK is None else teacher_BSK.to(dev),
    )
