"""A short-prompt task: read a sentence with a date spelled out in words, answer it as YYYY-MM-DD.

One system instruction and one sentence (about 120 tokens with SmolLM2's chat template), one short answer.
It is the short-prompt workload of `benchmarks/vs_trl.py`: where the demo's 700-token prompt lets prompt
sharing do most of the work, here the prompts are short and distinct, so the speed of generation and of the
update itself shows. The reward gives partial credit (see `reward`); 1.0 is an exact answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

SYSTEM = (
    "You extract dates. Read the user's sentence, find the date it mentions, and reply with that date in "
    "ISO format, YYYY-MM-DD, and nothing else. Years, months and days may be written out in words. Example: "
    "for 'We met on the fifth of May, nineteen ninety-one.' reply 1991-05-05."
)
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
_ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORD = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
        "nine": "ninth", "twelve": "twelfth", "twenty": "twentieth", "thirty": "thirtieth"}  # fmt: skip
_EVENTS = [
    "The quarterly board meeting, after two postponements and a long argument about the venue, finally took place",
    "Our neighbours moved into the yellow house at the end of the street, with three dogs and a piano,",
    "The museum reopened its east wing to the public, after a restoration that took far longer than planned,",
    "After weeks of rain the river burst its banks near the old mill and flooded the lower fields",
    "The small bakery on the corner sold its very last loaf and closed its doors for good",
    "My grandmother planted the apple tree that still stands behind the garage, and it has fruited every year since,",
    "The first train on the new coastal line left the station a little late, to cheers from the platform,",
    "The team shipped version two of the app, with the redesigned settings page that everyone had asked for,",
]
_DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
_ISO = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")


@dataclass(frozen=True)
class DateScenario:
    sentence: str
    year: int
    month: int
    day: int

    @property
    def answer(self) -> str:
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"


def number_words(n: int) -> str:
    """0 < n < 100 in words: 7 -> "seven", 42 -> "forty-two"."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def ordinal_words(n: int) -> str:
    """1 <= n <= 31 as an ordinal in words: 1 -> "first", 23 -> "twenty-third"."""
    words = number_words(n).split("-")
    last = words[-1]
    words[-1] = _ORD.get(last, last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return "-".join(words)


def year_words(y: int) -> str:
    """2024 -> "two thousand and twenty-four", 1987 -> "nineteen eighty-seven"."""
    hi, lo = divmod(y, 100)
    if y >= 2000 and hi == 20:
        return "two thousand" + (f" and {number_words(lo)}" if lo else "")
    return f"{number_words(hi)} {number_words(lo) if lo >= 10 else 'oh ' + number_words(lo)}"


def make_scenarios(n: int, seed: int = 0, split: str = "train") -> list[DateScenario]:
    """`n` sentences; "val" and "train" never share a date (val days are odd and train days even)."""
    rng = random.Random(f"{split}:{seed}")
    out = []
    for _ in range(n):
        year = rng.randint(1950, 2039)
        month = rng.randint(1, 12)
        day = rng.randrange(1 if split == "val" else 2, _DAYS_IN[month - 1] + 1, 2)
        event = rng.choice(_EVENTS)
        day_w, month_w, year_w = ordinal_words(day), MONTHS[month - 1], year_words(year)
        when = rng.choice([f"on the {day_w} of {month_w}, {year_w}", f"on {month_w} the {day_w}, {year_w}"])
        out.append(DateScenario(f"{event} {when}.", year, month, day))
    return out


def prompt(s: DateScenario) -> list[Message]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": s.sentence}]


def reward(text: str, s: DateScenario) -> float:
    """0.8 x correctness + 0.2 x brevity, so that even a small model's attempts differ. Correctness: 0.1 for an
    ISO date (YYYY-MM-DD) in the answer, then 0.3 each for its year, month and day; without an ISO date, 0.1
    each for the year's digits and the month's name appearing somewhere. Brevity: 1 for an empty answer,
    falling linearly to 0 at 80 characters. 1.0 is an exact answer and nothing else."""
    m = _ISO.search(text)
    if m is None:
        correct = 0.1 * (str(s.year) in text) + 0.1 * (MONTHS[s.month - 1] in text)
    else:
        y, mo, d = (int(g) for g in m.groups())
        correct = 0.1 + 0.3 * ((y == s.year) + (mo == s.month) + (d == s.day))
    brevity = max(0.0, 1 - len(text.strip()) / 80)
    return round(0.8 * correct + 0.2 * brevity, 6)
