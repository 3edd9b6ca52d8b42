"""The SQL of backups, restores and retention; gateway/ops/maintenance.py orchestrates them.

- Backups are `VACUUM INTO` copies: one read transaction, so the copy is a
  consistent snapshot while the service keeps writing (WAL readers do not
  block the writer), and compact. The copy carries a marker in its meta
  table (`backup:taken_at`); a store that starts with the marker was
  restored from a backup, and its unfinished jobs are held (`hold_restored`).
- Retention empties the bodies of messages whose jobs are all final (and
  have not changed since the cutoff) and the raw text of status reports,
  keeping every job, event and report row; `give_back_space` returns the
  freed pages to the file system (the store uses incremental auto-vacuum).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.models import FINAL_STATES, JobState
from gateway.store.base import get_meta, set_meta
from gateway.store.feedlog import LAST_REQUEST
from gateway.store.states import add_event, transition

BACKUP_TAKEN_AT = "backup:taken_at"  # meta key, present only in a backup copy
BACKUP_SOURCE = "backup:source"
RESTORE_REASON = "restored_from_backup"
_FINAL = "(" + ", ".join(f"'{state.value}'" for state in sorted(FINAL_STATES)) + ")"


# --- backups and restores -------------------------------------------------------------------


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def copy_into(conn: sqlite3.Connection, target: Path) -> None:
    """A consistent, compacted copy of the store in `target` (an empty file or none)."""
    conn.execute("VACUUM INTO ?", (str(target),))


def open_copy(path: Path) -> sqlite3.Connection:
    """A copy made by `copy_into`, to mark and check (it stays in rollback-journal mode)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def quick_check(conn: sqlite3.Connection) -> str:
    """"ok", or the first problem SQLite finds in the file's structure."""
    return conn.execute("PRAGMA quick_check").fetchone()[0]


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def mark_backup(conn: sqlite3.Connection, taken_at: str, source: str) -> None:
    """Write the backup marker into a copy (never into the live store)."""
    with transaction(conn):
        set_meta(conn, BACKUP_TAKEN_AT, taken_at)
        set_meta(conn, BACKUP_SOURCE, source)


def backup_marker(conn: sqlite3.Connection) -> str | None:
    """When the backup this store was restored from was taken (None: not a restored backup)."""
    try:
        return get_meta(conn, BACKUP_TAKEN_AT)
    except sqlite3.OperationalError:
        return None  # no meta table: an empty or foreign file


def hold_restored(conn: sqlite3.Connection, now: str, taken_at: str | None) -> list[tuple[str, str]]:
    """Every unfinished job of a restored store becomes `held`; the marker goes.

    Some of these jobs were sent, or changed state, after the backup was
    taken: sending them again by itself could fax twice. Returns (code,
    previous state) of each job held. Runs in the caller's transaction.
    """
    when = f"taken at {taken_at}" if taken_at else "of unknown age"
    rows = conn.execute(f"SELECT id, code, state FROM jobs WHERE state NOT IN {_FINAL} AND state <> 'held'"
                        " ORDER BY id").fetchall()
    for row in rows:
        detail = (f"restored from a backup {when} (was {row['state']}): it may have been sent since;"
                  " check with GreenFax, then `faxgw release` or `faxgw cancel`")
        transition(conn, row["id"], JobState.HELD, now=now, source="restore", detail=detail,
                   expect={JobState(row["state"])}, reason=RESTORE_REASON, next_attempt_at=None,
                   last_result=f"restored from a backup {when} (was {row['state']})")
    conn.execute("DELETE FROM meta WHERE key IN (?, ?)", (BACKUP_TAKEN_AT, BACKUP_SOURCE))
    # The feed's last request may have been after the backup: count one as
    # made now, so GreenFax's minimum interval holds whatever happened since.
    last = get_meta(conn, LAST_REQUEST)
    if last is None or last < now:
        set_meta(conn, LAST_REQUEST, now)
    return [(row["code"], row["state"]) for row in rows]


# --- retention ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Purgeable:
    """What a purge with a given cutoff takes (or took): counts and bytes."""

    bodies: int = 0
    body_bytes: int = 0
    reports: int = 0
    report_bytes: int = 0

    def __add__(self, other: Purgeable) -> Purgeable:
        return Purgeable(self.bodies + other.bodies, self.body_bytes + other.body_bytes,
                         self.reports + other.reports, self.report_bytes + other.report_bytes)

    @property
    def empty(self) -> bool:
        return not (self.bodies or self.reports)


