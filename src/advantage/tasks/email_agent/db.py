"""An inbox in SQLite with an FTS5 index (porter stemming) over subject and body: the search engine behind
the agent's tools. Built in memory from the generated inbox in about 0.1 s, and cached per inbox.

Search semantics (as ART-E's): every keyword must appear (AND); a keyword with a hyphen or inner spaces
("INV-48213") is matched as a phrase; results are newest first; filters narrow by sender, recipient (To or
Cc) and date. `sent_after` is inclusive and `sent_before` exclusive, both YYYY-MM-DD.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import sqlite3
from dataclasses import dataclass

from .inbox import Inbox, generate_inbox
from .mail import Email

MAX_RESULTS = 10


class ToolError(ValueError):
    """Bad tool input. The tools layer returns its message to the model; it never ends the rollout."""


@dataclass(frozen=True)
class SearchHit:
    message_id: str
    snippet: str


def _schema(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        CREATE TABLE emails (rowid INTEGER PRIMARY KEY, message_id TEXT UNIQUE, date TEXT, from_addr TEXT,
                             recipients TEXT, subject TEXT, body TEXT);
        CREATE VIRTUAL TABLE emails_fts USING fts5(subject, body, content='emails', content_rowid='rowid',
                                                   tokenize='porter unicode61');
        CREATE INDEX emails_date ON emails(date);
        """
    )


def parse_day(value: object, name: str) -> str:
    """A YYYY-MM-DD string, or a ToolError naming the argument and the expected format."""
    text = str(value).strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            return dt.date.fromisoformat(text).isoformat()
        except ValueError:
            pass
    raise ToolError(f"{name} must be a date as YYYY-MM-DD (e.g. 2024-03-01), got {text!r}")


def fts_query(keywords: str | list[str]) -> str:
    """An FTS5 MATCH expression requiring every keyword; user text never reaches FTS5's query syntax."""
    terms = keywords if isinstance(keywords, list) else re.split(r"[\s,;]+", str(keywords))
    phrases = [t.strip().strip("\"'") for t in terms if re.search(r"[A-Za-z0-9]", str(t))]
    if not phrases:
        raise ToolError("keywords is empty: give one or more words to search for, e.g. 'invoice Northwind'")
    return " AND ".join('"' + p.replace('"', '""') + '"' for p in phrases)


class EmailDB:
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.conn = sqlite3.connect(":memory:", check_same_thread=False)
        _schema(self.conn)
        rows = [
            (i, e.message_id, e.date.isoformat(sep=" ", timespec="minutes"), e.from_addr,
             ", ".join(e.to_addrs + e.cc_addrs), e.subject, e.body)
            for i, e in enumerate(inbox.emails, start=1)
        ]  # fmt: skip
        self.conn.executemany("INSERT INTO emails VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self.conn.execute("INSERT INTO emails_fts(emails_fts) VALUES ('rebuild')")
        self.conn.commit()

    def search(
        self,
        keywords: str | list[str],
        from_addr: str | None = None,
        to_addr: str | None = None,
        sent_after: str | None = None,
        sent_before: str | None = None,
        max_results: int = MAX_RESULTS,
    ) -> list[SearchHit]:
        """Messages holding every keyword, newest first. Raises ToolError for bad input."""
        if (
            isinstance(max_results, bool)
            or not isinstance(max_results, int)
            or not 1 <= max_results <= MAX_RESULTS
        ):
            raise ToolError(f"max_results must be an integer from 1 to {MAX_RESULTS}, got {max_results!r}")
        where, params = ["emails_fts MATCH ?"], [fts_query(keywords)]
        if from_addr:
            where.append("e.from_addr LIKE ?")
            params.append(f"%{str(from_addr).strip()}%")
        if to_addr:
            where.append("e.recipients LIKE ?")
            params.append(f"%{str(to_addr).strip()}%")
        if sent_after:
            where.append("e.date >= ?")
            params.append(parse_day(sent_after, "sent_after"))
        if sent_before:
            where.append("e.date < ?")
            params.append(parse_day(sent_before, "sent_before"))
        sql = (
            "SELECT e.message_id, e.date, e.from_addr, e.subject, "
            "snippet(emails_fts, 1, '', '', '...', 12) FROM emails_fts JOIN emails e ON e.rowid = emails_fts.rowid "
            f"WHERE {' AND '.join(where)} ORDER BY e.date DESC, e.message_id LIMIT ?"
        )
        try:
            rows = self.conn.execute(sql, [*params, max_results]).fetchall()
        except sqlite3.OperationalError as exc:  # should not happen: every keyword is quoted
            raise ToolError(f"search failed ({exc}); use plain words as keywords") from None
        return [
            SearchHit(mid, f"{date[:10]} | {frm} | {subject} | {snip}")
            for mid, date, frm, subject, snip in rows
        ]

    def read(self, message_id: str) -> Email:
        """The message with this id. Raises ToolError, with what to do, for an unknown id."""
        mid = str(message_id).strip().strip("<>")
        email = self.inbox.email(mid)
        if email is None:
            raise ToolError(f"no email with message_id {mid!r}; use an id returned by search_inbox")
        return email


@functools.cache
def inbox_db(seed: int) -> EmailDB:
    """The (shared, read-only) database of inbox `seed`."""
    return EmailDB(generate_inbox(seed))
