"""`SamplingParams.validate`, the top-p filter and `sample_next`: pure functions, no model, no server."""

from __future__ import annotations

import math

import pytest
import torch

from advantage.engine.sampling import SamplingError, SamplingParams, _top_p_filter, sample_next

# ---------------------------------------------------------------------------------------------- validate


def test_defaults_are_valid():
    SamplingParams().validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": None},
        {"max_tokens": 1},
        {"temperature": 0.0},
        {"temperature": 2.0},
        {"top_p": 1e-9},
        {"top_p": 1.0},
        {"n": 1},
        {"n": 64},
        {"top_logprobs": 0},
        {"top_logprobs": 20},
        {"stop": []},
        {"stop": ["a", "bb", "\n", "</tool_call>"]},
        {"seed": 0},
        {"seed": -5},
    ],
)
def test_valid_edges(kwargs):
    SamplingParams(**kwargs).validate()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.01}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 65}, "n"),
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_invalid_values_say_which_field(kwargs, field):
    with pytest.raises(SamplingError, match=field) as ei:
        SamplingParams(**kwargs).validate()
    assert isinstance(ei.value, ValueError)  # callers may catch ValueError


def test_error_states_the_allowed_range():
    with pytest.raises(SamplingError, match=r"\[0, 2\]"):
        SamplingParams(temperature=3).validate()
    with pytest.raises(SamplingError, match=r"\(0, 1\]"):
        SamplingParams(top_p=0).validate()


# ------------------------------------------------------------------------------------------------- top-p


def _probs(*p: float) -> torch.Tensor:
    return torch.tensor([p], dtype=torch.float32)


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (1.0, [0.5, 0.3, 0.15, 0.05]),  # keeps everything
        (0.96, [0.5, 0.3, 0.15, 0.05]),  # 0.95 < 0.96: the last token is still needed
        (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (0.7, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # smallest prefix whose mass reaches top_p
        (0.5, [1.0, 0.0, 0.0, 0.0]),  # the top token alone reaches 0.5
        (0.2, [1.0, 0.0, 0.0, 0.0]),
        (1e-6, [1.0, 0.0, 0.0, 0.0]),  # the top token is always kept
    ],
)
def test_top_p_keeps_smallest_prefix(top_p, expected):
    out = _top_p_filter(_probs(0.5, 0.3, 0.15, 0.05), torch.tensor([top_p]))
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_top_p_works_in_vocab_order_not_sorted_order():
    probs = _probs(0.05, 0.3, 0.15, 0.5)  # same distribution, shuffled
    out = _top_p_filter(probs, torch.tensor([0.7]))
    assert out[0].tolist() == pytest.approx([0.0, 0.375, 0.0, 0.625], abs=1e-6)


def test_top_p_per_row_and_normalized():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    out = _top_p_filter(probs, torch.tensor([0.7, 1.0, 0.5]))
    assert out.sum(-1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert (out[0] > 0).tolist() == [True, True, False, False]
    assert out[1].tolist() == pytest.approx([0.25] * 4)
    assert (out[2] > 0).tolist() == [False, False, True, True]  # 0.4 < 0.5, so 0.3 joins
    assert out[2].tolist() == pytest.approx([0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7], abs=1e-6)


def test_top_p_on_a_large_random_vocab():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 1000) * 3, dim=-1)
    out = _top_p_filter(probs, torch.tensor([0.9, 0.5, 1.0]))
    assert torch.allclose(out.sum(-1), torch.ones(3))
    for row, p in zip(range(3), (0.9, 0.5, 1.0), strict=True):
        kept = probs[row][out[row] > 0]
        # Reaches top_p, and is minimal: dropping its smallest member would fall short.
        assert kept.sum() >= p - 1e-5
        assert kept.sum() - kept.min() < p
        # Every kept token is at least as likely as every dropped one.
        dropped = probs[row][out[row] == 0]
        if dropped.numel():
            assert kept.min() >= dropped.max()


# --------------------------------------------------------------------------------------------- sampler


def _logits() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 50) * 2


def test_greedy_rows_take_argmax_with_raw_logprob():
    logits = _logits()
    tokens, lps = sample_next(logits, torch.zeros(4), torch.ones(4), [None] * 4)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    raw = torch.log_softmax(logits, -1)
    assert lps.tolist() == pytest.approx(raw.gather(1, tokens[:, None]).squeeze(1).tolist(), abs=1e-6)


def test_logprobs_are_of_the_unmodified_distribution():
    logits = _logits()
    temp = torch.tensor([0.3, 1.0, 1.7, 0.0])
    tokens, lps = sample_next(logits, temp, torch.tensor([1.0, 0.8, 1.0, 1.0]), [None] * 4)
    raw = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    assert lps.tolist() == pytest.approx(raw.tolist(), abs=1e-6)
    assert int(tokens[3]) == int(logits[3].argmax())  # the greedy row in a mixed batch


def test_seeded_generators_reproduce_and_differ_by_seed():
    logits = _logits()

    def draw(seeds: list[int]) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return [sample_next(logits, torch.ones(4), torch.ones(4), gens)[0].tolist() for _ in range(20)]

    a, b, c = draw([1, 2, 3, 4]), draw([1, 2, 3, 4]), draw([5, 6, 7, 8])
    assert a == b
    assert a != c


def test_top_p_restricts_what_is_sampled():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    tokens, _ = sample_next(logits, torch.ones(400), torch.full((400,), 0.7), gens)
    assert set(tokens.tolist()) == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs)[None].repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    tokens, _ = sample_next(logits, torch.ones(2000), torch.ones(2000), [gen] + [None] * 1999)
    freq = torch.bincount(tokens, minlength=3).float() / 2000
    assert freq.tolist() == pytest.approx(probs.tolist(), abs=0.04)


def test_low_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(1000, 1)
    torch.manual_seed(0)
    cold, _ = sample_next(logits, torch.full((1000,), 0.1), torch.ones(1000), [None] * 1000)
    hot, _ = sample_next(logits, torch.full((1000,), 2.0), torch.ones(1000), [None] * 1000)
    assert (cold == 0).float().mean() > 0.99
    assert 0.3 < (hot == 0).float().mean() < 0.7
