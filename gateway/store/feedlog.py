"""The XML data feed poller's SQL: its facts in meta, the jobs reconciliation looks up, foreign rows.

Meta keys (UTC ISO times, dates in the GreenFax account's zone):

- `feed:last_request_at`: when the last request to the feed was started,
  written before it is sent, so GreenFax's minimum interval holds across
  restarts and for `faxgw feed poll` in another process;
- `feed:next_start`: the first date of the next window (a day before the
  end of the last successful one: the windows overlap);
- `feed:status`: the last poll's facts as JSON, for `faxgw feed status` and
  the health check.

Reconciliation marks a job it has looked up with an event whose source is
`reconcile`; a job in the same state since then is not looked up again.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gateway.store.base import get_meta, set_meta
from gateway.models import JobState
from gateway.store.states import INSERT_EVENT, add_event, transition
from gateway.store.reports import INSERT_REPORT, REPORT_COLUMNS, WAITING

LAST_REQUEST = "feed:last_request_at"
NEXT_START = "feed:next_start"
STATUS = "feed:status"
RECONCILE = "reconcile"  # the events source of reconciliation's verdicts


def last_request(conn: sqlite3.Connection) -> str | None:
    return get_meta(conn, LAST_REQUEST)


def record_request(conn: sqlite3.Connection, at: str) -> None:
    set_meta(conn, LAST_REQUEST, at)


def next_start(conn: sqlite3.Connection) -> str | None:
    return get_meta(conn, NEXT_START)


def set_next_start(conn: sqlite3.Connection, day: str) -> None:
    set_meta(conn, NEXT_START, day)


def load_status(conn: sqlite3.Connection) -> dict[str, Any]:
    """The last poll's facts ({} before the first poll, or when meta holds something unreadable)."""
    text = get_meta(conn, STATUS)
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def save_status(conn: sqlite3.Connection, status: dict[str, Any]) -> None:
    set_meta(conn, STATUS, json.dumps(status, sort_keys=True))


# --- a chunk of rows at once (gateway/status/feedchunk.py) ----------------------------------------

def reports_seen(conn: sqlite3.Connection, keys: list[str]) -> dict[str, sqlite3.Row]:
    """reports.report_seen() for several dedup keys in one query: the ones received before, by key."""
    marks = ", ".join("?" * len(keys))
    return {row["dedup_key"]: row for row in conn.execute(
        "SELECT r.dedup_key, r.id, r.outcome, j.code FROM reports r LEFT JOIN jobs j ON j.id = r.job_id"
        f" WHERE r.dedup_key IN ({marks})", keys)}


def jobs_by_reference(conn: sqlite3.Connection, references: list[str]) -> dict[str, list[sqlite3.Row]]:
    """The jobs with each of these GreenFax reference ids, in one query (reports.job_by() matches only one)."""
    marks = ", ".join("?" * len(references))
    jobs: dict[str, list[sqlite3.Row]] = {}
    for row in conn.execute("SELECT id, code, secret, state, number, message_id, reference_id FROM jobs"
                            f" WHERE reference_id IN ({marks})", references):
        jobs.setdefault(row["reference_id"], []).append(row)
    return jobs


def apply_results(conn: sqlite3.Connection, results: list[tuple[tuple[Any, ...], tuple[Any, ...],
                                                               tuple[Any, ...]]]) -> None:
    """What reports.apply_result() and insert_report() write for each of several waiting jobs and their
    reports, one statement a table: (the job's columns, its event, the report's values) each.

    The job's columns: (state, updated_at, reason, last_result, pages, duration, cost, reference_id,
    reported_at, flagged, job id). Raises if a job was no longer waiting, so the caller's savepoint
    undoes them all.
    """
    marks = ", ".join("?" * len(WAITING))
    moved = conn.executemany(
        "UPDATE jobs SET state = ?, updated_at = ?, reason = ?, last_result = ?, next_attempt_at = NULL,"
        " pages = COALESCE(?, pages), duration = COALESCE(?, duration), cost = COALESCE(?, cost),"
        " reference_id = COALESCE(reference_id, ?), reported_at = ?, flagged = MAX(COALESCE(flagged, 0), ?)"
        f" WHERE id = ? AND state IN ({marks})", [(*job, *WAITING) for job, _event, _report in results]).rowcount
    if moved != len(results):
        raise sqlite3.IntegrityError(f"{len(results) - moved} of {len(results)} jobs were no longer waiting")
    conn.executemany(INSERT_EVENT, [event for _job, event, _report in results])
    conn.executemany(INSERT_REPORT, [report for _job, _event, report in results])


def reconcile_candidates(conn: sqlite3.Connection, *, overdue_before: str, ignore_marker: str | None = None,
                         limit: int | None = None) -> list[sqlite3.Row]:
    """Jobs the next poll must look up, oldest first: every `unknown` job, and `submitted` ones without a
    result since `overdue_before`, unless reconciliation has already judged them in their current state.

    `ignore_marker`: verdicts with this detail do not count (the operator has
    since enabled resending, so "waiting for the operator" is no longer the end).
    `limit`: only the oldest this many (planning a window needs the oldest alone).
    """
    return conn.execute(
        "SELECT j.id, j.code, j.state, j.created_at, j.updated_at FROM jobs j"
        " WHERE (j.state = 'unknown' OR (j.state = 'submitted' AND j.updated_at <= ?))"
        " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.job_id = j.id AND e.source = ?"
        "  AND e.at >= j.updated_at AND (? IS NULL OR substr(e.detail, 1, length(?)) <> ?))"
        " ORDER BY j.created_at LIMIT ?",
        (overdue_before, RECONCILE, ignore_marker, ignore_marker, ignore_marker, -1 if limit is None else limit),
    ).fetchall()


def requeue_unknown(conn: sqlite3.Connection, job_id: int, now: str, detail: str) -> bool:
    """Send an `unknown` job again (the operator allowed it); False if it is no longer unknown."""
    return transition(conn, job_id, JobState.QUEUED, now=now, source=RECONCILE, detail=detail,
                      expect={JobState.UNKNOWN}, next_attempt_at=now, last_result=detail)


def mark_looked_up(conn: sqlite3.Connection, job_id: int, now: str, detail: str) -> None:
    """Reconciliation's verdict on a job, without a state change (so it is not looked up again)."""
    add_event(conn, job_id, now, RECONCILE, None, detail)


def foreign_rows(conn: sqlite3.Connection, *, limit: int = 100) -> list[dict[str, Any]]:
    """Feed rows of faxes not sent through this gateway, newest first."""
    rows = conn.execute(
        f"SELECT {REPORT_COLUMNS}, cost, duration FROM reports WHERE outcome = 'foreign'"
        " ORDER BY id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [dict(row) for row in rows]


@contextmanager
def savepoint(conn: sqlite3.Connection, name: str = "feed_row") -> Iterator[None]:
    """One feed row's changes: an error undoes that row alone, not the rest of the poll."""
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


def count_unknown(conn: sqlite3.Connection) -> int:
    """Jobs in `unknown`: after reconciliation, those the operator must decide about."""
    return conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'unknown'").fetchone()[0]
