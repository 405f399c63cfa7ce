"""How a micro-batch is laid out for one forward pass: each prompt once, completions packed after it.

A micro-batch holds groups: sequences that share a prompt (the tokens before their first trained token).
The part common to *all* its sequences (the system prompt, tool schemas) runs once, as a KV cache that every
row attends to. What is left forms a two-level tree: each group's own rest of the prompt (the *parent*
segment) and, after it, the group's completions (the *children*). A row holds whole blocks, a parent and
some of its children, packed one after another; a block-causal 4D mask lets a child see the shared prefix,
its parent and itself causally, and nothing else. Positions restart where each segment's sequence puts them,
so every token sees exactly the context it has in its full sequence, and the logprobs and gradients equal
those of running each sequence on its own (checked in tests).

With 4 prompts x 8 completions in one micro-batch, the prompts' rests run 4 times, not 32.

Shapes: B datums, R rows, S slots per row, P shared prefix tokens, K = P + S keys a row's query can see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

ROW_TOKENS = 1024  # a group with more completion tokens than this is split over several rows


class HasTokens(Protocol):
    @property
    def input_ids(self) -> list[int]: ...

    @property
    def loss_mask(self) -> Sequence[float]: ...


def prompt_key(d: HasTokens) -> tuple[int, ...]:
    """The tokens before the first trained token: sequences with equal keys share a prompt."""
    first = next((i for i, m in enumerate(d.loss_mask) if m), len(d.input_ids))
    return tuple(d.input_ids[:first])


def shared_prefix_len(datums: Sequence[HasTokens]) -> int:
    """Longest common prefix of the datums' ids, stopped before the first trained token of any of them."""
    first = datums[0].input_ids
    limit = min(min((i for i, m in enumerate(d.loss_mask) if m), default=len(d.input_ids)) for d in datums)
    limit = min(limit, *(len(d.input_ids) for d in datums))
    n = 0
    while n < limit and all(d.input_ids[n] == first[n] for d in datums[1:]):
        n += 1
    return n


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed first-fit, longest first, into rows holding at most `capacity` tokens."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += lengths[i]
    return rows


@dataclass
class Layout:
    """One micro-batch ready for the model. Slot s of row r is flat index r * S + s."""

    ids_RS: torch.Tensor  # token fed at each slot (pad where unused)
    pos_RS: torch.Tensor  # its position in its own sequence
    see_RSK: torch.Tensor  # bool: slot (r, q) attends to key k (k < P: the shared prefix; else slot k - P)
    pick_BS: (
        torch.Tensor
    )  # (B, S'): flat slot whose hidden state predicts suffix token j, +1; 0 = the prefix's last
    target_BS: torch.Tensor  # (B, S'): the datum's tokens after the shared prefix (pad beyond its end)
    mask_BS: torch.Tensor  # (B, S'): bool, the loss mask after the shared prefix
    real_tokens: int  # tokens computed that belong to some sequence (prefix included)
    slot_tokens: int  # tokens computed, padding included (prefix included)


def layout(datums: Sequence[HasTokens], P: int, pad_id: int, *, share: bool = True) -> Layout:
    """Lay out `datums` (whose first P tokens are shared) in rows; `share=False` gives each sequence its own
    row with its whole rest of the prompt (the plain layout, kept for tests and benchmarks)."""
    B = len(datums)
    keys = [len(prompt_key(d)) for d in datums]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, d in enumerate(datums):
        groups.setdefault(tuple(d.input_ids[: keys[i]]) if share else (i,), []).append(i)
    # Blocks: a parent (the group's prompt after P) and children (completions), up to ROW_TOKENS of them.
    # Without a parent (the whole prompt is in the shared prefix) a row costs nothing to split: each child
    # is its own block, and short ones share rows below (shorter rows, less attention over the prefix).
    blocks: list[tuple[int, list[int]]] = []  # (parent length, child datum indices)
    for members in groups.values():
        a = keys[members[0]] - P
        budget = ROW_TOKENS if a else 0
        chunk: list[int] = []
        used = 0
        for i in sorted(members, key=lambda i: -(len(datums[i].input_ids) - keys[i])):
            n = len(datums[i].input_ids) - keys[i]
            if chunk and used + n > budget:
                blocks.append((a, chunk))
                chunk, used = [], 0
            chunk.append(i)
            used += n
        blocks.append((a, chunk))
    sizes = [a + sum(len(datums[i].input_ids) - keys[i] for i in ch) for a, ch in blocks]
    rows = pack_rows(sizes, max(sizes)) if share else [[b] for b in range(len(blocks))]
    S = max(sum(sizes[b] for b in row) for row in rows)
    R = len(rows)
    width = max(len(d.input_ids) for d in datums) - P  # suffix-aligned columns of the (B, S') tensors
    ids_RS = torch.full((R, S), pad_id, dtype=torch.long)
    pos_RS = torch.full((R, S), P, dtype=torch.long)
    see_RSK = torch.zeros((R, S, P + S), dtype=torch.bool)
    see_RSK[:, :, P:] = torch.eye(S, dtype=torch.bool)  # padding slots see themselves (no NaN)
    pick_BS = torch.zeros((B, width), dtype=torch.long)
    target_BS = torch.full((B, width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((B, width), dtype=torch.bool)
    for i, d in enumerate(datums):
        n = len(d.input_ids) - P
        target_BS[i, :n] = torch.tensor(d.input_ids[P:])
        mask_BS[i, :n] = torch.tensor(d.loss_mask[P:], dtype=torch.bool)
    for r, row in enumerate(rows):
        o = 0
        for b in row:
            a, children = blocks[b]
            parent = datums[children[0]].input_ids[P : P + a]
            _segment(ids_RS, pos_RS, see_RSK, r, o, parent, P, P, seen=None)
            c = o + a  # where the next child starts
            for i in children:
                d, k = datums[i], keys[i]
                _segment(ids_RS, pos_RS, see_RSK, r, c, d.input_ids[k:], P, k, seen=(o, a))
                # Suffix token j (= input_ids[P + j]) for j >= k - P: predicted by the slot of token j - 1.
                n = len(d.input_ids) - k
                first = r * S + o + a - 1 if a else -1  # the parent's last slot, or the shared prefix's last
                pick_BS[i, k - P] = first + 1
                pick_BS[i, k - P + 1 : k - P + n] = torch.arange(n - 1) + r * S + c + 1
                c += n
            o += sizes[b]
    real = P + sum(sizes)
    return Layout(ids_RS, pos_RS, see_RSK, pick_BS, target_BS, mask_BS, real, P + R * S)


def _segment(
    ids_RS: torch.Tensor,
    pos_RS: torch.Tensor,
    see_RSK: torch.Tensor,
    r: int,
    o: int,
    tokens: list[int],
    P: int,
    start: int,
    seen: tuple[int, int] | None,
) -> None:
    """Write `tokens` (positions start, start+1, ...) at slots o.. of row r: they see the shared prefix, the
    slots `seen` = (first, count) of their parent, and themselves causally."""
    n = len(tokens)
    if not n:
        return
    ids_RS[r, o : o + n] = torch.tensor(tokens)
    pos_RS[r, o : o + n] = start + torch.arange(n)
    see_RSK[r, o : o + n, :P] = True
    if seen is not None and seen[1]:
        see_RSK[r, o : o + n, P + seen[0] : P + seen[0] + seen[1]] = True
    see_RSK[r, o : o + n, P + o : P + o + n] = torch.ones((n, n), dtype=torch.bool).tril()
