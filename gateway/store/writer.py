"""The writer thread: one connection, every batch of queued calls is one commit (group commit).

Checkpoints (copying the WAL into the database file) run in a thread of
their own, so a commit, and the 250 waiting on it, never includes one: left
to SQLite's automatic checkpoint, every 4 MB of WAL one commit took 12-20 ms
longer (200 KB messages arrive at 4 MB every 20 messages). The checkpointer
copies passively, beside the writer, at most ten times a second; once it has caught up with a WAL past
WAL_RESET_PAGES, the writer itself restarts the WAL between two batches
(cheap then: only the frames since are left to copy), so the file does not
grow while mail keeps coming. Durability is unchanged: each commit is still
fsynced to the WAL first (synchronous=FULL).

With several worker processes on one store (`shared=True`), each has its
own writer, and they take turns through a blocking flock on
`<store>.write-turn` around each batch: the next writer is woken the moment
the lock is free, where SQLite's own busy handler would sleep in steps of
up to 100 ms. A writer takes its batch only once it has the turn, so the
calls queued while another committed share one commit. Only one of the workers checkpoints (`checkpoints()`, called
when it takes over the singletons); the others leave the WAL to it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.errors import StoreError, StoreFull
from gateway.store.base import BUSY_TIMEOUT_MS, connect, is_disk_full

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("faxgw.store")

T = TypeVar("T")
BATCH_LIMIT = 512
CHECKPOINT_INTERVAL = 0.1  # seconds between two checkpoints while mail is coming in
WAL_RESET_PAGES = 4096  # a WAL this long is restarted once copied (16 MB at 4 KB pages)
RESET_BUSY_MS = 20  # how long the writer waits for readers when it restarts the WAL; else it tries later
FALLBACK_AUTOCHECKPOINT = 1000  # SQLite's default, should the checkpointer thread die

class Writer:
    """One thread owning the write connection; each batch of queued calls is one commit.

    `await writer.run(fn, *args)` runs `fn(conn, *args)` inside a transaction
    and returns its result only after the commit reached the disk. One call's
    exception rolls back that call alone (a savepoint), not its neighbours.
    """

    def __init__(self, path: Path, *, max_size: int | None = None, shared: bool = False) -> None:
        self.path = path
        self.max_size = max_size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="store-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None
        self._checkpointer = Checkpointer(path)
        self._turn: int | None = None  # with other writers on the store: the descriptor of the turn lock
        self.shared = shared

    def start(self) -> None:
        self._conn = connect(self.path, max_size=self.max_size)
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
        if self.shared:
            self._turn = os.open(self.path.with_name(self.path.name + ".write-turn"), os.O_RDWR | os.O_CREAT, 0o600)
        else:
            self._checkpointer.start()
        self._thread.start()

    def checkpoints(self) -> None:
        """This writer's process checkpoints the store from now on (a shared writer starts without)."""
        if not self._checkpointer.started:
            self._checkpointer.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._checkpointer.close()
        if self._turn is not None:
            os.close(self._turn)
            self._turn = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        import asyncio  # here, not at the top: the CLI imports the store and starts 40 ms faster without it

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
            if self._turn is None:
                self._commit(conn, self._batch(first))
            else:
                # The turn first, then the batch: what was queued while another writer
                # committed shares this commit instead of waiting for one more.
                fcntl.flock(self._turn, fcntl.LOCK_EX)
                try:
                    self._commit(conn, self._batch(first))
                finally:
                    fcntl.flock(self._turn, fcntl.LOCK_UN)
            if self._checkpointer.started:
                self._checkpointer.after_commit(conn)
        conn.close()

    def _batch(self, first: Any) -> list[Any]:
        """`first` and what is queued behind it now, up to BATCH_LIMIT calls (a stop stays queued)."""
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
        return batch

    def _commit(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, _future, _loop in batch:
                conn.execute("SAVEPOINT call")
                try:
                    outcomes.append((True, fn(conn, *args)))
                    conn.execute("RELEASE call")
                except Exception as exc:  # one bad call must not sink the batch...
                    if not conn.in_transaction:
                        # ...unless SQLite rolled the whole transaction back itself
                        # (a full disk does): then nothing of this batch is stored.
                        raise
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


class Checkpointer:
    """Copies the WAL into the database file beside the writer (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reset_wanted = False  # set by this thread, read and cleared by the writer's
        self.failed = False  # this thread has died; the writer switches SQLite's own checkpoints back on
        self._due = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="store-checkpoint", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._stopping = True
            self._due.set()
            self._thread.join()

    def after_commit(self, conn: sqlite3.Connection) -> None:
        """Called by the writer after each commit, on its connection. Never raises: the writer must go on."""
        try:
            if self.failed:
                # No checkpointer: SQLite's own, inside the commits, so the WAL cannot grow without end.
                self.failed = False
                conn.execute(f"PRAGMA wal_autocheckpoint = {FALLBACK_AUTOCHECKPOINT}")
            elif self.reset_wanted:
                self._reset(conn)
            self._due.set()
        except Exception:
            log.exception("store checkpoint step failed; the writer goes on")

    def _reset(self, conn: sqlite3.Connection) -> None:
        """Restart the WAL between two batches; given up if a reader is in it (the next round tries again)."""
        self.reset_wanted = False
        try:
            conn.execute(f"PRAGMA busy_timeout = {RESET_BUSY_MS}")
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.Error:
            pass
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _serve(self) -> None:
        try:
            self._checkpoint_while_running()
        except Exception:
            log.exception("the store's checkpointer stopped; SQLite checkpoints inside the commits from now on")
            self.failed = True

    def _checkpoint_while_running(self) -> None:
        conn = connect(self.path)
        try:
            while not self._stopping:
                self._due.wait()
                self._due.clear()
                if self._stopping:
                    break
                try:
                    _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    log.warning("checkpoint failed (the writer goes on; it is tried again): %s", exc)
                    continue
                if frames >= WAL_RESET_PAGES and copied >= frames:
                    self.reset_wanted = True
                time.sleep(CHECKPOINT_INTERVAL)  # copy in larger pieces: fewer fsyncs of the database file
        finally:
            conn.close()


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

