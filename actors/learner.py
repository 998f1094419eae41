"""``Learner``: which plan answers which kind of question best, learned from the user's ratings.

A question's *type* is the router's class plus a topic from keywords ("complex/code"). Every
answered question (not incognito) is noted with its type and the plan that answered it (a
stage set such as "quick+synthesis", or "chain:NAME"); no question text is stored. A rating is
1-5.

Choosing: a type with no ratings gets the router's default plan. Otherwise UCB1 over ratings:
each candidate scores its mean rating (with a prior worth one rating: 3, or 3.5 for the
router's default, which is thus kept until ratings say otherwise) plus
sqrt(ln(N + 1) / (n + 1)) rating points for how little it has been tried (n of the type's N
ratings); the highest wins. Exploration fades as ratings come in. State lives in SQLite in
the data dir and survives restarts.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import ray

from mirador.runtime.metrics import prune_table

SCHEMA = """
CREATE TABLE IF NOT EXISTS observations (
    query_id TEXT PRIMARY KEY, qtype TEXT NOT NULL, plan TEXT NOT NULL, ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ratings (
    query_id TEXT PRIMARY KEY, qtype TEXT NOT NULL, plan TEXT NOT NULL, rating INTEGER NOT NULL, ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_ts ON observations (ts);
CREATE INDEX IF NOT EXISTS ratings_ts ON ratings (ts);
"""
# UCB over mean ratings (1-5). The prior is worth one rating of 3 (the router's default plan:
# 3.5, so it is kept until ratings say otherwise). EXPLORATION is in rating points: about the
# scatter of one rating. Measured in scripts/bench_learner.py against Thompson sampling (normal
# posteriors): UCB found the best plan more often (97 % vs 89 % after 30 ratings per type) with
# less regret.
PRIOR_MEAN, PRIOR_DEFAULT, PRIOR_WEIGHT, EXPLORATION = 3.0, 3.5, 1.0, 1.0


class UnknownQuery(KeyError):
    """No answered question with that id (or it was incognito)."""


class Learning:
    """The learner's state and rules; ``Learner`` below is this class as a Ray actor."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.executescript(SCHEMA)

    def observe(self, query_id: str, qtype: str, plan: str) -> None:
        """Note which plan answered a question of this type (so that it can be rated later)."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO observations VALUES (?, ?, ?, ?)", (query_id, qtype, plan, time.time()))

    def last_query(self) -> str | None:
        row = self._db.execute("SELECT query_id FROM observations ORDER BY ts DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def rate(self, query_id: str, rating: int) -> dict[str, Any]:
        """Record a 1-5 rating of an answered question; rating it again replaces the rating."""
        row = self._db.execute("SELECT qtype, plan FROM observations WHERE query_id = ?", (query_id,)).fetchone()
        if row is None:
            raise UnknownQuery(query_id)
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO ratings VALUES (?, ?, ?, ?, ?)", (query_id, *row, rating, time.time()))
        return {"query_id": query_id, "type": row[0], "plan": row[1], "rating": rating}

    def _evidence(self, qtype: str) -> dict[str, tuple[int, float]]:
        """plan -> (number of ratings, sum of ratings) for one type."""
        rows = self._db.execute("SELECT plan, COUNT(*), SUM(rating) FROM ratings WHERE qtype = ? GROUP BY plan", (qtype,))
        return {plan: (n, float(total)) for plan, n, total in rows}

    def choose(self, qtype: str, candidates: list[str], default: str) -> dict[str, Any]:
        """The plan to use for a question of ``qtype``, and the evidence behind it."""
        evidence = self._evidence(qtype)
        if not evidence:
            return {"plan": default, "learned": False, "evidence": {}}
        rated = sum(n for n, _ in evidence.values())
        scores = {}
        for plan in candidates:
            n, total = evidence.get(plan, (0, 0.0))
            prior = PRIOR_DEFAULT if plan == default else PRIOR_MEAN
            mean = (prior * PRIOR_WEIGHT + total) / (PRIOR_WEIGHT + n)
            scores[plan] = mean + EXPLORATION * math.sqrt(math.log(rated + 1) / (PRIOR_WEIGHT + n))
        plan = max(scores, key=scores.get)
        summary = {p: {"ratings": n, "mean_rating": round(total / n, 2)} for p, (n, total) in evidence.items()}
        return {"plan": plan, "learned": plan != default, "evidence": summary}

    def stats(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT qtype, plan, COUNT(*), AVG(rating) FROM ratings GROUP BY qtype, plan ORDER BY qtype, COUNT(*) DESC"
        )
        out: dict[str, list[dict[str, Any]]] = {}
        for qtype, plan, n, mean in rows:
            out.setdefault(qtype, []).append({"plan": plan, "ratings": n, "mean_rating": round(mean, 2)})
        return [{"type": t, "plans": plans} for t, plans in out.items()]

    def prune(self, keep_days: float, max_rows: int) -> dict[str, int]:
        """Drop ratings and observations older than ``keep_days``, and all but the newest
        ``max_rows`` of each (0: no such limit); returns how many rows went, per table."""
        with self._db:
            return {table: prune_table(self._db, table, keep_days, max_rows) for table in ("observations", "ratings")}

    def reset(self) -> int:
        """Forget every rating and observation; returns how many ratings there were."""
        (n,) = self._db.execute("SELECT COUNT(*) FROM ratings").fetchone()
        with self._db:
            self._db.execute("DELETE FROM ratings")
            self._db.execute("DELETE FROM observations")
        return n


Learner = ray.remote(num_cpus=0)(Learning)
