"""The status store: the only module with SQL.

SQLite in WAL mode with synchronous=FULL, reached through sqlite-utils for
the schema and plain statements on the hot path. Tables:

- messages: each accepted email as raw RFC 5322 bytes (a BLOB) and its envelope;
- jobs: one per fax recipient, with its current state;
- events: the append-only history of every job;
- meta: small facts about the store itself (mode, feed state...).

Writes from the running service go through one writer thread (`Writer`),
which commits everything queued at the moment in one transaction (group
commit), so an acknowledgement never waits for more than one fsync and
concurrent messages share it. Commands such as `faxgw cancel` write from
their own process with short transactions; SQLite serialises them.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from gateway.errors import InvalidTransition, StoreError, StoreFull, StoreLocked, UnknownJob
from gateway.models import ClaimedJob, JobState, NewMessage

T = TypeVar("T")

CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"  # no 0/O, 1/I/L, U: read aloud safely
BATCH_LIMIT = 512


# --- time ------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """UTC time in the store's fixed-width form, which sorts as text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_code() -> str:
    return "FX" + "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))


# --- schema ----------------------------------------------------------------


def _migration_1(db: sqlite_utils.Database) -> None:
    """Initial schema (incremental auto-vacuum is set by migrate() just before it)."""
    db["messages"].create(
        {
            "id": int, "received_at": str, "client": str, "helo": str, "mail_from": str,
            "auth_user": str, "header_from": str, "size": int, "smtputf8": int,
            "needs_8bitmime": int, "raw": bytes,
        },
        pk="id", not_null={"received_at", "raw"},
    )
    db["jobs"].create(
        {
            "id": int, "code": str, "message_id": int, "recipient": str, "number": str,
            "sender": str, "state": str, "reason": str, "attempts": int,
            "next_attempt_at": str, "created_at": str, "updated_at": str,
            "last_result": str, "upstream_reply": str, "reference_id": str,
        },
        pk="id", not_null={"code", "message_id", "number", "state", "created_at", "updated_at"},
        foreign_keys=[("message_id", "messages", "id")], defaults={"attempts": 0},
    )
    db["jobs"].create_index(["code"], unique=True)
    db["jobs"].create_index(["state", "next_attempt_at"])
    db["jobs"].create_index(["number", "created_at"])
    db["jobs"].create_index(["created_at"])
    db["events"].create(
        {"id": int, "job_id": int, "at": str, "source": str, "state": str, "detail": str},
        pk="id", not_null={"job_id", "at", "source"}, foreign_keys=[("job_id", "jobs", "id")],
    )
    db["events"].create_index(["job_id", "id"])
    db["meta"].create({"key": str, "value": str}, pk="key")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1]
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the store's pragmas; autocommit mode, explicit transactions."""
    if readonly:
        if not path.exists():
            raise StoreError(f"{path}: no store here yet (has `faxgw serve` run with this config?)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        _create_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.row_factory = sqlite3.Row
    return conn


def _create_private(path: Path) -> None:
    """Create the store's directory and file readable by their owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; refuse a store written by a newer gateway."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {version}, newer than this gateway knows ({SCHEMA_VERSION});"
            " run the newer faxgw, or restore a backup made for this version"
        )
    if version == 0:
        # Migration 1's first step: incremental auto-vacuum, so purged message
        # bodies give their space back. It takes effect through VACUUM (cheap
        # on an empty file), which cannot run inside a transaction.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    db = sqlite_utils.Database(conn)
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


class StoreLock:
    """The exclusive lock one `faxgw serve` holds on its store for its lifetime."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreLocked(
                f"{self.path.with_suffix('')} is in use by another `faxgw serve` (pid {holder});"
                " two would send every fax twice"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


# --- the writer thread -----------------------------------------------------


class Writer:
    """One thread owning the write connection; each batch of queued calls is one commit.

    `await writer.run(fn, *args)` runs `fn(conn, *args)` inside a transaction
    and returns its result only after the commit reached the disk. One call's
    exception rolls back that call alone (a savepoint), not its neighbours.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="store-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None

    def start(self) -> None:
        self._conn = connect(self.path)
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, future, loop))
        return await future

    def _serve(self) -> None:
        assert self._conn is not None
        conn = self._conn
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < BATCH_LIMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._commit(conn, batch)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, _future, _loop in batch:
                conn.execute("SAVEPOINT call")
                try:
                    outcomes.append((True, fn(conn, *args)))
                    conn.execute("RELEASE call")
                except Exception as exc:  # one bad call must not sink the batch
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                    outcomes.append((False, _translate(exc)))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            outcomes = [(False, _translate(exc))] * len(batch)
        for (ok, value), (_fn, _args, future, loop) in zip(outcomes, batch, strict=True):
            loop.call_soon_threadsafe(_settle, future, ok, value)


def _translate(exc: Exception) -> Exception:
    if is_disk_full(exc):
        return StoreFull(str(exc))
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"store write failed: {exc}")
    return exc


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


# --- operations (each runs inside a transaction the caller owns) ------------


def add_event(conn: sqlite3.Connection, job_id: int, now: str, source: str, state: str | None, detail: str) -> None:
    conn.execute(
        "INSERT INTO events (job_id, at, source, state, detail) VALUES (?, ?, ?, ?, ?)",
        (job_id, now, source, state, detail),
    )


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
                    "INSERT INTO jobs (code, message_id, recipient, number, sender, state,"
                    " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (code, message_id, recipient.address, recipient.number.e164, sender, now, now, now),
                )
                break
            except sqlite3.IntegrityError:
                continue  # the code is taken: draw another
        add_event(conn, job.lastrowid, now, "intake", "queued",
                  f"accepted from {msg.client} for {recipient.address}")
        codes.append(code)
    return codes


def claim_due(conn: sqlite3.Connection, now: str, limit: int) -> list[ClaimedJob]:
    """Mark up to `limit` due jobs `sending` and return them with their message."""
    rows = conn.execute(
        "SELECT j.id, j.code, j.number, j.attempts, j.created_at, m.raw, m.mail_from,"
        " m.header_from, m.smtputf8, m.needs_8bitmime FROM jobs j JOIN messages m ON m.id = j.message_id"
        " WHERE j.state IN ('queued', 'deferred') AND j.next_attempt_at <= ?"
        " ORDER BY j.next_attempt_at LIMIT ?",
        (now, limit),
    ).fetchall()
    claimed = []
    for row in rows:
        attempt = row["attempts"] + 1
        conn.execute(
            "UPDATE jobs SET state = 'sending', attempts = ?, updated_at = ? WHERE id = ?",
            (attempt, now, row["id"]),
        )
        add_event(conn, row["id"], now, "forwarder", "sending", f"attempt {attempt}")
        claimed.append(ClaimedJob(
            id=row["id"], code=row["code"], number=row["number"], attempts=attempt,
            created_at=row["created_at"], raw=row["raw"], mail_from=row["mail_from"] or "",
            header_from=row["header_from"] or "", smtputf8=bool(row["smtputf8"]),
            needs_8bitmime=bool(row["needs_8bitmime"]),
        ))
    return claimed


def record_outcome(
    conn: sqlite3.Connection, job_id: int, now: str, state: JobState, *, detail: str,
    reply: str | None = None, next_attempt_at: str | None = None, reason: str | None = None,
) -> None:
    """Set a job's new state after a forward attempt, with its event."""
    conn.execute(
        "UPDATE jobs SET state = ?, updated_at = ?, next_attempt_at = ?, last_result = ?,"
        " upstream_reply = COALESCE(?, upstream_reply), reason = ? WHERE id = ?",
        (state.value, now, next_attempt_at, detail, reply, reason, job_id),
    )
    add_event(conn, job_id, now, "forwarder", state.value, detail + (f": {reply}" if reply else ""))


def recover_sending(conn: sqlite3.Connection, now: str) -> list[str]:
    """Jobs left in `sending` by a crash become `unknown`: the upstream may have them."""
    rows = conn.execute("SELECT id, code FROM jobs WHERE state = 'sending'").fetchall()
    for row in rows:
        conn.execute(
            "UPDATE jobs SET state = 'unknown', updated_at = ?, next_attempt_at = NULL,"
            " last_result = 'interrupted while sending' WHERE id = ?",
            (now, row["id"]),
        )
        add_event(conn, row["id"], now, "startup", "unknown",
                  "the gateway stopped while sending this job; not resent automatically")
    return [row["code"] for row in rows]


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


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


def operator_action(conn: sqlite3.Connection, code: str, action: str, now: str) -> JobState:
    """Apply `faxgw retry|release|cancel CODE` as one conditional update plus its event."""
    allowed, target = ACTIONS[action]
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT id, state FROM jobs WHERE code = ?", (code.upper(),)).fetchone()
        if row is None:
            raise UnknownJob(f"no job with code {code}")
        state = JobState(row["state"])
        if state not in allowed:
            names = ", ".join(sorted(s.value for s in allowed))
            raise InvalidTransition(f"{code} is {state.value}; {action} applies only to jobs that are {names}")
        conn.execute(
            "UPDATE jobs SET state = ?, updated_at = ?, next_attempt_at = ? WHERE id = ?",
            (target.value, now, now if target is JobState.QUEUED else None, row["id"]),
        )
        add_event(conn, row["id"], now, "operator", target.value, f"faxgw {action} (was {state.value})")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return target


# --- queries for the status commands -----------------------------------------

JOB_COLUMNS = "code, number, sender, state, created_at, updated_at, last_result, attempts, next_attempt_at, reason"


def list_jobs(
    conn: sqlite3.Connection, *, states: Iterable[str] = (), number: str | None = None,
    sender: str | None = None, since: str | None = None, limit: int = 50,
) -> list[dict[str, Any]]:
    clauses, params = [], []
    states = list(states)
    if states:
        clauses.append(f"state IN ({', '.join('?' * len(states))})")
        params += states
    if number:
        clauses.append("number = ?")
        params.append(number)
    if sender:
        clauses.append("instr(lower(sender), lower(?)) > 0")
        params.append(sender)
    if since:
        clauses.append("created_at >= ?")
        params.append(since)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [dict(row) for row in rows]


def get_job(conn: sqlite3.Connection, code: str) -> dict[str, Any]:
    row = conn.execute(
        f"SELECT id, recipient, upstream_reply, reference_id, {JOB_COLUMNS} FROM jobs WHERE code = ?",
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
    return job


def waiting_jobs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('queued', 'deferred', 'sending', 'held', 'unknown')"
        " ORDER BY COALESCE(next_attempt_at, '9999'), created_at"
    ).fetchall()
    return [dict(row) for row in rows]


def backoff(attempts: int, initial: float, maximum: float) -> timedelta:
    """Exponential backoff after `attempts` tries: initial, 2x, 4x... up to maximum."""
    return timedelta(seconds=min(maximum, initial * 2 ** max(0, attempts - 1)))
