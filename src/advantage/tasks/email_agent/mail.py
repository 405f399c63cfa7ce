"""Email records and the `Writer` that composes them: new messages, replies (quoting), forwards, CC.

The writer owns the inbox's random generator and its calendar, so every topic and noise generator draws
from one seeded stream, and the whole inbox is a function of its seed.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .people import Company, Person

AnswerKind = Literal["time", "money", "date", "number", "text"]
Need = Literal["search", "date_filter", "sender_filter", "thread", "unanswerable"]

START = dt.datetime(2024, 1, 8)  # the inboxes span 2024, Monday 8 January to Friday 20 December
END = dt.datetime(2024, 12, 20, 18, 0)


@dataclass(frozen=True)
class Email:
    message_id: str
    thread_id: str
    date: dt.datetime
    from_addr: str
    to_addrs: tuple[str, ...]
    cc_addrs: tuple[str, ...]
    subject: str
    body: str

    def render(self) -> str:
        """The message as `read_email` shows it to the agent."""
        lines = [
            f"Message-ID: {self.message_id}",
            f"Date: {fmt_datetime(self.date)}",
            f"From: {self.from_addr}",
            f"To: {', '.join(self.to_addrs)}",
        ]
        if self.cc_addrs:
            lines.append(f"Cc: {', '.join(self.cc_addrs)}")
        return "\n".join([*lines, f"Subject: {self.subject}", "", self.body])


@dataclass(frozen=True)
class Fact:
    """A question planted in the inbox: its answer (None: not in the inbox) and where the answer lives.

    `filters` are the search filters a careful agent needs (from_addr, sent_after, sent_before)."""

    question: str
    answer: str | None
    kind: AnswerKind
    source_ids: tuple[str, ...]
    need: Need
    filters: dict[str, str] = field(default_factory=dict)


def fmt_datetime(d: dt.datetime) -> str:
    return d.strftime("%Y-%m-%d %H:%M")


def fmt_date(d: dt.date) -> str:
    return f"{d.strftime('%B')} {d.day}, {d.year}"


def fmt_time(hour: int, minute: int) -> str:
    return f"{(hour - 1) % 12 + 1}:{minute:02d} {'AM' if hour < 12 else 'PM'}"


def fmt_money(amount: float) -> str:
    return f"${amount:,.2f}"


def signature(p: Person) -> str:
    return f"\n\nBest,\n{p.name}\n{p.role}, {p.org}"


class Writer:
    """Composes the emails of one inbox from one seeded generator."""

    def __init__(self, rng: random.Random, company: Company) -> None:
        self.rng = rng
        self.company = company
        self.owner = company.owner
        self.emails: list[Email] = []
        self._ids: set[str] = set()
        self._threads = 0

    # ------------------------------------------------------------------ time
    def business_time(self, lo: dt.datetime = START, hi: dt.datetime = END) -> dt.datetime:
        """A random weekday moment between 07:30 and 18:59 within [lo, hi] (shifted forward off weekends)."""
        span_days = max((hi - lo).days, 1)
        day = lo + dt.timedelta(days=self.rng.randrange(span_days))
        while day.weekday() >= 5:
            day += dt.timedelta(days=1)
        moment = day.replace(hour=self.rng.randint(7, 18), minute=self.rng.randrange(60))
        return max(moment, lo.replace(second=0, microsecond=0))

    def later(self, d: dt.datetime, min_minutes: int = 20, max_hours: int = 52) -> dt.datetime:
        return d + dt.timedelta(minutes=self.rng.randint(min_minutes, max_hours * 60))

    # ------------------------------------------------------------------ people
    def colleague(self, *exclude: Person) -> Person:
        return self.rng.choice([p for p in self.company.staff if p not in exclude])

    def colleagues(self, k: int, *exclude: Person) -> list[Person]:
        return self.rng.sample([p for p in self.company.staff if p not in exclude], k)

    # ------------------------------------------------------------------ messages
    def _new_id(self) -> str:
        while True:
            mid = f"{self.rng.randrange(16**6):06x}"
            if mid not in self._ids:
                self._ids.add(mid)
                return mid

    def new_thread(self) -> str:
        self._threads += 1
        return f"t{self._threads:04d}"

    def send(
        self,
        sender: Person | str,
        to: Sequence[Person | str],
        subject: str,
        body: str,
        date: dt.datetime,
        cc: Sequence[Person | str] | None = None,
        thread_id: str | None = None,
    ) -> Email:
        addr = lambda p: p if isinstance(p, str) else p.email  # noqa: E731
        email = Email(
            message_id=self._new_id(),
            thread_id=thread_id or self.new_thread(),
            date=date,
            from_addr=addr(sender),
            to_addrs=tuple(addr(p) for p in to),
            cc_addrs=tuple(addr(p) for p in cc or []),
            subject=subject,
            body=body,
        )
        self.emails.append(email)
        return email

    def reply(
        self, to: Email, sender: Person, text: str, date: dt.datetime | None = None, reply_all: bool = True
    ) -> Email:
        """A reply that quotes the message it answers, in its thread, to its sender (and, by default, all)."""
        recipients = [to.from_addr] + ([a for a in to.to_addrs if a != sender.email] if reply_all else [])
        cc = [a for a in to.cc_addrs if a != sender.email] if reply_all else []
        quoted = "\n".join("> " + line for line in to.body.splitlines())
        who = self._name_of(to.from_addr)
        body = f"{text}{signature(sender)}\n\nOn {fmt_datetime(to.date)}, {who} wrote:\n{quoted}"
        subject = to.subject if to.subject.startswith("Re: ") else f"Re: {to.subject}"
        return self.send(sender, list(dict.fromkeys(recipients)), subject, body,
                         date or self.later(to.date), cc=list(cc), thread_id=to.thread_id)  # fmt: skip

    def forward(self, msg: Email, sender: Person, to: list[Person], note: str, date: dt.datetime | None = None,
                cc: list[Person] | None = None) -> Email:  # fmt: skip
        """A forward: the note, then the original with its headers, in the same thread."""
        body = (
            f"{note}{signature(sender)}\n\n---------- Forwarded message ----------\n"
            f"From: {msg.from_addr}\nDate: {fmt_datetime(msg.date)}\nSubject: {msg.subject}\n\n{msg.body}"
        )
        return self.send(sender, list(to), f"Fwd: {msg.subject}", body, date or self.later(msg.date),
                         cc=list(cc or []), thread_id=msg.thread_id)  # fmt: skip

    def _name_of(self, addr: str) -> str:
        for p in (self.owner, *self.company.staff, *self.company.vendors):
            if p.email == addr:
                return p.name
        return addr