# A kept body whose jobs are all final and unchanged since the cutoff, and
# whose sender notices (which quote the message) have all been sent.
_PURGEABLE_BODIES = (
    "FROM messages m INDEXED BY messages_kept WHERE m.purged_at IS NULL AND m.received_at < :cutoff"
    " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.message_id = m.id"
    f"  AND (j.state NOT IN {_FINAL} OR j.updated_at >= :cutoff))"
    " AND NOT EXISTS (SELECT 1 FROM notifications n JOIN jobs j ON j.id = n.job_id"
    "  WHERE n.state IN ('pending', 'sending') AND j.message_id = m.id)"
)
_KEPT_REPORTS = "FROM reports INDEXED BY reports_raw_kept WHERE raw IS NOT NULL AND received_at < :cutoff"


def purgeable(conn: sqlite3.Connection, cutoff: str) -> Purgeable:
    """What a purge with this cutoff would take (`faxgw purge --dry-run`)."""
    bodies, body_bytes = conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(m.size), 0) {_PURGEABLE_BODIES}", {"cutoff": cutoff}).fetchone()
    reports, report_bytes = conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(length(CAST(raw AS BLOB))), 0) {_KEPT_REPORTS}", {"cutoff": cutoff}
    ).fetchone()
    return Purgeable(bodies, body_bytes, reports, report_bytes)


def purge_bodies(conn: sqlite3.Connection, cutoff: str, now: str, after: tuple[str, int] | None,
                 limit: int, max_bytes: int, note: str) -> tuple[Purgeable, tuple[str, int] | None]:
    """Empty up to `limit` purgeable bodies (about `max_bytes` at most) after the key `after`.

    Returns what went and the key to go on from (None: the pass is done).
    The key (received_at, id) lets one pass go through the store once, even
    where old bodies must stay (a job still waiting). Each job gets an event.
    """
    received, last_id = after or ("", 0)
    rows = conn.execute(
        f"SELECT m.id, m.received_at, m.size {_PURGEABLE_BODIES} AND (m.received_at, m.id) > (:received, :id)"
        " ORDER BY m.received_at, m.id LIMIT :limit",
        {"cutoff": cutoff, "received": received, "id": last_id, "limit": limit},
    ).fetchall()
    done = Purgeable()
    for row in rows:
        conn.execute("UPDATE messages SET raw = X'', purged_at = ? WHERE id = ?", (now, row["id"]))
        for job in conn.execute("SELECT id FROM jobs WHERE message_id = ?", (row["id"],)).fetchall():
            add_event(conn, job["id"], now, "retention", None, note)
        done += Purgeable(bodies=1, body_bytes=row["size"] or 0)
        # Freeing a body reads its whole page chain: large ones make a batch short.
        if done.body_bytes >= max_bytes and row is not rows[-1]:
            return done, (row["received_at"], row["id"])
    return done, ((rows[-1]["received_at"], rows[-1]["id"]) if len(rows) == limit else None)


def purge_reports(conn: sqlite3.Connection, cutoff: str, limit: int) -> Purgeable:
    """Drop the raw text of up to `limit` status reports received before the cutoff; the rows stay."""
    rows = conn.execute(
        f"SELECT id, length(CAST(raw AS BLOB)) AS size {_KEPT_REPORTS} ORDER BY received_at LIMIT :limit",
        {"cutoff": cutoff, "limit": limit},
    ).fetchall()
    conn.executemany("UPDATE reports SET raw = NULL WHERE id = ?", [(row["id"],) for row in rows])
    return Purgeable(reports=len(rows), report_bytes=sum(row["size"] or 0 for row in rows))


def give_back_space(conn: sqlite3.Connection, max_pages: int) -> tuple[int, int]:
    """Return up to `max_pages` free pages to the file system; how many, and their bytes.

    Python's sqlite3 steps `PRAGMA incremental_vacuum` once per execute, and
    each step frees one page, so the pragma is run once per page.
    """
    free = min(conn.execute("PRAGMA freelist_count").fetchone()[0], max_pages)
    for _ in range(free):
        conn.execute("PRAGMA incremental_vacuum(1)")
    return free, free * conn.execute("PRAGMA page_size").fetchone()[0]


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the file and truncate both: the file shrinks by what was given back."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def free_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of free pages inside the file (what `give_back_space` can return)."""
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return free * conn.execute("PRAGMA page_size").fetchone()[0]
