"""SFT data files: OpenAI's fine-tuning chat format, read and checked before any training starts.

One JSON object per line:

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function":
                      {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]},
                  {"role": "tool", "tool_call_id": "...", "content": "18 C"},
                  {"role": "assistant", "content": "It is 18 C.", "weight": 1}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]}

- Roles are those of the chat API (system, developer, user, assistant, tool); content and tool calls are
  checked by the same rules as a chat request (`engine.chat.validate_messages`).
- `weight` (optional, assistant messages only) is 0 or 1: 0 keeps the turn as context and does not train
  on it. Every example needs at least one assistant message with weight 1 (the default).
- `tools` (optional) are OpenAI tool schemas; `parallel_tool_calls` is accepted and has no effect here.
  Any other key is an error, so a misspelt `mesages` is not read as an empty example.
- Blank lines are not examples and are passed over; every other line is one example.

Nothing is skipped silently: every bad line is reported (up to `MAX_REPORTED`), by file and line number,
in one `SFTDataError`, before any training step. Whether an example fits the model (its length in tokens)
needs the tokenizer, so the backend checks that when it tokenizes (`sft_datums`), naming the same lines.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from advantage.engine.chat import _check_tools, validate_messages
from advantage.trajectory import Message, Trajectory

ALLOWED_KEYS = ("messages", "tools", "parallel_tool_calls")
MAX_REPORTED = 20  # bad lines listed in one error; the count of the rest is given
T = TypeVar("T")


class SFTDataError(ValueError):
    """One or more bad lines in an SFT data file; the message lists each as `FILE, line N: what`."""


@dataclass
class SFTExample:
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    where: str  # "FILE, line N": names the example in any later error

    def to_trajectory(self) -> Trajectory:
        return Trajectory(list(self.messages), tools=self.tools, metadata={"source": self.where})


def parse_example(line: str) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """One line's messages and tools; raises ValueError saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"must be a JSON object with 'messages', got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(ALLOWED_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; an example has only {', '.join(ALLOWED_KEYS)}")
    if "messages" not in obj:
        raise ValueError("has no 'messages'")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of messages")
    validate_messages(messages)
    tools = obj.get("tools")
    if tools is not None:
        _check_tools(tools)
    trained = 0
    for i, m in enumerate(messages):
        if "weight" not in m:
            trained += m["role"] == "assistant"
            continue
        w = m["weight"]
        if m["role"] != "assistant":
            raise ValueError(f"messages[{i}] ({m['role']}) has a 'weight'; only assistant messages take one")
        if isinstance(w, bool) or w not in (0, 1):
            raise ValueError(f"messages[{i}] has weight {w!r}; it must be 0 (not trained) or 1 (trained)")
        trained += w == 1
    if not trained:
        raise ValueError("has no assistant message to train on (none, or all with weight 0)")
    return messages, tools


def parse_lines(lines: list[str], source: str) -> list[SFTExample]:
    """Every example of `lines` (a file's lines, named `source` in errors); raises SFTDataError listing every
    bad line, or saying the data holds no example."""
    examples: list[SFTExample] = []
    errors: list[str] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}, line {n}"
        try:
            messages, tools = parse_example(line)
        except ValueError as e:
            errors.append(f"{where}: {e}")
            continue
        examples.append(SFTExample(messages, tools, where))
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED} more bad lines" if len(errors) > MAX_REPORTED else ""
        raise SFTDataError(
            f"{len(errors)} bad line(s) in {source}; fix them (nothing was trained):\n"
            + "\n".join(errors[:MAX_REPORTED])
            + more
        )
    if not examples:
        raise SFTDataError(f"{source} holds no example; write one JSON object with 'messages' per line.")
    return examples


def read_file(path: str | Path) -> list[SFTExample]:
    """The examples of a JSONL file in the OpenAI chat fine-tuning format (rules in the module docstring)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SFTDataError(f"{p}: no such file.") from None
    except UnicodeDecodeError as e:
        raise SFTDataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    return parse_lines(text.splitlines(), str(p))


def split_val(examples: list[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, val): a seeded random `fraction` of `examples` held out, at least one when fraction > 0.
    Raises when that would leave nothing to train on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}.")
    if fraction == 0.0:
        return list(examples), []
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise ValueError(
            f"val_fraction {fraction} of {len(examples)} example(s) leaves none to train on; add examples, "
            "lower val_fraction, or pass a validation file."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )
