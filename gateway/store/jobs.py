"""Jobs and their events: intake, forwarder and operator operations, and the status queries.

Each operation runs inside a transaction its caller owns (the writer's batch,
or the CLI's own short transaction for operator actions).
"""

from __future__ import annotations

import base64
import secrets
import sqlite3
from collections.abc import Iterable
from typing import Any

from gateway.errors import InvalidTransition, UnknownJob
from gateway.models import ClaimedJob, JobDetail, JobState, JobSummary, NewMessage
from gateway.store.base import immediate
from gateway.store.states import Expr, add_event, transition

WAITING_TO_SEND = frozenset({JobState.QUEUED, JobState.DEFERRED})
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"  # no 0/O, 1/I/L, U: read aloud safely


def new_code() -> str:
    return "FX" + "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))


def new_secret() -> str:
    """A job's secret: 80 random bits as 16 lower-case base32 letters, safe in a local part and a Message-ID.

    The job code is short enough to read aloud, and so guessable; the
    secret goes only to the upstream (VERP address, Message-ID), so a
    bounce that presents it is a bounce of ours.
    """
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def insert_message(conn: sqlite3.Connection, msg: NewMessage, now: str) -> list[str]:
    """Store an accepted message and one queued job per recipient; return the job codes."""
    cursor = conn.execute(
        "INSERT INTO messages (received_at, client, helo, mail_from, auth_user, header_from,"
        " size, smtputf8, needs_8bitmime, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (now, msg.client, msg.helo, msg.mail_from, msg.auth_user, msg.header_from,
         len(msg.raw), int(msg.smtputf8), int(msg.needs_8bitmime), msg.raw),
    )
    message_id = cursor.lastrowid
    sender = msg.header_from or msg.mail_from
    codes = []
    for recipient in msg.recipients:
        while True:
            code = new_code()
            try:
                job = conn.execute(
                    "INSERT INTO jobs (code, secret, message_id, recipient, number, sender, state,"
                    " next_attempt_at, created_at, updated_at, billing_code)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (code, new_secret(), message_id, recipient.address, recipient.number.e164, sender, now, now,
                     now, msg.billing_code),
                )
                break
            except sqlite3.IntegrityError:
                continue  # the code is taken: draw another
        add_event(conn, job.lastrowid, now, "intake", "queued",
                  f"accepted from {msg.client} for {recipient.address}")
        codes.append(code)
    return codes


def count_due(conn: sqlite3.Connection, now: str, limit: int, horizon: str | None = None) -> int:
    """How many jobs claim_due() would find now, counting at most `limit` (the same index ranges)."""
    due = "SELECT COUNT(*) FROM (SELECT 1 FROM jobs INDEXED BY jobs_due WHERE state IN ('queued', 'deferred')" \
          " AND next_attempt_at {} ? LIMIT ?)"
    count = conn.execute(due.format("<="), (now, limit)).fetchone()[0]
    if horizon and count < limit:
        count += conn.execute(due.format(">"), (horizon, limit - count)).fetchone()[0]
    return count


