"""The writer thread: one connection, every batch of queued calls is one commit (group commit)."""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import StoreError, StoreFull
from gateway.store.base import connect, is_disk_full

T = TypeVar("T")
BATCH_LIMIT = 512

class Writer:
    """One thread owning the write connection; each batch of queued calls is one commit.

    `await writer.run(fn, *args)` runs `fn(conn, *args)` inside a transaction
    and returns its result only after the commit reached the disk. One call's
    exception rolls back that call alone (a savepoint), not its neighbours.
    """

    def __init__(self, path: Path, *, max_size: int | None = None) -> None:
        self.path = path
        self.max_size = max_size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="store-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None

    def start(self) -> None:
        self._conn = connect(self.path, max_size=self.max_size)
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

