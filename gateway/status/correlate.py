"""One correlation and update path for every status channel.

`apply_report()` runs inside the store writer's transaction. In order:

1. The same report seen before (same dedup key) changes nothing.
2. Match a job, as far as the report's trust allows (models.py,
   Trust): an untrusted report only the waiting job whose secret it
   presents; an authentic one by our job code or by GreenFax's reference id
   already linked to a job; a trusted one also by fax number within the
   time window of jobs still waiting for a result (exactly one, or none).
3. No job, an ambiguous match, or a result we do not understand: the report
   is kept as `unmatched`, raw content (or its excerpt) included, for
   `faxgw unmatched`. An untrusted report without its job's secret changes nothing.
4. A job already final: the same result again (another channel) is a
   `duplicate`; a different one is recorded as an event and flagged
   (`contradicting`), never silently applied. A result for a job that was
   never submitted is flagged too.
5. Otherwise the job takes the report's result, with an event; sanity
   checks (delivered with 0 pages) flag the job but do not block.

The XML feed (status/feed.py) passes a stricter `MatchScope`: number matching
only for rows sent by the account sender, never to a job newer than the row,
and a row that matches no job at all is `foreign`, not unmatched. Its Pending
rows, which are not results, go through `apply_pending`.
"""

from __future__ import annotations

import hmac
import sqlite3
from dataclasses import dataclass
from datetime import timedelta

from gateway.config import Settings, address_listed
from gateway.errors import InvalidTransition, UnknownJob
from gateway.models import FINAL_STATES, JobState, Result, StatusReport, Trust
from gateway.store import enqueue_notification, immediate, iso, parse_iso
from gateway import store


@dataclass(frozen=True)
class Outcome:
    kind: str  # applied, duplicate, unmatched, contradicting, flagged (the feed also: foreign, pending)
    job_code: str | None
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}{' ' + self.job_code if self.job_code else ''}: {self.detail}"


@dataclass(frozen=True)
class CorrelationPolicy:
    window: timedelta = timedelta(days=3)  # how far back a number-only report may match
    notify_states: frozenset[str] = frozenset({"failed", "rejected", "expired"})
    confirm_success: tuple[str, ...] = ()  # senders told of a delivery with the transmission report

    @classmethod
    def from_settings(cls, settings: Settings) -> CorrelationPolicy:
        notes = settings.notifications
        return cls(window=timedelta(seconds=settings.status.match_window),
                   notify_states=frozenset(notes.on) if notes.enabled else frozenset(),
                   confirm_success=tuple(notes.confirm_success) if notes.enabled else ())

    def tells_sender(self, conn: sqlite3.Connection, result: Result, message_id: int) -> bool:
        """Whether the sender of a fax is told of this result (a notice, or the report of a delivery)."""
        if result.value in self.notify_states:
            return True
        return result is Result.DELIVERED and bool(self.confirm_success) and \
            address_listed(store.envelope_sender(conn, message_id), list(self.confirm_success))


@dataclass(frozen=True)
class MatchScope:
    """How a report that does not name our job code may match a job (the XML feed is stricter).

    `by_number`: number-and-window matching is allowed (None: when the report
    is trusted). `created_before_report`: the job must exist no later than
    the report's time plus this slack (the feed lists older faxes too, which
    must not match a newer job to the same number). `no_match`: the outcome
    of a report that matches no job by any key (the feed: "foreign");
    `not_by_number`: why number matching does not apply, for the stored note.
    """

    by_number: bool | None = None
    created_before_report: timedelta | None = None
    no_match: str = "unmatched"
    not_by_number: str = "matching by number does not apply to this report"


DEFAULT_SCOPE = MatchScope()


def summary(report: StatusReport) -> str:
    parts = [report.result.value if report.result else "unknown result"]
    if report.reason:
        parts.append(report.reason)
    if report.pages is not None:
        parts.append(f"{report.pages} page{'s' if report.pages != 1 else ''}")
    text = ", ".join(parts)
    return f"{text} (by {report.channel.value}{', ref ' + report.reference_id if report.reference_id else ''})"


def apply_report(conn: sqlite3.Connection, report: StatusReport, now: str, policy: CorrelationPolicy,
                 scope: MatchScope = DEFAULT_SCOPE) -> Outcome:
    """Correlate a new report and apply it; the report is stored with its outcome."""
    seen = store.report_seen(conn, report.dedup_key)
    if seen is not None:
        return _seen_again(conn, report, seen, now, policy, scope)
    job, why, nothing = _match(conn, report, policy, now, scope)
    if job is None:
        kind, detail = (scope.no_match if nothing else "unmatched"), why
    else:
        kind, detail = _apply_to(conn, report, job, now, policy)
    store.insert_report(conn, report, now, kind, job["id"] if job is not None else None,
                     why if kind == "applied" else detail)
    return Outcome(kind, job["code"] if job is not None else None, detail)