def claim_due(conn: sqlite3.Connection, now: str, limit: int, horizon: str | None = None, *,
              owner: str | None = None) -> list[ClaimedJob]:
    """Mark up to `limit` due jobs `sending` by `owner` (the worker process) and return them with their message.

    A next attempt later than `horizon` (farther ahead than any backoff can
    put it) can only come from a clock that jumped backwards: such a job is
    due now rather than after the jump is made up.
    """
    due = "SELECT id FROM jobs INDEXED BY jobs_due WHERE state IN ('queued', 'deferred') AND next_attempt_at {} ?" \
          " ORDER BY next_attempt_at LIMIT ?"
    # Two range scans of the partial index, so nothing is scanned that is not claimed.
    ids = [row[0] for row in conn.execute(due.format("<="), (now, limit))]
    if horizon and len(ids) < limit:
        ids += [row[0] for row in conn.execute(due.format(">"), (horizon, limit - len(ids)))]
    if not ids:
        return []
    rows = conn.execute(
        "SELECT j.id, j.code, j.secret, j.number, j.attempts, j.created_at, m.raw, m.mail_from, m.header_from, m.smtputf8,"
        f" m.needs_8bitmime FROM jobs j JOIN messages m ON m.id = j.message_id WHERE j.id IN ({','.join('?' * len(ids))})"
        " ORDER BY j.next_attempt_at",
        ids,
    ).fetchall()
    claimed = []
    for row in rows:
        attempt = row["attempts"] + 1
        transition(conn, row["id"], JobState.SENDING, now=now, source="forwarder", detail=f"attempt {attempt}",
                   expect=WAITING_TO_SEND, attempts=attempt, claimed_by=owner)
        claimed.append(ClaimedJob(
            id=row["id"], code=row["code"], secret=row["secret"], number=row["number"], attempts=attempt,
            created_at=row["created_at"], raw=row["raw"], mail_from=row["mail_from"] or "",
            header_from=row["header_from"] or "", smtputf8=bool(row["smtputf8"]),
            needs_8bitmime=bool(row["needs_8bitmime"]),
        ))
    return claimed


def record_outcome(
    conn: sqlite3.Connection, job_id: int, now: str, state: JobState, *, detail: str,
    reply: str | None = None, next_attempt_at: str | None = None, reason: str | None = None,
    notify: bool = False,
) -> None:
    """Set a job's new state after a forward attempt, with its event.

    Only a job still `sending` changes state: a status report may already
    have taken it further (a fast service reports before our reply arrives),
    and the attempt is then recorded as an event alone.
    """
    event = detail + (f": {reply}" if reply else "")
    changed = transition(conn, job_id, state, now=now, source="forwarder", detail=event, expect={JobState.SENDING},
                         next_attempt_at=next_attempt_at, last_result=detail, reason=reason,
                         upstream_reply=Expr("COALESCE(?, upstream_reply)", reply))
    if not changed:
        conn.execute("UPDATE jobs SET upstream_reply = COALESCE(?, upstream_reply) WHERE id = ?", (reply, job_id))
        add_event(conn, job_id, now, "forwarder", None, event)
    elif notify:
        enqueue_notification(conn, job_id, now)


def enqueue_notification(conn: sqlite3.Connection, job_id: int, now: str) -> None:
    conn.execute(
        "INSERT INTO notifications (job_id, state, next_attempt_at, created_at, updated_at)"
        " VALUES (?, 'pending', ?, ?, ?)",
        (job_id, now, now, now),
    )


def recover_sending(conn: sqlite3.Connection, now: str, *, owner: str | None = None,
                    source: str = "startup",
                    detail: str = "the gateway stopped while sending this job; not resent automatically") -> list[str]:
    """Jobs left in `sending` by a crash become `unknown`: the upstream may have them.

    With `owner`, only the jobs that worker process claimed (it died; the others still send theirs).
    """
    if owner is None:
        rows = conn.execute("SELECT id, code FROM jobs WHERE state = 'sending'").fetchall()
    else:
        rows = conn.execute("SELECT id, code FROM jobs WHERE state = 'sending' AND claimed_by = ?", (owner,)).fetchall()
    for row in rows:
        transition(conn, row["id"], JobState.UNKNOWN, now=now, source=source, expect={JobState.SENDING},
                   detail=detail, next_attempt_at=None, last_result="interrupted while sending")
    return [row["code"] for row in rows]


def next_due(conn: sqlite3.Connection) -> str | None:
    """When the earliest waiting job is due (None: nothing waits)."""
    row = conn.execute(
        "SELECT MIN(next_attempt_at) FROM jobs WHERE state IN ('queued', 'deferred')"
    ).fetchone()
    return row[0]


# --- operator actions --------------------------------------------------------

