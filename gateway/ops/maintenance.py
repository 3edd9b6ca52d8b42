"""Keeping the store safe for years: backups, restores, the backup before a migration, retention.

- `backup()`: `faxgw backup PATH`, an online copy while `faxgw serve` runs;
  the copy is readable by its owner only and carries a backup marker.
- `restore()`: `faxgw restore BACKUP`, only while no `faxgw serve` holds the
  store; the store it replaces is kept beside it first.
- `hold_if_restored()`: a store that starts with a backup marker (restored by
  `faxgw restore`, or copied into place by hand) has every unfinished job
  put in `held`: some were sent after the backup was taken, and sending them
  again by itself could fax twice. The marker is then cleared.
- `backup_before_migrate()`: `serve` copies a store before changing its schema.
- `Retention`: the runner that empties message bodies and raw status mails
  after [retention] period, in small batches through the writer, then gives
  the space back; `faxgw purge` runs the same pass once.

The SQL lives in gateway/store/housekeeping.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from gateway.config import RetentionSettings
from gateway.runner import Runner
from gateway.units import format_duration
from gateway.errors import MaintenanceError, StoreError, StoreLocked
from gateway.logs import log_event
from gateway.store import SCHEMA_VERSION, StoreLock, Writer, connect, iso, utcnow
from gateway import store as db  # the store's names; `store` here is a store's path

log = logging.getLogger("faxgw.maintenance")
BATCH_PAUSE = 0.01  # seconds between two purge batches: the writer serves intake in between
BATCH_BYTES = 32 * 2**20  # message bodies emptied per write transaction, at most about this much
VACUUM_PAGES = 2000  # pages given back per write transaction (8 MB at 4 KiB pages)


# --- backups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    path: Path
    taken_at: str
    size: int


def stamp(moment: datetime) -> str:
    """A time for file names: 20261127T020239Z."""
    return iso(moment)[:19].replace("-", "").replace(":", "") + "Z"


def backup(store: Path, target: Path, *, overwrite: bool = False,
           clock: Callable[[], datetime] = utcnow) -> Backup:
    """Copy the store to `target` (mode 0600), consistently, also while `faxgw serve` writes to it."""
    if target.is_dir():
        raise MaintenanceError(f"{target} is a directory: name the backup file, e.g. {target / 'faxgw-backup.sqlite3'}")
    if target.resolve() in {store.resolve(), *(store.resolve().with_name(store.name + s) for s in ("-wal", "-shm"))}:
        raise MaintenanceError(f"{target} is the store itself: back it up to another file")
    if target.exists() and not overwrite:
        raise MaintenanceError(f"{target} exists; give --force to replace it")
    if not target.parent.is_dir():
        raise MaintenanceError(f"{target.parent}: no such directory")
    with closing(connect(store, readonly=True)) as conn:
        taken_at = iso(clock())
        temporary = _snapshot(conn, target.parent, taken_at=taken_at, source=str(store))
    _put_in_place(temporary, target, overwrite=overwrite)
    return Backup(target, taken_at, target.stat().st_size)


def backup_before_migrate(conn: sqlite3.Connection, store: Path, *,
                          clock: Callable[[], datetime] = utcnow) -> Path | None:
    """Before `serve` changes the schema of a store in use, a copy beside it; None when nothing migrates.

    No copy, no migration: a failure here stops the start with the reason.
    """
    version = db.schema_version(conn)
    if not 0 < version < SCHEMA_VERSION:
        return None
    now = clock()
    target = store.with_name(f"{store.name}.pre-v{SCHEMA_VERSION}-{stamp(now)}.bak")
    try:
        temporary = _snapshot(conn, store.parent, taken_at=iso(now), source=str(store))
        _put_in_place(temporary, target, overwrite=False)
    except (OSError, sqlite3.Error, MaintenanceError) as exc:
        raise MaintenanceError(
            f"cannot back up {store} before migrating it from schema v{version} to v{SCHEMA_VERSION}: {exc};"
            " the store was not changed (free some space beside it, or back it up and migrate by hand)"
        ) from None
    return target


def _snapshot(conn: sqlite3.Connection, directory: Path, *, taken_at: str | None, source: str) -> Path:
    """A checked copy of the store in a new owner-only file in `directory`, marked as a backup taken at `taken_at`."""
    temporary = directory / f".faxgw-backup-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    # Owner-only from the first byte: the copy holds what the store holds.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.chmod(temporary, 0o600)  # whatever the umask did
        db.copy_into(conn, temporary)
        with closing(db.open_copy(temporary)) as copy:
            if taken_at:
                db.mark_backup(copy, taken_at, source)
            check = db.quick_check(copy)
        if check != "ok":
            raise MaintenanceError(f"the copy failed its consistency check: {check}")
        _fsync(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _put_in_place(temporary: Path, target: Path, *, overwrite: bool) -> None:
    try:
        if overwrite:
            os.replace(temporary, target)
        else:
            try:
                os.link(temporary, target)  # fails if the target appeared meanwhile: never overwrite
            except FileExistsError:
                raise MaintenanceError(f"{target} exists; give --force to replace it") from None
            except OSError:  # a file system without hard links (some network shares)
                if target.exists():
                    raise MaintenanceError(f"{target} exists; give --force to replace it") from None
                os.rename(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- restores -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    taken_at: str | None
    held: list[tuple[str, str]]  # (job code, state before the restore)
    replaced: Path | None  # the copy of the store the restore replaced


def restore(store: Path, source: Path, *, clock: Callable[[], datetime] = utcnow) -> Restored:
    """Put a backup in place of the store and hold its unfinished jobs; refused while `serve` runs."""
    if not source.is_file():
        raise MaintenanceError(f"{source}: no such backup file")
    if source.resolve() == store.resolve():
        raise MaintenanceError(f"{source} is the store itself: name a backup file")
    lock = StoreLock(store)
    try:
        lock.acquire()
    except StoreLocked:
        pid = lock.path.read_text().strip() or "?"
        raise MaintenanceError(f"{store} is in use by `faxgw serve` (pid {pid}): stop it before restoring") from None
    try:
        with closing(_open_backup(source)) as backup_conn:
            now = clock()
            replaced = None
            if store.exists() and store.stat().st_size:
                with closing(connect(store)) as current:
                    replaced = store.with_name(f"{store.name}.pre-restore-{stamp(now)}.bak")
                    _put_in_place(_snapshot(current, store.parent, taken_at=iso(now), source=str(store)),
                                  replaced, overwrite=False)
            taken_at = db.backup_marker(backup_conn)  # None: a copy not made by `faxgw backup`
            temporary = _snapshot(backup_conn, store.parent, taken_at=None, source=str(source))
        # The old store's WAL must not be applied to the restored file.
        for suffix in ("-wal", "-shm"):
            store.with_name(store.name + suffix).unlink(missing_ok=True)
        os.replace(temporary, store)
        _fsync(store.parent)
        with closing(connect(store)) as conn:
            held = _hold(conn, taken_at, clock)
    finally:
        lock.release()
    return Restored(taken_at, held, replaced)


def _open_backup(source: Path) -> sqlite3.Connection:
    """The backup, read-only, after checking it is a gateway store this version can use."""
    try:
        conn = connect(source, readonly=True)
        version = db.schema_version(conn)
        check = db.quick_check(conn)
        tables = db.table_names(conn)
    except sqlite3.DatabaseError as exc:
        raise MaintenanceError(f"{source} is not a readable gateway store: {exc}") from None
    problem = None
    if check != "ok":
        problem = f"{source} failed its consistency check: {check}"
    elif version < 1 or not {"jobs", "events", "messages", "meta"} <= tables:
        problem = f"{source} is not a gateway store (no jobs in it)"
    elif version > SCHEMA_VERSION:
        problem = (f"{source} has schema version {version}, newer than this gateway knows ({SCHEMA_VERSION});"
                   " restore it with the newer faxgw")
    if problem:
        conn.close()
        raise MaintenanceError(problem)
    return conn


def hold_if_restored(conn: sqlite3.Connection, *,
                     clock: Callable[[], datetime] = utcnow) -> tuple[str, list[tuple[str, str]]] | None:
    """If the store carries a backup marker: hold its unfinished jobs, clear the marker, say when it was taken."""
    taken_at = db.backup_marker(conn)
    if taken_at is None:
        return None
    return taken_at, _hold(conn, taken_at, clock)


def _hold(conn: sqlite3.Connection, taken_at: str | None, clock: Callable[[], datetime]) -> list[tuple[str, str]]:
    with db.transaction(conn):
        return db.hold_restored(conn, iso(clock()), taken_at)


# --- retention ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Purged:
    """One purge pass: its cutoff, what went, and the bytes given back to the file system."""

    cutoff: str
    purged: db.Purgeable = field(default_factory=db.Purgeable)
    freed: int = 0
    copies: list[Path] = field(default_factory=list)  # the store's own safety copies, older than the period


def cutoff(settings: RetentionSettings, now: datetime) -> str:
    return iso(now - timedelta(seconds=settings.period))


def preview(store: Path, settings: RetentionSettings, *, clock: Callable[[], datetime] = utcnow) -> Purged:
    """What a purge now would take (`faxgw purge --dry-run`), and the free space already inside the file."""
    now = clock()
    limit = cutoff(settings, now)
    with closing(connect(store, readonly=True)) as conn:
        _require_current_schema(conn)
        return Purged(limit, db.purgeable(conn, limit), db.free_bytes(conn), old_copies(store, settings, now))


def old_copies(store: Path, settings: RetentionSettings, now: datetime) -> list[Path]:
    """Copies `serve` and `faxgw restore` left beside the store, older than the period.

    They hold message bodies too, so they go with them; copies elsewhere
    (`faxgw backup PATH`) are the operator's to expire.
    """
    older = (now - timedelta(seconds=settings.period)).timestamp()
    found = [*store.parent.glob(f"{store.name}.pre-v*-*.bak"), *store.parent.glob(f"{store.name}.pre-restore-*.bak")]
    return sorted(path for path in found if path.is_file() and path.stat().st_mtime < older)


def _require_current_schema(conn: sqlite3.Connection) -> None:
    version = db.schema_version(conn)
    if version < SCHEMA_VERSION:
        raise MaintenanceError(f"the store has schema version {version}; this faxgw purges from version"
                               f" {SCHEMA_VERSION} on: start `faxgw serve` once to upgrade it")


class Retention(Runner):
    """Runner: every [retention] interval, one purge pass (`purge_once`); a failing pass is retried.

    Each batch is one short write through the writer, so intake's commits
    wait for one batch at most, never for the whole pass.
    """

    name = "retention"
    expected = (StoreError,)

    def __init__(self, settings: RetentionSettings, writer: Writer, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(clock=clock)
        self.settings = settings
        self.writer = writer
        self.retry_max = settings.interval  # a failing pass is tried again, at the latest an interval later

    async def prepare(self) -> None:
        # Soon after the start, then every interval: a gateway restarted more
        # often than the interval still purges.
        await self._wait(min(self.settings.interval, 30))

    async def step(self) -> float:
        await self.purge_once()
        return self.settings.interval

    async def purge_once(self) -> Purged:
        now = self.clock()
        limit, at, batch = cutoff(self.settings, now), iso(now), self.settings.batch
        note = f"message body purged (retention {format_duration(self.settings.period)})"
        total, key = db.Purgeable(), None
        while True:
            done, key = await self.writer.run(db.purge_bodies, limit, at, key, batch, BATCH_BYTES, note)
            total += done
            if key is None:
                break
            await asyncio.sleep(BATCH_PAUSE)
        while True:
            done = await self.writer.run(db.purge_reports, limit, batch)
            total += done
            if done.reports < batch:
                break
            await asyncio.sleep(BATCH_PAUSE)
        freed = 0
        while True:
            pages, size = await self.writer.run(db.give_back_space, VACUUM_PAGES)
            freed += size
            if pages < VACUUM_PAGES:
                break
            await asyncio.sleep(BATCH_PAUSE)
        copies = old_copies(self.writer.path, self.settings, now)
        for copy in copies:
            copy.unlink(missing_ok=True)
        if not total.empty or freed or copies:
            log_event(log, "retention", cutoff=limit, bodies=total.bodies, body_bytes=total.body_bytes,
                      reports=total.reports, report_bytes=total.report_bytes, freed_bytes=freed,
                      copies_removed=" ".join(copy.name for copy in copies) or None)
        return Purged(limit, total, freed, copies)


async def purge_now(store: Path, settings: RetentionSettings, *, clock: Callable[[], datetime] = utcnow) -> Purged:
    """`faxgw purge`: one pass from this process (also while `serve` runs), then the file shrinks."""
    if not store.exists():
        raise MaintenanceError(f"{store}: no store here yet (has `faxgw serve` run with this config?)")
    with closing(connect(store, readonly=True)) as conn:
        _require_current_schema(conn)
    writer = Writer(store)
    writer.start()
    try:
        result = await Retention(settings, writer, clock=clock).purge_once()
    finally:
        writer.close()
    # Hand the emptied pages back now; the running service's checkpoints would too, later.
    with closing(connect(store)) as conn, suppress(sqlite3.OperationalError):
        db.checkpoint(conn)
    return result
