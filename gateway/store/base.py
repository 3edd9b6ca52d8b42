"""Connections, time format, the exclusive lock and small meta facts."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import StoreError, StoreLocked

# --- time ------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """UTC time in the store's fixed-width form, which sorts as text: 2026-11-27T05:00:00.000000Z.

    isoformat() is three times as fast as strftime() and gives the same text
    (a test compares them); it runs several times for every message and report.
    """
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, *, readonly: bool = False, max_size: int | None = None) -> sqlite3.Connection:
    """A connection with the store's pragmas; autocommit mode, explicit transactions.

    `max_size` caps the file (PRAGMA max_page_count): past it every write
    fails as on a full disk, and the gateway answers 452 instead of growing.
    """
    if readonly:
        if not path.exists():
            raise StoreError(f"{path}: no store here yet (has `faxgw serve` run with this config?)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        _create_private(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # Savepoint journals (one per writer call) in memory, not in a temp file: they only undo a call
    # that fails, so this changes nothing about durability, and writing a report costs a third less.
    conn.execute("PRAGMA temp_store = MEMORY")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    if max_size:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {max(1, max_size // page_size)}")
    conn.row_factory = sqlite3.Row
    return conn


def _create_private(path: Path) -> None:
    """Create the store's directory and file readable by their owner only.

    An existing file is not opened: closing any descriptor of it would drop
    every POSIX lock this process holds on it, SQLite's included, and
    another process would then take itself for the last connection and
    delete the WAL index under the running gateway.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


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

    @property
    def fd(self) -> int | None:
        """The held lock's descriptor: a worker process given it keeps the store locked while it lives."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction of its own (BEGIN IMMEDIATE), for a command outside the writer: committed, or
    rolled back on any error. Inside a transaction already (the writer's group commit, for the web
    console's actions) it is a savepoint: an error undoes this change alone."""
    if conn.in_transaction:
        conn.execute("SAVEPOINT immediate")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO immediate")
            conn.execute("RELEASE immediate")
            raise
        conn.execute("RELEASE immediate")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None

