"""Status reports written in batches: many calls of one function, one store-writer call.

The store writer commits every call queued at the moment in one
transaction, but runs each call in a savepoint of its own, and SQLite
copies each page a call changes into that savepoint's journal: for a status
report (a job, an event, the report and their indexes) that copy costs
about as much as the writing itself. Calls that arrive while a batch is
being written wait and are written together, as one writer call. Should
that call fail, nothing of it stays, and each call is written again alone,
so that a failure is only its own, as if the batch had never been tried.

The HTTP Notify handler (gateway/http/server.py) writes its reports through this;
the status-mail path batches on its own (gateway/status/inbound.py).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from gateway.store import Writer

I = TypeVar("I")
T = TypeVar("T")
log = logging.getLogger("faxgw.status")
# Batches with the writer at once. One: a second would split the calls that arrive during a commit into
# smaller batches (more commits), and it measured no faster with eight Notify connections.
IN_FLIGHT = 1


class Gathered(Generic[I, T]):
    """Items that arrive while earlier ones are being worked on wait, and are then taken together.

    `await gathered.submit(item)` returns the item's result. Up to `limit`
    batches are worked on at once; a worker task runs while items wait and
    ends when none do (no background task). `_process(batch)` settles each
    item's future; whatever it leaves unsettled gets its error, or is
    cancelled if the gateway stopped under it.
    """

    limit = 1

    def __init__(self) -> None:
        self._waiting: deque[tuple[I, asyncio.Future[T]]] = deque()
        self._running = 0  # workers running; counted by the workers themselves, so none is ever missed
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: I) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._waiting.append((item, future))
        if self._running < self.limit:
            self._running += 1
            task = loop.create_task(self._work())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    def _take(self) -> list[tuple[I, asyncio.Future[T]]]:
        """The next batch: by default everything waiting."""
        batch = list(self._waiting)
        self._waiting.clear()
        return batch

    async def _process(self, batch: list[tuple[I, asyncio.Future[T]]]) -> None:
        raise NotImplementedError

    async def _work(self) -> None:
        try:
            while self._waiting:
                batch = self._take()
                try:
                    await self._process(batch)
                except Exception as exc:  # a bug; the items still waiting need this worker to go on
                    log.exception("%s: a batch failed", type(self).__name__)
                    for _item, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                finally:
                    for _item, future in batch:
                        if not future.done():  # cancelled (the gateway stops)
                            future.cancel()
        finally:
            self._running -= 1


class Batched(Gathered[tuple[Any, ...], T]):
    """`await batched.run(*args)`: `fn(conn, *args)` committed in the store, like `writer.run(fn, *args)`."""

    limit = IN_FLIGHT

    def __init__(self, writer: Writer, fn: Callable[..., T]) -> None:
        super().__init__()
        self.writer = writer
        self.fn = fn

    async def run(self, *args: Any) -> T:
        return await self.submit(args)

    async def _process(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[T]]]) -> None:
        await self._write_batch(batch)

    async def _write_batch(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[T]]]) -> None:
        results: list[Any] | None = None
        if len(batch) > 1:
            try:
                results = await self.writer.run(_each, self.fn, [args for args, _future in batch])
            except Exception:  # noqa: BLE001 - each call is written alone next, and gets its own outcome
                results = None
        if results is None:
            results = await asyncio.gather(*(self.writer.run(self.fn, *args) for args, _future in batch),
                                           return_exceptions=True)
        for (_args, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # the caller went away
            if isinstance(result, asyncio.CancelledError):
                future.cancel()
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def _each(conn: sqlite3.Connection, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(conn, *args) for args in calls]
