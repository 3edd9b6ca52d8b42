"""The sandbox: a stand-in for GreenFax's email-to-fax endpoint, on loopback.

It takes `<number>@greenfax.com` mail only from the account's registered
sender (the From header, as GreenFax checks it), "sends" the fax and
decides its outcome from the number's last four digits (OUTCOMES). Test
faults are chosen by number as well (FAULTS), or switched on for every
message through `Faults`. Status reports (email, HTTP Notify, XML feed)
come from the received faxes; this module is the SMTP half.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import itertools
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from gateway.config import DEFAULT_SANDBOX_SENDER, Settings
from gateway.outbound.documents import count_pages
from gateway.rules import RulesInForce
from gateway.outbound.smtpserver import NullSenderSMTP
from gateway.logs import log_event
from gateway.models import NULL_SENDER

log = logging.getLogger("faxgw.sandbox")

# Outcome by the number's last four digits; everything else is delivered.
OUTCOMES = {
    "0000": ("failed", "busy"),
    "0001": ("failed", "no_answer"),
    "0002": ("failed", "invalid_number"),
    "0003": ("failed", "refused_by_service"),
}
# SMTP faults by the number's last four digits, for tests of the forwarder.
FAULTS = {
    "0450": ("rcpt", "450 4.2.1 Fax line temporarily unavailable (sandbox)"),
    "0550": ("rcpt", "550 5.1.1 No such fax number (sandbox)"),
    "0451": ("data", "451 4.3.0 Temporary failure, try later (sandbox)"),
    "0554": ("data", "554 5.6.0 Message refused (sandbox)"),
    "0999": ("drop", ""),
}


@dataclass
class Faults:
    """Faults applied to every session, switched on by tests or `faxgw sandbox --fail-*`."""

    auth: str | None = None  # e.g. "535 5.7.8 Authentication credentials invalid"
    mail: str | None = None
    rcpt: str | None = None
    data: str | None = None
    drop_after_data: bool = False
    delay: float = 0.0  # seconds before answering the data: a slow upstream


@dataclass
class SandboxFax:
    """A fax the sandbox received, with the outcome it decided."""

    reference_id: int
    number: str  # digits with country code, as in the address
    code: str | None  # the gateway's job code, read where the rules place it
    sender: str
    envelope_sender: str
    raw: bytes
    result: str  # "delivered" or "failed"
    reason: str | None
    pages: int
    received_at: datetime


class SandboxHandler:
    def __init__(self, *, domain: str, account_sender: str, rules: RulesInForce,
                 credentials: tuple[str, str] | None) -> None:
        self.domain = domain.lower()
        self.account_sender = account_sender.lower()
        self.rules = rules  # where the gateway puts the job code: the stand-in reads it back from there
        self.credentials = credentials
        self.faults = Faults()
        self.faxes: list[SandboxFax] = []
        self.notices: list[tuple[tuple[str, ...], bytes]] = []  # mail from <> to people: (recipients, raw)
        self.on_fax: list[Callable[[SandboxFax], None]] = []  # e.g. the status mailer
        self.arrived = asyncio.Condition()
        self._ids = itertools.count(8_591_334)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if self.credentials and not session.authenticated:
            return "530 5.7.0 Authentication required (sandbox)"
        if self.faults.mail:
            return self.faults.mail
        envelope.mail_from = address or NULL_SENDER
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if envelope.mail_from == NULL_SENDER:
            # A notice to a person (null sender): the sandbox stands in for their mailbox too.
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK (sandbox keeps notices to people)"
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain or not re.fullmatch(r"[0-9]{7,15}", local):
            return f"550 5.1.1 <{address}>: the sandbox accepts only <number>@{self.domain}"
        fault = FAULTS.get(local[-4:])
        if self.faults.rcpt:
            return self.faults.rcpt
        if fault and fault[0] == "rcpt":
            return fault[1]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        if envelope.mail_from == NULL_SENDER:
            self.notices.append((tuple(envelope.rcpt_tos), raw))
            async with self.arrived:
                self.arrived.notify_all()
            return "250 2.0.0 Ok: notice kept (SANDBOX)"
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        sender = email.utils.parseaddr(str(message.get("From", "")))[1].lower()
        numbers = [address.rpartition("@")[0] for address in envelope.rcpt_tos]
        faults = {FAULTS[n[-4:]][0]: FAULTS[n[-4:]][1] for n in numbers if n[-4:] in FAULTS}
        if self.faults.drop_after_data or "drop" in faults:
            assert server.transport is not None
            server.transport.abort()
            return "421 4.4.2 Connection dropped (sandbox)"
        if self.faults.data:
            return self.faults.data
        if "data" in faults:
            return faults["data"]
        if sender != self.account_sender:
            return (f"550 5.7.1 Sender <{sender}> is not registered on this GreenFax account"
                    f" (sandbox expects <{self.account_sender}>)")
        code = self._job_code(message)
        pages = count_pages(message)
        references = []
        for number in numbers:
            result, reason = OUTCOMES.get(number[-4:], ("delivered", None))
            fax = SandboxFax(
                reference_id=next(self._ids), number=number, code=code, sender=sender,
                envelope_sender=envelope.mail_from, raw=raw, result=result, reason=reason,
                pages=pages if result == "delivered" else 0, received_at=datetime.now(UTC),
            )
            self.faxes.append(fax)
            for listener in self.on_fax:
                listener(fax)
            references.append(str(fax.reference_id))
            log_event(log, "sandbox-fax", code=code, number=number, result=result, reason=reason,
                      pages=fax.pages, reference=fax.reference_id)
        async with self.arrived:
            self.arrived.notify_all()
        return f"250 2.0.0 Ok: queued as {' '.join(references)} (SANDBOX)"

    def _job_code(self, message: email.message.Message) -> str | None:
        header = self.rules.code_header
        if header and message.get(header):
            return str(message.get(header)).strip()
        match = self.rules.tag_pattern.search(str(message.get("Subject", "")))
        return match[1] if match else None

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: object) -> AuthResult:
        if self.faults.auth:
            return AuthResult(success=False, handled=False, message=self.faults.auth)
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.credentials is not None
            and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False)

    async def wait_for(self, count: int, timeout: float = 10) -> list[SandboxFax]:
        """Wait until at least `count` faxes arrived (for tests and the benchmark)."""
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.faxes) >= count), timeout)
        return self.faxes


class SandboxSMTP(NullSenderSMTP):
    # GreenFax's own limit is not documented; the sandbox accepts long lines
    # as the gateway does (README, "Long lines"), so it never hides a fault.
    line_length_limit = 64 * 1024

    async def handle_exception(self, error: Exception) -> str:
        log.warning("sandbox session error: %s", error)
        return "500 5.0.0 Sandbox error"


def sandbox_handler(settings: Settings, rules: RulesInForce) -> SandboxHandler:
    """The stand-in as the settings describe it (service and `faxgw sandbox`): domain, account sender, credentials."""
    sb = settings.sandbox
    return SandboxHandler(
        domain=settings.upstream.domain,
        account_sender=settings.upstream.account_sender or DEFAULT_SANDBOX_SENDER,
        rules=rules,
        credentials=(sb.username, sb.password.get_secret_value()) if sb.username and sb.password else None,
    )


async def start_sandbox(handler: SandboxHandler, host: str, port: int, *, tls_context: ssl.SSLContext | None = None,
                        eightbitmime: bool = True, smtputf8: bool = True) -> asyncio.Server:
    """Listen on host:port (0 = any free port) and return the server.

    `tls_context` offers STARTTLS; `eightbitmime`/`smtputf8` = False make it
    an upstream that lacks those extensions.
    """
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SandboxSMTP(handler, hostname="sandbox.greenfax.localhost", ident="GreenFax sandbox",
                           enable_SMTPUTF8=smtputf8, decode_data=not eightbitmime, tls_context=tls_context,
                           auth_require_tls=False, authenticator=handler.authenticate, data_size_limit=64 * 2**20)

    return await loop.create_server(factory, host=host, port=port, reuse_address=True)
