"""The email agent's tools: search semantics, and bad input returned to the model as an error."""

from __future__ import annotations

import json

import pytest

from advantage.tasks.email_agent.db import inbox_db
from advantage.tasks.email_agent.inbox import generate_inbox
from advantage.tasks.email_agent.tools import TOOL_NAMES, execute

DB = inbox_db(0)


def test_tools_are_the_design_ones() -> None:
    assert TOOL_NAMES == ["search_inbox", "read_email", "return_final_answer"]


def test_search_is_newest_first_with_filters() -> None:
    hits = DB.search("invoice", max_results=10)
    assert len(hits) == 10
    dates = [generate_inbox(0).email(h.message_id).date for h in hits]  # type: ignore[union-attr]
    assert dates == sorted(dates, reverse=True)
    march = DB.search("invoice", sent_after="2024-03-01", sent_before="2024-04-01", max_results=10)
    assert march and all(h.snippet.startswith("2024-03") for h in march)
    vendor = generate_inbox(0).company.vendors[0].email
    assert all(vendor in h.snippet for h in DB.search("invoice", from_addr=vendor))
    assert DB.search("invoice zzzznotaword") == []


def test_search_result_shape_and_read() -> None:
    out = execute(DB, "search_inbox", json.dumps({"keywords": "invoice", "max_results": 3}))
    rows = json.loads(out.content)
    assert out.error is None and len(rows) == 3 and set(rows[0]) == {"message_id", "snippet"}
    read = execute(DB, "read_email", json.dumps({"message_id": rows[0]["message_id"]}))
    assert read.read_id == rows[0]["message_id"] and read.content.startswith("Message-ID: ")


def test_fts_syntax_in_keywords_is_harmless() -> None:
    out = execute(DB, "search_inbox", json.dumps({"keywords": 'invoice" OR (NEAR* AND'}))
    assert out.error is None or out.content.startswith("Error: ")


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("delete_email", "{}", "unknown tool 'delete_email'"),
        ("search_inbox", '{"keywords": "invoice"', "not valid JSON"),
        ("search_inbox", '["invoice"]', "must be a JSON object"),
        ("search_inbox", "{}", "missing argument 'keywords'"),
        ("search_inbox", '{"keywords": "  "}', "keywords is empty"),
        ("search_inbox", '{"keywords": "invoice", "sent_after": "03/01/2024"}', "YYYY-MM-DD"),
        ("search_inbox", '{"keywords": "invoice", "sent_before": "2024-02-30"}', "YYYY-MM-DD"),
        ("search_inbox", '{"keywords": "invoice", "max_results": 50}', "from 1 to 10"),
        ("search_inbox", '{"keywords": "invoice", "max_results": "5"}', "from 1 to 10"),
        ("search_inbox", '{"keywords": "invoice", "folder": "inbox"}', "unknown argument(s) folder"),
        ("read_email", '{"message_id": "nope"}', "no email with message_id 'nope'"),
        ("read_email", "{}", "missing argument 'message_id'"),
        ("return_final_answer", '{"answer": 42, "sources": []}', "answer must be a string"),
        ("return_final_answer", '{"answer": "x", "sources": "abc"}', "sources must be a list"),
    ],
)
def test_bad_input_is_returned_not_raised(name: str, args: str, says: str) -> None:
    out = execute(DB, name, args)
    assert out.content.startswith("Error: ") and says in out.content, out.content
    assert out.final is None


def test_final_answer_is_recorded() -> None:
    out = execute(DB, "return_final_answer", json.dumps({"answer": " 9:45 AM ", "sources": ["<abc123>"]}))
    assert out.final is not None and out.final.answer == "9:45 AM" and out.final.sources == ("abc123",)
    assert execute(DB, "return_final_answer", '{"answer": "x"}').final is not None  # sources default to []