def apply_pending(conn: sqlite3.Connection, report: StatusReport, now: str, policy: CorrelationPolicy,
                  scope: MatchScope = DEFAULT_SCOPE) -> Outcome:
    """A report that the service is still working on a fax (the feed's Pending): not a result.

    An `unknown` job it matches is one the service has, so it becomes
    `submitted` (with an event); any other job changes nothing and only
    learns GreenFax's job id. The report is stored once (outcome `pending`).
    """
    seen = store.report_seen(conn, report.dedup_key)
    if seen is not None:
        return _seen_again(conn, report, seen, now, policy, scope)
    job, why, nothing = _match(conn, report, policy, now, scope)
    ref = f", ref {report.reference_id}" if report.reference_id else ""
    if job is None:
        kind, detail = (scope.no_match if nothing else "unmatched"), why
    elif job["state"] == JobState.UNKNOWN.value and store.submit_unknown(
            conn, job["id"], report.reference_id, now, source=report.channel.value,
            detail=f"GreenFax has it: listed as pending (by {report.channel.value}{ref})"):
        kind, detail = "applied", f"{job['code']} is with GreenFax (pending): submitted"
    else:
        if job["state"] in store.WAITING:
            store.link_reference(conn, job["id"], report.reference_id)
        kind, detail = "pending", f"{job['code']} is still pending at GreenFax"
    store.insert_report(conn, report, now, kind, job["id"] if job is not None else None,
                     why if kind == "applied" else detail)
    return Outcome(kind, job["code"] if job is not None else None, detail)


def match_by_hand(conn: sqlite3.Connection, report_id: int, code: str, now: str,
                  policy: CorrelationPolicy) -> Outcome:
    """`faxgw match`: an operator links an unmatched report to a job; it is applied like any other."""
    with immediate(conn):
        row = store.get_report(conn, report_id)
        job = store.job_by(conn, code=code)
        if job is None:
            raise UnknownJob(f"no job with code {code}")
        if row["outcome"] != "unmatched":
            raise InvalidTransition(f"status report {report_id} is {row['outcome']}, not unmatched")
        report = store.report_from_row(row)
        kind, detail = _apply_to(conn, report, job, now, policy)
        store.mark_matched(conn, report_id, job["id"], kind)
        store.note_on_job(conn, job["id"], now, "operator", f"status report #{report_id} linked by hand: {kind}",
                       flag=False)
    return Outcome(kind, code, detail)


def already_received(seen: sqlite3.Row) -> Outcome:
    """A report received before that matched a job, or was judged already: it changes nothing."""
    return Outcome("duplicate", seen["code"], f"report already received (#{seen['id']})")


def _seen_again(conn: sqlite3.Connection, report: StatusReport, seen: sqlite3.Row, now: str,
                policy: CorrelationPolicy, scope: MatchScope) -> Outcome:
    """A report received before. Only an earlier copy that matched nothing is tried again: the same
    mail may first come untrusted (SMTP, failing DKIM) and then trusted (IMAP)."""
    if seen["outcome"] != "unmatched":
        return already_received(seen)
    job, why, _nothing = _match(conn, report, policy, now, scope)
    if job is None:
        return Outcome("duplicate", None, f"report already received (#{seen['id']}), still unmatched")
    kind, detail = _apply_to(conn, report, job, now, policy)
    if kind != "unmatched":
        store.mark_matched(conn, seen["id"], job["id"], kind)
    return Outcome(kind, job["code"], detail)


def _apply_to(conn: sqlite3.Connection, report: StatusReport, job: sqlite3.Row, now: str,
              policy: CorrelationPolicy) -> tuple[str, str]:
    """What a matched report does to its job; returns (outcome, detail)."""
    if report.result is None and any(note.startswith("informational") for note in report.notes):
        # A delayed or relayed DSN: worth a line in the job's history, no change.
        store.note_on_job(conn, job["id"], now, report.channel.value, report.notes[0], flag=False)
        return "informational", report.notes[0]
    if report.result is None:
        return "unmatched", f"result {report.result_text!r} not understood"
    state = JobState(job["state"])
    source = report.channel.value
    if state in FINAL_STATES:
        if state.value == report.result.value:
            # Another report of the same outcome (often another channel): recorded, changes nothing.
            detail = f"{job['code']} is already {state.value}"
            store.note_on_job(conn, job["id"], now, source, f"also reported: {summary(report)}", flag=False)
            return "duplicate", detail
        detail = f"contradicting report: {summary(report)}; the job stays {state.value} (flagged for review)"
        store.note_on_job(conn, job["id"], now, source, detail, flag=True)
        return "contradicting", detail
    if state.value not in store.WAITING:
        detail = f"report for a job never submitted ({state.value}): {summary(report)} (flagged for review)"
        store.note_on_job(conn, job["id"], now, source, detail, flag=True)
        return "flagged", detail
    text, impossible = result_summary(report)
    conflict = bool(job["reference_id"] and report.reference_id and job["reference_id"] != report.reference_id)
    if conflict:
        # Matched by another key (the job code), yet GreenFax's id differs: kept, and said, never overwritten.
        store.note_on_job(conn, job["id"], now, source, f"reference id conflict: the job has {job['reference_id']},"
                       f" this report says {report.reference_id}; {job['reference_id']} kept (flagged for review)",
                       flag=True)
    store.apply_result(conn, job["id"], report, now, summary=text, source=source, flagged=impossible or conflict)
    if policy.tells_sender(conn, report.result, job["message_id"]):
        enqueue_notification(conn, job["id"], now)
    return "applied", text


