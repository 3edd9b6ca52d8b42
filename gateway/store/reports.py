"""Status reports and what they did to jobs; the SQL behind gateway/status/correlate.py."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from functools import lru_cache
from typing import Any

from gateway.errors import InvalidTransition, UnknownJob
from gateway.models import Channel, JobState, Result, StatusReport, Trust
from gateway.store.base import iso, parse_iso
from gateway.store.states import Expr, add_event, transition

WAITING = ("submitted", "unknown", "sending")  # states a report may resolve
WAITING_STATES = frozenset(JobState(state) for state in WAITING)


def report_seen(conn: sqlite3.Connection, dedup_key: str) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT r.id, r.outcome, j.code FROM reports r LEFT JOIN jobs j ON j.id = r.job_id WHERE dedup_key = ?",
        (dedup_key,),
    ).fetchone()


def job_by(conn: sqlite3.Connection, *, code: str | None = None, reference_id: str | None = None) -> sqlite3.Row | None:
    if code:
        return conn.execute("SELECT id, code, secret, state, number, message_id, reference_id FROM jobs WHERE code = ?", (code,)).fetchone()
    if reference_id:
        rows = conn.execute(
            "SELECT id, code, secret, state, number, message_id, reference_id FROM jobs WHERE reference_id = ? LIMIT 2", (reference_id,)
        ).fetchall()
        return rows[0] if len(rows) == 1 else None
    return None


def waiting_by_number(conn: sqlite3.Connection, number: str, since: str,
                      until: str | None = None) -> list[sqlite3.Row]:
    """Jobs to `number` still waiting for a result, created since `since` (and not after `until`)."""
    return conn.execute(
        "SELECT id, code, secret, state, number, message_id, reference_id FROM jobs WHERE number = ? AND created_at >= ?"
        " AND (? IS NULL OR created_at <= ?) AND state IN ('submitted', 'unknown') LIMIT 3",
        (number, since, until, until),
    ).fetchall()


INSERT_REPORT = (
    "INSERT INTO reports (received_at, channel, trusted, outcome, job_id, result, result_text, reason,"
    " number, pages, duration, cost, reference_id, job_code, reported_at, reported_at_raw, rule, note,"
    " dedup_key, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def insert_report(conn: sqlite3.Connection, report: StatusReport, now: str, outcome: str,
                  job_id: int | None, note: str | None) -> int:
    return conn.execute(INSERT_REPORT, report_values(report, now, outcome, job_id, note)).lastrowid


def report_values(report: StatusReport, now: str, outcome: str, job_id: int | None,
                  note: str | None) -> tuple[Any, ...]:
    """INSERT_REPORT's parameters for one report."""
    return (now, report.channel.value, int(report.trust), outcome, job_id,
            report.result.value if report.result else None, report.result_text, report.reason, report.fax_number,
            report.pages, report.duration, report.cost, report.reference_id, report.job_code,
            _stored_time(report.reported_at) if report.reported_at else None, report.reported_at_raw, report.rule,
            note, report.dedup_key, report.raw)


def apply_result(conn: sqlite3.Connection, job_id: int, report: StatusReport, now: str, *, summary: str,
                 source: str, flagged: bool) -> None:
    """Move a waiting job to the report's final state, keeping what the report told."""
    transition(conn, job_id, JobState(report.result.value), now=now, source=source, detail=summary, expect=WAITING_STATES,
               reason=report.reason, last_result=summary, next_attempt_at=None,
               pages=Expr("COALESCE(?, pages)", report.pages), duration=Expr("COALESCE(?, duration)", report.duration),
               cost=Expr("COALESCE(?, cost)", report.cost),
               reference_id=Expr("COALESCE(reference_id, ?)", report.reference_id),
               reported_at=_stored_time(report.reported_at) if report.reported_at else now,
               flagged=Expr("MAX(COALESCE(flagged, 0), ?)", int(flagged)))


@lru_cache(maxsize=64)
def _stored_time(moment: datetime) -> str:
    """iso(moment), kept for the next call: a report's time is written to its job and then to the report."""
    return iso(moment)


def submit_unknown(conn: sqlite3.Connection, job_id: int, reference_id: str | None, now: str, *,
                   source: str, detail: str) -> bool:
    """An `unknown` job the service says it has (the feed's Pending) becomes `submitted`."""
    return transition(conn, job_id, JobState.SUBMITTED, now=now, source=source, detail=detail,
                      expect={JobState.UNKNOWN}, last_result=detail,
                      reference_id=Expr("COALESCE(reference_id, ?)", reference_id))


def link_reference(conn: sqlite3.Connection, job_id: int, reference_id: str | None) -> None:
    """Remember GreenFax's job id for a job that has none yet, so later reports match by it."""
    if reference_id:
        conn.execute("UPDATE jobs SET reference_id = COALESCE(reference_id, ?) WHERE id = ?", (reference_id, job_id))


def note_on_job(conn: sqlite3.Connection, job_id: int, now: str, source: str, detail: str, *, flag: bool) -> None:
    """An event without a state change (a contradicting or impossible report)."""
    if flag:
        conn.execute("UPDATE jobs SET flagged = 1 WHERE id = ?", (job_id,))
    add_event(conn, job_id, now, source, None, detail)


