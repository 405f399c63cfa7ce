"""The email agent's reward, tier by tier with hand-worked numbers, and the answer matching."""

from __future__ import annotations

import pytest

from advantage.tasks.email_agent.answers import is_idk, matches
from advantage.tasks.email_agent.judge import AnswerJudge, JudgeError, parse_verdict
from advantage.tasks.email_agent.questions import Question
from advantage.tasks.email_agent.reward import Rubric, make_rubric, outcome, reward
from advantage.tasks.email_agent.tools import FinalAnswer, ToolResult

Q = Question(
    "inbox-0-q001", 0, "What time does my flight to Denver depart?", "9:10 AM", "time", ("abc123",), "search"
)
NO_ANSWER = Question(
    "inbox-0-q002", 0, "What is the confirmation code for my trip to Oslo?", None, "text", (), "unanswerable"
)
FOUND = ToolResult("[...]", found_ids=("zzz999", "abc123"))
READ = ToolResult("Message-ID: abc123 ...", read_id="abc123")
BAD_READ = ToolResult("Error: no email", error="no email")


def final(answer: str, *sources: str) -> ToolResult:
    return ToolResult("Answer recorded.", final=FinalAnswer(answer, sources))


def test_correct_with_sources_few_turns() -> None:
    r = make_rubric(Q, [FOUND, READ, final("It departs at 9:10 AM.", "abc123")], "answered", num_turns=3)
    assert outcome(r) == "correct"
    # 1 + 0.3 (sources) + 0.1 / 1 source + 0.1 * (1 - 3/10) = 1.47
    assert reward(r, max_turns=10) == pytest.approx(1.47)


def test_correct_without_sources() -> None:
    r = make_rubric(Q, [final("9:10am")], "answered", num_turns=1)
    # 1 + 0 + 0 (no sources) + 0.1 * (1 - 1/10) = 1.09
    assert reward(r, max_turns=10) == pytest.approx(1.09)


def test_correct_with_two_sources() -> None:
    r = make_rubric(Q, [final("09:10", "abc123", "zzz999")], "answered", num_turns=5)
    # 1 + 0.3 + 0.1 / 2 + 0.1 * (1 - 5/10) = 1.40
    assert reward(r, max_turns=10) == pytest.approx(1.40)


def test_wrong_answer_is_the_hallucination_penalty_plus_partial_credit() -> None:
    r = make_rubric(Q, [FOUND, READ, final("10:10 AM", "abc123")], "answered", num_turns=3)
    assert outcome(r) == "wrong"
    # -1 + 0.1 found + 0.1 read + 0.1 no tool errors + 0.1 right sources = -0.6
    assert reward(r, max_turns=10) == pytest.approx(-0.6)
    bare = make_rubric(Q, [BAD_READ, final("10:10 AM")], "answered", num_turns=2)
    assert reward(bare, max_turns=10) == pytest.approx(-1.0)  # no partial credit at all


def test_i_dont_know_to_an_answerable_question_is_zero_plus_partial() -> None:
    r = make_rubric(Q, [FOUND, final("I don't know")], "answered", num_turns=2)
    assert outcome(r) == "idk"
    # 0 + 0.1 found + 0.1 no tool errors = 0.2
    assert reward(r, max_turns=10) == pytest.approx(0.2)


def test_out_of_turns_is_zero_plus_partial() -> None:
    r = make_rubric(Q, [FOUND, READ, BAD_READ], "max_turns", num_turns=10)
    assert outcome(r) == "no_answer"
    # 0 + 0.1 found + 0.1 read (a tool error: no 0.1; no answer: no sources) = 0.2
    assert reward(r, max_turns=10) == pytest.approx(0.2)


def test_format_errors() -> None:
    unparseable = make_rubric(Q, [], "no_tool_call", num_turns=1)
    # -2 + 0.1 (no tool errors) = -1.9
    assert reward(unparseable, max_turns=10) == pytest.approx(-1.9)
    bad_args = make_rubric(Q, [ToolResult("Error: answer must be a string", error="x", bad_args=True)],
                           "bad_final_args", num_turns=1)  # fmt: skip
    assert reward(bad_args, max_turns=10) == pytest.approx(-1.8)


