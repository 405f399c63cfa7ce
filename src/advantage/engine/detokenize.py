"""Incremental detokenization: the text each new token adds to a row, in time independent of the row's length.

Decoding the whole row again for every token is O(n²) in its length. A fast tokenizer (the usual case) streams
with `tokenizers`' own `DecodeStream`; any other tokenizer (a transformers "slow" one in Python) decodes only a
few ids around the new one: the text of `window` minus that of `window[:read]`, once it no longer ends in an
incomplete character. Both give None while a character is incomplete (a byte-level token holding half an
emoji), and the pieces joined equal `tokenizer.decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

INCOMPLETE = "\ufffd"  # what a decode shows for the bytes of a character not yet complete
CONTEXT = 4  # emitted ids kept before the new ones: a SentencePiece token's leading space depends on them


class Detokenizer(Protocol):
    def step(self, token: int) -> str | None:
        """The text `token` adds to what came before, or None when it adds none yet."""
        ...


class StreamDetokenizer:
    """A fast tokenizer's own streaming decoder."""

    def __init__(self, backend: Tokenizer) -> None:
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str | None:
        return self._stream.step(self._backend, token)


class WindowDetokenizer:
    """For a tokenizer without a `tokenizers` backend: decodes only the ids since the last emitted piece, plus
    the CONTEXT ids before them, and emits the difference."""

    def __init__(self, tokenizer: Any) -> None:  # a transformers tokenizer: its decode() is all we use
        self._tokenizer = tokenizer
        self._window: list[int] = []  # up to CONTEXT emitted ids, then the ones not emitted yet
        self._read = 0  # window[:read] is emitted

    def step(self, token: int) -> str | None:
        self._window.append(token)
        before = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if len(text) <= len(before) or text.endswith(INCOMPLETE):
            return None
        self._window = self._window[-CONTEXT:]
        self._read = len(self._window)
        return text[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


def detokenizer_factory(tokenizer: Any) -> Callable[[], Detokenizer]:
    """A new detokenizer per row, for this transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return lambda: StreamDetokenizer(backend)
    return lambda: WindowDetokenizer(tokenizer)
