"""Enum values of a forced call chosen by the logprob of all their tokens, not of their first one.

Token by token, a value's first token decides it (the grammar admits each value only as the tokenizer's own
tokens, `grammar.grammar_for_tool_choice`), and a model may put more weight on a short first piece of the
wrong value than on the right one: after `"city": "`, the bundled 135M model put -1.27 on `B` (only
"Bangkok" starts so) and -1.77 on `Be` ("Beijing"), then almost all of its weight on `ijing`. Greedy named
the wrong city for 18 of the demo's 144 weather questions, and for 4 with every city scored whole
(BENCHMARKS.md, `benchmarks/enum_choice.py`).

So where a row opens an enum value (the grammar's table, `Constraint.values_at`), the `k` values whose first
tokens are likeliest are scored whole: the engine runs one forward over the rest of each candidate
(`score_rests`). The row takes the best value (temperature 0) or draws one with probability proportional to
exp(logprob / temperature) with its seeded generator, and writes it over the next steps (`plan`: each step's
mask then admits only the value's next token). The logprobs the engine reports are still the model's own,
token by token; the value's first token is the row's decision and is trained, the rest is forced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from advantage.engine.grammar import Constraint

# (row, candidate value's tokens) per job -> logprob of each value's tokens after its first, in its row
ScoreRests = Callable[[list[tuple[int, list[int]]]], list[float]]


class ChoosingRow(Protocol):
    finish: Any
    constraint: Constraint | None
    plan: list[int]
    text: str
    generator: torch.Generator | None

    @property
    def temperature(self) -> float: ...


def choose_values(
    rows: Sequence[ChoosingRow],
    logits_RV: torch.Tensor,
    allowed_RV: torch.Tensor,
    k: int,
    score_rests: ScoreRests,
) -> int:
    """Restrict `allowed_RV` (in place) to each choosing row's value: a planned value's next token, or the
    first token of the value chosen now. Returns how many values were chosen now."""
    picks: list[tuple[int, list[list[int]], list[float]]] = []
    for j, row in enumerate(rows):
        if row.finish is not None or row.constraint is None:
            continue
        if row.plan:  # a chosen value's next token (the grammar allows it: the value is one of its own)
            if bool(allowed_RV[j, row.plan[0]]):
                only(allowed_RV, j, row.plan[0])
                continue
            row.plan = []
        values = row.constraint.values_at(row.text)
        if values:
            cands, firsts = candidates(values, logits_RV[j], allowed_RV[j], k)
            if len(cands) > 1:
                picks.append((j, cands, firsts))
    if not picks:
        return 0
    scores = [list(firsts) for _, _, firsts in picks]
    jobs = [(p, c) for p, (_, cands, _) in enumerate(picks) for c, v in enumerate(cands) if len(v) > 1]
    if jobs:
        rests = score_rests([(picks[p][0], picks[p][1][c]) for p, c in jobs])
        for (p, c), lp in zip(jobs, rests, strict=True):
            scores[p][c] += lp
    for (j, cands, _), score in zip(picks, scores, strict=True):
        value = cands[draw(score, rows[j].temperature, rows[j].generator)]
        only(allowed_RV, j, value[0])
        rows[j].plan = list(value)  # its first token is sampled now, under that mask
    return len(picks)


def candidates(
    values: list[list[int]], logits_V: torch.Tensor, allowed_V: torch.Tensor, k: int
) -> tuple[list[list[int]], list[float]]:
    """The `k` values the grammar still admits whose first tokens the model finds likeliest, and the
    logprobs of those first tokens."""
    lp_V = torch.log_softmax(logits_V.float(), dim=-1)
    admitted = [v for v in values if bool(allowed_V[v[0]])]
    admitted.sort(key=lambda v: -float(lp_V[v[0]]))
    chosen = admitted[:k]
    return chosen, [float(lp_V[v[0]]) for v in chosen]


def draw(scores: list[float], temperature: float, generator: torch.Generator | None) -> int:
    """The best score's index at temperature 0; else one drawn with probability ∝ exp(score / temperature)."""
    s_C = torch.tensor(scores, dtype=torch.float64)
    if temperature <= 0:
        return int(s_C.argmax())
    cdf = torch.softmax(s_C / temperature, dim=0).cumsum(0)
    u = (
        torch.rand(1, generator=generator, dtype=torch.float64)
        if generator
        else torch.rand(1, dtype=torch.float64)
    )
    return min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), len(scores) - 1)


def only(allowed_RV: torch.Tensor, row: int, token: int) -> None:
    allowed_RV[row] = False
    allowed_RV[row, token] = True
