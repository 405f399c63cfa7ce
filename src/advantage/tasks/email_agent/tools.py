"""The agent's three tools (DESIGN §7), as OpenAI tool schemas, and their executor.

The inbox is injected: `execute` takes the `EmailDB` of the question's inbox, which the model never sees.
Bad input (malformed JSON, a missing or mistyped argument, a malformed date, an unknown message id, an
unknown tool) comes back as an "Error: ..." tool message that says what to do; `execute` never raises.
`return_final_answer` is validated here and ends the episode in the rollout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .db import MAX_RESULTS, EmailDB, ToolError

_STR = {"type": "string"}


def _fn(name: str, description: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    params = {"type": "object", "properties": props, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


TOOLS: list[dict[str, Any]] = [
    _fn(
        "search_inbox",
        "Search the user's inbox. Every keyword must appear. Returns message ids and snippets, newest first.",
        {
            "keywords": _STR,
            "from_addr": _STR,
            "to_addr": _STR,
            "sent_after": {"type": "string", "description": "YYYY-MM-DD"},
            "sent_before": {"type": "string", "description": "YYYY-MM-DD"},
            "max_results": {"type": "integer", "description": f"at most {MAX_RESULTS}"},
        },
        ["keywords"],
    ),
    _fn("read_email", "Read one email by its message_id.", {"message_id": _STR}, ["message_id"]),
    _fn(
        "return_final_answer",
        'Give the final answer and the message ids it comes from. Answer "I don\'t know" if the inbox does '
        "not say.",
        {"answer": _STR, "sources": {"type": "array", "items": _STR}},
        ["answer", "sources"],
    ),
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]
SEARCH_ARGS = frozenset(TOOLS[0]["function"]["parameters"]["properties"])


@dataclass(frozen=True)
class FinalAnswer:
    answer: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class ToolResult:
    """What a call returned to the model, and what the reward needs to know about it."""

    content: str
    error: str | None = None
    found_ids: tuple[str, ...] = ()  # ids a search returned
    read_id: str | None = None  # the id a successful read_email opened
    final: FinalAnswer | None = None  # set by a valid return_final_answer
    unknown_tool: bool = False
    bad_args: bool = False  # the arguments could not be used at all (not JSON, missing, wrong type)


def _error(message: str, **flags: bool) -> ToolResult:
    return ToolResult(f"Error: {message}", error=message, **flags)  # type: ignore[arg-type]


def parse_final_answer(args: dict[str, Any]) -> FinalAnswer:
    """The validated arguments of return_final_answer. Raises ToolError."""
    answer = args.get("answer")
    if not isinstance(answer, str):
        raise ToolError(f'answer must be a string, got {answer!r:.60}; answer "I don\'t know" if unsure')
    sources = args.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ToolError(f"sources must be a list of message ids (strings), got {sources!r:.60}")
    return FinalAnswer(answer.strip(), tuple(s.strip().strip("<>") for s in sources))


def execute(db: EmailDB, name: str, arguments_json: str) -> ToolResult:
    """Run one tool call as the model wrote it. Never raises."""
    if name not in TOOL_NAMES:
        return _error(f"unknown tool {name!r}; available tools: {', '.join(TOOL_NAMES)}", unknown_tool=True)
    try:
        args = json.loads(arguments_json or "{}")
    except (json.JSONDecodeError, TypeError):
        return _error(f"arguments are not valid JSON: {arguments_json!r:.80}", bad_args=True)
    if not isinstance(args, dict):
        return _error(f"arguments must be a JSON object, got {arguments_json!r:.80}", bad_args=True)
    try:
        if name == "search_inbox":
            unknown = sorted(set(args) - SEARCH_ARGS)
            if unknown:
                raise ToolError(
                    f"unknown argument(s) {', '.join(unknown)}; use {', '.join(sorted(SEARCH_ARGS))}"
                )
            if "keywords" not in args:
                raise ToolError("missing argument 'keywords'")
            hits = db.search(**args)
            content = json.dumps([{"message_id": h.message_id, "snippet": h.snippet} for h in hits])
            return ToolResult(content if hits else "[] (no email matches all keywords; try fewer)",
                              found_ids=tuple(h.message_id for h in hits))  # fmt: skip
        if name == "read_email":
            if "message_id" not in args:
                raise ToolError("missing argument 'message_id'")
            email = db.read(args["message_id"])
            return ToolResult(email.render(), read_id=email.message_id)
        final = parse_final_answer(args)
        return ToolResult("Answer recorded.", final=final)
    except ToolError as exc:
        bad = (
            name == "return_final_answer" or "missing argument" in str(exc) or "unknown argument" in str(exc)
        )
        return _error(str(exc), bad_args=bad)
    except TypeError as exc:  # e.g. a list where a string belongs, deep in the search
        return _error(f"bad arguments for {name}: {exc}", bad_args=True)
