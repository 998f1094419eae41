"""Per-query metrics in SQLite (data dir), written off the hot path.

Every access runs on one background thread, in order: a question's row is written after its
``done`` has gone out, and a ``stats`` read queued after it sees it. A failed write (say, a full
disk) is logged and the daemon goes on answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("mirador.metrics")

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    query_id TEXT PRIMARY KEY, ts REAL, route TEXT, mode TEXT, stages TEXT,
    duration_s REAL, cancelled INTEGER, errors TEXT
);
CREATE TABLE IF NOT EXISTS stage_runs (
    query_id TEXT, stage TEXT, model TEXT, first_token_s REAL, tokens INTEGER,
    tokens_per_s REAL, duration_s REAL, cancelled INTEGER
);
CREATE INDEX IF NOT EXISTS stage_runs_query ON stage_runs (query_id);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, ts REAL, kind TEXT, state TEXT, model_s REAL, tokens INTEGER,
    saved_s REAL, used_tokens INTEGER, job TEXT
);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
"""


def prune_table(conn: sqlite3.Connection, table: str, keep_days: float, max_rows: int) -> int:
    """Delete the rows of ``table`` (which has a ``ts`` column, in seconds) older than ``keep_days``
    and all but the newest ``max_rows``; 0 turns either limit off. Returns how many went.
    The caller commits."""
    dropped = 0
    if keep_days:
        dropped += conn.execute(f"DELETE FROM {table} WHERE ts < ?", (time.time() - keep_days * 86400,)).rowcount
    if max_rows:
        dropped += conn.execute(f"DELETE FROM {table} WHERE rowid IN "
                                f"(SELECT rowid FROM {table} ORDER BY ts DESC LIMIT -1 OFFSET ?)", (max_rows,)).rowcount
    return dropped


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)


