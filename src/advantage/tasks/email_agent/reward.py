"""The tiered ART-E reward (DESIGN §7), a pure function of an episode's `Rubric`.

    format error        -2   no tool call in the last turn (plain text, or a call that did not parse)
                        -1.8 return_final_answer with unusable arguments
    wrong answer        -1   (the hallucination penalty; a concrete answer to an unanswerable question)
    no answer            0   "I don't know" to an answerable question, or out of turns
    correct answer       1   + 0.3 if the sources cite the source email(s)
                             + 0.1 / n_sources (fewer sources)  + 0.1 * (1 - turns / max_turns) (fewer turns)

Every tier but the correct one adds partial credit, at most 0.4, so the tiers never overlap by more than
that: 0.1 each for having found the source email in a search, having read it, never having made a failing
tool call, and citing the right sources. For an unanswerable question "I don't know" is the correct answer
(with no sources to cite).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from .answers import is_idk, matches
from .questions import Question
from .tools import FinalAnswer, ToolResult

Finish = Literal["answered", "no_tool_call", "bad_final_args", "max_turns"]
Outcome = Literal["correct", "wrong", "idk", "no_answer"]

W_SOURCES, W_FEW_SOURCES, W_FEW_TURNS = 0.3, 0.1, 0.1
PARTIAL = 0.1


@dataclass(frozen=True)
class Rubric:
    finish: Finish
    num_turns: int
    answer_correct: bool = False
    answered_idk: bool = False
    sources_correct: bool = False
    num_sources: int = 0
    found_source: bool = False
    read_source: bool = False
    tool_errors: int = 0

    def to_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if k != "finish"}


def grade_answer(question: Question, final: FinalAnswer) -> tuple[bool, bool]:
    """(correct, idk) by normalised matching. "I don't know" is correct exactly when the inbox has no answer."""
    idk = is_idk(final.answer)
    if question.answer is None:
        return idk, idk
    return (not idk) and matches(final.answer, question.answer, question.kind), idk


def make_rubric(
    question: Question,
    results: Sequence[ToolResult],
    finish: Finish,
    num_turns: int,
    correct: bool | None = None,
) -> Rubric:
    """The facts the reward needs, from the episode's tool results. `correct` overrides normalised matching
    (a judge's verdict)."""
    final = next((r.final for r in results if r.final is not None), None)
    found = any(set(r.found_ids) & set(question.source_ids) for r in results)
    read = any(r.read_id in question.source_ids for r in results if r.read_id)
    errors = sum(r.error is not None for r in results)
    if finish != "answered" or final is None:
        return Rubric(finish, num_turns, found_source=found, read_source=read, tool_errors=errors)
    ok, idk = grade_answer(question, final)
    sources = set(final.sources)
    return Rubric(
        finish,
        num_turns,
        answer_correct=ok if correct is None else correct,
        answered_idk=idk,
        sources_correct=set(question.source_ids) <= sources if question.source_ids else not sources,
        num_sources=len(sources),
        found_source=found,
        read_source=read,
        tool_errors=errors,
    )


def outcome(r: Rubric) -> Outcome:
    if r.finish != "answered":
        return "no_answer"
    if r.answer_correct:
        return "correct"
    return "idk" if r.answered_idk else "wrong"


def partial_credit(r: Rubric) -> float:
    return PARTIAL * (r.found_source + r.read_source + (r.tool_errors == 0) + r.sources_correct)


def reward(r: Rubric, max_turns: int) -> float:
    """The episode's reward; see the module docstring for the tiers."""
    if r.finish == "no_tool_call":
        return -2.0 + partial_credit(r)
    if r.finish == "bad_final_args":
        return -1.8 + partial_credit(r)
    if r.finish == "max_turns":
        return 0.0 + partial_credit(r)
    if not r.answer_correct:
        return (0.0 if r.answered_idk else -1.0) + partial_credit(r)
    few_sources = W_FEW_SOURCES / r.num_sources if r.num_sources else 0.0
    few_turns = W_FEW_TURNS * (1 - r.num_turns / max_turns)
    return 1.0 + W_SOURCES * r.sources_correct + few_sources + few_turns
