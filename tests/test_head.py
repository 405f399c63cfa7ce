"""The engine's vocabulary head (engine/head.py): every form gives the logits `F.linear` gives, the tied weight
stays tied, a swapped weight (a merged adapter) is followed, and "auto" times the forms once per process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advantage.engine import head as head_mod
from advantage.engine.head import FORMS, TunedHead, tune_head
from advantage.engine.sampling import SamplingParams
from advantage.engine.torch_engine import TorchEngine


class _LM(nn.Module):
    """The two parts of a causal LM that tune_head touches: a tied embedding and head."""

    def __init__(self, vocab: int = 300, hidden: int = 16, column_major: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        if column_major:  # as precision.column_major_linears lays it out
            self.lm_head.weight.data = self.lm_head.weight.data.t().contiguous().t()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("column_major", [True, False])
def test_every_form_gives_the_logits_of_f_linear(form, column_major) -> None:
    torch.manual_seed(0)
    lm = _LM(column_major=column_major)
    w = lm.lm_head.weight.detach().clone()
    assert tune_head(lm, rows=(2,), form=form) == {2: form}
    assert isinstance(lm.lm_head, TunedHead) and lm.lm_head.weight is lm.embed.weight  # still tied
    for shape in [(5, 16), (3, 1, 16), (2, 4, 16)]:  # decode rows, prefill's last position, a batch
        h = torch.randn(*shape)
        out = lm.lm_head(h)
        assert out.shape == (*shape[:-1], 300) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(h, w), rtol=1e-5, atol=1e-5)


def test_a_swapped_weight_is_followed() -> None:
    """MergedLora swaps a layer's weight storage for its merged buffer: the head must then use that one."""
    torch.manual_seed(0)
    lm = _LM()
    tune_head(lm, rows=(2,), form="product")
    merged = lm.lm_head.weight.data + 0.5  # a new storage, as MergedLora's buffer is
    lm.lm_head.weight.data = merged
    h = torch.randn(4, 16)
    torch.testing.assert_close(lm.lm_head(h), F.linear(h, merged))


def test_auto_times_the_forms_once_per_process_and_uses_each_from_its_row_count(monkeypatch) -> None:
    calls = []

    def fake_times(weight, rows, repeats=3):  # the timing itself is not what is tested
        calls.append(rows)
        if rows == 1:  # a matrix-vector product: F.linear wins
            return {"linear": 1.0, "linear_row": 2.0, "product": 3.0}
        return {"linear": 3.0, "linear_row": 2.0, "product": 1.0}

    monkeypatch.setattr(head_mod, "time_forms", fake_times)
    monkeypatch.setattr(head_mod, "_CHOSEN", {})
    lm = _LM()
    assert tune_head(lm, rows=(1, 8)) == {1: "linear", 8: "product"}
    assert tune_head(_LM(), rows=(1, 8)) == {1: "linear", 8: "product"}  # remembered, not timed again
    assert calls == [1, 8]
    head = lm.lm_head
    assert [head.form(n) for n in (1, 2, 7, 8, 500)] == ["linear"] * 3 + ["product"] * 2
    torch.manual_seed(0)
    for n in (1, 3, 9):
        h = torch.randn(n, 16)
        torch.testing.assert_close(head(h), F.linear(h, head.weight), rtol=1e-5, atol=1e-5)


def test_time_forms_times_each_distinct_form() -> None:
    lm = _LM()
    seconds = head_mod.time_forms(lm.lm_head.weight.detach(), rows=3, repeats=1)
    assert set(seconds) == set(FORMS) and all(s > 0 for s in seconds.values())
    row_major = _LM(column_major=False)  # "linear_row" would be "linear" again
    assert set(head_mod.time_forms(row_major.lm_head.weight.detach(), rows=1, repeats=1)) == {
        "linear",
        "product",
    }


def test_heads_it_does_not_handle_are_left_alone() -> None:
    biased = _LM()
    biased.lm_head = nn.Linear(16, 300, bias=True)
    assert tune_head(biased, rows=(2,)) is None and type(biased.lm_head) is nn.Linear
    half = _LM().to(torch.bfloat16)
    assert tune_head(half, rows=(2,)) is None
    with pytest.raises(ValueError, match="head_form"):
        tune_head(_LM(), rows=(2,), form="fastest")  # type: ignore[arg-type]


def test_the_engine_answers_alike_in_every_form(tiny_model_dir) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompt = [1, 17, 923, 88, 4012, 77, 5]
    answers = {}
    for form in (*FORMS, "auto"):
        engine = TorchEngine(tiny_model_dir, dtype="float32", head_form=form)
        try:
            [c] = engine.submit(prompt, params).result()
            plan = engine.head_plan or {}
            assert plan and set(plan.values()) <= set(FORMS), plan
            assert form == "auto" or set(plan.values()) == {form}
            answers[form] = (c.token_ids, c.logprobs)
        finally:
            engine.close()
    ids, logprobs = answers["linear"]
    for form, (ids_f, logprobs_f) in answers.items():
        assert ids_f == ids, form
        assert logprobs_f == pytest.approx(logprobs, abs=1e-4), form
    with pytest.raises(ValueError, match="head_form"):
        TorchEngine(tiny_model_dir, dtype="float32", head_form="fastest")  # type: ignore[arg-type]
