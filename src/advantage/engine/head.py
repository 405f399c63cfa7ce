"""The vocabulary head of a CPU engine, computed in whichever of three equal forms runs fastest on this CPU.

At decode the head is the largest matmul of a step by far: logits (rows, V) = h (rows, H) @ Wᵀ, with W
(V, H) = (49,152, 576) for SmolLM2, 113 MB in fp32, read whole for every step. How fast MKL runs it depends
on W's layout and on which operand it sees first, and the best form differs from one CPU to the next
(2 torch threads, 48 rows unless said):

- a 2-core AMX Xeon: `F.linear` on column-major W (`precision.column_major_linears`) 13 ms, on row-major
  W 26 ms (32 rows);
- a 2-core EPYC (Zen 3, AVX2 only): `F.linear` 88 ms on column-major W, 74 ms on row-major, and
  (W @ hᵀ)ᵀ on row-major W 61 ms; at 8 rows 65 / 45 / 21 ms (`benchmarks/head_forms.py`).

At one row (a single request decoding) `F.linear` on the column-major W runs as a matrix-vector product and
won on the EPYC too (9 ms against 17). So the engine times the forms once per process, on its own weight, at a few row
counts (1, 8 and its batch's), and uses at each row count the form that was fastest at the nearest count
timed below it (`TunedHead`). The forms give the same logits up to fp32 rounding (~1e-6: the order of one sum).
A row-major copy of W, where a form needs one and the model's W is not, costs one more copy of the head
(113 MB); it is made only for the form that wins.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HeadForm = Literal["linear", "linear_row", "product"]
FORMS: tuple[HeadForm, ...] = ("linear", "linear_row", "product")
Plan = dict[int, HeadForm]  # rows -> the form used from that many rows up (to the next key)

# (weight shape, stride, dtype, torch threads, rows timed) -> the plan timed; once per process
_CHOSEN: dict[tuple[object, ...], Plan] = {}


def check_form(form: str) -> None:
    """Raise, saying what is allowed, unless `form` is "auto" or one of FORMS."""
    if form != "auto" and form not in FORMS:
        raise ValueError(f"head_form must be 'auto' or one of {', '.join(FORMS)}, got {form!r}.")


def _matmul(
    form: HeadForm, weight: torch.Tensor, row_major: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """h (N, H) -> logits (N, V) in `form`: `F.linear` on W as held, on row-major W, or (W @ hᵀ)ᵀ."""
    if form == "linear":
        return lambda h: F.linear(h, weight)
    if form == "linear_row":
        return lambda h: F.linear(h, row_major)
    return lambda h: (row_major @ h.t()).t().contiguous()


def time_forms(weight: torch.Tensor, rows: int, repeats: int = 3) -> dict[HeadForm, float]:
    """Seconds each form takes for one matmul of `rows` rows (the median of `repeats`, after a warm-up)."""
    row_major = weight.contiguous()
    h = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    out: dict[HeadForm, float] = {}
    for form in FORMS:
        if form == "linear_row" and row_major is weight:
            continue  # the same as "linear"
        fn = _matmul(form, weight, row_major)
        fn(h)
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(h)
            seconds.append(time.perf_counter() - t0)
        out[form] = statistics.median(seconds)
    return out


class TunedHead(nn.Linear):
    """A bias-free fp32 vocabulary head (an `nn.Linear`, whose weight it keeps as is: tied or shared with a
    trainer) that computes its logits in the form its `plan` gives for the rows at hand. If its weight's
    storage is swapped (an adapter on the head merged in, `lora.MergedLora`), it falls back to `F.linear`
    on the weight as it is then."""

    def __init__(self, head: nn.Linear, plan: Plan) -> None:
        super().__init__(head.in_features, head.out_features, bias=False, device="meta")
        self.weight = head.weight  # the same Parameter: tied names and shared storage stay as they were
        self.plan = dict(sorted(plan.items()))
        w = head.weight.detach()
        self._source = w.data_ptr()
        row_major = w.contiguous() if set(plan.values()) - {"linear"} else w
        self._fns = {form: _matmul(form, w, row_major) for form in set(plan.values())}

    def form(self, rows: int) -> HeadForm:
        """The form used for `rows` rows: the plan's at the largest count not above it (its first below)."""
        below = [k for k in self.plan if k <= rows]
        return self.plan[below[-1] if below else next(iter(self.plan))]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.weight.data_ptr() != self._source:
            return F.linear(h, self.weight)
        lead = h.shape[:-1]
        h2 = h.reshape(-1, h.shape[-1])
        return self._fns[self.form(h2.shape[0])](h2).reshape(*lead, self.out_features)


def tune_head(
    model: nn.Module, rows: Sequence[int], form: HeadForm | Literal["auto"] = "auto"
) -> Plan | None:
    """Give `model` (a causal LM on the CPU) a `TunedHead`: in `form`, or ("auto") in the form timed fastest
    here at each of `rows`, used from that many rows up. Returns the plan, or None where the head is left
    alone: not a bias-free fp32 `nn.Linear` on the CPU."""
    check_form(form)
    head = getattr(model, "lm_head", None)
    if (
        type(head) is not nn.Linear
        or head.bias is not None
        or head.weight.device.type != "cpu"
        or head.weight.dtype != torch.float32
    ):
        return None
    if form != "auto":
        plan: Plan = {min(rows): form}
    else:
        w = head.weight.detach()
        key = (tuple(w.shape), w.stride(), w.dtype, torch.get_num_threads(), tuple(rows))
        if key not in _CHOSEN:
            timed = {}
            with torch.no_grad():
                for n in rows:
                    timed[n] = time_forms(w, n)
            _CHOSEN[key] = {n: min(t, key=t.__getitem__) for n, t in timed.items()}
            log.info(
                "vocabulary head, ms per form: %s",
                "; ".join(
                    f"{n} rows: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items())
                    for n, t in timed.items()
                ),
            )
        plan = _CHOSEN[key]
    model.lm_head = TunedHead(head, plan)
    return plan