# --- queries and operator actions ---------------------------------------------------

REPORT_COLUMNS = ("id, received_at, channel, trusted, outcome, result, result_text, reason, number, pages,"
                  " reference_id, job_code, reported_at, rule, note")


def list_reports(conn: sqlite3.Connection, *, outcomes: tuple[str, ...] = ("unmatched",),
                 limit: int = 100) -> list[dict[str, Any]]:
    marks = ", ".join("?" * len(outcomes))
    rows = conn.execute(
        f"SELECT {REPORT_COLUMNS} FROM reports WHERE outcome IN ({marks}) ORDER BY id DESC LIMIT ?",
        (*outcomes, limit),
    ).fetchall()
    return [dict(row) for row in rows]


def reports_for_job(conn: sqlite3.Connection, job_code: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT {', '.join('r.' + c.strip() for c in REPORT_COLUMNS.split(','))} FROM reports r"
        " JOIN jobs j ON j.id = r.job_id WHERE j.code = ? ORDER BY r.id",
        (job_code.upper(),),
    ).fetchall()
    return [dict(row) for row in rows]


def link_candidates(conn: sqlite3.Connection, number: str | None, since: str, until: str,
                    limit: int = 10) -> list[dict[str, Any]]:
    """Jobs an unmatched report may be about: to its number, created in [since, until], newest first."""
    if not number:
        return []
    return [dict(row) for row in conn.execute(
        "SELECT code, number, sender, state, created_at, reference_id FROM jobs WHERE number = ?"
        " AND created_at >= ? AND created_at <= ? ORDER BY created_at DESC LIMIT ?", (number, since, until, limit))]


def get_report(conn: sqlite3.Connection, report_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM reports WHERE id = ?", (report_id,)).fetchone()
    if row is None:
        raise UnknownJob(f"no status report with id {report_id}")
    return row


def mark_matched(conn: sqlite3.Connection, report_id: int, job_id: int, outcome: str) -> None:
    changed = conn.execute(
        "UPDATE reports SET outcome = ?, job_id = ? WHERE id = ? AND outcome = 'unmatched'",
        (outcome, job_id, report_id),
    ).rowcount
    if not changed:
        raise InvalidTransition(f"status report {report_id} is not unmatched")


def report_from_row(row: sqlite3.Row) -> StatusReport:
    """A stored report as a StatusReport again (for `faxgw match`)."""
    return StatusReport(
        channel=Channel(row["channel"]), trust=Trust(row["trusted"]), raw=row["raw"] or "",
        result=Result(row["result"]) if row["result"] else None, result_text=row["result_text"],
        reason=row["reason"], fax_number=row["number"], pages=row["pages"], duration=row["duration"],
        cost=row["cost"], reference_id=row["reference_id"], job_code=row["job_code"],
        reported_at=parse_iso(row["reported_at"]) if row["reported_at"] else None,
        reported_at_raw=row["reported_at_raw"], dedup_key=row["dedup_key"], rule=row["rule"],
    )


# --- sender notifications ----------------------------------------------------------------


def claim_notifications(conn: sqlite3.Connection, now: str, limit: int) -> list[dict[str, Any]]:
    """Due notifications with what the notice needs; marked `sending` until sent or retried."""
    rows = conn.execute(
        "SELECT n.id, n.attempts, j.code, j.number, j.recipient, j.state, j.reason, j.pages, j.last_result,"
        " j.created_at, m.mail_from, m.raw FROM notifications n JOIN jobs j ON j.id = n.job_id"
        " JOIN messages m ON m.id = j.message_id WHERE n.state = 'pending' AND n.next_attempt_at <= ?"
        " ORDER BY n.next_attempt_at LIMIT ?",
        (now, limit),
    ).fetchall()
    for row in rows:
        conn.execute("UPDATE notifications SET state = 'sending', attempts = attempts + 1, updated_at = ?"
                     " WHERE id = ?", (now, row["id"]))
    return [dict(row) for row in rows]


def finish_notification(conn: sqlite3.Connection, notification_id: int, now: str, state: str,
                        error: str | None = None, next_attempt_at: str | None = None,
                        what: str = "DSN") -> None:
    conn.execute(
        "UPDATE notifications SET state = ?, updated_at = ?, last_error = ?, next_attempt_at = ? WHERE id = ?",
        (state, now, error, next_attempt_at, notification_id),
    )
    job_id = conn.execute("SELECT job_id FROM notifications WHERE id = ?", (notification_id,)).fetchone()[0]
    detail = {"sent": f"sender notified ({what})", "skipped": f"sender not notified: {error}",
              "failed": f"sender notification failed for good: {error}"}.get(state)
    if detail:
        add_event(conn, job_id, now, "notifier", None, detail)


def envelope_sender(conn: sqlite3.Connection, message_id: int) -> str:
    """The envelope sender of a message: where its notices go."""
    return conn.execute("SELECT mail_from FROM messages WHERE id = ?", (message_id,)).fetchone()[0] or ""


def requeue_interrupted_notifications(conn: sqlite3.Connection) -> None:
    """A notification being sent when the gateway stopped is sent again (a second notice is harmless)."""
    conn.execute("UPDATE notifications SET state = 'pending' WHERE state = 'sending'")
