"""Correlation of status reports with jobs, on a real store file (DESIGN.md, "Correlation and trust")."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import new_message

from gateway import store
from gateway.models import Channel, JobState, Result, StatusReport, Trust
from gateway.status.correlate import CorrelationPolicy, apply_report, match_by_hand
from gateway.status.report import dedup_key
from gateway.store import reports as reports_db

POLICY = CorrelationPolicy()
NOW = store.utcnow()


@pytest.fixture
def conn(tmp_path: Path):
    connection = store.connect(tmp_path / "s.sqlite3")
    store.migrate(connection)
    yield connection
    connection.close()


def make_job(conn, number="+12125551234", state=JobState.SUBMITTED) -> str:
    """A job as the intake stores it, taken to `state` the way the forwarder would."""
    message = new_message(number)
    with conn:
        (code,) = store.insert_message(conn, message, store.iso(NOW))
    if state is not JobState.QUEUED:
        conn.execute("UPDATE jobs SET state = ? WHERE code = ?", (state.value, code))
    return code


def report(n: int = 0, **fields) -> StatusReport:
    values = dict(channel=Channel.IMAP, trust=Trust.TRUSTED, raw=f"report {n} {sorted(fields.items())}",
                  result=Result.FAILED, reason="busy", pages=0, reported_at=NOW)
    values.update(fields)
    values.setdefault("dedup_key", dedup_key("mail", f"<{n}@x>", values["raw"]))
    return StatusReport(**values)


def apply(conn, rep: StatusReport):
    with conn:
        conn.execute("BEGIN")
        return apply_report(conn, rep, store.iso(store.utcnow()), POLICY)


def state_of(conn, code: str) -> str:
    return store.get_job(conn, code)["state"]


def test_match_by_job_code_applies_result_with_event(conn):
    code = make_job(conn)
    outcome = apply(conn, report(job_code=code, reference_id="8591334"))
    assert (outcome.kind, outcome.job_code) == ("applied", code)
    job = store.get_job(conn, code)
    assert job["state"] == "failed" and job["reason"] == "busy" and job["reference_id"] == "8591334"
    assert job["events"][-1]["source"] == "email-imap" and "busy" in job["events"][-1]["detail"]


def test_match_by_linked_reference_id(conn):
    code = make_job(conn)
    conn.execute("UPDATE jobs SET reference_id = '777' WHERE code = ?", (code,))
    outcome = apply(conn, report(reference_id="777", result=Result.DELIVERED, reason=None, pages=2))
    assert outcome.kind == "applied" and state_of(conn, code) == "delivered"


def test_match_by_number_and_window_only_for_trusted_sources(conn):
    code = make_job(conn, "+13125550123")
    untrusted = apply(conn, report(1, trust=Trust.UNTRUSTED, fax_number="+13125550123"))
    assert untrusted.kind == "unmatched" and state_of(conn, code) == "submitted"
    trusted = apply(conn, report(2, fax_number="+13125550123"))
    assert trusted.kind == "applied" and state_of(conn, code) == "failed"


def test_number_outside_window_or_ambiguous_stays_unmatched(conn):
    make_job(conn, "+13125550124")
    old = apply(conn, report(1, fax_number="+13125550124", reported_at=NOW + timedelta(days=10)))
    assert old.kind == "unmatched" and "no job" in old.detail
    make_job(conn, "+13125550124")
    ambiguous = apply(conn, report(2, fax_number="+13125550124"))
    assert ambiguous.kind == "unmatched" and "ambiguous" in ambiguous.detail


def test_unknown_job_code_and_unknown_result_are_unmatched_with_raw_kept(conn):
    assert apply(conn, report(1, job_code="FXZZZZ99")).kind == "unmatched"
    code = make_job(conn)
    weird = apply(conn, report(2, job_code=code, result=None, result_text="PARTIAL"))
    assert weird.kind == "unmatched" and state_of(conn, code) == "submitted"
    kept = reports_db.list_reports(conn)
    assert len(kept) == 2 and all(row["outcome"] == "unmatched" for row in kept)
    assert conn.execute("SELECT raw FROM reports WHERE id = ?", (kept[0]["id"],)).fetchone()[0].startswith("report")


def test_same_report_twice_changes_nothing_and_a_second_channel_is_only_recorded(conn):
    code = make_job(conn)
    first = report(1, job_code=code)
    assert apply(conn, first).kind == "applied"
    events = len(store.get_job(conn, code)["events"])
    assert apply(conn, first).kind == "duplicate"
    assert len(store.get_job(conn, code)["events"]) == events  # the very same report: not even an event
    again = apply(conn, report(2, job_code=code, channel=Channel.NOTIFY))
    job = store.get_job(conn, code)
    assert again.kind == "duplicate" and job["state"] == "failed"
    assert len(job["events"]) == events + 1
    assert job["events"][-1]["state"] is None and job["events"][-1]["source"] == "notify"


def test_contradicting_report_is_flagged_not_applied(conn):
    code = make_job(conn)
    apply(conn, report(1, job_code=code))
    outcome = apply(conn, report(2, job_code=code, result=Result.DELIVERED, reason=None, pages=1))
    job = store.get_job(conn, code)
    assert outcome.kind == "contradicting" and job["state"] == "failed" and job["flagged"] == 1
    assert "contradicting report" in job["events"][-1]["detail"]


def test_result_for_job_never_submitted_is_flagged(conn):
    code = make_job(conn, state=JobState.QUEUED)
    outcome = apply(conn, report(job_code=code))
    assert outcome.kind == "flagged" and state_of(conn, code) == "queued"


def test_unknown_job_is_resolved_by_a_report(conn):
    code = make_job(conn, state=JobState.UNKNOWN)
    assert apply(conn, report(job_code=code, result=Result.DELIVERED, reason=None, pages=3)).kind == "applied"
    assert state_of(conn, code) == "delivered"


def test_delivered_with_zero_pages_is_applied_but_flagged(conn):
    code = make_job(conn)
    outcome = apply(conn, report(job_code=code, result=Result.DELIVERED, reason=None, pages=0))
    job = store.get_job(conn, code)
    assert outcome.kind == "applied" and job["state"] == "delivered" and job["flagged"] == 1
    assert "impossible" in outcome.detail


def secret_of(conn, code: str) -> str:
    return conn.execute("SELECT secret FROM jobs WHERE code = ?", (code,)).fetchone()[0]


def test_an_untrusted_report_matches_only_with_the_jobs_secret(conn):
    code = make_job(conn)
    conn.execute("UPDATE jobs SET reference_id = '778' WHERE code = ?", (code,))
    untrusted = dict(trust=Trust.UNTRUSTED, channel=Channel.BOUNCE)
    for n, fields in enumerate([{"job_code": code}, {"reference_id": "778"}, {"fax_number": "+12125551234"},
                                {"job_code": code, "job_secret": "a" * 16}], start=1):
        outcome = apply(conn, report(n, **untrusted, **fields))
        assert outcome.kind == "unmatched" and state_of(conn, code) == "submitted", fields
    outcome = apply(conn, report(9, **untrusted, job_code=code, job_secret=secret_of(conn, code)))
    assert (outcome.kind, state_of(conn, code)) == ("applied", "failed")


def test_an_authentic_report_matches_by_code_or_reference_but_never_by_number(conn):
    code, other = make_job(conn, "+13125550127"), make_job(conn, "+13125550128")
    conn.execute("UPDATE jobs SET reference_id = '779' WHERE code = ?", (other,))
    authentic = dict(trust=Trust.AUTHENTIC, channel=Channel.NOTIFY)
    assert apply(conn, report(1, **authentic, fax_number="+13125550127")).kind == "unmatched"
    assert apply(conn, report(2, **authentic, job_code=code)).kind == "applied"
    assert apply(conn, report(3, **authentic, reference_id="779")).kind == "applied"
    assert (state_of(conn, code), state_of(conn, other)) == ("failed", "failed")


def test_untrusted_report_naming_a_final_job_changes_nothing(conn):
    code = make_job(conn, state=JobState.REJECTED)
    outcome = apply(conn, report(trust=Trust.UNTRUSTED, job_code=code, job_secret=secret_of(conn, code),
                                 result=Result.DELIVERED, reason=None, pages=1))
    job = store.get_job(conn, code)
    assert outcome.kind == "unmatched" and job["state"] == "rejected" and not job["flagged"]


def test_failure_enqueues_a_sender_notification(conn):
    code = make_job(conn)
    apply(conn, report(job_code=code))
    assert conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0] == 1
    delivered = make_job(conn)
    apply(conn, report(2, job_code=delivered, result=Result.DELIVERED, reason=None, pages=1))
    assert conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0] == 1


def test_operator_links_an_unmatched_report(conn):
    code = make_job(conn, "+13125550125")
    apply(conn, report(1, trust=Trust.UNTRUSTED, fax_number="+13125550125"))
    (row,) = reports_db.list_reports(conn)
    outcome = match_by_hand(conn, row["id"], code, store.iso(store.utcnow()), POLICY)
    assert outcome.kind == "applied" and state_of(conn, code) == "failed"
    assert any(e["source"] == "operator" for e in store.get_job(conn, code)["events"])
    assert reports_db.list_reports(conn) == []


def test_an_unmatched_copy_is_matched_when_a_trusted_copy_arrives(conn):
    code = make_job(conn, "+13125550126")
    untrusted = report(1, trust=Trust.UNTRUSTED, fax_number="+13125550126", channel=Channel.SMTP)
    assert apply(conn, untrusted).kind == "unmatched"
    # The same mail read from the IMAP mailbox (trusted): same dedup key, now applied.
    trusted = dataclasses.replace(untrusted, trust=Trust.TRUSTED, channel=Channel.IMAP)
    outcome = apply(conn, trusted)
    assert outcome.kind == "applied" and state_of(conn, code) == "failed"
    assert reports_db.list_reports(conn) == []  # the stored copy is no longer unmatched
    assert apply(conn, trusted).kind == "duplicate"


def test_informational_dsn_is_an_event_not_unmatched(conn):
    code = make_job(conn)
    delayed = report(job_code=code, result=None, reason=None, channel=Channel.BOUNCE,
                     notes=("informational DSN: delayed 4.4.1",))
    outcome = apply(conn, delayed)
    job = store.get_job(conn, code)
    assert outcome.kind == "informational" and job["state"] == "submitted"
    assert job["events"][-1]["detail"].startswith("informational DSN")
    assert reports_db.list_reports(conn) == []


def test_a_report_contradicting_the_jobs_reference_id_never_matches_it_by_number(conn):
    code = make_job(conn, "+13125550129")
    conn.execute("UPDATE jobs SET reference_id = '8591335' WHERE code = ?", (code,))
    outcome = apply(conn, report(1, fax_number="+13125550129", reference_id="8591337"))
    assert outcome.kind == "unmatched" and state_of(conn, code) == "submitted"
    assert f"{code}: GreenFax reference id 8591335, the report 8591337" in outcome.detail
    # A report naming a job code no job has is another fax too.
    assert apply(conn, report(2, fax_number="+13125550129", job_code="FXZZZZ22")).kind == "unmatched"
    assert store.get_job(conn, code)["reference_id"] == "8591335"


def test_a_reference_id_conflict_on_a_report_matched_by_code_is_recorded_and_flagged(conn):
    code = make_job(conn)
    conn.execute("UPDATE jobs SET reference_id = '8591335' WHERE code = ?", (code,))
    outcome = apply(conn, report(job_code=code, reference_id="8591337"))
    job = store.get_job(conn, code)
    assert outcome.kind == "applied" and job["state"] == "failed"
    assert (job["reference_id"], job["flagged"]) == ("8591335", 1)
    assert any("reference id conflict: the job has 8591335, this report says 8591337" in e["detail"]
               for e in job["events"])
