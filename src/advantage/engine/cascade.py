"""Cascade attention: rows that share a prompt prefix read its keys and values once, not once per row.

The rollouts of an agent step share most of their prompt (system prompt, tool schemas, examples: ~700 of
the demo's ~740 tokens), and decoding is bound by reading the KV cache: 32 rows each holding their own copy
of that prefix read it 32 times per token. Here the batch keeps one copy (`SharedPrefix`), every row's cache
holds only what follows it, and attention is computed in two parts that share one softmax:

    scores = [q·K_prefix | q·K_row] · scale      (the prefix part is one matmul over all rows' queries)
    out    = softmax(scores) · [V_prefix ; V_row]

which is exactly attention over the concatenated keys. On CPU each part runs in torch's flash kernel, which
returns the part's log-sum-exp of scores next to its output, and the two are merged by those (as FlashInfer's
cascade kernels do): no score matrix is materialised, and the bf16 keys and values are read as they are,
never copied to fp32 (the kernel accumulates in fp32; on this project's 2-core boxes the copies and the score
matrices cost more than the arithmetic). Elsewhere the two parts share one fp32 softmax (`two_part_attention`).
It is registered as a `transformers` attention implementation (`CASCADE`); without a `shared_prefix`
argument it is plain SDPA. Only models whose layers all attend to the full context use it
(`supports_cascade`): a sliding-window layer would have to drop prefix columns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CASCADE = "advantage_cascade"
CASCADE_TWO_PART = "advantage_cascade_two_part"
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # returns (out, log-sum-exp, ...)

# (query, key, value, mask, prefix keys, prefix values, scale) -> attention output (B, T, H, d)
Parts = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, float],
    torch.Tensor,
]


@dataclass(frozen=True)
class SharedPrefix:
    """The first `len(ids)` tokens of every row in a batch, and their per-layer (keys, values), each
    shaped (kv_heads, len(ids), head_dim)."""

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.ids)

    def common_len(self, other: SharedPrefix | None) -> int:
        return 0 if other is None else len(os.path.commonprefix([self.ids, other.ids]))

    def head(self, n: int) -> SharedPrefix:
        """The first `n` tokens (views, no copy)."""
        return SharedPrefix(self.ids[:n], [(k[:, :n], v[:, :n]) for k, v in self.kv])

    def tail(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) of the tokens from `n` on."""
        return [(k[:, n:], v[:, n:]) for k, v in self.kv]


def _cascade(parts: Parts | None) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention(
        module: Any,
        query: torch.Tensor,  # (B, H, T, d)
        key: torch.Tensor,  # (B, KVH, S, d): the rows' own columns, after the prefix
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,  # (B, 1, T, P + S) bool, True = attend
        dropout: float = 0.0,
        scaling: float | None = None,
        shared_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if shared_prefix is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        kp, vp = shared_prefix[module.layer_idx]  # (KVH, P, d)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        run = parts or (_flash_parts if query.device.type == "cpu" else two_part_attention)
        return run(query, key, value, attention_mask, kp, vp, scale), None

    return attention


def _grouped(query: torch.Tensor, kvh: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, KVH, G*T, d): query head h reads kv head h // G, as repeat_kv has it."""
    B, H, T, d = query.shape
    return query.reshape(B, kvh, H // kvh * T, d)


def _row_keep(
    attention_mask: torch.Tensor | None, B: int, G: int, T: int, P: int, S: int
) -> torch.Tensor | None:
    """The rows' own columns of the mask, one row per (query head of a group, position): (B, 1, G*T, S)."""
    if attention_mask is None:
        return None
    return attention_mask[..., P:].unsqueeze(2).expand(B, 1, G, T, S).reshape(B, 1, G * T, S)


def _flash_parts(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kp: torch.Tensor,
    vp: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Each part in torch's CPU flash kernel, merged by the parts' log-sum-exps (in fp32)."""
    B, H, T, d = query.shape
    KVH, P, S = kp.shape[0], kp.shape[1], key.shape[2]
    G = H // KVH
    q = _grouped(query, KVH)
    q_all = q.transpose(0, 1).reshape(1, KVH, B * G * T, d)  # every row's queries against one prefix copy
    o_pre, l_pre = _flash(q_all, kp[None], vp[None], 0.0, False, scale=scale)[:2]
    o_pre = o_pre.view(KVH, B, G * T, d).transpose(0, 1)
    l_pre = l_pre.view(KVH, B, G * T).transpose(0, 1)
    keep = _row_keep(attention_mask, B, G, T, P, S)
    bias = None
    if keep is not None:
        bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~keep, float("-inf")
        )
    o_row, l_row = _flash(q, key, value, 0.0, False, attn_mask=bias, scale=scale)[:2]
    if keep is not None:  # a query with none of its row's columns to see gets o = 0, lse = 0 from the kernel
        l_row = l_row.masked_fill(~keep.any(-1), float("-inf"))
    total = torch.logaddexp(l_pre, l_row)
    w_pre = (l_pre - total).exp().unsqueeze(-1)
    w_row = (l_row - total).exp().unsqueeze(-1)
    out = o_pre.float() * w_pre + o_row.float() * w_row  # (B, KVH, G*T, d)
    return out.reshape(B, H, T, d).transpose(1, 2).to(query.dtype).contiguous()


def two_part_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kp: torch.Tensor,
    vp: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Both parts' scores under one softmax, in fp32 throughout, on any device: the exact reference (it
    materialises the score matrix and upcasts every key and value it reads on every call)."""
    dtype = query.dtype
    kp, vp = kp.float(), vp.float()
    B, H, T, d = query.shape
    KVH, P, S = kp.shape[0], kp.shape[1], key.shape[2]
    G = H // KVH
    q = _grouped(query.float(), KVH)
    key, value = key.float(), value.float()
    q_all = q.transpose(0, 1).reshape(KVH, B * G * T, d)
    s_pre = torch.matmul(q_all, kp.transpose(1, 2)).view(KVH, B, G * T, P).transpose(0, 1)
    s_row = torch.matmul(q, key.transpose(2, 3))  # (B, KVH, G*T, S)
    keep = _row_keep(attention_mask, B, G, T, P, S)
    if keep is not None:
        s_row = s_row.masked_fill(~keep, float("-inf"))
    probs = (torch.cat([s_pre, s_row], dim=-1) * scale).softmax(-1)
    out = torch.matmul(probs[..., P:], value)
    p_pre = probs[..., :P].transpose(0, 1).reshape(KVH, B * G * T, P)
    out = out + torch.matmul(p_pre, vp).view(KVH, B, G * T, d).transpose(0, 1)
    return out.reshape(B, H, T, d).transpose(1, 2).to(dtype).contiguous()


def _full_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA's boolean mask, always materialised: the rows' part is sliced off it."""
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


cascade_attention = _cascade(None)
AttentionInterface.register(CASCADE, cascade_attention)
AttentionMaskInterface.register(CASCADE, _full_mask)
# The same with both parts under one fp32 softmax on CPU too: the reference `benchmarks/rollout_gen.py
# --compare attention` times the flash parts against.
AttentionInterface.register(CASCADE_TWO_PART, _cascade(two_part_attention))
AttentionMaskInterface.register(CASCADE_TWO_PART, _full_mask)


def supports_cascade(model: Any) -> bool:
    """Whether every layer attends to the whole context through the standard attention interface."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    windowed = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    return (
        all(t == "full_attention" for t in types)
        and not windowed
        and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager")
    )
