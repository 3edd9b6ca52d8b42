"""One correlation and update path for every status channel.

`apply_report()` runs inside the store writer's transaction. In order:

1. The same report seen before (same dedup key) changes nothing.
2. Match a job: by our job code; by GreenFax's reference id already linked to
   a job; and, for trusted sources only, by fax number within the time
   window of jobs still waiting for a result (exactly one, or no match).
3. No job, an ambiguous match, or a result we do not understand: the report
   is kept as `unmatched`, raw content included, for `faxgw unmatched`.
   An untrusted report that names no waiting job changes nothing.
4. A job already final: the same result again (another channel) is a
   `duplicate`; a different one is recorded as an event and flagged
   (`contradicting`), never silently applied. A result for a job that was
   never submitted is flagged too.
5. Otherwise the job takes the report's result, with an event; sanity
   checks (delivered with 0 pages) flag the job but do not block.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import timedelta

from gateway.config import Settings
from gateway.errors import InvalidTransition, UnknownJob
from gateway.models import FINAL_STATES, JobState
from gateway.status.report import Result, StatusReport
from gateway.store import enqueue_notification, iso, parse_iso
from gateway.store import reports as db


@dataclass(frozen=True)
class Outcome:
    kind: str  # applied, duplicate, unmatched, contradicting, flagged
    job_code: str | None
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}{' ' + self.job_code if self.job_code else ''}: {self.detail}"


@dataclass(frozen=True)
class CorrelationPolicy:
    window: timedelta = timedelta(days=3)  # how far back a number-only report may match
    notify_states: frozenset[str] = frozenset({"failed", "rejected", "expired"})

    @classmethod
    def from_settings(cls, settings: Settings) -> CorrelationPolicy:
        notes = settings.notifications
        return cls(window=timedelta(seconds=settings.status.match_window),
                   notify_states=frozenset(notes.on) if notes.enabled else frozenset())


def summary(report: StatusReport) -> str:
    parts = [report.result.value if report.result else "unknown result"]
    if report.reason:
        parts.append(report.reason)
    if report.pages is not None:
        parts.append(f"{report.pages} page{'s' if report.pages != 1 else ''}")
    text = ", ".join(parts)
    return f"{text} (by {report.channel.value}{', ref ' + report.reference_id if report.reference_id else ''})"


def apply_report(conn: sqlite3.Connection, report: StatusReport, now: str, policy: CorrelationPolicy) -> Outcome:
    """Correlate a new report and apply it; the report is stored with its outcome."""
    seen = db.report_seen(conn, report.dedup_key)
    if seen is not None:
        return Outcome("duplicate", seen["code"], f"report already received (#{seen['id']})")
    job, why = _match(conn, report, policy, now)
    kind, detail = _apply_to(conn, report, job, now, policy) if job is not None else ("unmatched", why)
    db.insert_report(conn, report, now, kind, job["id"] if job is not None else None,
                     why if kind == "applied" else detail)
    return Outcome(kind, job["code"] if job is not None else None, detail)


def match_by_hand(conn: sqlite3.Connection, report_id: int, code: str, now: str,
                  policy: CorrelationPolicy) -> Outcome:
    """`faxgw match`: an operator links an unmatched report to a job; it is applied like any other."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = db.get_report(conn, report_id)
        job = db.job_by(conn, code=code)
        if job is None:
            raise UnknownJob(f"no job with code {code}")
        if row["outcome"] != "unmatched":
            raise InvalidTransition(f"status report {report_id} is {row['outcome']}, not unmatched")
        report = db.report_from_row(row)
        kind, detail = _apply_to(conn, report, job, now, policy)
        db.mark_matched(conn, report_id, job["id"], kind)
        db.note_on_job(conn, job["id"], now, "operator", f"status report #{report_id} linked by hand: {kind}",
                       flag=False)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return Outcome(kind, code, detail)


def _apply_to(conn: sqlite3.Connection, report: StatusReport, job: sqlite3.Row, now: str,
              policy: CorrelationPolicy) -> tuple[str, str]:
    """What a matched report does to its job; returns (outcome, detail)."""
    if report.result is None:
        return "unmatched", f"result {report.result_text!r} not understood"
    state = JobState(job["state"])
    source = report.channel.value
    if state in FINAL_STATES:
        if state.value == report.result.value:
            return "duplicate", f"{job['code']} is already {state.value}"
        detail = f"contradicting report: {summary(report)}; the job stays {state.value} (flagged for review)"
        db.note_on_job(conn, job["id"], now, source, detail, flag=True)
        return "contradicting", detail
    if state.value not in db.WAITING:
        detail = f"report for a job never submitted ({state.value}): {summary(report)} (flagged for review)"
        db.note_on_job(conn, job["id"], now, source, detail, flag=True)
        return "flagged", detail
    impossible = report.result is Result.DELIVERED and report.pages == 0
    text = summary(report) + ("; delivered with 0 pages is impossible (flagged)" if impossible else "")
    db.apply_result(conn, job["id"], report, now, summary=text, source=source, flagged=impossible)
    if report.result.value in policy.notify_states:
        enqueue_notification(conn, job["id"], now)
    return "applied", text


def _match(conn: sqlite3.Connection, report: StatusReport, policy: CorrelationPolicy,
           now: str) -> tuple[sqlite3.Row | None, str]:
    if report.job_code:
        job = db.job_by(conn, code=report.job_code)
        if job is not None:
            if not report.trusted and job["state"] not in db.WAITING and job["state"] != (
                    report.result.value if report.result else None):
                return None, f"untrusted report names {report.job_code}, which is not waiting for a result"
            return job, "by job code"
    if report.reference_id:
        job = db.job_by(conn, reference_id=report.reference_id)
        if job is not None:
            return job, "by GreenFax reference id"
    if not report.trusted:
        return None, "untrusted report names no job code of ours"
    if not report.fax_number:
        return None, "no job code, reference id or fax number"
    anchor = report.reported_at or parse_iso(now)
    candidates = db.waiting_by_number(conn, report.fax_number, iso(anchor - policy.window))
    if len(candidates) == 1:
        return candidates[0], "by fax number and time window"
    if not candidates:
        return None, f"no job to {report.fax_number} waiting for a result"
    return None, f"ambiguous: several jobs to {report.fax_number} wait for a result"


def keep_unrecognised(conn: sqlite3.Connection, report: StatusReport, now: str) -> Outcome:
    """Mail to a status address that no rule recognised: kept raw for review, once."""
    if db.report_seen(conn, report.dedup_key) is None:
        db.insert_report(conn, report, now, "unrecognised", None, "not recognised as a status mail")
    return Outcome("unrecognised", None, "kept for review")
