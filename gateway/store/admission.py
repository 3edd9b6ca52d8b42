"""What intake's cost controls read and write: daily usage, duplicates, hold decisions.

`admit_message` is the one call that takes a fax message in when limits,
the duplicate guard or hold rules are configured: it checks the day's usage
and earlier jobs and inserts the message and its jobs in the same
transaction (the writer's batch), so two messages committed together can
never both slip under a limit, and the counts survive a restart because
they are read from the jobs themselves.

The facts live on the jobs (a table without message bodies, so the counts
never read a BLOB): `sender_key` is "user:<AUTH user>" or "sender:<envelope
sender>", `client` the client address, `document_pages` the pages intake
counted (NULL when it did not count them, which counts as 1) and
`document_digest` the hash of the decoded documents. Cancelled jobs do not
count.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Literal

from gateway.models import JobState, NewMessage
from gateway.store.jobs import insert_message
from gateway.store.states import transition


# Earlier jobs that do not make a later fax a duplicate: they never reached
# the recipient, so sending the documents again is the sender's retry.
NOT_SENT = ("cancelled", "failed", "rejected", "expired")
# Jobs that do not make a number "faxed before": waiting for an operator, or never sent.
NOT_APPROVED = ("held", "cancelled", "rejected", "expired")


# --- values in and out ---------------------------------------------------------------------


@dataclass(frozen=True)
class HoldReason:
    """Why a job is held: `rule` (a bounded name for metrics), a short label for the reply, the detail kept."""

    rule: str
    short: str
    detail: str


@dataclass(frozen=True)
class DailyQuota:
    """One scope's daily limits: `scope` "client" (by address) or "sender" (by sender_key); 0 = off."""

    scope: Literal["client", "sender"]
    key: str
    faxes: int = 0
    pages: int = 0


@dataclass(frozen=True)
class Admission:
    """Everything `admit_message` needs besides the message; plain values, no settings."""

    sender_key: str
    since: str  # the start of the local day, as a store timestamp (UTC)
    pages: int | None = None  # pages per fax, None when not counted
    digest: str | None = None
    quotas: tuple[DailyQuota, ...] = ()
    duplicate_since: str | None = None  # None: no duplicate guard
    duplicate_action: Literal["refuse", "hold"] = "refuse"
    duplicate_window: str = ""  # e.g. "1 h", for the hold reason
    hold_new_numbers: bool = False
    holds: dict[str, tuple[HoldReason, ...]] = field(default_factory=dict)  # number -> reasons known beforehand


@dataclass(frozen=True)
class OverQuota:
    """A daily limit the message would exceed; `needed` is what this message adds."""

    scope: Literal["client", "sender"]
    unit: Literal["faxes", "pages"]
    limit: int
    used: int
    needed: int


@dataclass(frozen=True)
class Duplicate:
    """An earlier job with the same documents, number and sender inside the window."""

    number: str
    code: str
    created_at: str


@dataclass(frozen=True)
class Admitted:
    codes: list[str]
    held: dict[str, tuple[HoldReason, ...]]  # job code -> why it is held


# --- queries -------------------------------------------------------------------------------

_SCOPE_COLUMN = {"client": "client", "sender": "sender_key"}


def usage_since(conn: sqlite3.Connection, scope: str, key: str, since: str) -> tuple[int, int]:
    """(faxes, pages) of one client or sender since `since`; cancelled jobs do not count."""
    column = _SCOPE_COLUMN[scope]
    row = conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(COALESCE(document_pages, 1)), 0) FROM jobs"
        f" WHERE {column} = ? AND created_at >= ? AND state != 'cancelled'",
        (key, since),
    ).fetchone()
    return row[0], row[1]


def earlier_duplicate(conn: sqlite3.Connection, number: str, sender_key: str, digest: str,
                      since: str) -> Duplicate | None:
    """The latest job since `since` with these documents to this number from this sender, still sent."""
    row = conn.execute(
        "SELECT code, created_at FROM jobs WHERE number = ? AND created_at >= ? AND sender_key = ?"
        f" AND document_digest = ? AND state NOT IN ({', '.join('?' * len(NOT_SENT))})"
        " ORDER BY created_at DESC LIMIT 1",
        (number, since, sender_key, digest, *NOT_SENT),
    ).fetchone()
    return Duplicate(number, row[0], row[1]) if row else None


def number_known(conn: sqlite3.Connection, number: str) -> bool:
    """Whether an earlier fax to this number was sent or is on its way (not held, cancelled, refused)."""
    row = conn.execute(
        f"SELECT 1 FROM jobs WHERE number = ? AND state NOT IN ({', '.join('?' * len(NOT_APPROVED))}) LIMIT 1",
        (number, *NOT_APPROVED),
    ).fetchone()
    return row is not None


# --- admission -----------------------------------------------------------------------------


def admit_message(conn: sqlite3.Connection, msg: NewMessage, now: str,
                  admission: Admission) -> Admitted | OverQuota | Duplicate:
    """Check the day's usage and earlier jobs, then insert the message with its jobs, some of them held."""
    over = _over_quota(conn, admission, len(msg.recipients))
    if over is not None:
        return over
    reasons: dict[int, list[HoldReason]] = {}
    for index, recipient in enumerate(msg.recipients):
        number = recipient.number.e164
        found = list(admission.holds.get(number, ()))
        if admission.hold_new_numbers and not number_known(conn, number):
            found.insert(0, HoldReason("new-number", "new number", f"first fax to {number}: never faxed before"))
        if admission.duplicate_since is not None and admission.digest is not None:
            earlier = earlier_duplicate(conn, number, admission.sender_key, admission.digest,
                                        admission.duplicate_since)
            if earlier is not None and admission.duplicate_action == "refuse":
                return earlier
            if earlier is not None:
                found.append(HoldReason(
                    "duplicate", f"duplicate of {earlier.code}",
                    f"duplicate of {earlier.code}: the same documents to {number} from the same sender"
                    f" within {admission.duplicate_window}"))
        if found:
            reasons[index] = found
    codes = insert_message(conn, msg, now)
    conn.execute(
        "UPDATE jobs SET sender_key = ?, client = ?, document_pages = ?, document_digest = ?"
        f" WHERE code IN ({', '.join('?' * len(codes))})",
        (admission.sender_key, msg.client, admission.pages, admission.digest, *codes),
    )
    held = {codes[index]: tuple(found) for index, found in reasons.items()}
    for code, found in held.items():
        _hold(conn, code, "; ".join(reason.detail for reason in found), now)
    return Admitted(codes, held)


def _over_quota(conn: sqlite3.Connection, admission: Admission, faxes: int) -> OverQuota | None:
    pages = faxes * (admission.pages or 1)
    for quota in admission.quotas:
        if not (quota.faxes or quota.pages):
            continue
        used_faxes, used_pages = usage_since(conn, quota.scope, quota.key, admission.since)
        if quota.faxes and used_faxes + faxes > quota.faxes:
            return OverQuota(quota.scope, "faxes", quota.faxes, used_faxes, faxes)
        if quota.pages and used_pages + pages > quota.pages:
            return OverQuota(quota.scope, "pages", quota.pages, used_pages, pages)
    return None


def _hold(conn: sqlite3.Connection, code: str, reason: str, now: str) -> None:
    job_id = conn.execute("SELECT id FROM jobs WHERE code = ?", (code,)).fetchone()[0]
    transition(conn, job_id, JobState.HELD, now=now, source="intake", expect={JobState.QUEUED},
               detail=f"held: {reason}; `faxgw release {code}` sends it", reason=reason, next_attempt_at=None)