def test_unanswerable_question() -> None:
    idk = make_rubric(NO_ANSWER, [final("I don't know")], "answered", num_turns=2)
    assert outcome(idk) == "correct"
    # 1 + 0.3 (no sources cited, none exist) + 0 + 0.1 * (1 - 2/10) = 1.38
    assert reward(idk, max_turns=10) == pytest.approx(1.38)
    guess = make_rubric(NO_ANSWER, [final("QX7P2L")], "answered", num_turns=2)
    assert outcome(guess) == "wrong"
    assert reward(guess, max_turns=10) == pytest.approx(-1.0 + 0.1 + 0.1)  # no tool errors, no sources


def test_tiers_are_ordered() -> None:
    rubrics = [Rubric("no_tool_call", 1), Rubric("bad_final_args", 1), Rubric("answered", 2),
               Rubric("max_turns", 10), Rubric("answered", 10, answer_correct=True)]  # fmt: skip
    values = [reward(r, 10) for r in rubrics]
    assert values == sorted(values)


def test_a_judge_verdict_overrides_matching() -> None:
    r = make_rubric(Q, [final("ten past nine in the morning")], "answered", num_turns=1)
    assert not r.answer_correct
    assert make_rubric(Q, [final("ten past nine in the morning")], "answered", 1, correct=True).answer_correct


@pytest.mark.parametrize(
    ("answer", "expected", "kind", "ok"),
    [
        ("It departs at 9:10 AM.", "9:10 AM", "time", True),
        ("09:10", "9:10 AM", "time", True),
        ("21:10", "9:10 AM", "time", False),
        ("1:45pm", "1:45 PM", "time", True),
        ("9:10, 9:30, 10:00 or 11:00 or 12:00", "9:10 AM", "time", False),
        ("$20,052.36", "$20,052.36", "money", True),
        ("20052.36 dollars", "$20,052.36", "money", True),
        ("$20,052", "$20,052.36", "money", False),
        ("March 30, 2024", "March 30, 2024", "date", True),
        ("by 2024-03-30", "March 30, 2024", "date", True),
        ("30 March", "March 30, 2024", "date", True),
        ("Mar 31", "March 30, 2024", "date", False),
        ("12 monitors", "12", "number", True),
        ("120", "12", "number", False),
        ("The Hyatt Regency Denver", "Hyatt Regency", "text", True),
        ("Hyatt", "Hyatt Regency", "text", False),
        ("code qx7p2l", "QX7P2L", "text", True),
        ("QX7P2", "QX7P2L", "text", False),
    ],
)
def test_matches(answer: str, expected: str, kind: str, ok: bool) -> None:
    assert matches(answer, expected, kind) is ok  # type: ignore[arg-type]


def test_idk_detection() -> None:
    assert is_idk("I don't know") and is_idk("I couldn\u2019t find it.") and is_idk("")
    assert not is_idk("9:10 AM")


class FakeJudge(AnswerJudge):
    def __init__(self, reply: str) -> None:
        super().__init__("judge", base_url="http://127.0.0.1:9/v1")
        self.reply, self.calls = reply, 0

    async def _complete(self, prompt: str) -> str:
        self.calls += 1
        assert "ten past nine" in prompt and "9:10 AM" in prompt
        return self.reply


async def test_judge() -> None:
    assert await FakeJudge('{"correct": true}').is_correct(Q.question, "9:10 AM", "ten past nine") is True
    empty = FakeJudge('{"correct": true}')
    assert await empty.is_correct(Q.question, "9:10 AM", "  ") is False and empty.calls == 0
    with pytest.raises(JudgeError):
        await FakeJudge("yes!").is_correct(Q.question, "9:10 AM", "ten past nine")
    assert parse_verdict('Sure. {"correct": false}') is False
