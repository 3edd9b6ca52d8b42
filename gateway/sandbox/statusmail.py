"""The sandbox's status email: what GreenFax sends the account sender after each fax.

The layout is documented in rules/status/10-sandbox.toml, which reads it.
It is delivered by SMTP (to the gateway's status listener) or appended to
an IMAP mailbox, as the sandbox is configured.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import logging
import ssl
from collections.abc import Awaitable, Callable
from email.message import EmailMessage

import aiosmtplib
from imap_tools import MailBox, MailBoxStartTls, MailBoxUnencrypted

from gateway.config import ImapSettings
from gateway.logs import log_event
from gateway.sandbox.greenfax import SandboxFax

log = logging.getLogger("faxgw.sandbox")
STATUS_SENDER = "status@sandbox.greenfax.localhost"
RESULT_TEXT = {None: "Delivered", "busy": "Busy", "no_answer": "No answer", "invalid_number": "Invalid number",
               "refused_by_service": "Refused"}


def status_email(fax: SandboxFax, account_sender: str) -> bytes:
    outcome = "delivered" if fax.result == "delivered" else f"failed: {RESULT_TEXT[fax.reason].lower()}"
    message = EmailMessage()
    message["From"] = f"GreenFax Status <{STATUS_SENDER}>"
    message["To"] = account_sender
    message["Subject"] = f"Fax to {fax.number} {outcome}" + (f" [{fax.code}]" if fax.code else "")
    message["Date"] = email.utils.format_datetime(fax.received_at)
    message["Message-ID"] = email.utils.make_msgid(f"status.{fax.reference_id}", "sandbox.greenfax.localhost")
    message.set_content(
        "GreenFax fax status report\n\n"
        f"Fax number:    {fax.number}\n"
        f"Result:        {RESULT_TEXT[fax.reason]}\n"
        f"Pages:         {fax.pages}\n"
        f"Duration:      {fax.pages * 26} seconds\n"
        f"Cost:          {fax.pages * 0.10:.2f} USD\n"
        f"Reference ID:  {fax.reference_id}\n"
        f"Job code:      {fax.code or '-'}\n"
        f"Completed:     {fax.received_at.strftime('%Y-%m-%d %H:%M:%S')} UTC\n"
    )
    return message.as_bytes(policy=email.policy.SMTP)


def smtp_delivery(host: str, port: int) -> Callable[[str, bytes], Awaitable[None]]:
    """Deliver status mail over SMTP, as GreenFax's servers would to the account sender's MX."""

    async def deliver(recipient: str, message: bytes) -> None:
        await aiosmtplib.send(message, sender=STATUS_SENDER, recipients=[recipient], hostname=host, port=port,
                              start_tls=False, timeout=30)

    return deliver


def imap_delivery(settings: ImapSettings) -> Callable[[str, bytes], Awaitable[None]]:
    """Append status mail to the [status.imap] mailbox, as if GreenFax's mail had been delivered there."""

    def append(message: bytes) -> None:
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        box = {"implicit": lambda: MailBox(settings.host, settings.effective_port, ssl_context=context),
               "starttls": lambda: MailBoxStartTls(settings.host, settings.effective_port, ssl_context=context),
               "none": lambda: MailBoxUnencrypted(settings.host, settings.effective_port)}[settings.tls]()
        password = settings.password.get_secret_value() if settings.password else ""
        with box.login(settings.username or "", password, initial_folder=None) as mailbox:
            mailbox.append(message, settings.mailbox)

    async def deliver(recipient: str, message: bytes) -> None:
        await asyncio.to_thread(append, message)

    return deliver


class StatusMailer:
    """Sends each fax's status email after a short delay, retrying a few times like a real MTA."""

    def __init__(self, account_sender: str, deliver: Callable[[str, bytes], Awaitable[None]], *,
                 delay: float = 0.2, attempts: int = 5) -> None:
        self.account_sender = account_sender
        self.deliver = deliver
        self.delay = delay
        self.attempts = attempts
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0

    def __call__(self, fax: SandboxFax) -> None:
        task = asyncio.get_running_loop().create_task(self._send(fax))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, fax: SandboxFax) -> None:
        message = status_email(fax, self.account_sender)
        for attempt in range(self.attempts):
            await asyncio.sleep(self.delay * (4 ** attempt))
            try:
                await self.deliver(self.account_sender, message)
                self.sent += 1
                return
            except Exception as exc:
                log_event(log, "sandbox-status-mail", level=logging.WARNING, code=fax.code,
                          attempt=attempt + 1, problem=str(exc) or type(exc).__name__)
        log_event(log, "sandbox-status-mail", level=logging.ERROR, code=fax.code, result="given up")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
