"""Shared fixtures: real servers on 127.0.0.1 (the gateway, the sandbox), real fax messages.

- `sandbox`: the GreenFax stand-in, in-process on a free port.
- `gateway`: a factory that starts the gateway in-process with settings
  built from keyword overrides, its upstream pointing at the sandbox.
- `fax_message()`: a MIME fax email (text body + real PDF attachment).
- `send()`: submit a message over SMTP with aiosmtplib as a real client.
"""

from __future__ import annotations

import asyncio
import email.policy
import io
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from pypdf import PdfWriter

from gateway import config, store
from gateway.models import FaxNumber, NewMessage, Recipient
from gateway.rules import RulesInForce
from gateway.sandbox import SandboxHandler, start_sandbox
from gateway.service import Service

ACCOUNT_SENDER = "faxes@office.example"
RETURN_PATH = "fax-bounce@gw.office.example"
NUMBER = "12125551234"  # a valid-looking US number (+1 212 555 ...)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pdf_bytes(pages: int = 1, *, marker: str = "") -> bytes:
    """A real PDF with `pages` blank pages; `marker` makes each document different."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=612, height=792)
    if marker:
        writer.add_metadata({"/Title": marker})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def fax_message(
    to: str = f"{NUMBER}@greenfax.com", *, sender: str = "erp@legacy.example", subject: str = "Invoice 4711",
    body: str = "Please find the invoice attached.", pdf: bytes | None = None, filename: str = "invoice.pdf",
    extra_headers: dict[str, str] | None = None, attachment_type: tuple[str, str] = ("application", "pdf"),
    attach: bool = True,
) -> bytes:
    """A fax email as a legacy program sends it, CRLF line endings."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    for name, value in (extra_headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    if attach:
        maintype, subtype = attachment_type
        msg.add_attachment(pdf if pdf is not None else pdf_bytes(), maintype=maintype, subtype=subtype,
                           filename=filename)
    return msg.as_bytes(policy=email.policy.SMTP)


async def send(port: int, message: bytes, *, rcpts: list[str] | None = None, sender: str = "erp@legacy.example",
               **client: Any) -> aiosmtplib.SMTPResponse:
    """Submit one message; returns the reply to the data (raises on refusals)."""
    rcpts = rcpts or [f"{NUMBER}@greenfax.com"]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, **client) as smtp:
        _errors, reply = await smtp.sendmail(sender, rcpts, message)
        return aiosmtplib.SMTPResponse(250, reply)


def new_message(*numbers: str, raw: bytes = b"Subject: x\r\n\r\nx\r\n", mail_from: str = "erp@legacy.example",
                client: str = "127.0.0.1", header_from: str | None = "erp@legacy.example",
                domain: str = "fax.localhost") -> NewMessage:
    """The tests' one job factory: a message as the intake stores it, one job per E.164 number given."""
    return NewMessage(raw=raw, mail_from=mail_from, client=client, helo="h", auth_user=None,
                      header_from=header_from, smtputf8=False, needs_8bitmime=False,  # type: ignore[arg-type]
                      recipients=[Recipient(f"{n.lstrip('+')}@{domain}", FaxNumber(n)) for n in numbers])


def codes_in(reply: str) -> list[str]:
    return re.findall(r"\bFX[0-9A-Z]{6}\b", reply)


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    server = SandboxServer()
    await server.start()
    yield server
    await server.stop()


@dataclass
class SandboxServer:
    """The sandbox in-process; `port` may be chosen before start (to test an upstream that comes back)."""

    port: int = 0
    handler: SandboxHandler | None = None
    server: asyncio.AbstractServer | None = None

    def __post_init__(self) -> None:
        self.handler = SandboxHandler(domain="greenfax.com", account_sender=ACCOUNT_SENDER, rules=RulesInForce(),
                                      credentials=None)

    async def start(self, **options: Any) -> None:
        self.server = await start_sandbox(self.handler, "127.0.0.1", self.port, **options)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    @property
    def faxes(self) -> list:
        return self.handler.faxes

    async def wait_for(self, count: int, timeout: float = 10) -> list:
        return await self.handler.wait_for(count, timeout)


def settings_for(tmp_path: Path, upstream_port: int, **sections: dict[str, Any]) -> config.Settings:
    """Gateway settings for tests: listens on a free port, forwards to 127.0.0.1:upstream_port, fast retries."""
    data: dict[str, Any] = {
        "smtp": {"listen": ["127.0.0.1:0"], "hostname": "gw.test"},
        "http": {"listen": ["127.0.0.1:0"]},
        "store": {"path": str(tmp_path / "store" / "faxgw.sqlite3")},
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "tls": "none", "account_sender": ACCOUNT_SENDER,
                     "return_path": RETURN_PATH, "retry_initial": 0.2, "retry_max": 0.5, "timeout": 5,
                     "connect_timeout": 2},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config.validate(data, source="test", base=tmp_path)


@dataclass
class RunningGateway:
    service: Service
    settings: config.Settings

    @property
    def port(self) -> int:
        return self.service.smtp_addresses[0][1]

    @property
    def store_path(self) -> Path:
        return self.settings.store.path

    async def send(self, message: bytes | None = None, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        return await send(self.port, message or fax_message(), **kwargs)

    def secret(self, code: str) -> str:
        """The job's secret, which nothing the gateway prints shows: read from the store itself."""
        conn = store.connect(self.store_path, readonly=True)
        try:
            return conn.execute("SELECT secret FROM jobs WHERE code = ?", (code,)).fetchone()[0]
        finally:
            conn.close()

    def job(self, code: str) -> dict[str, Any]:
        conn = store.connect(self.store_path, readonly=True)
        try:
            return store.get_job(conn, code)
        finally:
            conn.close()

    async def notify(self, token: str, **params: str) -> int:
        """Call the gateway's HTTP Notify URL as GreenFax does; the HTTP status."""
        import aiohttp

        host, port = self.service.web.addresses["http"][0]
        async with aiohttp.ClientSession() as session, session.get(
                f"http://{host}:{port}/greenfax/notify/{token}", params=params) as response:
            return response.status

    async def wait_state(self, code: str, *states: str, timeout: float = 10) -> dict[str, Any]:
        """Poll the store until the job reaches one of `states`."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(code)
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"{code} stayed {job['state']}, expected {states}: {job['events']}")
            await asyncio.sleep(0.05)


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def gateway(tmp_path: Path, sandbox: SandboxServer) -> AsyncIterator[GatewayFactory]:
    """`await gateway(**sections)` starts a gateway forwarding to the `sandbox` fixture."""
    started: list[Service] = []

    async def start(upstream_port: int | None = None, **sections: dict[str, Any]) -> RunningGateway:
        settings = settings_for(tmp_path, upstream_port or sandbox.port, **sections)
        service = Service(settings)
        await service.start()
        started.append(service)
        return RunningGateway(service, settings)

    yield start
    for service in started:
        await service.stop()
