"""A single-turn variant of the tool-use task: the first tool call only, graded from the completion's text.

Same prompt as the multi-turn task (system message, worked example, question, tool schemas); the reward is
the call credits of `reward.py` (valid format, right tool, right arguments) rescaled to [0, 1], computed from
the raw completion text. One prompt, one completion, one number: the shape every trainer accepts, which is
what the cookbook's low-level loop and the side-by-side benchmark against TRL use.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .env import TOOLS, Scenario
from .reward import W_ARGS, W_FORMAT, W_TOOL, call_credits
from .rollout import initial_messages

Message = dict[str, Any]
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", re.DOTALL)
MAX_CALL = W_FORMAT + W_TOOL + W_ARGS

__all__ = ["TOOLS", "first_call", "prompt", "reward"]


def prompt(scenario: Scenario) -> list[Message]:
    """The chat messages to complete (send them with `tools=TOOLS`)."""
    return initial_messages(scenario)


def first_call(text: str) -> tuple[str, dict[str, Any] | None] | None:
    """(name, arguments) of the first `<tool_call>{...}</tool_call>` in a completion; arguments are None
    when they are not a JSON object. None when there is no call."""
    m = _CALL.search(text)
    if m is None:
        return None
    try:
        call = json.loads(m.group(1))
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict):
        return None
    args = call.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = None
    return str(call.get("name") or ""), args if isinstance(args, dict) else None


def reward(text: str, scenario: Scenario) -> float:
    """The call credits in [0, 1]: 0.2 for a well-formed call, +0.4 right tool, +0.4 right arguments."""
    valid, right_tool, right_args = call_credits(first_call(text), scenario)
    return (W_FORMAT * valid + W_TOOL * right_tool + W_ARGS * right_args) / MAX_CALL
