"""Logprobs of given token ids under a model's weights: how a teacher scores what a student sampled.

`sequence_logprobs(model, sequences)` returns, for each sequence, log p(ids[j] | ids[:j]) at every position
j (0.0 at j = 0, which has no context), under the unmodified distribution (no temperature, no top-p): the
numbers the engine reports for sampled tokens, so a teacher's score and a student's sampler logprob of the
same token are comparable. The engine runs it on its own thread with the requested adapter's weights
(`TorchEngine.score`).

Sequences scored together usually share a long start (system prompt, tools, examples): that common prefix
runs once, and the rest of each sequence runs in right-padded chunks that attend to its keys and values.
Chunks are bounded in logits (rows x width x vocabulary), so a large vocabulary does not take gigabytes.

With `top_k` > 0 each position also gets the model's `top_k` most likely tokens there and their logprobs
(`Scores.top_ids`, `Scores.top_logprobs`, most likely first; empty at j = 0): a teacher's distribution at
the states a student reached, for distillation against more than the one sampled token.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from advantage.engine.base import Scores
from advantage.engine.kv import cache_from, layer_kv

MAX_LOGITS = 2**26  # floats of logits per chunk (256 MiB in fp32)
MAX_ROWS = 8  # rows per chunk: each row gets its own copy of the prefix's KV


def sequence_logprobs(model: Any, sequences: list[list[int]], pad_id: int = 0, top_k: int = 0) -> Scores:
    """Scores of `sequences` under `model` (module docstring). Call it under `torch.inference_mode()` with
    the weights that should score."""
    if not sequences or any(not s for s in sequences):
        raise ValueError("Every sequence to score needs at least one token.")
    if top_k < 0:
        raise ValueError(f"top_k is {top_k}; it must be 0 (none) or more.")
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    top_k = min(top_k, vocab)
    out = [[0.0] * len(s) for s in sequences]
    tops = _Tops([len(s) for s in sequences], top_k)
    # The common prefix, leaving every sequence at least one token of its own (its first is scored from
    # the prefix's last logits).
    P = min(len(os.path.commonprefix(sequences)), min(len(s) for s in sequences) - 1)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    next_lp_V: torch.Tensor | None = None  # log p(token P | prefix)
    if P > 0:  # in pieces, each extending the cache, so its logits stay within MAX_LOGITS
        prefix = sequences[0][:P]
        piece = max(1, MAX_LOGITS // vocab)
        past = None
        for a in range(0, P, piece):
            ids_1N = torch.tensor([prefix[a : a + piece]], device=device)
            res = model(input_ids=ids_1N, past_key_values=past, use_cache=True)
            past = res.past_key_values
            if next_lp_V is not None:  # the first token of this piece, from the last piece's last logits
                lp_first = float(next_lp_V[prefix[a]])
                for o in out:
                    o[a] = lp_first
                tops.put(range(len(sequences)), a, next_lp_V[None])
            lp_NV = res.logits[0, :-1].float().log_softmax(-1)
            lp_N = _gather(lp_NV, ids_1N[0, 1:])  # positions a+1 .. a+N-1
            for o in out:
                o[a + 1 : a + 1 + len(lp_N)] = lp_N
            tops.put(range(len(sequences)), a + 1, lp_NV)
            next_lp_V = res.logits[0, -1].float().log_softmax(-1)
        assert past is not None  # P > 0: at least one piece ran
        kv = layer_kv(past)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for chunk in _chunks([len(sequences[i]) - P for i in order], vocab):
        rows = [order[k] for k in chunk]
        rests = [sequences[i][P:] for i in rows]
        R, W = len(rows), max(len(r) for r in rests)
        ids_RW = torch.full((R, W), pad_id, dtype=torch.long)
        attn_RL = torch.zeros((R, P + W), dtype=torch.long)
        attn_RL[:, :P] = 1
        for r, rest in enumerate(rests):  # right padding: real tokens keep their positions
            ids_RW[r, : len(rest)] = torch.tensor(rest)
            attn_RL[r, P : P + len(rest)] = 1
        pos_RW = torch.arange(P, P + W).expand(R, W)
        cache = (
            cache_from([(k.expand(R, -1, -1, -1), v.expand(R, -1, -1, -1)) for k, v in kv]) if kv else None
        )
        res = model(
            input_ids=ids_RW.to(device),
            attention_mask=attn_RL.to(device),
            position_ids=pos_RW.to(device),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        for r, (i, rest) in enumerate(zip(rows, rests, strict=True)):
            n = len(rest)
            if next_lp_V is not None:
                out[i][P] = float(next_lp_V[rest[0]])
                tops.put([i], P, next_lp_V[None])
            if n > 1:
                lp_NV = res.logits[r, : n - 1].float().log_softmax(-1)
                out[i][P + 1 : P + n] = _gather(lp_NV, ids_RW[r, 1:n].to(device))
                tops.put([i], P + 1, lp_NV)
    return Scores(out, tops.ids, tops.logprobs)


def _gather(lp_TV: torch.Tensor, targets_T: torch.Tensor) -> list[float]:
    """lp[t, targets[t]] for each t (log-softmaxed fp32 logits)."""
    return lp_TV.gather(-1, targets_T[:, None]).squeeze(-1).tolist()


class _Tops:
    """The top-k tokens and logprobs of each position, filled in as the log-softmaxed logits come."""

    def __init__(self, lengths: list[int], k: int) -> None:
        self.k = k
        self.ids: list[list[list[int]]] = [[[] for _ in range(m)] for m in lengths] if k else []
        self.logprobs: list[list[list[float]]] = [[[] for _ in range(m)] for m in lengths] if k else []

    def put(self, rows: Any, start: int, lp_NV: torch.Tensor) -> None:
        """Positions start .. start + N - 1 of every sequence in `rows` get the top-k of lp_NV's N rows."""
        if not self.k:
            return
        values, indices = lp_NV.topk(self.k, dim=-1)
        ids, lps = indices.tolist(), values.tolist()
        for i in rows:
            self.ids[i][start : start + len(ids)] = ids
            self.logprobs[i][start : start + len(lps)] = lps


def _chunks(lengths: list[int], vocab: int) -> list[list[int]]:
    """Consecutive index ranges of `lengths` (sorted ascending) whose padded logits fit MAX_LOGITS."""
    chunks: list[list[int]] = []
    for k, n in enumerate(lengths):
        if chunks:
            c = chunks[-1]
            rows, width = len(c) + 1, max(n, lengths[c[0]])
            if rows <= MAX_ROWS and rows * width * vocab <= MAX_LOGITS:
                c.append(k)
                continue
        chunks.append([k])
    return chunks
