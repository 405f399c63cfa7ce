"""The torch engine's running batch: its rows (`rows.py`), their KV cache, which of the cache's columns hold
each row's real tokens, and the token each row feeds next. A prompt prefix that every row shares is kept
once (`cascade.py`), outside the rows' own columns.

Rows join left-padded (`merge`): the shorter side gets zero columns on the left, masked out, so every row's
newest token sits in the last column and one decode step feeds all of them. Rows leave (`compact`) with the
columns that no remaining row reads. The engine thread alone touches a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from advantage.engine.cascade import SharedPrefix
from advantage.engine.kv import GrowingCache
from advantage.engine.rows import Row


@dataclass
class Batch:
    rows: list[Row] = field(default_factory=list)
    cache: GrowingCache | None = None
    shared: SharedPrefix | None = None  # the batch's prompt prefix, kept once for all rows
    attn: torch.Tensor | None = None  # (B, L) 1 where the cache holds a real token (after `shared`)
    last: torch.Tensor | None = None  # (B,) token to feed at the next decode step

    @property
    def held(self) -> int:
        """Tokens of the shared prefix (columns the rows read but do not hold)."""
        return len(self.shared) if self.shared else 0

    def prefix_kwargs(self) -> dict[str, Any]:
        """The model's keyword arguments for this batch's shared prefix (none without one)."""
        return prefix_kwargs(self.shared)

    def full_mask(self, attn: torch.Tensor) -> torch.Tensor:
        """The attention mask over the shared prefix and the rows' own columns."""
        if self.shared is None:
            return attn
        return torch.cat([attn.new_ones((attn.shape[0], len(self.shared))), attn], dim=1)

    def grow(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One column more for the token each row feeds now: returns (its position (B, 1), the full mask)."""
        assert self.attn is not None
        pos_B1 = self.attn.sum(-1, keepdim=True) + self.held  # real tokens so far = position of the fed token
        self.attn = torch.cat([self.attn, self.attn.new_ones((self.attn.shape[0], 1))], dim=1)
        return pos_B1, self.full_mask(self.attn)

    def merge(
        self,
        rows: list[Row],
        cache: GrowingCache,
        shared: SharedPrefix | None,
        attn_RP: torch.Tensor,
        min_reuse: int,
    ) -> None:
        """Append freshly prefilled rows, left-padding whichever side is shorter.

        The batch keeps the part of its shared prefix that the new rows share too (if at least `min_reuse`
        tokens); the rest of each side's prefix is copied into its rows' own columns."""
        last = torch.zeros(attn_RP.shape[0], dtype=torch.long, device=attn_RP.device)
        if self.cache is None or self.attn is None or self.last is None or not self.rows:
            self.rows, self.cache, self.shared = list(rows), cache, shared
            self.attn, self.last = attn_RP, last
            return
        keep = shared.common_len(self.shared) if shared else 0
        if keep < min_reuse:
            keep = 0
        self.attn = _unshare(self.cache, self.shared, keep, self.attn)
        attn_RP = _unshare(cache, shared, keep, attn_RP)
        self.shared = shared.head(keep) if shared and keep else None
        old_len, new_len = self.attn.shape[1], attn_RP.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a = _left_pad(getattr(old_layer, attr), width - old_len, dim=-2)
                b = _left_pad(getattr(new_layer, attr), width - new_len, dim=-2)
                setattr(old_layer, attr, torch.cat([a, b], dim=0))
        self.attn = torch.cat(
            [_left_pad(self.attn, width - old_len, dim=1), _left_pad(attn_RP, width - new_len, dim=1)], dim=0
        )
        self.last = torch.cat([self.last, last])
        self.rows.extend(rows)

    def compact(self) -> None:
        """Drop finished and cancelled rows, and the cache columns no remaining row attends to."""
        keep = [i for i, r in enumerate(self.rows) if r.finish is None and not r.req.future.cancelled()]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        self.rows = [self.rows[i] for i in keep]
        assert self.cache is not None and self.attn is not None and self.last is not None
        idx = torch.tensor(keep, device=self.attn.device)
        self.cache.batch_select_indices(idx)
        self.attn, self.last = self.attn[idx], self.last[idx]
        used = self.attn.any(dim=0).nonzero()  # none: the rows hold only the shared prefix so far
        first_used = int(used[0]) if used.numel() else self.attn.shape[1]
        if first_used:  # columns no remaining row attends to
            for layer in self.cache.growing_layers:
                layer.keys = layer.keys[..., first_used:, :]
                layer.values = layer.values[..., first_used:, :]
            self.attn = self.attn[:, first_used:]

    def clear(self) -> list[Row]:
        """Empty the batch; returns the rows it held."""
        rows = self.rows
        self.rows, self.cache, self.attn, self.last, self.shared = [], None, None, None, None
        return rows


def prefix_kwargs(shared: SharedPrefix | None) -> dict[str, Any]:
    return {"shared_prefix": shared.kv} if shared else {}


def _unshare(cache: GrowingCache, shared: SharedPrefix | None, keep: int, attn: torch.Tensor) -> torch.Tensor:
    """Copy the shared prefix's tokens from `keep` on into every row's own columns; returns the new mask."""
    if shared is None or len(shared) == keep:
        return attn
    cache.prepend(shared.tail(keep))
    return torch.cat([attn.new_ones((attn.shape[0], len(shared) - keep)), attn], dim=1)


def _left_pad(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    if k == 0:
        return t
    shape = list(t.shape)
    shape[dim] = k
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


__all__ = ["Batch", "prefix_kwargs"]
