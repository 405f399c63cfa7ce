"""The QA set: first-person questions generated from the facts planted in each inbox, split by inbox.

Each question has one verifiable answer (None when the inbox does not hold it: "I don't know" is then the
right answer) and the message ids it comes from. `need` says what a good agent must do beyond a plain
keyword search: use a date or sender filter, read a thread to its latest reply, or give up.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .inbox import SPLITS, Split, generate_inbox
from .mail import AnswerKind, Need

# Words of a question that say what is asked rather than what to look for; `keywords` drops them.
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been am do does did i me my we us our "
    "you your what which when where who whom how much many time want need have has had after now this that "
    "it its date received".split()
)


@dataclass(frozen=True)
class Question:
    id: str
    inbox_seed: int
    question: str
    answer: str | None  # None: not in the inbox
    kind: AnswerKind
    source_ids: tuple[str, ...]
    need: Need
    filters: dict[str, str] = field(default_factory=dict)

    @property
    def answerable(self) -> bool:
        return self.answer is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "source_ids": list(self.source_ids)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Question:
        return cls(**{**d, "source_ids": tuple(d["source_ids"]), "filters": dict(d.get("filters") or {})})


def inbox_questions(seed: int) -> list[Question]:
    """The questions of one inbox, in generation order."""
    inbox = generate_inbox(seed)
    return [
        Question(
            f"{inbox.inbox_id}-q{i:03d}",
            seed,
            f.question,
            f.answer,
            f.kind,
            f.source_ids,
            f.need,
            dict(f.filters),
        )  # fmt: skip
        for i, f in enumerate(inbox.facts)
    ]


def load_questions(split: Split, limit: int | None = None, seed: int = 0) -> list[Question]:
    """The questions of `split`, shuffled by `seed` (inboxes interleaved), the first `limit` of them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = [q for s in SPLITS[split] for q in inbox_questions(s)]
    random.Random(f"email_agent:questions:{split}:{seed}").shuffle(out)
    return out[:limit] if limit is not None else out


MONTH_OR_YEAR = re.compile(
    r"^(january|february|march|april|may|june|july|august|september|october|november|"
    r"december|\d{4})$",
    re.IGNORECASE,
)


def search_args(q: Question) -> dict[str, Any]:
    """The `search_inbox` arguments a careful agent derives from the question: its keywords, with a month
    it names expressed as a date filter instead (an invoice does not repeat the month it was sent in)."""
    words = keywords(q.question)
    if "sent_after" in q.filters:
        words = [w for w in words if not MONTH_OR_YEAR.match(w)]
    return {"keywords": " ".join(words), **q.filters}


def keywords(question: str) -> list[str]:
    """The question's own search words: its words minus the ones that only shape the question."""
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'-]*", question)
    return [w for w in words if w.lower() not in STOPWORDS]
