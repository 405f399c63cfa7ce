"""The email agent's data: the generated inboxes, the QA set, and the FTS5 search over them."""

from __future__ import annotations

import sqlite3
from collections import Counter

from advantage.tasks.email_agent.db import inbox_db
from advantage.tasks.email_agent.inbox import SPLITS, generate_inbox
from advantage.tasks.email_agent.questions import Question, keywords, load_questions, search_args


def test_sqlite_has_fts5() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(body, tokenize='porter unicode61')")


def test_generator_is_deterministic() -> None:
    a = generate_inbox.__wrapped__(3)  # bypass the cache: two independent builds
    b = generate_inbox.__wrapped__(3)
    assert a.emails == b.emails and a.facts == b.facts and a.company == b.company
    assert generate_inbox.__wrapped__(4).emails != a.emails


def test_inboxes_are_big_and_realistic() -> None:
    inbox = generate_inbox(0)
    assert len(inbox.emails) >= 2000
    subjects = [e.subject for e in inbox.emails]
    assert any(s.startswith("Re: ") for s in subjects) and any(s.startswith("Fwd: ") for s in subjects)
    assert sum(bool(e.cc_addrs) for e in inbox.emails) > 20
    months = {e.date.month for e in inbox.emails}
    assert len(months) == 12
    threads = Counter(e.thread_id for e in inbox.emails)
    assert max(threads.values()) >= 3  # threads with replies
    assert len({e.message_id for e in inbox.emails}) == len(inbox.emails)
    assert [e.date for e in inbox.emails] == sorted(e.date for e in inbox.emails)


def test_question_counts_and_split_by_inbox() -> None:
    train, test = load_questions("train"), load_questions("test")
    assert len(train) >= 1000 and len(test) >= 200
    assert {q.inbox_seed for q in train}.isdisjoint({q.inbox_seed for q in test})
    assert {q.inbox_seed for q in test} == set(SPLITS["test"])
    needs = Counter(q.need for q in train)
    assert set(needs) == {"search", "date_filter", "sender_filter", "thread", "unanswerable"}
    assert all(q.question.split()[0] in {"What", "Which", "When", "How", "By", "After"} for q in train)
    assert load_questions("test", limit=5, seed=1) == load_questions("test", limit=5, seed=1)
    q = test[0]
    assert Question.from_dict(q.to_dict()) == q


def test_each_answer_appears_in_its_source_email() -> None:
    for q in load_questions("train") + load_questions("test"):
        if q.answer is None:
            assert q.source_ids == ()
            continue
        inbox = generate_inbox(q.inbox_seed)
        bodies = [inbox.email(mid).body for mid in q.source_ids]  # type: ignore[union-attr]
        assert any(q.answer in body for body in bodies), q


def test_thread_questions_need_the_latest_reply() -> None:
    q = next(q for q in load_questions("train") if q.need == "thread" and "moved to" in q.question)
    email = generate_inbox(q.inbox_seed).email(q.source_ids[0])
    assert email is not None and email.subject.startswith("Re: ")


def test_keyword_search_finds_the_source_for_90_percent() -> None:
    found = total = 0
    for q in load_questions("train") + load_questions("test"):
        if q.answer is None:
            continue
        hits = inbox_db(q.inbox_seed).search(**search_args(q))
        found += any(h.message_id in q.source_ids for h in hits)
        total += 1
    assert found / total >= 0.9, found / total


def test_date_filter_questions_need_the_filter() -> None:
    qs = [q for q in load_questions("train") if q.need == "date_filter"][:20]
    assert qs
    for q in qs:
        plain = inbox_db(q.inbox_seed).search(keywords(q.question))
        assert not any(h.message_id in q.source_ids for h in plain)  # the month is not in the email
        filtered = inbox_db(q.inbox_seed).search(**search_args(q))
        assert any(h.message_id in q.source_ids for h in filtered)
