"""How busy a recorded model was: requests and feedback over time, read from its traffic store.

Read-only and separate from `SQLiteTrafficStore` (the report opens a run dir that a live server may be
writing to): one query over the store's `completions`, `choices` and `feedback` tables, binned by the time
each completion was recorded.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ActivityBin:
    start: float  # seconds since the first recorded completion
    completions: int  # chat completions served (and recorded) in the bin
    choices: int
    rated: int  # of those choices, how many have feedback (given at any time)

    def per_hour(self, width: float) -> float:
        return self.completions * 3600.0 / width

    @property
    def rated_share(self) -> float:
        return self.rated / self.choices if self.choices else 0.0


def traffic_activity(path: str | Path, bins: int = 30) -> tuple[list[ActivityBin], float]:
    """(bins, bin width in seconds) over the store at `path`, from its first to its last completion;
    ([], 0) for a store with nothing recorded. Completions tagged `metadata.eval` (evaluation requests)
    count like any other: they are traffic the server served."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT c.created, COUNT(ch.idx), COUNT(f.reward) FROM completions c "
            "LEFT JOIN choices ch ON ch.completion_id = c.id "
            "LEFT JOIN feedback f ON f.completion_id = ch.completion_id AND f.idx = ch.idx "
            "GROUP BY c.id ORDER BY c.created"
        ).fetchall()
    finally:
        db.close()
    if not rows:
        return [], 0.0
    t0, t1 = rows[0][0], rows[-1][0]
    width = max((t1 - t0) / bins, 1.0)
    n = min(bins, int((t1 - t0) / width) + 1)
    acc = [[0, 0, 0] for _ in range(n)]
    for created, choices, rated in rows:
        b = acc[min(int((created - t0) / width), n - 1)]
        b[0] += 1
        b[1] += choices
        b[2] += rated
    return [ActivityBin(i * width, *a) for i, a in enumerate(acc)], width
