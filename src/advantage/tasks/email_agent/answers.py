"""Is a free-form answer right? Normalised matching by the kind of the expected answer (pure functions).

- money:  "$4,120.50", "4120.5 dollars" and "USD 4,120.50" all state 4120.50 (to the cent);
- number: an integer token equal to the expected one ("12 monitors");
- time:   "1:45 PM", "13:45", "1:45pm" (and "1:45" without AM/PM, which is read either way);
- date:   "March 5, 2024", "Mar 5", "5 March", "2024-03-05", "03/05/2024" (month and day must agree);
- text:   the expected words appear in order ("the Hyatt Regency Denver" states "Hyatt Regency").

An answer that states more than two candidate values of the kind ("9:00, 9:30 or 10:00") or runs past
`MAX_ANSWER_CHARS` is not a match: listing guesses must not pay. Anything this misses (a paraphrase, "a
quarter to two") is what the optional LLM judge (judge.py) is for.
"""

from __future__ import annotations

import datetime as dt
import re

from .mail import AnswerKind

MAX_ANSWER_CHARS = 300
IDK_PHRASES = (
    "i don't know", "i do not know", "dont know", "don't know", "not sure", "cannot find", "can't find",
    "couldn't find", "could not find", "no information", "not found", "no answer", "unable to find", "idk",
    "not in the inbox", "no email", "no record",
)  # fmt: skip
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]  # fmt: skip
_MONTH = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_TIME = re.compile(
    r"\b(\d{1,2})(?::|\.)(\d{2})\s*([ap])?\.?\s*m?\b|\b(\d{1,2})\s*([ap])\.?m\b", re.IGNORECASE
)
_MONEY = re.compile(r"\d[\d,]*(?:\.\d+)?")


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "")))


def is_idk(answer: str) -> bool:
    """Whether the answer declines ("I don't know", "I couldn't find it"); an empty answer declines too."""
    text = answer.lower().replace("\u2019", "'")
    return not text.strip() or any(p in text for p in IDK_PHRASES)


def times(text: str) -> set[int]:
    """Minutes after midnight of every time stated; a time without AM/PM stands for both readings."""
    out: set[int] = set()
    for h1, m1, ap1, h2, ap2 in _TIME.findall(text):
        hour, minute, ap = (int(h1), int(m1), ap1) if h1 else (int(h2), 0, ap2)
        if hour > 23 or minute > 59:
            continue
        if ap:
            hour = hour % 12 + (12 if ap.lower() == "p" else 0)
            out.add(hour * 60 + minute)
        else:
            out |= {hour * 60 + minute, (hour % 12 + 12) * 60 + minute if hour < 12 else hour * 60 + minute}
    return out


def dates(text: str) -> set[tuple[int, int]]:
    """(month, day) of every date stated."""
    t = text.lower()
    out = {(int(m), int(d)) for _, m, d in re.findall(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b", t)}
    out |= {(int(m), int(d)) for m, d in re.findall(r"\b(\d{1,2})/(\d{1,2})/\d{2,4}\b", t)}
    for mon, day in re.findall(_MONTH + r"\s+(\d{1,2})(?:st|nd|rd|th)?\b", t):
        out.add((_month_number(mon), int(day)))
    for day, mon in re.findall(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH, t):
        out.add((_month_number(mon), int(day)))
    return {(m, d) for m, d in out if 1 <= m <= 12 and 1 <= d <= 31}


def _month_number(prefix: str) -> int:
    return next(i for i, name in enumerate(MONTHS, start=1) if name.startswith(prefix[:3]))


def amounts(text: str) -> set[float]:
    out: set[float] = set()
    for token in _MONEY.findall(text):
        try:
            out.add(round(float(token.replace(",", "")), 2))
        except ValueError:
            continue
    return out


def matches(answer: str, expected: str, kind: AnswerKind) -> bool:
    """Whether `answer` states `expected` (a value of `kind`), by normalised matching."""
    if not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return False
    if kind == "time":
        want, got = times(expected), times(answer)
        return bool(want & got) and len(got) <= 4  # "1:45" alone counts both readings
    if kind == "date":
        want_d = dt.datetime.strptime(expected, "%B %d, %Y")
        got_d = dates(answer)
        return (want_d.month, want_d.day) in got_d and len(got_d) <= 2
    if kind == "money":
        got_m = {a for a in amounts(answer) if a != 2024}  # a year is not an amount
        return round(float(expected.replace("$", "").replace(",", "")), 2) in got_m and len(got_m) <= 2
    if kind == "number":
        nums = {int(n) for n in re.findall(r"\b\d+\b", answer)}
        return int(expected) in nums and len(nums) <= 2
    want_t, got_t = normalise(expected), normalise(answer)
    return bool(want_t) and f" {want_t} " in f" {got_t} "
