"""SFT data files (OpenAI's chat fine-tuning format): what reads, and the error each kind of bad line gets,
naming the file and the line. Pure: no model, no tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advantage.training.sft_data import SFTDataError, parse_example, parse_lines, read_file, split_val

USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ],
}
TOOL = {"role": "tool", "tool_call_id": "c1", "content": "18 C"}
ANSWER = {"role": "assistant", "content": "It is 18 C in Paris."}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def line(**obj: object) -> str:
    return json.dumps(obj)


def test_a_full_tool_use_example_reads() -> None:
    messages = [{"role": "system", "content": "Be brief."}, USER, CALL, TOOL, {**ANSWER, "weight": 1}]
    got, tools = parse_example(line(messages=messages, tools=TOOLS, parallel_tool_calls=False))
    assert got == messages and tools == TOOLS


def test_weight_zero_keeps_a_turn_as_context() -> None:
    messages, _ = parse_example(line(messages=[USER, {**CALL, "weight": 0}, TOOL, ANSWER]))
    assert messages[1]["weight"] == 0


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (line(mesages=[USER, ANSWER]), r"unknown key\(s\) \['mesages'\]"),
        (line(tools=TOOLS), "has no 'messages'"),
        (line(messages=[]), "non-empty list"),
        (line(messages=[{"role": "robot", "content": "hi"}, ANSWER]), "unknown role 'robot'"),
        (line(messages=[USER, {**ANSWER, "weight": 0.5}]), r"weight 0\.5.*0 \(not trained\) or 1"),
        (line(messages=[USER, {**ANSWER, "weight": True}]), "weight True"),
        (line(messages=[{**USER, "weight": 1}, ANSWER]), r"messages\[0\] \(user\) has a 'weight'"),
        (line(messages=[USER]), "no assistant message to train on"),
        (line(messages=[USER, {**ANSWER, "weight": 0}]), "no assistant message to train on"),
        (line(messages=[USER, {**CALL, "tool_calls": "x"}]), "tool_calls must be a list"),
        (line(messages=[USER, ANSWER], tools="get_weather"), "tools must be a list"),
    ],
)
def test_each_bad_line_says_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_example(text)


def test_every_bad_line_is_reported_by_file_and_line_before_anything_trains() -> None:
    good = line(messages=[USER, ANSWER])
    lines = [good, "", "{oops", good, line(messages=[USER])]
    with pytest.raises(SFTDataError) as info:
        parse_lines(lines, "data.jsonl")
    msg = str(info.value)
    assert msg.startswith("2 bad line(s) in data.jsonl")
    assert "data.jsonl, line 3: not valid JSON" in msg
    assert "data.jsonl, line 5: has no assistant message" in msg
    assert "line 1" not in msg and "line 4" not in msg


def test_blank_lines_are_not_examples_and_examples_know_their_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + line(messages=[USER, ANSWER], tools=TOOLS) + "\n\n")
    (ex,) = read_file(path)
    assert ex.where == f"{path}, line 2"
    traj = ex.to_trajectory()
    assert traj.messages() == [USER, ANSWER] and traj.tools == TOOLS


def test_empty_missing_and_undecodable_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SFTDataError, match="holds no example"):
        read_file(tmp_path / "empty.jsonl")
    with pytest.raises(SFTDataError, match="no such file"):
        read_file(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe{")
    with pytest.raises(SFTDataError, match="not UTF-8"):
        read_file(tmp_path / "bin.jsonl")


def test_many_bad_lines_are_counted_past_the_first_twenty() -> None:
    with pytest.raises(SFTDataError, match=r"25 bad line\(s\)[\s\S]*and 5 more bad lines"):
        parse_lines(["{"] * 25, "d.jsonl")


def test_split_val_is_seeded_disjoint_and_keeps_something_to_train_on() -> None:
    items = list(range(10))
    train, val = split_val(items, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == items
    assert split_val(items, 0.2, seed=3) == (train, val)
    assert split_val(items, 0.0) == (items, [])
    assert len(split_val(items, 0.01)[1]) == 1  # a fraction > 0 always holds one out
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_val([1], 0.5)