ACTIONS: dict[str, tuple[frozenset[JobState], JobState]] = {
    "retry": (frozenset({JobState.DEFERRED, JobState.UNKNOWN, JobState.EXPIRED, JobState.REJECTED}), JobState.QUEUED),
    "release": (frozenset({JobState.HELD}), JobState.QUEUED),
    "cancel": (frozenset({JobState.QUEUED, JobState.DEFERRED, JobState.HELD, JobState.UNKNOWN}), JobState.CANCELLED),
}


def operator_action(conn: sqlite3.Connection, code: str, action: str, now: str, *, source: str = "operator",
                    reason: str | None = None) -> JobState:
    """Apply `faxgw retry|release|cancel CODE` (or the console's button) as one conditional update plus its event."""
    allowed, target = ACTIONS[action]
    with immediate(conn):
        row = conn.execute("SELECT id, state, message_id FROM jobs WHERE code = ?", (code.upper(),)).fetchone()
        if row is None:
            raise UnknownJob(f"no job with code {code}")
        state = JobState(row["state"])
        if state not in allowed:
            names = ", ".join(sorted(s.value for s in allowed))
            raise InvalidTransition(f"{code} is {state.value}; {action} applies only to jobs that are {names}")
        # Retention empties the body of finished jobs (an accepted message is never empty).
        if target is JobState.QUEUED and not conn.execute(
                "SELECT length(raw) FROM messages WHERE id = ?", (row["message_id"],)).fetchone()[0]:
            raise InvalidTransition(f"{code} cannot be sent again: its message was purged after the retention period")
        detail = f"faxgw {action} (was {state.value})" if reason is None else \
            f"{action} (was {state.value}): {reason}"
        transition(conn, row["id"], target, now=now, source=source, detail=detail,
                   expect={state}, next_attempt_at=now if target is JobState.QUEUED else None)
    return target


# --- queries for the status commands -----------------------------------------

JOB_COLUMNS = "code, number, sender, state, created_at, updated_at, last_result, attempts, next_attempt_at, reason"


def list_jobs(
    conn: sqlite3.Connection, *, states: Iterable[str] = (), number: str | None = None,
    sender: str | None = None, since: str | None = None, limit: int = 50, before: str | None = None,
    billing_code: str | None = None, text: str | None = None, text_number: str | None = None,
) -> list[JobSummary]:
    """Jobs newest first; `before` (a job code) pages by keyset: the jobs older than that one.

    `text` is the search box: a job code or GreenFax reference id finds that
    job; any other text the jobs with that billing code, to that number
    (`text_number`, the text read as one), or whose sender contains it. Each
    is its own query on its own index, newest first and limited, and the
    answers are merged: one query with all of them OR-ed could use no index
    and would read every job.
    """
    clauses, params = [], []
    if billing_code:
        clauses.append("billing_code = ?")
        params.append(billing_code)
    if before:
        clauses.append("(created_at, id) < (SELECT created_at, id FROM jobs WHERE code = ?)")
        params.append(before.upper())
    states = list(states)
    if states:
        clauses.append(f"state IN ({', '.join('?' * len(states))})")
        params += states
    if number:
        clauses.append("number = ?")
        params.append(number)
    if sender:
        clause, pattern = _sender_contains(sender)
        clauses.append(clause)
        params.append(pattern)
    if since:
        clauses.append("created_at >= ?")
        params.append(since)
    if not text:
        return _jobs(conn, clauses, params, limit)
    # A job code or reference id names one job: when it is one, that job is the answer, at once.
    for clause, value in (("code = ?", text.upper()), ("reference_id = ?", text)):
        named = _jobs(conn, [*clauses, clause], [*params, value], 2)
        if len(named) == 1:
            return named
    found: dict[str, JobSummary] = {}
    ways = [("billing_code = ?", text), _sender_contains(text)] + \
        ([("number = ?", text_number)] if text_number else [])
    for clause, value in ways:
        for job in _jobs(conn, [*clauses, clause], [*params, value], limit, keyed=True):
            found[job["code"]] = job
    newest_first = sorted(found.values(), key=lambda job: (job["created_at"], job["id"]), reverse=True)
    for job in newest_first:
        del job["id"]  # type: ignore[misc]
    return newest_first[:limit]


