"""The tool-use task's programmatic reward: partial credit, a pure function of the conversation.

    valid tool-call format  0.1   the first tool call has a name and a JSON-object of arguments
    right tool              0.2   ... and it names the scenario's tool
    right arguments         0.2   ... and its arguments mean the scenario's (case, aliases, 5 vs 5.0 ignored)
    answer uses the result  0.5   the final assistant reply states the key value (a temperature, an amount,
                                  a converted value, a time), a tool result in the conversation holds it,
                                  and the reply ended by itself (a reply cut off at max_tokens is no answer)

Only the agent's turns are graded: the messages after the last user message (the question), so the worked
example in the prompt never counts. Of those, only the first tool call earns the call credits. The answer
credit needs the value to have come from a tool, so a guessed or memorised number earns nothing, and it
needs a finished reply: without that, a reply that rambles on until it is cut off (listing numbers until one
matches) would earn it, and the policy learns to ramble, which also makes every rollout slower. A perfect
episode scores 1.0, which is what `success` means.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from advantage import Trajectory

from .env import Scenario, ToolError, canonical_arguments

Message = dict[str, Any]

W_FORMAT, W_TOOL, W_ARGS, W_ANSWER = 0.1, 0.2, 0.2, 0.5
NUMBER_TOLERANCE = 0.05  # "52.6" states 52.56: a reply may round the tool's two decimals to one

_TIME = re.compile(r"\b(\d{1,2})[:.](\d{2})\b")  # in a reply: "9:30", "09:30", "9.30"
_TIME_FACT = re.compile(r"\d{2}:\d{2}")  # as the calendar writes it
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class RewardBreakdown:
    valid_call: bool
    right_tool: bool
    right_args: bool
    answered: bool  # the final reply states the key value that a tool returned

    @property
    def total(self) -> float:
        return (
            W_FORMAT * self.valid_call
            + W_TOOL * self.right_tool
            + W_ARGS * self.right_args
            + W_ANSWER * self.answered
        )


def episode(messages: list[Message]) -> list[Message]:
    """The agent's part of the conversation: everything after the last user message."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return messages[last_user + 1 :]


def first_tool_call(messages: list[Message]) -> tuple[str, dict[str, Any] | None] | None:
    """(name, arguments) of the conversation's first tool call; arguments are None unless a JSON object.

    None when the conversation has no tool call."""
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            fn = m["tool_calls"][0].get("function") or {}
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                args = None
            return str(fn.get("name") or ""), args if isinstance(args, dict) else None
    return None


def final_reply(messages: list[Message]) -> str | None:
    """The closing assistant message's text, or None if the conversation does not end with a reply."""
    if not messages:
        return None
    last = messages[-1]
    if last.get("role") != "assistant" or last.get("tool_calls"):
        return None
    return str(last.get("content") or "")


def states_fact(text: str, fact: str) -> bool:
    """Whether `text` states `fact`: a time ("09:30" matches "9:30"), or a number (up to rounding, commas)."""
    if _TIME_FACT.fullmatch(fact):
        h, m = fact.split(":")
        return any((int(a), b) == (int(h), m) for a, b in _TIME.findall(text))
    want = float(fact)
    for token in _NUMBER.findall(text):
        try:
            if abs(float(token.replace(",", "")) - want) <= NUMBER_TOLERANCE:
                return True
        except ValueError:
            continue
    return False


def call_credits(
    call: tuple[str, dict[str, Any] | None] | None, scenario: Scenario
) -> tuple[bool, bool, bool]:
    """(valid call, right tool, right arguments) of a first tool call given as (name, arguments or None)."""
    name, args = call if call is not None else ("", None)
    valid = bool(name) and args is not None
    right_tool = valid and name == scenario.tool
    right_args = False
    if right_tool and args is not None:
        try:
            right_args = canonical_arguments(name, args) == scenario.arguments
        except ToolError:
            right_args = False
    return valid, right_tool, right_args


def score(messages: list[Message], scenario: Scenario, *, cut_off: bool = False) -> RewardBreakdown:
    """Grade a conversation (as `Trajectory.messages()` returns it) against the scenario it answers.

    `cut_off`: the final reply was stopped by max_tokens (finish_reason "length"); it earns no answer credit."""
    messages = episode(messages)
    valid, right_tool, right_args = call_credits(first_tool_call(messages), scenario)
    reply = final_reply(messages)
    tool_results = [str(m.get("content") or "") for m in messages if m.get("role") == "tool"]
    answered = (
        reply is not None
        and not cut_off
        and all(
            states_fact(reply, f) and any(states_fact(r, f) for r in tool_results)
            for f in scenario.answer_facts
        )
    )
    return RewardBreakdown(valid, right_tool, right_args, answered and bool(scenario.answer_facts))


def reward(messages: list[Message], scenario: Scenario, *, cut_off: bool = False) -> float:
    return score(messages, scenario, cut_off=cut_off).total


def success(traj: Trajectory) -> bool:
    """Whether an episode earned full marks; regraded from its messages, finish reason and the scenario in its
    metadata."""
    scenario = Scenario.from_dict(traj.metadata["scenario"])
    cut_off = traj.finish_reason == "length"
    return score(traj.messages(), scenario, cut_off=cut_off).total >= 1.0 - 1e-9