def result_summary(report: StatusReport) -> tuple[str, bool]:
    """What a waiting job's history says of the result it takes, and whether the result is impossible."""
    impossible = report.result is Result.DELIVERED and report.pages == 0
    return summary(report) + ("; delivered with 0 pages is impossible (flagged)" if impossible else ""), impossible


def _match(conn: sqlite3.Connection, report: StatusReport, policy: CorrelationPolicy, now: str,
           scope: MatchScope = DEFAULT_SCOPE) -> tuple[sqlite3.Row | None, str, bool]:
    """(job, how or why not, True when no job matched by any key: not ambiguous, not refused).

    What a report may match depends on its trust (gateway.status.report.Trust):
    an untrusted one only the job whose secret it presents.
    """
    if report.trust is Trust.UNTRUSTED:
        return _match_untrusted(conn, report)
    if report.job_code:
        job = store.job_by(conn, code=report.job_code)
        if job is not None:
            return job, "by job code", False
    if report.reference_id:
        job = store.job_by(conn, reference_id=report.reference_id)
        if job is not None:
            return job, "by GreenFax reference id", False
    if not report.trusted:
        return None, "names no job of ours (matching by number is for trusted sources only)", True
    if scope.by_number is False:
        return None, f"no job has this reference id, and {scope.not_by_number}", True
    if not report.fax_number:
        return None, "no job code, reference id or fax number", False
    waiting, candidates = number_candidates(conn, report, policy, now, scope)
    if len(candidates) == 1:
        return candidates[0], "by fax number and time window", False
    if waiting and not candidates:
        return None, f"the job to {report.fax_number} waiting for a result is another fax: " + "; ".join(
            f"{job['code']}: {_contradiction(job, report)}" for job in waiting), False
    if not candidates:
        return None, f"no job to {report.fax_number} waiting for a result", True
    return None, f"ambiguous: several jobs to {report.fax_number} wait for a result", False


def number_candidates(conn: sqlite3.Connection, report: StatusReport, policy: CorrelationPolicy, now: str,
                      scope: MatchScope) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
    """The jobs to the report's number waiting in its time window, and those of them it may be about."""
    anchor = report.reported_at or parse_iso(now)
    until = iso(anchor + scope.created_before_report) if scope.created_before_report is not None else None
    waiting = store.waiting_by_number(conn, report.fax_number, iso(anchor - policy.window), until)
    # A job whose own keys the report contradicts is another fax to the same number.
    return waiting, [job for job in waiting if _contradiction(job, report) is None]


def _contradiction(job: sqlite3.Row, report: StatusReport) -> str | None:
    """What in the report contradicts what the job already has (another fax), or None."""
    if report.job_code and report.job_code != job["code"]:
        return f"the report names job code {report.job_code}"
    if report.reference_id and job["reference_id"] and report.reference_id != job["reference_id"]:
        return f"GreenFax reference id {job['reference_id']}, the report {report.reference_id}"
    return None


def _match_untrusted(conn: sqlite3.Connection, report: StatusReport) -> tuple[sqlite3.Row | None, str, bool]:
    """An untrusted report matches the job whose secret it presents, and only while that job waits.

    Job codes are short and GreenFax's reference ids sequential: either can
    be guessed, so neither alone lets mail from anyone change a fax.
    """
    named = f" names {report.job_code} but" if report.job_code else ""
    if not report.job_code or not report.job_secret:
        return None, f"untrusted report{named} carries no job secret (kept for review: `faxgw match`)", False
    job = store.job_by(conn, code=report.job_code)
    if job is None or not job["secret"] or not hmac.compare_digest(job["secret"], report.job_secret):
        return None, f"untrusted report{named} carries a wrong job secret (kept for review)", False
    if job["state"] not in store.WAITING and job["state"] != (report.result.value if report.result else None):
        return None, f"untrusted report names {report.job_code}, which is not waiting for a result", False
    return job, "by job code and the job's secret", False


def keep_unrecognised(conn: sqlite3.Connection, report: StatusReport, now: str) -> Outcome:
    """Mail to a status address that no rule recognised: kept raw for review, once."""
    if store.report_seen(conn, report.dedup_key) is None:
        store.insert_report(conn, report, now, "unrecognised", None, "not recognised as a status mail")
    return Outcome("unrecognised", None, "kept for review")
