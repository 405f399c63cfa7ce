"""The engine's incremental detokenization: a row's text is built from each new token's piece (not a decode
of the whole row per token), and must equal the full decode, stop strings cut in the same place."""

from __future__ import annotations

import concurrent.futures

from tokenizers.decoders import DecodeStream

from advantage.engine.sampling import SamplingParams
from advantage.engine.torch_engine import TorchEngine, _Request, _Row

TEXT = 'Héllo wörld — 日本語 🙂 <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> done. END here'


def _row(stop: list[str]) -> _Row:
    req = _Request([1], SamplingParams(stop=stop), 10_000, None, concurrent.futures.Future(), None, [None])
    return _Row(req, 0, None)


def _stream(tokenizer, ids: list[int], stop: list[str]) -> str:
    row = _row(stop)
    assert isinstance(row.detok, DecodeStream)
    for t in ids:
        if TorchEngine._stop_string_in(row, row.detok.step(tokenizer.backend_tokenizer, t)):
            break
    return row.text


def test_streamed_text_equals_the_full_decode(tokenizer) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert _stream(tokenizer, ids, []) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_stop_strings_cut_where_the_full_text_would(tokenizer) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for stop in (["</tool_call>"], ["END", "🙂"], ["ld — 日"], ["never there"], ["o", "é"]):
        cut = min((TEXT.find(s) for s in stop if s in TEXT), default=len(TEXT))
        assert _stream(tokenizer, ids, stop) == TEXT[:cut], stop
