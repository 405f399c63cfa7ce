"""The engine's incremental detokenization: a row's text is built from each new token's piece (not a decode
of the whole row per token), and must equal the full decode, stop strings cut in the same place. Both
detokenizers are checked: `tokenizers`' DecodeStream (fast tokenizers) and the window fallback (slow ones)."""

from __future__ import annotations

import concurrent.futures

import pytest

from advantage.engine.detokenize import (
    Detokenizer,
    StreamDetokenizer,
    WindowDetokenizer,
    detokenizer_factory,
)
from advantage.engine.rows import Request, Row
from advantage.engine.sampling import SamplingParams

TEXT = 'Héllo wörld — 日本語 🙂 <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> done. END here'


class _SlowTokenizer:
    """A tokenizer with only `decode`, as a transformers Python ("slow") tokenizer looks to the engine."""

    def __init__(self, fast) -> None:
        self.decode = fast.decode


@pytest.fixture(params=["stream", "window"])
def new_detok(request, tokenizer):
    if request.param == "stream":
        return detokenizer_factory(tokenizer)
    return detokenizer_factory(_SlowTokenizer(tokenizer))


def _stream(detok: Detokenizer, ids: list[int], stop: list[str]) -> str:
    req = Request([1], SamplingParams(stop=stop), 10_000, None, concurrent.futures.Future(), None, [None])
    row = Row(req, 0, None, detok)
    for t in ids:
        if row.stop_string_in(row.detok.step(t)):
            break
    return row.text


def test_the_factory_picks_the_streaming_decoder_for_a_fast_tokenizer(tokenizer) -> None:
    assert isinstance(detokenizer_factory(tokenizer)(), StreamDetokenizer)
    assert isinstance(detokenizer_factory(_SlowTokenizer(tokenizer))(), WindowDetokenizer)


def test_streamed_text_equals_the_full_decode(tokenizer, new_detok) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert _stream(new_detok(), ids, []) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_a_character_split_over_tokens_comes_whole(tokenizer, new_detok) -> None:
    """Byte-level BPE splits the emoji's 4 bytes over tokens: nothing is emitted until it is complete, and
    special tokens add nothing."""
    ids = tokenizer("🙂🦀 x", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # the two emoji take more than one token each
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    detok = new_detok()
    pieces = [detok.step(t) for t in [special, *ids, special]]
    assert "".join(p for p in pieces if p) == "🙂🦀 x"
    assert all("\ufffd" not in p for p in pieces if p)


def test_stop_strings_cut_where_the_full_text_would(tokenizer, new_detok) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for stop in (["</tool_call>"], ["END", "🙂"], ["ld — 日"], ["never there"], ["o", "é"]):
        cut = min((TEXT.find(s) for s in stop if s in TEXT), default=len(TEXT))
        assert _stream(new_detok(), ids, stop) == TEXT[:cut], stop
