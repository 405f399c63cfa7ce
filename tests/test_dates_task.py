"""The short-prompt date task (the speed benchmark's workload W): words, splits and the reward."""

from __future__ import annotations

from advantage.tasks import dates


def test_numbers_in_words() -> None:
    assert [dates.ordinal_words(n) for n in (1, 2, 3, 5, 12, 20, 21, 30, 31)] == [
        "first", "second", "third", "fifth", "twelfth", "twentieth", "twenty-first", "thirtieth", "thirty-first",
    ]  # fmt: skip
    assert dates.year_words(2024) == "two thousand and twenty-four"
    assert dates.year_words(2000) == "two thousand"
    assert dates.year_words(1987) == "nineteen eighty-seven"
    assert dates.year_words(1905) == "nineteen oh five"


def test_splits_are_seeded_and_disjoint() -> None:
    train, val = dates.make_scenarios(200, seed=3), dates.make_scenarios(200, seed=3, split="val")
    assert train == dates.make_scenarios(200, seed=3)
    assert {s.answer for s in train}.isdisjoint({s.answer for s in val})
    s = train[0]
    assert dates.MONTHS[s.month - 1] in s.sentence and dates.ordinal_words(s.day) in s.sentence


def test_reward_credits_each_field_and_brevity() -> None:
    s = dates.DateScenario("", 2024, 3, 7)
    assert dates.reward("2024-03-07", s) == round(0.8 * 1.0 + 0.2 * (1 - 10 / 80), 6)  # 0.975
    assert dates.reward("", s) == 0.2  # nothing right, but as short as can be
    # day and month swapped: ISO 0.1 + the year 0.3 = 0.4; 20 characters: brevity 0.75
    assert dates.reward("It is 2024-07-03 ok.", s) == round(0.8 * 0.4 + 0.2 * 0.75, 6)
    # no ISO date: the year's digits and the month's name, 0.1 each; 80+ characters: no brevity
    assert dates.reward("March 7, 2024" + "." * 80, s) == round(0.8 * 0.2, 6)