def _sender_contains(text: str) -> tuple[str, str]:
    """The clause and parameter for "the sender contains this text", ignoring ASCII case.

    SQLite's LIKE ignores ASCII case as lower() does and is checked in the
    index that holds the sender (jobs_created_sender) almost three times
    faster than instr(lower(...)); an ESCAPE clause costs a little more, so
    only a text with % or _ (taken literally) has one.
    """
    if not any(char in text for char in "%_\\"):
        return "sender LIKE ?", f"%{text}%"
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "sender LIKE ? ESCAPE '\\'", f"%{escaped}%"


def _jobs(conn: sqlite3.Connection, clauses: list[str], params: list[Any], limit: int,
          keyed: bool = False) -> list[JobSummary]:
    """Jobs newest first; `keyed` adds their row id, the order's second key, for merging answers.

    The jobs are chosen by id first and read after: a search by sender then
    reads only the index that holds the sender (a fifth faster when it reads
    it to the end), and the other filters lose nothing.
    """
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    cursor = conn.execute(
        f"SELECT {'id, ' if keyed else ''}{JOB_COLUMNS} FROM jobs WHERE id IN"
        f" (SELECT id FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT ?) ORDER BY created_at DESC, id DESC",
        (*params, limit),
    )
    cursor.row_factory = None  # plain tuples: a Row and then a dict per job cost more than the query
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor]  # type: ignore[misc]  # JOB_COLUMNS are JobSummary's keys


def get_job(conn: sqlite3.Connection, code: str) -> JobDetail:
    row = conn.execute(
        f"SELECT id, recipient, upstream_reply, reference_id, pages, duration, cost, reported_at, flagged, billing_code,"
        f" {JOB_COLUMNS} FROM jobs WHERE code = ?",
        (code.upper(),),
    ).fetchone()
    if row is None:
        raise UnknownJob(f"no job with code {code}")
    job = dict(row)
    job["events"] = [
        dict(event) for event in conn.execute(
            "SELECT at, source, state, detail FROM events WHERE job_id = ? ORDER BY id", (job.pop("id"),)
        )
    ]
    return job  # type: ignore[return-value]  # the columns above are JobDetail's keys


def job_message(conn: sqlite3.Connection, code: str) -> bytes:
    """The message a job sends, as stored (empty once retention purged it)."""
    row = conn.execute("SELECT m.raw FROM jobs j JOIN messages m ON m.id = j.message_id WHERE j.code = ?",
                       (code.upper(),)).fetchone()
    if row is None:
        raise UnknownJob(f"no job with code {code}")
    return bytes(row[0] or b"")


def waiting_jobs(conn: sqlite3.Connection) -> list[JobSummary]:
    rows = conn.execute(
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'deferred', 'sending', 'held', 'unknown')"
        " ORDER BY COALESCE(next_attempt_at, '9999'), created_at"
    ).fetchall()
    return [dict(row) for row in rows]  # type: ignore[misc]


def count_jobs(conn: sqlite3.Connection, state: str) -> int:
    """How many jobs are in `state` (health's unknown jobs)."""
    return conn.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]


def job_counts(conn: sqlite3.Connection) -> tuple[dict[str, int], str | None]:
    """Jobs by state, and when the oldest job still waiting to be sent was created (the metrics)."""
    counts = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    oldest = conn.execute("SELECT MIN(created_at) FROM jobs WHERE state IN ('queued', 'deferred', 'sending')"
                          ).fetchone()[0]
    return counts, oldest
