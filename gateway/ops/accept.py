"""Accepting on a listening socket that every worker process accepts on, so that each gets its share.

asyncio's own server accepts up to its backlog (100) connections each time
its socket is readable, so with several workers on one socket the first to
wake takes a whole burst: eight sessions opened at once went 7 to 1, and
with clients that keep their connection the second core stayed idle. Here a
worker takes one connection at a time, and only while it has no more open
connections than the least busy of the others (`Sessions`, a page of
memory the supervisor shares with every worker); otherwise it leaves the
connection to them for a few milliseconds, and takes it itself if nobody
has (a worker that is alive but stuck never holds mail up for longer). Only
for the workers' shared SMTP sockets; a single gateway keeps asyncio's server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger("faxgw.smtp")

RETRY_AFTER = 1.0  # seconds without accepting after the process ran out of descriptors or memory
LEAVE_FOR = 0.005  # seconds a busier worker leaves a waiting connection to the others before it takes it
HANDSHAKE_TIMEOUT = 60.0  # implicit TLS, as asyncio's server has it
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Sessions:
    """The open SMTP connections of each worker, in shared memory: made before the fork, inherited by all.

    Each worker writes its own slot only; the supervisor marks a dead
    worker's slot ABSENT (so nobody leaves connections to it) until its
    successor starts. Reading the others' slots unlocked is a hint, no more.
    """

    ABSENT = -1

    def __init__(self, workers: int) -> None:
        self._memory = mmap.mmap(-1, 4 * workers)  # anonymous and MAP_SHARED: the children see one copy
        self.counts = memoryview(self._memory).cast("i")
        for index in range(workers):
            self.counts[index] = self.ABSENT

    def present(self, index: int) -> None:
        self.counts[index] = 0

    def absent(self, index: int) -> None:
        self.counts[index] = self.ABSENT

    def busier(self, index: int) -> bool:
        """Whether another live worker has fewer open connections than worker `index`."""
        mine = self.counts[index]
        return any(self.ABSENT < count < mine for slot, count in enumerate(self.counts) if slot != index)


class OneAtATime:
    """An `asyncio.Server` look-alike (sockets, is_serving, close, wait_closed) over one shared socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext | None,
                 sessions: Sessions, index: int) -> None:
        self.loop = loop
        self.sockets = [sock]
        self.factory = factory
        self.context = context
        self.sessions = sessions
        self.index = index  # this worker's slot in `sessions`
        self._serving = False
        self._starting: set[asyncio.Task[None]] = set()  # connections in their TLS handshake
        self._timer: asyncio.TimerHandle | None = None
        sock.setblocking(False)

    def start(self) -> OneAtATime:
        self._serving = True
        self.loop.add_reader(self.sockets[0].fileno(), self._readable)
        return self

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._timer is not None:
            self._timer.cancel()
        else:
            self.loop.remove_reader(self.sockets[0].fileno())
        self.sockets[0].close()  # this process's descriptor: the other workers keep theirs

    async def wait_closed(self) -> None:
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    def _readable(self) -> None:
        if self.sessions.busier(self.index):
            self._pause(LEAVE_FOR)
            return
        self._accept()

    def _pause(self, seconds: float) -> None:
        self.loop.remove_reader(self.sockets[0].fileno())
        self._timer = self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        """After leaving a connection to the others: take it if it is still there, then listen again."""
        self._timer = None
        if not self._serving:
            return
        self.loop.add_reader(self.sockets[0].fileno(), self._readable)
        self._accept()

    def _accept(self) -> None:
        try:
            conn, _address = self.sockets[0].accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up first
        except OSError as exc:
            if exc.errno not in OUT_OF_RESOURCES:
                raise
            log.error("cannot accept an SMTP connection on %s: %s; trying again in %g s",
                      self.where, exc.strerror, RETRY_AFTER)
            self._pause(RETRY_AFTER)
            return
        conn.setblocking(False)
        self.sessions.counts[self.index] += 1
        task = self.loop.create_task(self._connect(conn, _Counted(self)))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: socket.socket, counted: _Counted) -> None:
        try:
            await self.loop.connect_accepted_socket(
                counted.protocol, conn, ssl=self.context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.context is not None else None)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            # As asyncio's server does: a client that fails its TLS handshake is only closed.
            log.debug("connection on %s closed before the session began: %s", self.where, exc)
            conn.close()
            counted.closed()

    @property
    def where(self) -> str:
        host, port = self.sockets[0].getsockname()[:2]
        return f"{host}:{port}"


class _Counted:
    """One accepted connection in its worker's count until its protocol (or its failed start) ends it."""

    def __init__(self, server: OneAtATime) -> None:
        self.server = server
        self.open = True

    def protocol(self) -> asyncio.Protocol:
        protocol = self.server.factory()
        lost = protocol.connection_lost

        def connection_lost(error: Exception | None) -> None:
            self.closed()
            lost(error)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    def closed(self) -> None:
        if self.open:
            self.open = False
            self.server.sessions.counts[self.server.index] -= 1
