"""The gateway's HTTP face (aiohttp): GreenFax's Notify calls, the JSON API, health and metrics.

- `GET /greenfax/notify/<token>`: a Notify call. The token is compared in
  constant time; a wrong or missing token, or a source outside
  `[notify] allowed_networks`, gets 404 and changes nothing. A valid call is
  committed before its 200. Notify may have listeners of its own (it faces
  the internet; the API and metrics need not).
- `GET /api/jobs`, `GET /api/jobs/<code>`: what `faxgw status` and `faxgw
  show` print, as JSON; a bearer token is required when the listener is not
  loopback-only.
- `GET /healthz` (200 or 503 naming the failing part), `GET /metrics`.

Access logs never carry the Notify token or query strings.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import sqlite3
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.config import Settings
from gateway.errors import ConfigError, UnknownJob
from gateway.jobfilter import FilterError, parse_filter
from gateway.logs import log_event
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.reload import server_context
from gateway.status.batches import Batched
from gateway.status.correlate import CorrelationPolicy, apply_report
from gateway.status.notify import MissingParameters, notify_report
from gateway.store import Writer, get_job, iso, list_jobs, utcnow
from gateway.store import reports as reports_db

log = logging.getLogger("faxgw.http")
_TOKEN_IN_PATH = re.compile(r"(/greenfax/notify/)[^/?]*")


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
                 region: str) -> None:
        self.settings = settings
        self.writer = writer
        self.policy = policy
        self.metrics = metrics
        self.read_store = read_store
        self.health = health
        self.region = region
        self.runners: list[web.AppRunner] = []
        self.tls_contexts: list[ssl.SSLContext] = []  # kept so SIGHUP can load a renewed certificate into them
        self.addresses: dict[str, list[tuple[str, int]]] = {"http": [], "notify": []}
        self._reports = Batched(writer, apply_report)  # Notify calls that arrive together share a writer call
        self._tokens = [t.encode() for t in settings.notify.tokens]
        self._networks = settings.notify.allowed_networks
        api_token = settings.http.api_token
        self._api_token = api_token.get_secret_value().encode() if api_token else None

    # --- listeners ------------------------------------------------------------------------------

    async def start(self) -> None:
        http, notify = self.settings.http, self.settings.notify
        own_notify = bool(notify.listen)
        await self._serve("http", self._app(api=True, notify=not own_notify), http.listen)
        if own_notify:
            await self._serve("notify", self._app(api=False, notify=True), notify.listen)

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()

    async def _serve(self, name: str, app: web.Application, listen: list[tuple[str, int]]) -> None:
        runner = web.AppRunner(app, access_log_class=AccessLogger, access_log=log, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        context = self._tls_context()
        for host, port in listen:
            site = web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from None
            server = site._server  # aiohttp exposes the bound port only here
            self.addresses[name].append(server.sockets[0].getsockname()[:2])  # type: ignore[union-attr]

    def _tls_context(self) -> ssl.SSLContext | None:
        http = self.settings.http
        if not http.tls_cert:
            return None
        context = server_context("http", http.tls_cert, http.tls_key)
        self.tls_contexts.append(context)  # SIGHUP loads a renewed certificate into it
        return context

    def _app(self, *, api: bool, notify: bool) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        if notify:
            app.router.add_get("/greenfax/notify/{token}", self.notify)
            app.router.add_get("/greenfax/notify/", self.notify)
        if api:
            app.router.add_get("/api/jobs", self.jobs)
            app.router.add_get("/api/jobs/{code}", self.job)
            app.router.add_get("/healthz", self.healthz)
            app.router.add_get("/metrics", self.prometheus)
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
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address((remote or "").split("%")[0])
        except ValueError:
            return False
        return any(ip in net for net in self._networks if net.version == ip.version)

    # --- API, health, metrics -------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> None:
        if self.settings.http.loopback_only:
            return
        header = request.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").encode() if header.startswith("Bearer ") else b""
        if self._api_token is None or not hmac.compare_digest(given, self._api_token):
            raise web.HTTPUnauthorized(text="a bearer token is required (Authorization: Bearer ...)\n",
                                       headers={"WWW-Authenticate": "Bearer"})

    async def jobs(self, request: web.Request) -> web.Response:
        self._authorised(request)
        query = request.query
        try:
            spec = parse_filter(states=tuple(query.getall("state", [])), number=query.get("number"),
                                sender=query.get("sender"), since=query.get("since"),
                                limit=query.get("limit", "50"), region=self.region)
        except FilterError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        rows = await asyncio.to_thread(self._read, lambda conn: list_jobs(conn, **spec.as_query()))
        return web.json_response(rows)

    async def job(self, request: web.Request) -> web.Response:
        self._authorised(request)
        code = request.match_info["code"]

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            job = get_job(conn, code)
            job["reports"] = reports_db.reports_for_job(conn, code)
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
