"""Composition root: builds the stages from the settings and runs them in one event loop.

Start-up order matters for safety: take the store's exclusive lock, migrate,
turn jobs left in `sending` by a crash into `unknown`, and only then start
the forwarder and open the listeners.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from datetime import datetime

from gateway import store
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.forward import Forwarder
from gateway.intake import Intake, Role, smtp_factory
from gateway.notices import Notifier
from gateway.logs import log_event
from gateway.passwords import PasswordChecker
from gateway.policy import Policy
from gateway.rules import load_addressing
from gateway.sandbox.statusmail import StatusMailer, imap_delivery, smtp_delivery
from gateway.status.imap import ImapReader, meta_reader
from gateway.status.inbound import StatusMail
from gateway.status.mailrules import load_rules
from gateway.upstream import Endpoint

log = logging.getLogger("faxgw.service")
SHUTDOWN_GRACE = 10.0  # seconds in-flight forwards may take to finish on stop


class Service:
    """The running gateway: intake listeners, forwarder, store writer and (in sandbox mode) the sandbox."""

    def __init__(self, settings: Settings, *, clock: Callable[[], datetime] = store.utcnow) -> None:
        self.settings = settings
        self.clock = clock
        self.rules = load_addressing(settings.addressing)
        self.status_mail = StatusMail(settings, load_rules(settings.status.rule_files))
        self.status_addresses: list[tuple[str, int]] = []  # listeners taking status mail, as bound
        self._status_mailer: StatusMailer | None = None
        self.imap: ImapReader | None = None
        self.notifier: Notifier | None = None
        self._notifier_task: asyncio.Task[None] | None = None
        self._imap_task: asyncio.Task[None] | None = None
        self.lock = store.StoreLock(settings.store.path)
        self.writer = store.Writer(settings.store.path)
        self.servers: list[asyncio.Server] = []
        self.sandbox = None
        self.sandbox_server: asyncio.Server | None = None
        self.forwarder: Forwarder | None = None
        self._forward_task: asyncio.Task[None] | None = None

    # --- start and stop -----------------------------------------------------------

    async def start(self) -> None:
        self.lock.acquire()
        try:
            self._prepare_store()
            self.writer.start()
            endpoint = await self._upstream_endpoint()
            self.notifier = Notifier(self.settings, self.writer, endpoint, clock=self.clock)
            self._notifier_task = asyncio.create_task(self.notifier.run(), name="notifier")
            self.forwarder = Forwarder(
                settings=self.settings.upstream, endpoint=endpoint, writer=self.writer,
                jobcode=self.rules.jobcode, hostname=self.settings.smtp.hostname, clock=self.clock,
                notify_states=self.status_mail.policy.notify_states, on_notice=self.notifier.wake,
            )
            self._forward_task = asyncio.create_task(self.forwarder.run(), name="forwarder")
            await self._listen()
            self._start_sandbox_status_mail()
            self._start_imap()
        except BaseException:
            await self.stop()
            raise
        mode = "SANDBOX: faxes go to the built-in GreenFax stand-in, nothing is faxed" \
            if self.settings.sandbox_mode else f"upstream {endpoint.describe()}"
        log_event(log, "started", listen=" ".join(f"{h}:{p}" for h, p in self.smtp_addresses),
                  store=str(self.settings.store.path), mode=mode, config=self.settings.source)

    async def stop(self) -> None:
        if self.imap is not None and self._imap_task is not None:
            self.imap.stop()  # the reader's thread notices within a second
            await asyncio.wait({self._imap_task}, timeout=10)
            self._imap_task.cancel()
            self._imap_task = None
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        if self._forward_task is not None:
            if self.forwarder is not None:
                try:
                    async with asyncio.timeout(SHUTDOWN_GRACE + 5):
                        await self.forwarder.shutdown(SHUTDOWN_GRACE)
                except TimeoutError:
                    log.error("forwarder did not stop in time; jobs it was sending become unknown at the next start")
            self._forward_task.cancel()
            await asyncio.gather(self._forward_task, return_exceptions=True)
            self._forward_task = None
        if self._notifier_task is not None:
            self._notifier_task.cancel()
            await asyncio.gather(self._notifier_task, return_exceptions=True)
            self._notifier_task = None
        if self._status_mailer is not None:
            await self._status_mailer.close()
        if self.sandbox_server is not None:
            self.sandbox_server.close()
            self.sandbox_server = None
        self.writer.close()
        self.lock.release()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
            log_event(log, "stopping")
        finally:
            await self.stop()

    # --- parts ------------------------------------------------------------------------

    def _prepare_store(self) -> None:
        conn = store.connect(self.settings.store.path)
        try:
            store.migrate(conn)
            conn.execute("BEGIN IMMEDIATE")
            interrupted = store.recover_sending(conn, store.iso(self.clock()))
            store.set_meta(conn, "mode", "sandbox" if self.settings.sandbox_mode else "production")
            conn.execute("COMMIT")
        finally:
            conn.close()
        if interrupted:
            log_event(log, "interrupted-jobs", level=logging.WARNING, codes=" ".join(interrupted),
                      state="unknown", action="check with GreenFax, then `faxgw retry CODE` or `faxgw cancel CODE`")

    async def _upstream_endpoint(self) -> Endpoint:
        up = self.settings.upstream
        if not self.settings.sandbox_mode:
            assert up.host
            return Endpoint(
                host=up.host, port=up.effective_port, tls=up.tls, username=up.username,
                password=up.password.get_secret_value() if up.password else None,
                ca_file=str(up.ca_file) if up.ca_file else None, helo_name=up.helo_name or self.settings.smtp.hostname,
                connect_timeout=up.connect_timeout, timeout=up.timeout,
            )
        from gateway.sandbox import SandboxHandler, start_sandbox

        sb = self.settings.sandbox
        credentials = (sb.username, sb.password.get_secret_value()) if sb.username and sb.password else None
        self.sandbox = SandboxHandler(
            domain=up.domain, account_sender=up.account_sender or "", code_pattern=self.rules.tag_pattern(),
            code_header=self.rules.jobcode.header if self.rules.jobcode.placement == "header" else None,
            credentials=credentials,
        )
        host, port = sb.listen[0]
        self.sandbox_server = await _bind(lambda: start_sandbox(self.sandbox, host, port), f"{host}:{port}")
        port = self.sandbox_server.sockets[0].getsockname()[1]
        return Endpoint(host=host, port=port, tls="none", username=sb.username,
                        password=credentials[1] if credentials else None, helo_name="gateway.localhost")

    def _start_imap(self) -> None:
        imap = self.settings.status.imap
        if not imap.host:
            return
        path = self.settings.store.path
        self.imap = ImapReader(imap, self.status_mail, self.writer,
                               read_meta=meta_reader(lambda: store.connect(path, readonly=True)))
        self._imap_task = asyncio.create_task(self.imap.run(), name="imap")

    def _start_sandbox_status_mail(self) -> None:
        """The sandbox returns each fax's status email, as GreenFax does, to the gateway's status listener."""
        sb = self.settings.sandbox
        if self.sandbox is None or sb.status_mail == "none":
            return
        if sb.status_mail == "imap":
            deliver = imap_delivery(self.settings.status.imap)
        elif self.status_addresses:
            deliver = smtp_delivery(*self.status_addresses[0])
        else:
            log.warning("the sandbox cannot return status mail: no [status] listen address")
            return
        self._status_mailer = StatusMailer(self.settings.upstream.account_sender or "", deliver,
                                           delay=sb.status_delay)
        self.sandbox.on_fax.append(self._status_mailer)

    async def _listen(self) -> None:
        smtp = self.settings.smtp
        tls_context = self._tls_context()
        loop = asyncio.get_running_loop()
        intake = Intake(
            policy=Policy(self.settings, self.rules), writer=self.writer, sandbox=self.settings.sandbox_mode,
            on_queued=self.forwarder.wake if self.forwarder else (lambda: None),
            passwords=PasswordChecker(smtp.users), status=self.status_mail,
        )
        status_listen = self.settings.status.listen
        listeners = [(addr, False, Role(fax=True, status=addr in status_listen)) for addr in smtp.listen]
        listeners += [(addr, True, Role(fax=True, status=addr in status_listen)) for addr in smtp.listen_tls]
        listeners += [(addr, False, Role(fax=False, status=True)) for addr in status_listen
                      if addr not in smtp.listen and addr not in smtp.listen_tls]
        for (host, port), implicit, role in listeners:
            factory = smtp_factory(intake, settings_smtp=smtp, tls_context=tls_context, implicit_tls=implicit,
                                   plaintext_auth=(host, port) in smtp.plaintext_auth, role=role)
            server = await _bind(
                lambda: loop.create_server(factory, host=host, port=port, reuse_address=True,
                                           ssl=tls_context if implicit else None),
                f"{host}:{port}",
            )
            self.servers.append(server)
            if role.status:
                self.status_addresses.append(server.sockets[0].getsockname()[:2])

    def _tls_context(self) -> ssl.SSLContext | None:
        smtp = self.settings.smtp
        if not smtp.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(smtp.tls_cert, smtp.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"smtp.tls_cert/smtp.tls_key: cannot load {smtp.tls_cert}: {exc}") from None
        return context

    @property
    def smtp_addresses(self) -> list[tuple[str, int]]:
        """The addresses the intake really listens on (port 0 in the settings resolved)."""
        return [server.sockets[0].getsockname()[:2] for server in self.servers]


async def _bind(start: Callable, where: str) -> asyncio.Server:
    try:
        return await start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
