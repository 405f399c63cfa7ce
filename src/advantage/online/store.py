"""The traffic store: every chat completion a recording model served, and the feedback given on it (the
records themselves are `online/records.py`'s).

`TrafficStore` is the interface the server and the online trainer use; it is narrow (record, look up,
write feedback, read rewarded choices, prune) so that a server-grade database can replace SQLite later.
`SQLiteTrafficStore` keeps one file per model, `<run dir>/traffic.sqlite`, in WAL mode with
synchronous=NORMAL: readers never block the writer, a process crash loses nothing committed, and a power cut
may lose the last few transactions but never leaves the file inconsistent. One connection is shared under a lock;
callers run its methods on worker threads, never on the event loop.

Tables (JSON columns hold what a completion request or a choice was on the wire):
    completions(id, model, step, created, episode, user, request_json, metadata_json, pending)
    choices(completion_id, idx, token_ids, logprobs, prompt_token_ids, forced_token_indices,
            finish_reason, message_json, background)
    feedback(completion_id, idx, reward, label, comment, source_id, updated, judge)
    trained(completion_id, idx, step, outcome, updated)
    judged(completion_id, judge, outcome, updated)
`episode` is the JSON of the request's `metadata["episode"]` (NULL without one), indexed so that feedback
on an episode finds its completions. A choice has at most one feedback row: explicit feedback replaces any
row; a judge's score (`judge` names the judge) is written only where there is none, so explicit feedback
wins over the judge whichever comes first.

Background samples (`server/background.py`): a completion recorded with `pending` = k has k background
samples on the way; `add_background` appends them as choices `n..n+k-1` with `background` = 1 (never
returned to the caller) and sets `pending` to 0. `judged` records which completions the online trainer's
judge has looked at (outcome "scored", or "failed" for a verdict that could not be used), so none is sent
twice. Files written before these columns existed get them on open (`ALTER TABLE`).
Golden completions (`records.is_golden`: the request's `metadata["golden"]` is truthy, tested in SQL by
`golden_sql` with JSON1) are an evaluation set: `untrained` and `unjudged` never return them, so the online
trainer never trains on, replays or judges them; `golden` reads their rated choices (`online/golden.py`).
`trained` is the online trainer's durable record of what it has used (`online/trainer.py`): a rated choice
with a row there is never trained on as fresh traffic again; `outcome` says what became of it ("promoted":
in a step that became the default, "rejected": in a step the promotion gate refused, "stale": sampled from
weights too old to train on, "skipped": in a step that trained nothing).

Retention (`Retention`, per store, so per model): on every insert, completions older than `max_age_s`
(`MAX_AGE_S`, 30 days) are deleted, and past `max_completions` (`MAX_COMPLETIONS`, 100,000) the oldest go
first; their choices and feedback go with them.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from advantage.online.records import Feedback, RecordedChoice, RecordedCompletion, RewardedChoice

FILENAME = "traffic.sqlite"
MAX_AGE_S = 30 * 24 * 3600.0
MAX_COMPLETIONS = 100_000
PENDING_TIMEOUT_S = 600.0  # background samples not recorded by then never will be (the server stopped)
JUDGED = ("scored", "failed")


@dataclass(frozen=True)
class Retention:
    """How much traffic a store keeps: completions younger than `max_age_s`, at most `max_completions`."""

    max_age_s: float = MAX_AGE_S
    max_completions: int = MAX_COMPLETIONS

    def __post_init__(self) -> None:
        if not self.max_age_s > 0 or self.max_completions < 1:
            raise ValueError(
                f"Retention needs max_age_s > 0 and max_completions >= 1, got {self.max_age_s} and "
                f"{self.max_completions}."
            )


class TrafficStore(Protocol):
    def record(self, completion: RecordedCompletion) -> None:
        """Store a completion and its choices (and prune what retention no longer keeps)."""
        ...

    def get(self, completion_id: str) -> RecordedCompletion | None: ...

    def add_background(self, completion_id: str, choices: list[RecordedChoice]) -> bool:
        """Append a completion's background samples (none: they never came) and clear its `pending`;
        False when the completion is not kept (any more)."""
        ...

    def episode(self, model: str, episode: str) -> list[tuple[str, int]]:
        """(completion id, number of returned choices) of the model's completions tagged `episode`, oldest
        first (background samples are not the episode's: the agent went on with a returned choice)."""
        ...

    def set_feedback(self, rows: list[Feedback]) -> None:
        """Write feedback rows, replacing any on the same choices, in one transaction."""
        ...

    def unjudged(self, min_choices: int, min_step: int, limit: int) -> list[RecordedCompletion]:
        """Completions for the judge, oldest first: from step `min_step` on, not golden, with at least
        `min_choices` choices, no background samples pending (or pending for over `PENDING_TIMEOUT_S`), never
        judged, and a choice with neither feedback nor a `trained` row."""
        ...

    def set_judged(self, completion_id: str, judge: str, outcome: str, scores: list[Feedback]) -> None:
        """Record the judge's look at a completion (`JUDGED`) and its scores, which never replace feedback."""
        ...

    def feedback(self, completion_id: str) -> dict[int, Feedback]:
        """The feedback on a completion's choices, by choice index."""
        ...

    def rewarded(self, since: float | None = None, limit: int | None = None) -> list[RewardedChoice]:
        """Choices with feedback updated after `since` (all with None), oldest feedback first."""
        ...

    def untrained(self, limit: int | None = None) -> list[RewardedChoice]:
        """Rated choices the online trainer has not used yet (no `trained` row), oldest feedback first;
        never a golden completion's (`records.is_golden`)."""
        ...

    def golden(self, min_reward: float | None = None, limit: int | None = None) -> list[RewardedChoice]:
        """The golden set: choices of golden completions with explicit feedback (not a judge's) of at least
        `min_reward` (None: any), most recently rated first."""
        ...

    def mark_trained(self, keys: list[tuple[str, int]], step: int, outcome: str) -> None:
        """Record (completion id, choice) pairs as used by step `step` with `outcome`, in one transaction."""
        ...

    def trained(self, outcome: str, limit: int | None = None) -> list[RewardedChoice]:
        """Rated choices used with `outcome`, most recently used first (replay reads "promoted")."""
        ...

    def prune(self, now: float | None = None) -> int:
        """Apply retention; returns how many completions were deleted."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    step INTEGER NOT NULL,
    created REAL NOT NULL,
    episode TEXT,
    user TEXT,
    request_json TEXT NOT NULL,
    metadata_json TEXT NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS completions_created ON completions(created);
CREATE INDEX IF NOT EXISTS completions_episode ON completions(model, episode) WHERE episode IS NOT NULL;
CREATE TABLE IF NOT EXISTS choices (
    completion_id TEXT NOT NULL REFERENCES completions(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    token_ids TEXT NOT NULL,
    logprobs TEXT NOT NULL,
    prompt_token_ids TEXT NOT NULL,
    forced_token_indices TEXT NOT NULL,
    finish_reason TEXT,
    message_json TEXT NOT NULL,
    background INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (completion_id, idx)
);
CREATE TABLE IF NOT EXISTS feedback (
    completion_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    reward REAL NOT NULL,
    label TEXT,
    comment TEXT,
    source_id TEXT,
    updated REAL NOT NULL,
    judge TEXT,
    PRIMARY KEY (completion_id, idx),
    FOREIGN KEY (completion_id, idx) REFERENCES choices(completion_id, idx) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS feedback_updated ON feedback(updated);
CREATE TABLE IF NOT EXISTS trained (
    completion_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    step INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (completion_id, idx),
    FOREIGN KEY (completion_id, idx) REFERENCES choices(completion_id, idx) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS trained_outcome ON trained(outcome, updated);
CREATE TABLE IF NOT EXISTS judged (
    completion_id TEXT PRIMARY KEY REFERENCES completions(id) ON DELETE CASCADE,
    judge TEXT NOT NULL,
    outcome TEXT NOT NULL,
    updated REAL NOT NULL
);
"""
# Columns added since the first release: (table, column, declaration), added to older files on open.
_ADDED_COLUMNS = (
    ("completions", "pending", "INTEGER NOT NULL DEFAULT 0"),
    ("choices", "background", "INTEGER NOT NULL DEFAULT 0"),
    ("feedback", "judge", "TEXT"),
)
OUTCOMES = ("promoted", "rejected", "stale", "skipped")


def golden_sql(metadata_json: str) -> str:
    """SQL true where the JSON column `metadata_json` holds a golden completion's metadata:
    `records.is_golden` (Python truthiness of `metadata["golden"]`) in SQLite's JSON1."""
    value = f"json_extract({metadata_json}, '$.golden')"
    return (
        f"(CASE json_type({metadata_json}, '$.golden') WHEN 'true' THEN 1 "
        f"WHEN 'integer' THEN {value} != 0 WHEN 'real' THEN {value} != 0 WHEN 'text' THEN {value} != '' "
        f"WHEN 'array' THEN json_array_length({metadata_json}, '$.golden') > 0 "
        f"WHEN 'object' THEN {value} != '{{}}' ELSE 0 END)"
    )


class SQLiteTrafficStore:
    """`TrafficStore` on one SQLite file in WAL mode. Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | Path, retention: Retention | None = None) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # no fsync per insert: see the module docstring
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED_COLUMNS:
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        # Kept here: COUNT(*) walks the whole table, and the count is checked on every insert.
        self._count = int(self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0])

    def record(self, completion: RecordedCompletion) -> None:
        c = completion
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.id, c.model, c.step, c.created, c.episode, _text(c.user),
                    json.dumps(c.request), json.dumps(c.metadata), c.pending,
                ),
            )  # fmt: skip
            self._insert_choices(c.id, c.choices)
            self._count += 1
            self._prune(time.time())

    def _insert_choices(self, completion_id: str, choices: list[RecordedChoice]) -> None:
        self._db.executemany(
            "INSERT INTO choices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    completion_id,
                    ch.index,
                    json.dumps(ch.token_ids),
                    json.dumps(ch.logprobs),
                    json.dumps(ch.prompt_token_ids),
                    json.dumps(ch.forced_token_indices),
                    ch.finish_reason,
                    json.dumps(ch.message),
                    int(ch.background),
                )
                for ch in choices
            ],
        )

    def add_background(self, completion_id: str, choices: list[RecordedChoice]) -> bool:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if not self._db.execute(
                "UPDATE completions SET pending = 0 WHERE id = ?", (completion_id,)
            ).rowcount:
                return False
            self._insert_choices(completion_id, choices)
            return True

    def get(self, completion_id: str) -> RecordedCompletion | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM completions WHERE id = ?", (completion_id,)).fetchone()
            if row is None:
                return None
            choices = self._db.execute(
                "SELECT * FROM choices WHERE completion_id = ? ORDER BY idx", (completion_id,)
            ).fetchall()
        return _completion(row, {completion_id: [_choice(r) for r in choices]})

    def episode(self, model: str, episode: str) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, COUNT(ch.idx) FROM completions c JOIN choices ch ON ch.completion_id = c.id "
                "WHERE c.model = ? AND c.episode = ? AND ch.background = 0 GROUP BY c.id "
                "ORDER BY c.created, c.rowid",
                (model, episode),
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def set_feedback(self, rows: list[Feedback]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [_feedback_row(f) for f in rows],
            )

    def unjudged(self, min_choices: int, min_step: int, limit: int) -> list[RecordedCompletion]:
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT c.id FROM completions c WHERE c.step >= ? AND NOT {golden_sql('c.metadata_json')} "
                    "AND (c.pending = 0 OR c.created < ?) "
                    "AND NOT EXISTS (SELECT 1 FROM judged j WHERE j.completion_id = c.id) "
                    "AND (SELECT COUNT(*) FROM choices ch WHERE ch.completion_id = c.id) >= ? "
                    "AND EXISTS (SELECT 1 FROM choices ch WHERE ch.completion_id = c.id "
                    "AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = c.id AND f.idx = ch.idx) "
                    "AND NOT EXISTS (SELECT 1 FROM trained t WHERE t.completion_id = c.id AND t.idx = ch.idx)) "
                    "ORDER BY c.created, c.rowid LIMIT ?",
                    (min_step, time.time() - PENDING_TIMEOUT_S, min_choices, limit),
                )
            ]
        return [c for c in map(self.get, ids) if c is not None]

    def set_judged(self, completion_id: str, judge: str, outcome: str, scores: list[Feedback]) -> None:
        if outcome not in JUDGED:
            raise ValueError(f"outcome must be one of {JUDGED}, got {outcome!r}.")
        if any(f.judge is None for f in scores):
            raise ValueError("a judge's score names its judge (Feedback.judge).")
        try:
            with self._lock, self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT OR REPLACE INTO judged VALUES (?, ?, ?, ?)",
                    (completion_id, _text(judge), outcome, time.time()),
                )
                self._db.executemany(  # OR IGNORE: explicit feedback already there wins
                    "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [_feedback_row(f) for f in scores],
                )
        except sqlite3.IntegrityError:
            raise ValueError(
                f"set_judged names a completion or choice that is not recorded (or no longer kept): "
                f"{completion_id!r}."
            ) from None

    def feedback(self, completion_id: str) -> dict[int, Feedback]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM feedback WHERE completion_id = ?", (completion_id,)
            ).fetchall()
        return {int(r[1]): _feedback(r) for r in rows}

    def rewarded(self, since: float | None = None, limit: int | None = None) -> list[RewardedChoice]:
        return self._rated(
            "SELECT f.* FROM feedback f WHERE f.updated > ? ORDER BY f.updated, f.rowid LIMIT ?",
            (-1.0 if since is None else since, -1 if limit is None else limit),
        )

    def untrained(self, limit: int | None = None) -> list[RewardedChoice]:
        return self._rated(
            "SELECT f.* FROM feedback f JOIN completions c ON c.id = f.completion_id "
            "LEFT JOIN trained t ON t.completion_id = f.completion_id AND t.idx = f.idx "
            f"WHERE t.completion_id IS NULL AND NOT {golden_sql('c.metadata_json')} "
            "ORDER BY f.updated, f.rowid LIMIT ?",
            (-1 if limit is None else limit,),
        )

    def golden(self, min_reward: float | None = None, limit: int | None = None) -> list[RewardedChoice]:
        return self._rated(
            "SELECT f.* FROM feedback f JOIN completions c ON c.id = f.completion_id "
            f"WHERE f.judge IS NULL AND f.reward >= ? AND {golden_sql('c.metadata_json')} "
            "ORDER BY f.updated DESC, f.rowid DESC LIMIT ?",
            (-math.inf if min_reward is None else min_reward, -1 if limit is None else limit),
        )

    def mark_trained(self, keys: list[tuple[str, int]], step: int, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}.")
        now = time.time()
        try:
            with self._lock, self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT OR REPLACE INTO trained VALUES (?, ?, ?, ?, ?)",
                    [(cid, idx, step, outcome, now) for cid, idx in keys],
                )
        except sqlite3.IntegrityError:  # the whole transaction is rolled back
            raise ValueError(
                "mark_trained names a choice that is not recorded (or no longer kept): send the "
                "(completion id, choice index) pairs of recorded choices."
            ) from None

    def trained(self, outcome: str, limit: int | None = None) -> list[RewardedChoice]:
        return self._rated(
            "SELECT f.* FROM feedback f JOIN trained t ON t.completion_id = f.completion_id AND t.idx = f.idx "
            "WHERE t.outcome = ? ORDER BY t.updated DESC, t.rowid DESC LIMIT ?",
            (outcome, -1 if limit is None else limit),
        )

    def _rated(self, query: str, params: tuple[Any, ...]) -> list[RewardedChoice]:
        """The feedback rows `query` selects (all of `feedback`'s columns, in its order), each with its
        completion and choice."""
        with self._lock:
            fbs = self._db.execute(query, params).fetchall()
            ids = sorted({str(r[0]) for r in fbs})
            completions: dict[str, Any] = {}
            choices: dict[str, list[RecordedChoice]] = {i: [] for i in ids}
            for start in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(f"SELECT * FROM completions WHERE id IN ({marks})", chunk):
                    completions[str(row[0])] = row
                query = f"SELECT * FROM choices WHERE completion_id IN ({marks}) ORDER BY completion_id, idx"
                for row in self._db.execute(query, chunk):
                    choices[str(row[0])].append(_choice(row))
        records = {i: _completion(row, choices) for i, row in completions.items()}
        out = []
        for r in fbs:
            fb = _feedback(r)
            rec = records[fb.completion_id]
            out.append(RewardedChoice(rec, next(c for c in rec.choices if c.index == fb.choice), fb))
        return out

    def prune(self, now: float | None = None) -> int:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            return self._prune(time.time() if now is None else now)

    def _prune(self, now: float) -> int:
        """Delete by age, then the oldest past the count; both walk the `created` index from its old end, so
        a prune with nothing to delete costs one index probe. Runs inside the caller's transaction."""
        cutoff = now - self.retention.max_age_s
        deleted = self._db.execute("DELETE FROM completions WHERE created < ?", (cutoff,)).rowcount
        excess = self._count - deleted - self.retention.max_completions
        if excess > 0:
            deleted += self._db.execute(
                "DELETE FROM completions WHERE rowid IN "
                "(SELECT rowid FROM completions ORDER BY created, rowid LIMIT ?)",
                (excess,),
            ).rowcount
        self._count -= deleted
        return deleted

    def count(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _text(value: str | None) -> str | None:
    """SQLite stores UTF-8: a lone surrogate (valid in a Python str, and in JSON) is written escaped."""
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


def _feedback_row(f: Feedback) -> tuple[Any, ...]:
    return (
        f.completion_id, f.choice, f.reward, _text(f.label), _text(f.comment), f.source_id, f.updated,
        _text(f.judge),
    )  # fmt: skip


def _completion(row: tuple[Any, ...], choices: dict[str, list[RecordedChoice]]) -> RecordedCompletion:
    cid, model, step, created, _episode, user, request_json, metadata_json, pending = row
    return RecordedCompletion(
        id=cid,
        model=model,
        step=int(step),
        created=float(created),
        request=json.loads(request_json),
        choices=choices.get(cid, []),
        metadata=json.loads(metadata_json),
        user=user,
        pending=int(pending),
    )


def _choice(row: tuple[Any, ...]) -> RecordedChoice:
    _cid, idx, token_ids, logprobs, prompt_ids, forced, finish, message_json, background = row
    return RecordedChoice(
        index=int(idx),
        token_ids=json.loads(token_ids),
        logprobs=json.loads(logprobs),
        prompt_token_ids=json.loads(prompt_ids),
        forced_token_indices=json.loads(forced),
        finish_reason=finish,
        message=json.loads(message_json),
        background=bool(background),
    )


def _feedback(row: tuple[Any, ...]) -> Feedback:
    cid, idx, reward, label, comment, source_id, updated, judge = row
    return Feedback(cid, int(idx), float(reward), label, comment, source_id, float(updated), judge)
