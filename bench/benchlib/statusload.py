"""status.py's workload: a store of submitted jobs, and the reports GreenFax would send about them.

Each job has its own number and reference id (so no cache helps); every
fourth fax failed (busy). The reports come in the channels' own formats:
status mails in the sandbox's layout, one XML feed answer, Notify URLs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from yarl import URL

from gateway import store
from gateway.models import FaxNumber, NewMessage, Recipient
from gateway.sandbox.notifycall import notify_parameters
from gateway.sandbox.greenfax import SandboxFax
from gateway.sandbox.statusmail import status_email

ACCOUNT_SENDER = "faxes@bench.example"
FEED_ZONE = "America/New_York"


def seed(path: Path, count: int, *, with_references: bool = False, age: float = 0) -> list[tuple[str, str, int]]:
    """A store with `count` submitted jobs, each to its own number; returns (code, digits, reference id).

    `with_references`: every other job already knows its GreenFax reference id
    (as after an earlier report), so half the feed rows match by it. `age`:
    the jobs were created that many seconds ago.
    """
    conn = store.connect(path)
    store.migrate(conn)
    jobs = []
    conn.execute("BEGIN")
    for n in range(count):
        digits = f"1212{5_000_000 + n:07d}"
        message = NewMessage(raw=b"Subject: bench\r\n\r\nx\r\n", mail_from="erp@bench.example", client="127.0.0.1",
                             helo="bench", auth_user=None, header_from="erp@bench.example", smtputf8=False,
                             needs_8bitmime=False, recipients=[Recipient(f"{digits}@greenfax.com",
                                                                         FaxNumber("+" + digits))])
        (code,) = store.insert_message(conn, message, store.iso(store.utcnow()))
        jobs.append((code, digits, 9_000_000 + n))
        if with_references and n % 2 == 0:
            conn.execute("UPDATE jobs SET reference_id = ? WHERE code = ?", (str(9_000_000 + n), code))
    conn.execute("UPDATE jobs SET state = 'submitted', created_at = ?, updated_at = ?",
                 (store.iso(store.utcnow() - timedelta(seconds=age)),) * 2)
    conn.execute("COMMIT")
    conn.close()
    return jobs


def fax(index: int, code: str, digits: str, reference: int, now: datetime) -> SandboxFax:
    """One fax's outcome, as GreenFax reports it; every fourth one failed (busy)."""
    ok = index % 4 != 0
    return SandboxFax(reference_id=reference, number=digits, code=code, sender=ACCOUNT_SENDER, envelope_sender="",
                      raw=b"", result="delivered" if ok else "failed", reason=None if ok else "busy",
                      pages=2 if ok else 0, received_at=now)


def mails(jobs: list[tuple[str, str, int]]) -> list[bytes]:
    now = datetime.now(UTC)
    return [status_email(fax(i, *job, now), ACCOUNT_SENDER) for i, job in enumerate(jobs)]


def feed_body(jobs: list[tuple[str, str, int]], since: float) -> bytes:
    """A feed answer listing every job, in the format gateway/status/feedxml.py documents.

    The rows' times are spread over the last `since` seconds, in the account's zone.
    """
    start = datetime.now(ZoneInfo(FEED_ZONE)) - timedelta(seconds=since)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<outbound>"]
    for i, (_code, digits, reference) in enumerate(jobs):
        ok = i % 4 != 0
        stamp = (start + timedelta(seconds=since * i / len(jobs))).strftime("%Y-%m-%d %H:%M:%S")
        values = {"jobid": reference, "faxnumber": digits, "sender": ACCOUNT_SENDER,
                  "status": "Success" if ok else "Busy", "pages": 2 if ok else 0, "duration": 52 if ok else 0,
                  "cost": "0.20" if ok else "0.00", "timestamp": stamp}
        lines.append("  <fax>" + "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in values.items()) + "</fax>")
    lines.append("</outbound>")
    return ("\n".join(lines) + "\n").encode()


def notify_urls(base: str, jobs: list[tuple[str, str, int]]) -> list[URL]:
    now = datetime.now(UTC)
    return [URL(f"{base}?{urlencode(notify_parameters(fax(i, *job, now)))}", encoded=True)
            for i, job in enumerate(jobs)]
