"""The gateway's HTTP face (aiohttp): GreenFax's Notify calls, the JSON API, health and metrics.

- `GET /greenfax/notify/<token>`: a Notify call. The token is compared in
  constant time; a wrong or missing token, or a source outside
  `[notify] allowed_networks`, gets 404 and changes nothing. A valid call is
  committed before its 200. Notify may have listeners of its own (it faces
  the internet; the API and metrics need not).
- `GET /api/jobs`, `GET /api/jobs/<code>`: what `faxgw status` and `faxgw
  show` print, as JSON; the bearer token `[http] api_token` is required
  whenever it is set (loopback too), and it must be set beyond loopback.
- `GET /healthz` (200 or 503 naming the failing part), `GET /metrics`.
- With [web] enabled, the web console's pages at `/` (gateway/http/console.py).

Every connection goes through gateway/http/guard.py (caps, head and idle
timeouts, a share of the descriptors). Logs never carry the Notify token or
query strings: the access log masks everything after `/notify/`, and a
request head aiohttp cannot parse is answered without logging it.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import socket
import sqlite3
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.config import Settings, in_networks
from gateway.rules import RulesInForce
from gateway.errors import ConfigError, FilterError, MissingParameters, UnknownJob
from gateway.http.guard import (MAX_HEADER_LINE, MAX_REQUEST_LINE, ConnectionMetrics, DescriptorBudget, Gate,
                               GuardedHandler, mark_requests)
from gateway.jobfilter import parse_filter
from gateway.logs import log_event
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.ops.reload import server_context
from gateway.status.batches import Batched
from gateway.status.correlate import CorrelationPolicy, apply_report
from gateway.status.notify import notify_report
from gateway.store import Writer, get_job, iso, list_jobs, utcnow
from gateway import store

log = logging.getLogger("faxgw.http")
# Everything after "/notify/", however the path is spelt: a token may hold an
# encoded slash, and a misspelt route (/GreenFax/Notify/, //notify/) is still a token.
_TOKEN_IN_PATH = re.compile(r"(/notify/?).*", re.IGNORECASE | re.DOTALL)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path with the Notify token masked, status, time; no query string."""

    @property
    def enabled(self) -> bool:
        """aiohttp asks once per connection; at [log] level warning it then skips the access log altogether."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = _TOKEN_IN_PATH.sub(r"\1********", request.path)
        log_event(self.logger, "http", client=request.remote, method=request.method, path=path,
                  status=response.status, ms=round(time * 1000, 1))


class Web:
    def __init__(self, settings: Settings, *, writer: Writer, policy: CorrelationPolicy, metrics: Metrics,
                 read_store: Callable[[], sqlite3.Connection], health: Callable[[], Awaitable[dict[str, Any]]],
                 rules: RulesInForce, nofile: int,
                 inherited: Callable[[str, int], list[socket.socket]] | None = None) -> None:
        self.settings = settings
        self.inherited = inherited  # a worker process's listening sockets, by address (gateway/ops/workers.py)
        self.writer = writer
        self.policy = policy
        self.metrics = metrics
        self.read_store = read_store
        self.health = health
        self.rules = rules
        self.nofile = nofile  # the process's descriptor limit: HTTP may hold half of it (httpguard.DescriptorBudget)
        self.runners: list[web.AppRunner] = []
        self.console: Any = None  # the web console ([web] enabled), on the http listener
        self.servers: list[asyncio.Server] = []
        self.connections = ConnectionMetrics(metrics.registry)
        self._budget: DescriptorBudget | None = None  # set at start, from the descriptor limit
        self.tls_contexts: list[ssl.SSLContext] = []  # kept so SIGHUP can load a renewed certificate into them
        self.addresses: dict[str, list[tuple[str, int]]] = {"http": [], "notify": []}
        self._reports = Batched(writer, apply_report)  # Notify calls that arrive together share a writer call
        self._tokens = [t.encode() for t in settings.notify.tokens]
        self._networks = settings.notify.allowed_networks
        api_token = settings.http.api_token
        self._api_token = api_token.get_secret_value().encode() if api_token else None

    # --- listeners ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._budget = DescriptorBudget.of(self.nofile)
        http, notify = self.settings.http, self.settings.notify
        own_notify = bool(notify.listen)
        await self._serve("http", self._app(api=True, notify=not own_notify), http.listen)
        if own_notify:
            await self._serve("notify", self._app(api=False, notify=True), notify.listen)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()  # no new connections
        for runner in self.runners:
            await runner.cleanup()  # closes the open ones
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        self.runners.clear()

    async def _serve(self, name: str, app: web.Application, listen: list[tuple[str, int]]) -> None:
        """Listen on each address with a gate of its own; aiohttp's runner holds the app and its connections."""
        http = self.settings.http
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        context = self._tls_context()
        loop = asyncio.get_running_loop()
        assert self._budget is not None
        for host, port in listen:
            gate = Gate(name, max_connections=http.max_connections, max_per_client=http.max_connections_per_client,
                        header_timeout=http.header_timeout, budget=self._budget, metrics=self.connections)
            handler = functools.partial(GuardedHandler, gate, runner.server, loop=loop,
                                        keepalive_timeout=http.idle_timeout, access_log_class=AccessLogger,
                                        access_log=log, max_line_size=MAX_REQUEST_LINE,
                                        max_field_size=MAX_HEADER_LINE)
            # A TLS handshake is part of the head: it gets no longer than the head itself.
            handshake = (http.header_timeout or None) if context else None
            if self.inherited is not None:
                for sock in self.inherited(host, port):
                    server = await loop.create_server(handler, sock=sock, ssl=context, ssl_handshake_timeout=handshake)
                    self.servers.append(server)
                    self.addresses[name].append(server.sockets[0].getsockname()[:2])
                continue
            try:
                server = await loop.create_server(handler, host, port, ssl=context, reuse_address=True, backlog=128,
                                                  ssl_handshake_timeout=handshake)
            except OSError as exc:
                raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}; set [{name}] listen"
                                  " to a free address (with no [http] listen in the config, 127.0.0.1:8025 is"
                                  " the default)" if name == "http" else
                                  f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}; set [{name}]"
                                  " listen to a free address") from None
            self.servers.append(server)
            self.addresses[name].append(server.sockets[0].getsockname()[:2])

    def _tls_context(self) -> ssl.SSLContext | None:
        http = self.settings.http
        if not http.tls_cert:
            return None
        context = server_context("http", http.tls_cert, http.tls_key)
        self.tls_contexts.append(context)  # SIGHUP loads a renewed certificate into it
        return context

    def _app(self, *, api: bool, notify: bool) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[mark_requests])
        if notify:
            # GET only: add_get would add HEAD too, and a HEAD must not apply a report.
            app.router.add_get("/greenfax/notify/{token}", self.notify, allow_head=False)
            app.router.add_get("/greenfax/notify/", self.notify, allow_head=False)
        if api:
            app.router.add_get("/api/jobs", self.jobs)
            app.router.add_get("/api/jobs/{code}", self.job)
            app.router.add_get("/healthz", self.healthz)
            app.router.add_get("/metrics", self.prometheus)
            if self.settings.web.enabled:
                from gateway.http.console import Console

                self.console = Console(self.settings, writer=self.writer, read_store=self.read_store,
                                       rules=self.rules, health=self.health)
                self.console.routes(app)
        return app

    # --- Notify ----------------------------------------------------------------------------------

    async def notify(self, request: web.Request) -> web.Response:
        token = request.match_info.get("token", "").encode()
        valid = False
        for candidate in self._tokens:  # every token is compared, each in constant time
            valid |= hmac.compare_digest(token, candidate)
        if not valid or not self._source_allowed(request.remote):
            raise web.HTTPNotFound()
        try:
            report = notify_report(request.query, trusted=self.settings.notify.trusted)
        except MissingParameters as exc:
            return web.Response(status=400, text=f"{exc}; a Notify call needs result and an identifier\n")
        outcome = await self._reports.run(report, iso(utcnow()), self.policy)
        self.metrics.report("notify", outcome.kind)
        log_event(log, "status-report", channel="notify", client=request.remote, result=report.result,
                  code=outcome.job_code, outcome=outcome.kind, trusted=report.trusted)
        return web.Response(text="OK\n")

    def _source_allowed(self, remote: str | None) -> bool:
        return not self._networks or in_networks(remote or "", self._networks)

    # --- API, health, metrics -------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> None:
        """A token, once set, is always required; without one the API is open on a loopback-only listener."""
        if self._api_token is None and self.settings.http.loopback_only:
            return
        header = request.headers.get("Authorization", "")
        # surrogateescape: a header of bytes that are not UTF-8 is a wrong token, not a server error.
        given = header.removeprefix("Bearer ").encode("utf-8", "surrogateescape") if header.startswith("Bearer ") \
            else b""
        if self._api_token is None or not hmac.compare_digest(given, self._api_token):
            raise web.HTTPUnauthorized(text="a bearer token is required (Authorization: Bearer ...)\n",
                                       headers={"WWW-Authenticate": "Bearer"})

    async def jobs(self, request: web.Request) -> web.Response:
        self._authorised(request)
        query = request.query
        try:
            spec = parse_filter(states=tuple(query.getall("state", [])), number=query.get("number"),
                                sender=query.get("sender"), since=query.get("since"), text=query.get("text"),
                                limit=query.get("limit", "50"), region=self.rules.addressing.numbers.default_region)
        except FilterError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        rows = await asyncio.to_thread(self._read, lambda conn: list_jobs(conn, **spec.as_query()))
        return web.json_response(rows)

    async def job(self, request: web.Request) -> web.Response:
        self._authorised(request)
        code = request.match_info["code"]

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            job = get_job(conn, code)
            job["reports"] = store.reports_for_job(conn, code)
            return job

        try:
            return web.json_response(await asyncio.to_thread(self._read, read))
        except UnknownJob as exc:
            return web.json_response({"error": str(exc)}, status=404)

    async def healthz(self, request: web.Request) -> web.Response:
        report = await self.health()
        return web.json_response(report, status=200 if report["status"] == "ok" else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self.read_store()
        try:
            return fn(conn)
        finally:
            conn.close()
