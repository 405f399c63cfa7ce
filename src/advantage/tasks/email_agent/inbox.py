"""One generated inbox: a company, its owner, ~2,000 emails (fact-carrying threads plus noise) and the facts
planted in them. A function of its seed; cached, because building one takes about a tenth of a second.

Splits are by inbox, as in ART-E: the questions of a test inbox are about people, vendors and threads that
no training inbox contains.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Literal

from . import noise, topics
from .mail import END, Email, Fact, Writer
from .people import Company, make_company

Split = Literal["train", "test"]
SPLITS: dict[Split, tuple[int, ...]] = {"train": (0, 1, 2, 3, 4), "test": (100, 101)}  # inbox seeds
N_EMAILS = 2000


@dataclass(frozen=True)
class Inbox:
    seed: int
    company: Company
    emails: tuple[Email, ...]  # date-ascending
    facts: tuple[Fact, ...]
    by_id: dict[str, Email] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {e.message_id: e for e in self.emails})

    @property
    def inbox_id(self) -> str:
        return f"inbox-{self.seed}"

    @property
    def owner_email(self) -> str:
        return self.company.owner.email

    @property
    def today(self) -> str:
        """The inbox's "now" (its last day), which the agent is told."""
        return END.date().isoformat()

    def email(self, message_id: str) -> Email | None:
        return self.by_id.get(message_id)


@functools.cache
def generate_inbox(seed: int, n_emails: int = N_EMAILS) -> Inbox:
    """The inbox of `seed`: the same seed always gives the same company, emails, ids and facts."""
    rng = random.Random(f"email_agent:inbox:{seed}")
    writer = Writer(rng, make_company(rng))
    facts = [fact for topic in topics.TOPICS for fact in topic(writer)]
    noise.fill(writer, n_emails)
    emails = tuple(sorted(writer.emails, key=lambda e: (e.date, e.message_id)))
    return Inbox(seed, writer.company, emails, tuple(facts))
