"""The HTTP face's guard: connection caps, a time limit for request heads, a share of the descriptors.

aiohttp's server has a keep-alive timeout but no cap on connections and no
limit on how long a request's line and headers may take to arrive: 1,100
idle or half-sent connections once took every descriptor the process had,
and SMTP intake stopped. Here each listener has a `Gate` that counts its
connections (in all, and per client address) and shares one
`DescriptorBudget` with the other listeners; each connection is a
`GuardedHandler`, aiohttp's own RequestHandler that asks its gate first and
closes itself when a request's head is late. A connection over a cap gets a
bare 503 and is closed at once, counted and logged (logs.RateLimit keeps a
flood of those lines short).

A malformed or oversized request head gets a short 400, 414 or 431 and no
traceback: aiohttp's error names the start of the bad line, which on the
Notify path is the token.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import prometheus_client
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from gateway.config import client_key
from gateway.logs import log_event

log = logging.getLogger("faxgw.http")

# Our URLs are short (a Notify call's is well under 1 KiB); a header line may
# be longer (a bearer token, a proxy's cookies). aiohttp raises the same
# LineTooLong for both and names the limit, so the two limits differ: that
# tells a 414 from a 431.
MAX_REQUEST_LINE = 4096
MAX_HEADER_LINE = 8190  # aiohttp's default
REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def raise_descriptor_limit() -> tuple[int, str | None]:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit in force, and why it stayed if it did."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            return soft, f"cannot raise the soft limit to the hard one ({hard}): {exc}"
        soft = hard
    return soft, None


@dataclass
class DescriptorBudget:
    """How many connections all HTTP listeners together may hold: half the process's descriptors.

    The other half stays for what must go on working while the HTTP face is
    flooded: SMTP intake, the store (SQLite keeps three descriptors per
    connection), IMAP, the upstream and the logs.
    """

    limit: int
    taken: int = 0

    @classmethod
    def of(cls, nofile: int) -> DescriptorBudget:
        return cls(limit=sys.maxsize if nofile == resource.RLIM_INFINITY else nofile // 2)


class ConnectionMetrics:
    """The HTTP connections open now and those refused, by listener (`http`, `notify`) and cap."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.open = prometheus_client.Gauge("faxgw_http_connections", "Open HTTP connections, by listener",
                                            ["listener"], registry=registry, multiprocess_mode="livesum")
        self.refused = prometheus_client.Counter(
            "faxgw_http_connections_refused_total",
            "HTTP connections closed at once over a cap, by listener and cap (listener, client, descriptors)",
            ["listener", "reason"], registry=registry)


class Gate:
    """One listener's connections: at most `max_connections`, and `max_per_client` of them from one client."""

    def __init__(self, listener: str, *, max_connections: int, max_per_client: int, header_timeout: float,
                 budget: DescriptorBudget, metrics: ConnectionMetrics) -> None:
        self.listener = listener
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.header_timeout = header_timeout  # 0: no limit
        self.budget = budget
        self.metrics = metrics
        self.open = 0
        self._per_client: Counter[str] = Counter()

    def admit(self, client: str) -> bool:
        reason, limit = self._over(client)
        if reason is None:
            self.open += 1
            self.budget.taken += 1
            self._per_client[client_key(client)] += 1
            self.metrics.open.labels(self.listener).inc()
            return True
        self.metrics.refused.labels(self.listener, reason).inc()
        log_event(log, "http-refused", level=logging.WARNING, listener=self.listener, client=client,
                  reason=reason, limit=limit)
        return False

    def release(self, client: str) -> None:
        self.open -= 1
        self.budget.taken -= 1
        key = client_key(client)
        self._per_client[key] -= 1
        if not self._per_client[key]:
            del self._per_client[key]
        self.metrics.open.labels(self.listener).dec()

    def _over(self, client: str) -> tuple[str | None, int]:
        if self.budget.taken >= self.budget.limit:
            return "descriptors", self.budget.limit
        if self.open >= self.max_connections:
            return "listener", self.max_connections
        if self._per_client[client_key(client)] >= self.max_per_client:
            return "client", self.max_per_client
        return None, 0


class GuardedHandler(web.RequestHandler):
    """aiohttp's handler of one connection, admitted by a gate and closed when a request's head is late.

    The head timer runs from the connection's start, and on a kept-alive
    connection from the first byte of the next request, until the request
    reaches the application (`mark_requests`). An idle kept-alive connection
    is left to aiohttp's keep-alive timeout; partial data does not reset that.
    """

    def __init__(self, gate: Gate, manager: web.Server, **options: Any) -> None:
        super().__init__(manager, **options)
        self._gate = gate
        self._client: str | None = None  # set once admitted
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else ""
        if not self._gate.admit(client):
            transport.write(REFUSAL)  # type: ignore[attr-defined]
            transport.close()
            return  # aiohttp never sees this connection
        self._client = client
        super().connection_made(transport)
        self._expect_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._client is None:
            return
        self._gate.release(self._client)
        self._client = None
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._client is None:
            return
        if data and self._head_timer is None and not self._in_request:
            self._expect_head()
        super().data_received(data)

    def request_started(self) -> None:
        self._stop_head_timer()
        self._in_request = True

    def request_ended(self) -> None:
        self._in_request = False

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # A request head aiohttp could not parse. Its error quotes the bad
        # line, so it is neither logged nor sent back; the access log has the status.
        status = int(_status_for(exc, line_limit=self.max_line_size))
        response = web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}\n")
        response.force_close()
        return response

    def _expect_head(self) -> None:
        if self._gate.header_timeout > 0:
            self._head_timer = asyncio.get_running_loop().call_later(self._gate.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        self.force_close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def _status_for(exc: HttpProcessingError, *, line_limit: int) -> int:
    if isinstance(exc, LineTooLong):
        return HTTPStatus.REQUEST_URI_TOO_LONG if exc.args[1] == line_limit \
            else HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    if "Too many headers" in exc.message:  # aiohttp's words; it has no exception type of its own
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    return HTTPStatus.BAD_REQUEST


@web.middleware
async def mark_requests(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Tells the connection's GuardedHandler that a request's head has arrived, and when it is answered."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedHandler):
        return await handler(request)
    protocol.request_started()
    try:
        return await handler(request)
    finally:
        protocol.request_ended()
