"""Cascade attention: rows that share a prompt prefix read its keys and values once, not once per row.

The rollouts of an agent step share most of their prompt (system prompt, tool schemas, examples: ~700 of
the demo's ~740 tokens), and decoding is bound by reading the KV cache: 32 rows each holding their own copy
of that prefix read it 32 times per token. Here the batch keeps one copy (`SharedPrefix`), every row's cache
holds only what follows it, and attention is computed in two parts that share one softmax:

    scores = [q·K_prefix | q·K_row] · scale      (the prefix part is one matmul over all rows' queries)
    out    = softmax(scores) · [V_prefix ; V_row]

which is exactly attention over the concatenated keys. It is registered as a `transformers` attention
implementation (`CASCADE`); without a `shared_prefix` argument it is plain SDPA. Only models whose layers
all attend to the full context use it (`supports_cascade`): a sliding-window layer would have to drop
prefix columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CASCADE = "advantage_cascade"


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


def cascade_attention(
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
    # In fp32 throughout: the prefix is read once per step and the rows' own columns are few, so the upcast
    # is cheap, and bf16 scores would round by ~0.4% (the trainer's SDPA accumulates in fp32 too).
    dtype = query.dtype
    kp, vp = (t.float() for t in shared_prefix[module.layer_idx])  # (KVH, P, d)
    query, key, value = query.float(), key.float(), value.float()
    B, H, T, d = query.shape
    KVH, P = kp.shape[0], kp.shape[1]
    G, S = H // KVH, key.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(B, KVH, G * T, d)  # query head h reads kv head h // G, as repeat_kv has it
    q_all = q.transpose(0, 1).reshape(KVH, B * G * T, d)  # every row's queries against one prefix copy
    s_pre = torch.matmul(q_all, kp.transpose(1, 2)).view(KVH, B, G * T, P).transpose(0, 1)
    s_row = torch.matmul(q, key.transpose(2, 3))  # (B, KVH, G*T, S)
    if attention_mask is not None:
        keep = attention_mask[..., P:].unsqueeze(2).expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
        s_row = s_row.masked_fill(~keep, float("-inf"))
    probs = (torch.cat([s_pre, s_row], dim=-1) * scale).softmax(-1)
    out = torch.matmul(probs[..., P:], value)
    p_pre = probs[..., :P].transpose(0, 1).reshape(KVH, B * G * T, P)
    out = out + torch.matmul(p_pre, vp).view(KVH, B, G * T, d).transpose(0, 1)
    return out.reshape(B, H, T, d).transpose(1, 2).to(dtype).contiguous(), None


def _full_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA's boolean mask, always materialised: the rows' part is sliced off it."""
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


AttentionInterface.register(CASCADE, cascade_attention)
AttentionMaskInterface.register(CASCADE, _full_mask)


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
