"""Composition root: builds the stages from the settings and runs them in one event loop.

Start-up order matters for safety: take the store's exclusive lock, migrate,
turn jobs left in `sending` by a crash into `unknown`, and only then start
the runners (forwarder, notifier, IMAP reader, feed poller) and open the
listeners. Stopping runs the other way: listeners first, then the runners
(sends in flight may finish), then the store writer.

As one of several worker processes (gateway/ops/workers.py) it is given its
listening sockets and the store ready by the supervisor, shares the store's
writes with the other workers, claims jobs in its own name, beats its heart
into the store, and starts the singletons only once it holds their lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gateway import store
from gateway.ops import maintenance
from gateway.ops.accept import OneAtATime
from gateway.config import SANDBOX_FEED_ACCOUNT, Settings
from gateway.errors import ConfigError, StoreError
from gateway.outbound.forward import Forwarder
from gateway.http.guard import DescriptorBudget, raise_descriptor_limit
from gateway.outbound.intake import Intake
from gateway.outbound.smtpserver import Role, smtp_factory
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.health import health_report
from gateway.runner import Runner, Supervisor
from gateway.outbound.notices import Notifier
from gateway.outbound.oauth import TokenKeeper, TokenSource
from gateway.outbound.passwords import PasswordChecker
from gateway.outbound.policy import Policy
from gateway.ops.reload import TLS_KINDS, load_reloadable, renew, server_context
from gateway.ops.workers import Worker
from gateway.rules import RulesInForce
from gateway.sandbox.notifycall import NotifyCaller
from gateway.sandbox.statusmail import StatusMailer, imap_delivery, smtp_delivery
from gateway.status.feedpoll import FeedPoller
from gateway.status.imap import ImapReader, meta_reader
from gateway.status.inbound import StatusMail
from gateway.outbound.upstream import Endpoint, endpoint_for
from gateway.http.server import Web

log = logging.getLogger("faxgw.service")
SHUTDOWN_GRACE = 10.0  # seconds in-flight forwards may take to finish on stop


class Service:
    """The running gateway: listeners, runners, store writer and (in sandbox mode) the sandbox."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = store.utcnow,
                 worker: Worker | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.worker = worker  # one of several worker processes: the supervisor has bound and prepared
        self.name = worker.name if worker else f"{socket.gethostname()}:{os.getpid()}"  # the jobs' claimed_by
        self.rules = RulesInForce.load(settings)  # every stage reads the rules in force through it
        path = settings.store.path
        self.read_store = lambda: store.connect(path, readonly=True)
        self.metrics = Metrics(self.read_store)
        self.status_mail = StatusMail(settings, self.rules, metrics=self.metrics)
        self.lock = store.StoreLock(path)
        self.writer = store.Writer(path, max_size=settings.store.max_size, shared=worker is not None)
        self.servers: list[asyncio.Server | OneAtATime] = []
        self.intake: Intake | None = None  # the fax handler all SMTP listeners share, once listening
        self.status_addresses: list[tuple[str, int]] = []  # listeners taking status mail, as bound
        self.forwarder: Forwarder | None = None
        self.notifier: Notifier | None = None
        self.imap: ImapReader | None = None
        self.web: Web | None = None
        self.feed: FeedPoller | None = None
        self._sandbox_feed: Any = None  # the sandbox's feed server (an aiohttp runner)
        self.sandbox = None
        self.sandbox_server: asyncio.Server | None = None
        self._sandbox_helpers: list[Any] = []  # the sandbox's status mailer and Notify caller
        self.runners = Supervisor(metrics=self.metrics)  # the background loops, in one TaskGroup
        self.tokens: TokenSource | None = None  # the OAuth2 access token, with [upstream] auth = "xoauth2"

    # --- start and stop -----------------------------------------------------------

    async def start(self) -> None:
        if self.worker is None:
            self.lock.acquire()  # a worker's supervisor holds it, and passed it on to the worker
        # Before any listener: HTTP may hold half the descriptors, the rest stay for intake and the store.
        self.nofile, problem = raise_descriptor_limit()
        log_event(log, "fd-limit", level=logging.WARNING if problem else logging.INFO, nofile=self.nofile,
                  http_connections=DescriptorBudget.of(self.nofile).limit, problem=problem)
        try:
            if self.worker is None:
                self.prepare_store()
            self.writer.start()
            self._prepare_reload()
            await self.runners.start()
            endpoint = await self._upstream_endpoint()
            self.notifier = Notifier(self.settings, self.writer, endpoint, clock=self.clock)
            self.forwarder = Forwarder(
                settings=self._upstream_share(), endpoint=endpoint, writer=self.writer,
                rules=self.rules, hostname=self.settings.smtp.hostname, clock=self.clock,
                notify_states=self.status_mail.policy.notify_states, on_notice=self.notifier.wake,
                owner=self.name,
            )
            self.forwarder.metrics = self.metrics
            self.runners.add(self.forwarder)
            await self._listen()
            await self._start_web()
            if self.worker is None:
                await self._start_singletons()
            else:
                self.runners.add(Heartbeat(self))
                self.runners.add(SingletonsWatch(self))
            self._start_sandbox_reporting()
        except BaseException:
            await self.stop()
            raise
        mode = "SANDBOX: faxes go to the built-in GreenFax stand-in, nothing is faxed" \
            if self.settings.sandbox_mode else f"upstream {endpoint.describe()}"
        log_event(log, "started", listen=" ".join(f"{h}:{p}" for h, p in self.smtp_addresses),
                  http=" ".join(f"{h}:{p}" for h, p in self.web.addresses["http"]) if self.web else None,
                  store=str(self.settings.store.path), mode=mode, config=self.settings.source)

    async def stop(self) -> None:
        if self.imap is not None and "imap" in self.runners.runners:
            await self.runners.end("imap", grace=10)  # the reader's thread notices within a second
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        if self.web is not None:
            await self.web.stop()
        if self.forwarder is not None and "forwarder" in self.runners.runners:
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE + 5):
                    await self.forwarder.shutdown(SHUTDOWN_GRACE)
            except TimeoutError:
                log.error("forwarder did not stop in time; jobs it was sending become unknown at the next start")
        await self.runners.close()
        for helper in self._sandbox_helpers:
            await helper.close()
        self._sandbox_helpers.clear()
        if self._sandbox_feed is not None:
            await self._sandbox_feed.cleanup()
            self._sandbox_feed = None
        if self.sandbox_server is not None:
            self.sandbox_server.close()
            self.sandbox_server = None
        if self.tokens is not None:
            await self.tokens.close()
        self.writer.close()
        self.lock.release()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.worker is not None:
            self.worker.watch_parent(loop, stop.set)
        await self.start()
        if self.worker is not None:
            self.worker.started()
        try:
            await stop.wait()
            log_event(log, "stopping")
        finally:
            await self.stop()

    # --- parts ------------------------------------------------------------------------

    def _upstream_share(self) -> Any:
        """The upstream settings of this process's forwarder: the workers share out its concurrency."""
        up = self.settings.upstream
        if self.worker is None:
            return up
        return up.model_copy(update={"concurrency": max(1, up.concurrency // self.worker.workers)})

    async def _start_singletons(self) -> None:
        """What runs once per store: sender notices, retention, the IMAP reader, the feed poller, checkpoints."""
        self.writer.checkpoints()
        self.runners.add(self.notifier)
        self._start_retention()
        self._start_imap()
        await self._start_feed()
        if self.worker is not None:
            log_event(log, "singletons", worker=self.worker.tag, pid=os.getpid(),
                      runners=" ".join(n for n in ("notifier", "retention", "imap", "feed") if n in self.runners.runners))
            self.runners.runners["heartbeat"].wake()  # the others' /healthz learns it now, not in a few seconds

    def prepare_store(self) -> None:
        prepare_store(self.settings, self.clock)

    async def _upstream_endpoint(self) -> Endpoint:
        up = self.settings.upstream
        if not self.settings.sandbox_mode:
            if up.oauth is not None:
                self.tokens = TokenSource(up.oauth, on_request=lambda outcome: self.metrics.oauth_requests.labels(
                    outcome).inc())
                self.runners.add(TokenKeeper(self.tokens, clock=self.clock))  # the first token before the first fax
            return endpoint_for(self.settings, self.tokens)
        from gateway.sandbox import sandbox_handler, start_sandbox

        sb = self.settings.sandbox
        self.sandbox = sandbox_handler(self.settings, self.rules)
        credentials = self.sandbox.credentials
        host, port = sb.listen[0]
        self.sandbox_server = await _bind(lambda: start_sandbox(self.sandbox, host, port), f"{host}:{port}",
                                          "[sandbox] listen")
        port = self.sandbox_server.sockets[0].getsockname()[1]
        return Endpoint(host=host, port=port, tls="none", username=sb.username,
                        password=credentials[1] if credentials else None, helo_name="gateway.localhost")

    async def _listen(self) -> None:
        smtp = self.settings.smtp
        tls_context = self._tls_context()
        loop = asyncio.get_running_loop()
        intake = Intake(
            policy=Policy(self.settings, self.rules), writer=self.writer, sandbox=self.settings.sandbox_mode,
            on_queued=self.forwarder.wake if self.forwarder else (lambda: None),
            passwords=PasswordChecker(smtp.users), status=self.status_mail, clock=self.clock,
        )
        intake.metrics = self.metrics
        self.intake = intake  # one for all listeners
        # SMTP may hold a quarter of the descriptors (HTTP half): the store, IMAP and the upstream keep theirs.
        intake.limits.total_limit = max(16, self.nofile // 4)
        status_listen = self.settings.status.listen
        listeners = [(addr, False, Role(fax=True, status=addr in status_listen)) for addr in smtp.listen]
        listeners += [(addr, True, Role(fax=True, status=addr in status_listen)) for addr in smtp.listen_tls]
        listeners += [(addr, False, Role(fax=False, status=True)) for addr in status_listen
                      if addr not in smtp.listen and addr not in smtp.listen_tls]
        for (host, port), implicit, role in listeners:
            factory = smtp_factory(intake, settings_smtp=smtp, tls_context=tls_context, implicit_tls=implicit,
                                   plaintext_auth=(host, port) in smtp.plaintext_auth, role=role)
            context = tls_context if implicit else None
            if self.worker is not None:  # the supervisor's sockets, shared with the other workers
                servers = [OneAtATime(loop, sock, factory, context, self.worker.sessions, self.worker.index).start()
                           for sock in self.worker.take(host, port)]
            else:
                servers = [await _bind(
                    lambda: loop.create_server(factory, host=host, port=port, reuse_address=True, ssl=context),
                    f"{host}:{port}",
                    "[smtp] listen_tls" if implicit else "[smtp] listen" if role.fax else "[status] listen",
                )]
            self.servers += servers
            if role.status:
                self.status_addresses += [server.sockets[0].getsockname()[:2] for server in servers]

    async def _start_web(self) -> None:
        self.web = Web(self.settings, writer=self.writer, policy=self.status_mail.policy, metrics=self.metrics,
                       read_store=self.read_store, health=self.health,
                       rules=self.rules, nofile=self.nofile, inherited=self.worker.take if self.worker else None)
        await self.web.start()

    def _start_imap(self) -> None:
        imap = self.settings.status.imap
        if not imap.host:
            return
        self.imap = ImapReader(imap, self.status_mail, self.writer, read_meta=meta_reader(self.read_store),
                               clock=self.clock)
        self.runners.add(self.imap)

    async def _start_feed(self) -> None:
        """The XML feed poller; in sandbox mode against the sandbox's own feed (GreenFax's rules, shorter interval)."""
        settings = self.settings
        sb = settings.sandbox
        if self.sandbox is not None and sb.feed:
            from gateway.sandbox.feedserver import FEED_PATH, start_feed

            host, port = sb.feed_listen
            accountid, password = SANDBOX_FEED_ACCOUNT
            options = {"timezone": settings.greenfax.timezone, "min_interval": sb.feed_min_interval,
                       "accountid": accountid, "password": password}
            try:
                self._sandbox_feed, port = await start_feed(self.sandbox, host, port, **options)
            except OSError as exc:
                # Only the stand-in's own feed: another sandbox may hold the port. Any free one will do.
                log_event(log, "sandbox-feed-port-taken", level=logging.WARNING, listen=f"{host}:{port}",
                          problem=exc.strerror, action="using a free port; `faxgw feed poll` cannot reach it")
                self._sandbox_feed, port = await start_feed(self.sandbox, host, 0, **options)
                settings = settings.model_copy(update={"feed": settings.feed.model_copy(update={"url": None})})
            if not settings.feed.url:  # feed_listen asked for any free port, or had to
                feed = settings.feed.model_copy(update={"url": f"http://{host}:{port}{FEED_PATH}"})
                settings = settings.model_copy(update={"feed": feed})
        if not settings.feed.url:
            return
        self.feed = FeedPoller(settings, self.writer, self.status_mail.policy, clock=self.clock)
        self.feed.metrics = self.metrics
        self.runners.add(self.feed)

    def _start_sandbox_reporting(self) -> None:
        """The sandbox reports each fax as GreenFax does: a status email and an HTTP Notify call."""
        sb = self.settings.sandbox
        if self.sandbox is None:
            return
        deliver = None
        if sb.status_mail == "imap":
            deliver = imap_delivery(self.settings.status.imap)
        elif sb.status_mail == "smtp" and self.status_addresses:
            deliver = smtp_delivery(*self.status_addresses[0])
        elif sb.status_mail == "smtp":
            log.warning("the sandbox cannot return status mail: no [status] listen address")
        if deliver is not None:
            # After the Notify call, as GreenFax's mail comes after its call: the order the README gives.
            mailer = StatusMailer(self.settings.upstream.account_sender or "", deliver, delay=2 * sb.status_delay)
            self.sandbox.on_fax.append(mailer)
            self._sandbox_helpers.append(mailer)
        tokens = self.settings.notify.tokens
        if sb.notify and tokens and self.web is not None:
            host, port = (self.web.addresses["notify"] or self.web.addresses["http"])[0]
            caller = NotifyCaller(f"http://{host}:{port}/greenfax/notify/{tokens[0]}", delay=sb.status_delay)
            self.sandbox.on_fax.append(caller)
            self._sandbox_helpers.append(caller)

    def _tls_context(self) -> ssl.SSLContext | None:
        smtp = self.settings.smtp
        if not smtp.tls_cert:
            return None
        context = server_context("smtp", smtp.tls_cert, smtp.tls_key)
        self.tls_contexts["smtp"].append(context)  # SIGHUP loads a renewed certificate into it
        return context

    # --- retention, reload (gateway/ops/maintenance.py, gateway/ops/reload.py) ----------------------------

    def _start_retention(self) -> None:
        if self.settings.retention.enabled:
            retention = maintenance.Retention(self.settings.retention, self.writer, clock=self.clock)
            self.runners.add(retention)

    def _prepare_reload(self) -> None:
        """What SIGHUP reaches besides the rules (self.rules): the listeners' TLS contexts."""
        self.tls_contexts: dict[str, list[ssl.SSLContext]] = {kind: [] for kind in TLS_KINDS}

    def reload(self) -> None:
        """SIGHUP: renewed certificates and changed rules; if any is broken, none is taken and the old stay."""
        if not self.servers:
            log_event(log, "reload-ignored", level=logging.WARNING, reason="the gateway is starting or stopping")
            return
        contexts = {"smtp": self.tls_contexts["smtp"], "http": self.web.tls_contexts if self.web else []}
        try:
            new = load_reloadable(self.settings, with_tls={kind for kind in TLS_KINDS if contexts[kind]})
            for kind, (cert, key) in new.certificates.items():
                renew(contexts[kind], kind, cert, key)
        except ConfigError as exc:
            log_event(log, "reload-refused", level=logging.ERROR, error=str(exc),
                      action="the rules and certificates in force stay; fix it and send SIGHUP again")
            return
        self.rules.replace(new.addressing, new.mail_rules)
        log_event(log, "reloaded", tls=" ".join(new.certificates) or "none",
                  status_rules=len(new.mail_rules.rules),
                  restart_needed=" ".join(new.restart_needed) or None)

    # --- health -----------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """What /healthz reports (gateway/health.py)."""
        return await health_report(self)

    @property
    def smtp_addresses(self) -> list[tuple[str, int]]:
        """The addresses the intake really listens on (port 0 in the settings resolved)."""
        return [server.sockets[0].getsockname()[:2] for server in self.servers]


def prepare_store(settings: Settings, clock: Callable[[], datetime] = store.utcnow) -> None:
    """Before anything listens (one process, or the supervisor of the workers): back up before a migration,
    migrate, hold the jobs of a restored backup, and turn jobs left `sending` by a crash into `unknown`."""
    conn = store.connect(settings.store.path)
    try:
        copy = maintenance.backup_before_migrate(conn, settings.store.path, clock=clock)
        if copy is not None:
            log_event(log, "store-backup", reason=f"before migrating to schema v{store.SCHEMA_VERSION}",
                      path=str(copy))
        store.migrate(conn)
        restored = maintenance.hold_if_restored(conn, clock=clock)
        if restored is not None:
            taken_at, held = restored
            log_event(log, "restored-backup", level=logging.WARNING, taken_at=taken_at,
                      held=" ".join(code for code, _state in held) or "none",
                      action="these may have been sent after the backup: check with GreenFax, then"
                             " `faxgw release CODE` or `faxgw cancel CODE`")
        with store.immediate(conn):
            interrupted = store.recover_sending(conn, store.iso(clock()))
            store.set_meta(conn, "mode", "sandbox" if settings.sandbox_mode else "production")
    finally:
        conn.close()
    if interrupted:
        log_event(log, "interrupted-jobs", level=logging.WARNING, codes=" ".join(interrupted),
                  state="unknown", action="check with GreenFax, then `faxgw retry CODE` or `faxgw cancel CODE`")


class Heartbeat(Runner):
    """A worker's row in the store every few seconds: that it lives, and its health for the others' /healthz."""

    name = "heartbeat"
    expected = (StoreError,)

    def __init__(self, service: Service) -> None:
        super().__init__(clock=service.clock)
        self.service = service
        self.started_at = store.iso(service.clock())

    async def step(self) -> float:
        from gateway.health import local_report

        failing: list[str] = []
        health = {**local_report(self.service, failing), "failing": failing,
                  "singletons": self.service.worker is not None and self.service.worker.singletons_fd is not None}
        await self.service.writer.run(store.beat, self.service.name, os.getpid(), self.started_at,
                                      store.iso(self.clock()), health)
        return store.HEARTBEAT


class SingletonsWatch(Runner):
    """A worker's wait for the singletons' lock: taken at start by one worker, by another when its holder dies."""

    name = "singletons"
    interval = 1.0  # how soon a worker takes over from one that died

    def __init__(self, service: Service) -> None:
        super().__init__(clock=service.clock)
        self.service = service

    async def step(self) -> float | None:
        worker = self.service.worker
        assert worker is not None
        if worker.singletons_fd is not None:
            return None  # held until the process ends: nothing more to do
        if not worker.try_singletons(self.service.settings.store.path):
            return self.interval
        await self.service._start_singletons()
        return None


async def _bind(start: Callable, where: str, key: str) -> asyncio.Server:
    try:
        return await start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}; set {key} to a free address") from None