class MetricsStore:
    def __init__(self, path: Path):
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._conn: sqlite3.Connection | None = None
        self._thread.submit(self._open).result()

    def _open(self) -> None:
        self._conn = sqlite3.connect(self.path)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(SCHEMA)

    def record(self, query_id: str, route: str, mode: str, metrics: dict[str, Any]) -> None:
        """Queue one finished question's metrics; returns at once."""
        self._thread.submit(self._write, query_id, route, mode, metrics, time.time())

    def _write(self, query_id: str, route: str, mode: str, metrics: dict[str, Any], ts: float) -> None:
        assert self._conn is not None
        stages = metrics["stages"]
        try:
            with self._conn:
                self._conn.execute(
                    "INSERT OR REPLACE INTO queries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (query_id, ts, route, mode, json.dumps(list(stages)), metrics["duration_s"],
                     int(any(s.get("cancelled") for s in stages.values())), json.dumps(metrics.get("errors", []))),
                )
                self._conn.executemany(  # an answer served from the cache is not a run of its model
                    "INSERT INTO stage_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(query_id, name, s.get("model"), s.get("first_token_s"), s.get("tokens"), s.get("tokens_per_s"),
                      s.get("duration_s"), int(bool(s.get("cancelled")))) for name, s in stages.items() if not s.get("cached")],
                )
        except sqlite3.Error as exc:
            log.error("could not record metrics for %s in %s: %s", query_id, self.path, exc)

    async def summary(self) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._summary)

    def _summary(self) -> dict[str, Any]:
        assert self._conn is not None
        queries = self._conn.execute("SELECT route, COUNT(*) FROM queries GROUP BY route").fetchall()
        errors = sum(len(json.loads(e)) for (e,) in self._conn.execute("SELECT errors FROM queries"))
        rows = self._conn.execute(
            "SELECT stage, model, first_token_s, tokens, tokens_per_s, duration_s FROM stage_runs"
        ).fetchall()

        def group(key: int) -> list[dict[str, Any]]:
            groups: dict[str, list[tuple]] = {}
            for row in rows:
                groups.setdefault(row[key], []).append(row)
            out = []
            for name, runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
                first = [r[2] for r in runs if r[2] is not None]
                tps = [r[4] for r in runs if r[4] is not None]
                out.append({
                    "name": name, "runs": len(runs),
                    "first_token_p50_s": _pct(first, 0.5), "first_token_p95_s": _pct(first, 0.95),
                    "tokens_per_s_p50": _pct(tps, 0.5), "tokens_per_s_p95": _pct(tps, 0.95),
                    "tokens_mean": round(statistics.fmean(r[3] or 0 for r in runs), 1),
                    "duration_p50_s": _pct([r[5] for r in runs if r[5] is not None], 0.5),
                })
            return out

        return {"queries": sum(n for _, n in queries), "routes": dict(queries), "errors": errors,
                "stages": group(0), "models": group(1), "jobs": self._jobs_summary()}

    def record_job(self, job: dict[str, Any]) -> None:
        """Queue an ended job (``Job.public()``); returns at once. Its saving may be credited later:
        recorded again then."""
        self._thread.submit(self._write_job, job)

    def _write_job(self, job: dict[str, Any]) -> None:
        assert self._conn is not None
        try:
            with self._conn:
                self._conn.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                   (job["id"], job["created"], job["kind"], job["state"], job["cost"]["model_s"],
                                    job["cost"]["tokens"], job["saved"]["s"], job["saved"]["tokens"], json.dumps(job)))
        except sqlite3.Error as exc:
            log.error("could not record job %s in %s: %s", job["id"], self.path, exc)

    async def jobs_history(self, since: float, keep: int) -> tuple[float, list[dict[str, Any]]]:
        """Model time the jobs since ``since`` spent, and the newest ``keep`` jobs, oldest first."""
        def read() -> tuple[float, list[dict[str, Any]]]:
            assert self._conn is not None
            (spent,) = self._conn.execute("SELECT COALESCE(SUM(model_s), 0) FROM jobs WHERE ts >= ?", (since,)).fetchone()
            rows = self._conn.execute("SELECT job FROM jobs ORDER BY ts DESC LIMIT ?", (keep,)).fetchall()
            return spent, [json.loads(job) for (job,) in reversed(rows)]

        return await asyncio.get_running_loop().run_in_executor(self._thread, read)

    def _jobs_summary(self) -> dict[str, Any]:
        assert self._conn is not None
        rows = self._conn.execute("SELECT kind, COUNT(*), SUM(model_s), SUM(tokens), SUM(saved_s), SUM(used_tokens) "
                                  "FROM jobs GROUP BY kind").fetchall()
        kinds = {kind: {"jobs": n, "model_s": round(m or 0, 3), "tokens": t or 0, "saved_s": round(sv or 0, 3),
                        "used_tokens": u or 0} for kind, n, m, t, sv, u in rows}
        return kinds

    async def prune(self, keep_days: float, max_rows: int) -> int:
        """Drop the questions older than ``keep_days`` and all but the newest ``max_rows`` (0: no
        such limit), with their stage runs; returns how many questions went. Runs on the store's
        thread, behind the writes already queued: never on the path of a question."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._prune, keep_days, max_rows)

    def _prune(self, keep_days: float, max_rows: int) -> int:
        assert self._conn is not None
        try:
            with self._conn:
                prune_table(self._conn, "jobs", keep_days, max_rows)
                dropped = prune_table(self._conn, "queries", keep_days, max_rows)
                if dropped:
                    self._conn.execute("DELETE FROM stage_runs WHERE query_id NOT IN (SELECT query_id FROM queries)")
            return dropped
        except sqlite3.Error as exc:
            log.error("could not prune the metrics in %s: %s", self.path, exc)
            return 0

    def close(self) -> None:
        """Finish the queued writes, then close (on the thread that owns the connection)."""
        if self._conn is not None:
            self._thread.submit(self._conn.close).result()
        self._thread.shutdown(wait=True)
