"""Prefilling prompts for the torch engine: distinct prompts in one left-padded forward, from the longest prefix
the prefix cache holds for them (`kv.py`); with cascade attention (`cascade.py`) that prefix stays one copy
that every row reads. Each prompt's keys and values then go into the prefix cache, so the next turn of a
conversation, or the next rollout of a group, starts where this one ended."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from advantage.engine.batch import prefix_kwargs
from advantage.engine.cascade import SharedPrefix
from advantage.engine.kv import GrowingCache, PrefixCache, cache_from, layer_kv


@dataclass
class Prefill:
    """One prefill of the running batch's adapter (`adapter`, None: the base weights) on `model`."""

    model: Any  # a transformers causal LM (or peft's wrapper of one)
    prefix_cache: PrefixCache
    adapter: str | None
    cascade: bool  # rows read one shared copy of a cached prefix
    pad_id: int
    device: torch.device

    def forward(self, unique: list[list[int]]) -> tuple[GrowingCache, SharedPrefix | None, torch.Tensor, Any]:
        """Prefill distinct prompts in one left-padded batch, starting from the longest cached prefix they
        share; each prompt's KV then goes into the prefix cache. Returns (cache, shared prefix, attention
        mask, output): with cascade attention the cached prefix stays one shared copy, and the cache and
        mask cover only the columns after it; without, the cache holds it for every prompt.

        Distinct prompts that start alike (one system prompt, different questions) have that start computed
        once: it is prefilled on its own first, into the prefix cache, and the batch starts from it."""
        if len(unique) > 1 and self.prefix_cache.max_bytes:
            common = min(len(os.path.commonprefix(unique)), min(len(p) for p in unique) - 1)
            cached = self.prefix_cache.cached_len(self.adapter, unique)
            if common - cached >= self.prefix_cache.min_reuse:
                self.forward([unique[0][:common]])
        hit = self.prefix_cache.lookup(self.adapter, unique)
        m = hit[1] if hit else 0
        rows = len(unique)
        shared: SharedPrefix | None = None
        if hit and self.cascade:
            shared = SharedPrefix(tuple(unique[0][:m]), [(k[0], v[0]) for k, v in hit[0]])
            cache = GrowingCache(int(self.model.config.num_hidden_layers), offset=m)
        elif hit:
            cache = cache_from([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in hit[0]])
        else:
            cache = GrowingCache(int(self.model.config.num_hidden_layers))
        width = max(len(p) for p in unique) - m
        ids_UP = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        attn_UP = torch.zeros((len(unique), m + width), dtype=torch.long)
        attn_UP[:, :m] = 1
        for u, p in enumerate(unique):  # the rest of each prompt, left-padded
            ids_UP[u, width - (len(p) - m) :] = torch.tensor(p[m:])
            attn_UP[u, m + width - (len(p) - m) :] = 1
        pos_UP = (attn_UP.cumsum(-1) - 1).clamp_min(0)[:, m:]
        out = self.model(
            input_ids=ids_UP.to(self.device),
            attention_mask=attn_UP.to(self.device),
            position_ids=pos_UP.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **prefix_kwargs(shared),
        )
        held = len(shared) if shared else 0  # columns of attn_UP that the cache does not hold
        one = self.cascade and rows == 1  # all of the prompt becomes the shared prefix of its rows
        if self.prefix_cache.max_bytes or one:
            for u, p in enumerate(unique):
                cols = attn_UP[u, held:].nonzero().squeeze(1).to(self.device)
                kv = [(k[u].index_select(1, cols), v[u].index_select(1, cols)) for k, v in layer_kv(cache)]
                if shared:
                    kv = [
                        (torch.cat([sk, k], 1), torch.cat([sv, v], 1))
                        for (sk, sv), (k, v) in zip(shared.kv, kv, strict=True)
                    ]
                self.prefix_cache.insert(self.adapter, p, kv)
            if one:
                shared, held = SharedPrefix(tuple(unique[0]), kv), len(unique[0])
                cache = GrowingCache(len(kv), offset=held)
                for layer, (k, v) in zip(cache.growing_layers, kv, strict=True):
                    layer.update(k[None, :, :0], v[None, :, :0])  # no columns of its own yet
        return cache, shared, attn_UP[:, held:], out


__all__ = ["Prefill"]
