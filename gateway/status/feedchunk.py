"""One chunk of XML feed rows applied together: read with a query per chunk, written with a statement per table.

feedpoll.FeedPoller.apply_chunk -> here -> store (gateway/store/feedlog.py),
inside the store writer's transaction. A row that correlate.apply_report()
would simply apply, or find received before, is decided here:

- received before: the chunk's dedup keys are looked up in one query;
- its job found by GreenFax's reference id (the chunk's ids in one query)
  or by number and time window (correlate.number_candidates), exactly one,
  waiting, without a conflicting reference id: the job takes the result,
  written with the chunk's other such results (store.apply_results).

Every other row (Pending, a job already final, ambiguous, foreign, matched
by nothing) goes through correlate itself, row by row, after the results
decided before it are written, so it reads the store as row-by-row
application would have left it. So does a row an earlier row of the chunk
may have changed the answer for: the same dedup key or reference id again,
or a job (or number candidate) an earlier row touched. The outcomes, and
what is stored, are those of applying the rows one by one
(tests/test_status_fast_paths.py compares the two).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from gateway import store
from gateway.models import Trust
from gateway.status.correlate import (
    CorrelationPolicy,
    MatchScope,
    Outcome,
    already_received,
    number_candidates,
    result_summary,
)
from gateway.status.feedxml import FeedRow

OneByOne = Callable[[sqlite3.Connection, FeedRow, str], Outcome]


def apply_together(conn: sqlite3.Connection, rows: list[FeedRow], now: str, policy: CorrelationPolicy,
                   scope_of: Callable[[str | None], MatchScope], one_by_one: OneByOne) -> list[Outcome]:
    """Each row's outcome, in order; `one_by_one` applies a row the chunk leaves to correlate."""
    chunk = _Chunk(conn, rows, now, policy)
    outcomes = [chunk.apply(row, scope_of(row.sender), one_by_one) for row in rows]
    chunk.write()
    return outcomes


class _Chunk:
    """The chunk's lookups, what its rows have touched so far, and the results not yet written."""

    def __init__(self, conn: sqlite3.Connection, rows: list[FeedRow], now: str, policy: CorrelationPolicy) -> None:
        self.conn, self.now, self.policy = conn, now, policy
        self.seen = store.reports_seen(conn, [row.report.dedup_key for row in rows])
        self.by_reference = store.jobs_by_reference(
            conn, sorted({row.report.reference_id for row in rows if row.report.reference_id}))
        self.keys: set[str] = set()  # dedup keys, reference ids and job codes of the rows before
        self.references: set[str] = set()
        self.touched: set[str] = set()
        self.results: list[tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]] = []

    def apply(self, row: FeedRow, scope: MatchScope, one_by_one: OneByOne) -> Outcome:
        report = row.report
        outcome = None
        if report.dedup_key not in self.keys and report.reference_id not in self.references:
            outcome = self._decide(row, scope)
        if outcome is None:
            self.write()
            outcome = one_by_one(self.conn, row, self.now)
        self.keys.add(report.dedup_key)
        if report.reference_id:
            self.references.add(report.reference_id)
        if outcome.job_code:
            self.touched.add(outcome.job_code)
        return outcome

    def write(self) -> None:
        """The results decided so far, before a row that reads the store itself (and at the end)."""
        if self.results:
            store.apply_results(self.conn, self.results)
            self.results = []

    def _decide(self, row: FeedRow, scope: MatchScope) -> Outcome | None:
        """The row's outcome when it is received before or plainly applies to its job; None: correlate decides."""
        report = row.report
        seen = self.seen.get(report.dedup_key)
        if seen is not None:
            return already_received(seen) if seen["outcome"] != "unmatched" else None
        if row.pending or report.result is None or report.trust is not Trust.TRUSTED or report.job_code:
            return None
        job, why = self._job(row, scope)
        if job is None or job["code"] in self.touched or job["state"] not in store.WAITING:
            return None
        if job["reference_id"] and report.reference_id and job["reference_id"] != report.reference_id:
            return None  # a conflict, which correlate notes in the job's history
        text, impossible = result_summary(report)
        if self.policy.tells_sender(self.conn, report.result, job["message_id"]):
            store.enqueue_notification(self.conn, job["id"], self.now)
        source, now = report.channel.value, self.now
        reported_at = store.iso(report.reported_at) if report.reported_at else now
        self.results.append((
            (report.result.value, now, report.reason, text, report.pages, report.duration, report.cost,
             report.reference_id, reported_at, int(impossible), job["id"]),
            (job["id"], now, source, report.result.value, text),
            store.report_values(report, now, "applied", job["id"], why),
        ))
        return Outcome("applied", job["code"], text)

    def _job(self, row: FeedRow, scope: MatchScope) -> tuple[Any, str]:
        """The one job the row matches as correlate would match it, or None (with "")."""
        report = row.report
        if report.reference_id:
            jobs = self.by_reference.get(report.reference_id, [])
            if len(jobs) == 1:
                return jobs[0], "by GreenFax reference id"
            if jobs:
                return None, ""  # several jobs have it: correlate goes on by number
        if scope.by_number is False or not report.fax_number:
            return None, ""
        waiting, candidates = number_candidates(self.conn, report, self.policy, self.now, scope)
        if len(candidates) != 1 or any(job["code"] in self.touched for job in waiting):
            return None, ""
        return candidates[0], "by fax number and time window"
