"""KV-cache storage for the engine: a cache that grows in place, and a cache of prompt prefixes.

`GrowingCache` is a `transformers` cache whose layers keep their keys and values in buffers with spare
room, so a decode step writes one column instead of copying the whole cache (`DynamicCache` concatenates,
which copies every row's entire KV on every step).

`PrefixCache` keeps the KV states of recent prompts, per adapter. Agent prompts repeat: every rollout of a
task starts with the same system prompt, tool schemas and examples, and each turn of a conversation
extends the previous turn's prompt. A new prompt that starts like a cached one reuses that prefix's KV and
prefills only the rest. Entries are evicted least-recently-used beyond a byte budget, and all entries of
an adapter are dropped when its weights change.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_COLUMNS = 128  # room for this many more tokens before a buffer is copied into a larger one


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` backed by buffers with spare columns; `keys`/`values` are views of the used part.

    `offset` tokens come before its columns and are held elsewhere (a batch's shared prefix, `cascade.py`):
    they count in the sequence length that `transformers` sizes masks and positions by."""

    def __init__(self, offset: int = 0) -> None:
        self._buf: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._len = {"keys": 0, "values": 0}
        self.offset = offset
        super().__init__()

    def get_seq_length(self) -> int:
        return self.offset + super().get_seq_length()

    def _get(self, attr: str) -> torch.Tensor | None:
        buf = self._buf[attr]
        return buf if buf is None or buf.dim() < 2 else buf[..., : self._len[attr], :]

    def _set(self, attr: str, value: torch.Tensor | None) -> None:
        self._buf[attr] = value
        self._len[attr] = 0 if value is None or value.dim() < 2 else value.shape[-2]

    keys = property(lambda self: self._get("keys"), lambda self, v: self._set("keys", v))
    values = property(lambda self: self._get("values"), lambda self, v: self._set("values", v))

    def _append(self, attr: str, new: torch.Tensor) -> torch.Tensor:
        buf, used = self._buf[attr], self._len[attr]
        if buf is None or buf.dim() < 2 or buf.shape[:-2] != new.shape[:-2]:
            buf, used = None, 0
        need = used + new.shape[-2]
        if buf is None or need > buf.shape[-2]:
            grown = new.new_empty((*new.shape[:-2], need + SPARE_COLUMNS, new.shape[-1]))
            if buf is not None and used:
                grown[..., :used, :] = buf[..., :used, :]
            buf = grown
        buf[..., used:need, :] = new
        self._buf[attr], self._len[attr] = buf, need
        return buf[..., :need, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        return self._append("keys", key_states), self._append("values", value_states)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`; only the used columns are copied."""
        for attr in ("keys", "values"):
            used = self._get(attr)
            if used is not None and used.dim() >= 2:
                self._set(attr, used.index_select(0, indices))


class GrowingCache(DynamicCache):
    def __init__(self, num_layers: int, offset: int = 0) -> None:
        super().__init__()
        self.layers = [GrowingLayer(offset) for _ in range(num_layers)]

    @property
    def growing_layers(self) -> list[GrowingLayer]:
        """`layers`, as __init__ made them (DynamicCache types them as any kind of layer)."""
        return cast("list[GrowingLayer]", self.layers)

    def set_offset(self, offset: int) -> None:
        for layer in self.growing_layers:
            layer.offset = offset

    def prepend(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put the same columns (per layer (keys, values), each (kv_heads, n, head_dim)) before every row's;
        they leave the offset held elsewhere."""
        n = kv[0][0].shape[1]
        for layer, (k, v) in zip(self.growing_layers, kv, strict=True):
            for attr, new in (("keys", k), ("values", v)):
                used = layer._get(attr)
                assert used is not None and used.dim() == 4
                layer._set(attr, torch.cat([new.unsqueeze(0).expand(used.shape[0], -1, -1, -1), used], dim=2))
            layer.offset -= n


def layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a filled attention cache."""
    return [_filled(layer) for layer in cache.layers]


def _filled(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TypeError(f"A {type(layer).__name__} holds no attention keys and values.")
    return keys, values


def cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> GrowingCache:
    """A cache holding the given per-layer (keys, values), each shaped (batch, heads, length, head_dim)."""
    cache = GrowingCache(len(kv))
    for layer, (k, v) in zip(cache.growing_layers, kv, strict=True):
        layer.update(k, v)
    return cache


@dataclass
class _Entry:
    adapter: str | None
    ids: torch.Tensor  # (L,) int64
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each (heads, L, head_dim)
    nbytes: int


def common_prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


class PrefixCache:
    """Least-recently-used prompt KV states, per adapter, within `max_bytes` and `max_entries`."""

    def __init__(self, max_bytes: int, min_reuse: int = 32, max_entries: int = 256) -> None:
        self.max_bytes = max_bytes
        self.min_reuse = min_reuse
        self.max_entries = max_entries  # a lookup compares the prompts against every entry
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.nbytes = 0
        self.stats = {"hit_tokens": 0, "miss_tokens": 0, "inserts": 0, "evictions": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, adapter: str | None, prompts: list[list[int]]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None:
        """The longest cached prefix shared by all `prompts`: (per-layer (keys, values) of shape
        (1, heads, m, head_dim), m), leaving each prompt at least one token to prefill; None below `min_reuse`.
        Counts the prompts' tokens served from the cache (`hit_tokens`) and left to prefill (`miss_tokens`)."""
        key, m = self._best(adapter, prompts)
        self.stats["hit_tokens"] += m * len(prompts)
        self.stats["miss_tokens"] += sum(len(p) - m for p in prompts)
        if key is None:
            return None
        self._entries.move_to_end(key)
        return [(k[None, :, :m], v[None, :, :m]) for k, v in self._entries[key].kv], m

    def cached_len(self, adapter: str | None, prompts: list[list[int]]) -> int:
        """How many leading tokens of all `prompts` a `lookup` would serve from the cache (no stats counted)."""
        return self._best(adapter, prompts)[1]

    def _best(self, adapter: str | None, prompts: list[list[int]]) -> tuple[int | None, int]:
        if not self._entries or not prompts:
            return None, 0
        ids = [torch.tensor(p, dtype=torch.long) for p in prompts]
        limit = min(len(p) for p in prompts) - 1
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            if entry.adapter != adapter:
                continue
            m = min(limit, *(common_prefix_len(entry.ids, p) for p in ids))
            if m > best_len:
                best_key, best_len = key, m
        return (best_key, best_len) if best_len >= self.min_reuse else (None, 0)

    def insert(
        self, adapter: str | None, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Cache one prompt's KV (per layer, (heads, len(ids), head_dim)); replaces entries it extends."""
        if len(ids) < self.min_reuse:
            return
        t = torch.tensor(ids, dtype=torch.long)
        for key, entry in list(self._entries.items()):  # a prefix of this prompt is now redundant
            if entry.adapter == adapter and entry.ids.numel() <= t.numel():
                if common_prefix_len(entry.ids, t) == entry.ids.numel():
                    self._drop(key)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        self._entries[self._next] = _Entry(adapter, t, kv, nbytes)
        self._next += 1
        self.nbytes += nbytes
        self.stats["inserts"] += 1
        while self.nbytes > self.max_bytes or len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))
            self.stats["evictions"] += 1

    def clear(self, adapter: str | None = None, *, all_adapters: bool = False) -> None:
        for key, entry in list(self._entries.items()):
            if all_adapters or entry.adapter == adapter:
                self._drop(key)

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
