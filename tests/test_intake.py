"""Intake over real SMTP (issue 2, section 3): every reply, exactly, and the DATA reader byte for byte.

The gateway runs in-process on 127.0.0.1 (the `gateway` fixture) and
forwards to the in-process sandbox. Most tests speak SMTP through `Client`,
a small client on a raw socket, so that every byte on the wire is the
test's choice: bare LF, commands pipelined behind the end of data, address
forms that aiosmtpd would clean. The AUTH-over-STARTTLS case uses
aiosmtplib, a real client. After a refusal a test sends a good fax on the
same session: the gateway keeps serving, and no refusal is ever a 250.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.policy
import io
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
import trustme
from conftest import NUMBER, RunningGateway, codes_in, fax_message, pdf_bytes
from PIL import Image

from gateway import store
from gateway.outbound import mimeparse
from gateway.outbound.passwords import hash_password
from gateway.sandbox.greenfax import SandboxSMTP

SENDER = "erp@legacy.example"
FAX = f"{NUMBER}@greenfax.com"
OTHER_FAX = "13125550123@greenfax.com"  # a second valid number, +1 312 555 0123
USER = "scanner"
PASSWORD = "correct horse battery staple"
OUTSIDE = {"allowed_networks": ["10.0.0.0/8"]}  # loopback is not an allowed network


# --- a raw SMTP client ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One SMTP reply as read off the wire: basic code, enhanced code, text of all lines."""

    code: int
    enhanced: str
    text: str
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return " | ".join(self.lines)

    @property
    def keywords(self) -> list[str]:
        """The EHLO keywords (every line but the greeting)."""
        return [line[4:] for line in self.lines[1:]]


_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3}) ")


class Client:
    """A minimal SMTP client that sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ehlo: Answer | None = None

    @classmethod
    async def connect(cls, port: int, *, tls: ssl.SSLContext | None = None, ehlo: bool = True) -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None)
        client = cls(reader, writer)
        assert (await client.reply()).code == 220
        if ehlo:
            client.ehlo = await client.command("EHLO client.test")
            assert client.ehlo.code == 250, client.ehlo
        return client

    async def reply(self) -> Answer:
        lines: list[str] = []
        while not lines or lines[-1][3:4] == "-":
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line:
                raise ConnectionError(f"connection closed after {lines}")
            lines.append(line.decode("utf-8").rstrip("\r\n"))
        first = lines[0][4:]
        match = _ENHANCED.match(first)
        texts = [first[match.end():] if match else first] + [line[4:] for line in lines[1:]]
        return Answer(int(lines[0][:3]), match[1] if match else "", "\n".join(texts), tuple(lines))

    async def replies(self, count: int) -> list[Answer]:
        return [await self.reply() for _ in range(count)]

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> Answer:
        await self.write(line.encode() + b"\r\n")
        return await self.reply()

    async def data(self, message: bytes) -> Answer:
        """DATA, then the message as `on_the_wire` sends it; the reply to the data."""
        go = await self.command("DATA")
        assert go.code == 354, go
        await self.write(on_the_wire(message))
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert (await self.command("STARTTLS")).code == 220
        await self.writer.start_tls(context, server_hostname="localhost")
        self.ehlo = await self.command("EHLO client.test")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


def on_the_wire(message: bytes) -> bytes:
    """DATA as a client sends it: leading dots doubled, then the CRLF.CRLF end (RFC 5321 4.5.2)."""
    if not message:
        return b".\r\n"
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    return stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def gateway(gateway, sandbox):
    """conftest's `gateway`; at the end of a test it waits until every accepted fax has been forwarded.

    An accepted fax that never left the gateway fails the test that
    accepted it, and no test stops the gateway with a fax in hand.
    """
    started: list[RunningGateway] = []

    async def start(upstream_port: int | None = None, **sections: dict) -> RunningGateway:
        running = await gateway(upstream_port, **sections)
        started.append(running)
        return running

    yield start
    for running in started:
        await forwarded_all(running)


async def forwarded_all(running: RunningGateway, timeout: float = 10) -> None:
    """Wait until the store has no job waiting to be forwarded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        conn = store.connect(running.store_path, readonly=True)
        try:
            waiting = store.waiting_jobs(conn)
        finally:
            conn.close()
        if not waiting:
            return
        assert asyncio.get_running_loop().time() < deadline, f"accepted but not forwarded: {waiting}"
        await asyncio.sleep(0.05)


Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """`await connect(port)`: a `Client` after its EHLO, closed at the end of the test."""
    clients: list[Client] = []

    async def open_client(port: int, **options: object) -> Client:
        client = await Client.connect(port, **options)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


class LongLineSandbox(SandboxSMTP):
    """The sandbox taking lines as long as the gateway does (aiosmtpd stops at 1,000 octets by default)."""

    line_length_limit = 65536 + 2


@pytest.fixture
async def long_line_upstream(sandbox) -> AsyncIterator[int]:
    """The port of an upstream that takes long lines; what it receives lands in `sandbox.faxes`."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: LongLineSandbox(sandbox.handler, hostname="sandbox.test", auth_require_tls=False),
        "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


# --- replies and transactions -----------------------------------------------------------


def assert_reply(answer: Answer, code: int, enhanced: str | None = None, *named: str) -> None:
    assert answer.code == code, f"expected {code} {enhanced or ''}, got {answer}"
    if enhanced is not None:
        assert answer.enhanced == enhanced, f"expected {code} {enhanced}, got {answer}"
    for word in named:
        assert word.lower() in answer.text.lower(), f"{word!r} not named in {answer}"


def assert_refused(answer: Answer, code: int, enhanced: str, *named: str) -> None:
    """A refusal: never a 2xx, the exact codes, and text naming the problem and what it concerns."""
    assert answer.code >= 400, f"expected a refusal, got {answer}"
    assert_reply(answer, code, enhanced, *named)


def queued(answer: Answer, count: int = 1) -> list[str]:
    """The job codes of an accepted message (`250 2.0.0 queued as ...`)."""
    assert_reply(answer, 250, "2.0.0", "queued as")
    codes = codes_in(answer.text)
    assert len(codes) == count, answer
    return codes


async def envelope(client: Client, *, sender: str = SENDER, rcpts: tuple[str, ...] = (FAX,)) -> None:
    """MAIL and RCPT commands that must be accepted."""
    assert_reply(await client.command(f"MAIL FROM:<{sender}>"), 250, "2.1.0")
    for rcpt in rcpts:
        assert_reply(await client.command(f"RCPT TO:<{rcpt}>"), 250, "2.1.5")


async def submit(client: Client, message: bytes | None = None, *, sender: str = SENDER,
                 rcpts: tuple[str, ...] = (FAX,)) -> Answer:
    """A transaction whose envelope must be accepted; returns the reply to the data."""
    await envelope(client, sender=sender, rcpts=rcpts)
    return await client.data(fax_message() if message is None else message)


async def assert_still_serving(client: Client) -> str:
    """After a refusal the same session takes a good fax; returns its job code."""
    assert_reply(await client.command("RSET"), 250)
    (code,) = queued(await submit(client))
    return code


def body(raw: bytes) -> bytes:
    """A message's body bytes, from the blank line after the header on."""
    return mimeparse.split(raw)[1]


# --- messages ------------------------------------------------------------------------------

BODY_MARK = b"@@BODY@@\r\n"


def fax_with_body(text: bytes) -> bytes:
    """A fax email (text part + PDF) whose text part is exactly these bytes, not re-encoded."""
    message = fax_message(body=BODY_MARK.decode().strip())
    assert message.count(BODY_MARK) == 1
    return message.replace(BODY_MARK, text)


def fax_of_size(size: int) -> bytes:
    """A fax email of exactly `size` octets (the padding is one long text line)."""
    padding = size - len(fax_with_body(b"\r\n"))
    assert padding > 0
    message = fax_with_body(b"x" * padding + b"\r\n")
    assert len(message) == size
    return message


def image_bytes(kind: str = "PNG") -> bytes:
    """A small real image file of that format (Pillow's name for it)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(out, kind)
    return out.getvalue()


def html_with_inline_image(*, image: bytes, image_type: tuple[str, str], attach_pdf: bool,
                           extra: tuple[bytes, str, str, str] | None = None) -> bytes:
    """An HTML mail whose body shows an image (multipart/related), as Outlook sends it.

    `extra` = (data, maintype/subtype, file name, Content-ID) adds a part
    after the related body that carries a Content-ID but is not shown by it.
    """
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = FAX
    msg["Subject"] = "Invoice 4711"
    msg.set_content('<p>Invoice attached.</p><img src="cid:logo@legacy.example">', subtype="html")
    msg.add_related(image, *image_type, cid="<logo@legacy.example>", disposition="inline",
                    filename=f"image001.{image_type[1]}")
    if attach_pdf:
        msg.add_attachment(pdf_bytes(), maintype="application", subtype="pdf", filename="invoice.pdf")
    if extra is not None:
        data, content_type, filename, cid = extra
        maintype, subtype = content_type.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename,
                           disposition="inline", cid=cid)
    return msg.as_bytes(policy=email.policy.SMTP)


# --- TLS and AUTH ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A server certificate for the gateway, and a client context that trusts its CA."""

    smtp: dict[str, str]  # the [smtp] keys tls_cert and tls_key
    client: ssl.SSLContext


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "gateway-cert.pem", tmp_path / "gateway-key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Certificates({"tls_cert": str(cert), "tls_key": str(key)}, client)


@pytest.fixture(scope="module")
def users() -> dict[str, str]:
    """[smtp.users] as `faxgw passwd` makes it: argon2 hashes only."""
    return {USER: hash_password(PASSWORD)}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_plain(user: str = USER, password: str = PASSWORD) -> str:
    return f"AUTH PLAIN {b64(chr(0) + user + chr(0) + password)}"


async def auth_login(client: Client, user: str = USER, password: str = PASSWORD) -> Answer:
    assert_reply(await client.command("AUTH LOGIN"), 334)
    assert_reply(await client.command(b64(user)), 334)
    return await client.command(b64(password))


# === EHLO ======================================================================================


async def test_ehlo_advertises_size_8bitmime_pipelining_and_smtputf8(gateway, connect):
    gw = await gateway()
    client = await connect(gw.port)
    keywords = client.ehlo.keywords
    assert "SIZE 20971520" in keywords
    assert {"8BITMIME", "PIPELINING", "SMTPUTF8"} <= set(keywords)
    # Without a certificate there is no STARTTLS, and so no AUTH (it needs TLS).
    assert "STARTTLS" not in keywords
    assert not [k for k in keywords if k.startswith("AUTH")]


async def test_starttls_is_offered_when_a_certificate_is_configured(gateway, connect, certificates, users):
    gw = await gateway(smtp={**certificates.smtp, "users": users})
    client = await connect(gw.port)
    assert "STARTTLS" in client.ehlo.keywords
    assert not [k for k in client.ehlo.keywords if k.startswith("AUTH")]
    await client.starttls(certificates.client)
    keywords = client.ehlo.keywords
    assert "STARTTLS" not in keywords
    assert "AUTH LOGIN PLAIN" in keywords
    assert {"SIZE 20971520", "8BITMIME", "PIPELINING", "SMTPUTF8"} <= set(keywords)
    queued(await submit(client))


async def test_8bitmime_and_smtputf8_mail_is_accepted_and_forwarded(gateway, sandbox, connect):
    gw = await gateway()
    client = await connect(gw.port)
    message = fax_message(sender="jörg@legacy.example", subject="Rechnung für Jörg",
                          body="Grüße aus Köln")
    assert not message.isascii()
    assert_reply(await client.command("MAIL FROM:<jörg@legacy.example> BODY=8BITMIME SMTPUTF8"), 250, "2.1.0")
    assert_reply(await client.command(f"RCPT TO:<{FAX}>"), 250, "2.1.5")
    (code,) = queued(await client.data(message))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code and body(fax.raw) == body(message)


# === SIZE ======================================================================================


async def test_declared_size_over_the_limit_is_refused_at_mail(gateway, connect):
    gw = await gateway()
    client = await connect(gw.port)
    answer = await client.command(f"MAIL FROM:<{SENDER}> SIZE=20971521")
    assert_refused(answer, 552, "5.3.4", "20971521", "20971520")
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}> SIZE=20971520"), 250, "2.1.0")  # exactly the limit
    assert_reply(await client.command(f"RCPT TO:<{FAX}>"), 250, "2.1.5")
    queued(await client.data(fax_message()))


async def test_message_over_the_size_limit_is_refused_after_data(gateway, sandbox, connect):
    gw = await gateway(smtp={"max_message_size": 50000})
    client = await connect(gw.port)
    assert "SIZE 50000" in client.ehlo.keywords
    big = fax_message(pdf=pdf_bytes(marker="x" * 60000))
    assert len(big) > 50000
    assert_refused(await submit(client, big), 552, "5.3.4", "50000")
    code = await assert_still_serving(client)
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code


async def test_size_limit_is_exact(gateway, connect):
    """A message of exactly the limit is accepted, even when its end arrives in pieces; one octet more is not."""
    limit = 50000
    gw = await gateway(smtp={"max_message_size": limit})
    client = await connect(gw.port)
    queued(await submit(client, fax_of_size(limit)))
    assert_refused(await submit(client, fax_of_size(limit + 1)), 552, "5.3.4", str(limit))
    assert_refused(await submit(client, fax_of_size(limit + 2)), 552, "5.3.4", str(limit))
    # The end of data split over two reads: all of the message and ".\r" first, then "\n".
    await envelope(client)
    assert_reply(await client.command("DATA"), 354)
    await client.write(fax_of_size(limit) + b".\r")
    await asyncio.sleep(0.2)
    await client.write(b"\n")
    queued(await client.reply())


# === who may send ================================================================================


async def test_client_outside_the_allowed_networks_is_refused_naming_it(gateway, connect):
    gw = await gateway(smtp=OUTSIDE)
    client = await connect(gw.port)
    answer = await client.command(f"MAIL FROM:<{SENDER}>")
    assert_refused(answer, 550, "5.7.1", "client host 127.0.0.1", "authenticate")
    assert_reply(await client.command(f"RCPT TO:<{FAX}>"), 503)
    # The refusal did not end the session, and it is not passed at the next try either.
    assert_refused(await client.command(f"MAIL FROM:<{SENDER}>"), 550, "5.7.1", "127.0.0.1")


async def test_outside_client_may_send_after_auth_over_starttls(gateway, sandbox, certificates, users):
    gw = await gateway(smtp={**OUTSIDE, **certificates.smtp, "users": users})
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, start_tls=True,
                               tls_context=certificates.client, username=USER, password=PASSWORD) as smtp:
        _refused, reply = await smtp.sendmail(SENDER, [FAX], fax_message())
    (code,) = codes_in(reply)
    assert reply.startswith(f"2.0.0 queued as {code}")
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code and fax.number == NUMBER


async def test_auth_without_tls_is_refused_with_538(gateway, connect, certificates, users):
    gw = await gateway(smtp={**OUTSIDE, **certificates.smtp, "users": users})
    client = await connect(gw.port)
    assert_refused(await client.command(auth_plain()), 538, "5.7.11", "encryption required")
    assert_refused(await client.command("AUTH LOGIN"), 538, "5.7.11", "encryption required")
    assert_refused(await client.command(f"MAIL FROM:<{SENDER}>"), 550, "5.7.1", "127.0.0.1")
    # The same session may still secure itself and log in.
    await client.starttls(certificates.client)
    assert_reply(await client.command(auth_plain()), 235, "2.7.0")
    queued(await submit(client))


async def test_auth_without_tls_works_on_a_plaintext_auth_listener(gateway, sandbox, connect, users):
    gw = await gateway(smtp={**OUTSIDE, "users": users, "plaintext_auth": ["127.0.0.1:0"]})
    client = await connect(gw.port)
    assert "AUTH LOGIN PLAIN" in client.ehlo.keywords
    assert_reply(await auth_login(client), 235, "2.7.0")
    (code,) = queued(await submit(client))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_implicit_tls_listener_offers_and_accepts_auth(gateway, sandbox, connect, certificates, users,
                                                             mechanism):
    gw = await gateway(smtp={**OUTSIDE, **certificates.smtp, "users": users, "listen_tls": ["127.0.0.1:0"]})
    tls_port = gw.service.smtp_addresses[1][1]
    client = await connect(tls_port, tls=certificates.client)
    assert "AUTH LOGIN PLAIN" in client.ehlo.keywords
    assert "STARTTLS" not in client.ehlo.keywords
    assert_refused(await client.command(f"MAIL FROM:<{SENDER}>"), 550, "5.7.1", "127.0.0.1")
    answer = await client.command(auth_plain()) if mechanism == "PLAIN" else await auth_login(client)
    assert_reply(answer, 235, "2.7.0")
    (code,) = queued(await submit(client))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code


async def test_wrong_password_is_refused_with_535(gateway, connect, users):
    gw = await gateway(smtp={**OUTSIDE, "users": users, "plaintext_auth": ["127.0.0.1:0"]})
    client = await connect(gw.port)
    assert_refused(await client.command(auth_plain(password="wrong")), 535, "5.7.8", "credentials invalid")
    assert_refused(await auth_login(client, password="wrong"), 535, "5.7.8", "credentials invalid")
    assert_refused(await client.command(auth_plain(user="nobody")), 535, "5.7.8", "credentials invalid")
    assert_refused(await client.command(f"MAIL FROM:<{SENDER}>"), 550, "5.7.1", "127.0.0.1")
    assert_reply(await client.command(auth_plain()), 235, "2.7.0")
    queued(await submit(client))


async def test_sender_allowlist_refuses_other_senders_naming_them(gateway, connect):
    gw = await gateway(smtp={"allowed_senders": [SENDER, "@office.example"]})
    client = await connect(gw.port)
    answer = await client.command("MAIL FROM:<intruder@elsewhere.example>")
    assert_refused(answer, 550, "5.7.1", "<intruder@elsewhere.example>", "not allowed")
    assert_reply(await client.command(f"RCPT TO:<{FAX}>"), 503)
    queued(await submit(client, sender="Anyone@OFFICE.example"))
    queued(await submit(client))


@pytest.mark.parametrize("command", ["MAIL FROM:<>", "MAIL FROM: <>", "MAIL FROM:<> SIZE=2000"])
async def test_null_sender_is_refused(gateway, connect, command):
    gw = await gateway()
    client = await connect(gw.port)
    assert_refused(await client.command(command), 550, "5.7.1", "null sender <>")
    assert_reply(await client.command(f"RCPT TO:<{FAX}>"), 503)
    await assert_still_serving(client)


async def test_commands_before_ehlo_get_one_reply_each(gateway, connect):
    gw = await gateway()
    client = await connect(gw.port, ehlo=False)
    await client.write(f"MAIL FROM:<{SENDER}>\r\nNOOP\r\n".encode())
    assert_reply(await client.reply(), 503)
    assert_reply(await client.reply(), 250)  # the NOOP's reply, not a second 503
    assert_reply(await client.command("EHLO client.test"), 250)
    queued(await submit(client))


# === which recipients are faxes =====================================================================

REFUSED_RECIPIENTS = [
    # (address, code, enhanced code, what the reply must name)
    ("someone@example.org", 550, "5.7.1", ("relay denied", "<someone@example.org>", "not a fax address")),
    (f"{NUMBER}@example.org", 550, "5.7.1", ("relay denied", f"<{NUMBER}@example.org>")),
    ("1212555abcd@greenfax.com", 553, "5.1.3", ("<1212555abcd@greenfax.com>", "must be a fax number")),
    ("123@greenfax.com", 553, "5.1.3", ("<123@greenfax.com>", "not a valid phone number")),
    ("-12125551234@greenfax.com", 553, "5.1.3", ("<-12125551234@greenfax.com>", "begins with + or a digit")),
    ("1212-555-1234-@greenfax.com", 553, "5.1.3", ("ends with a digit",)),
    ("19005550123@greenfax.com", 550, "5.7.1", ("<19005550123@greenfax.com>", "+19005550123", "premium-rate")),
    ("881612345678@greenfax.com", 550, "5.7.1", ("<881612345678@greenfax.com>", "+881612345678", "satellite")),
    ("442079460000@greenfax.com", 550, "5.7.1", ("<442079460000@greenfax.com>", "+442079460000", "international")),
]


@pytest.mark.parametrize("address, code, enhanced, named", REFUSED_RECIPIENTS,
                         ids=[row[0] for row in REFUSED_RECIPIENTS])
async def test_recipient_is_refused(gateway, sandbox, connect, address, code, enhanced, named):
    gw = await gateway()
    client = await connect(gw.port)
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    assert_refused(await client.command(f"RCPT TO:<{address}>"), code, enhanced, *named)
    # The refused recipient is left out; the good one in the same transaction is faxed.
    assert_reply(await client.command(f"RCPT TO:<{FAX}>"), 250, "2.1.5")
    (code,) = queued(await client.data(fax_message()))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code and fax.number == NUMBER


async def test_international_number_is_accepted_when_allowed(gateway, sandbox, connect):
    gw = await gateway(addressing={"numbers": {"allow_international": True}})
    client = await connect(gw.port)
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    assert_reply(await client.command("RCPT TO:<442079460000@greenfax.com>"), 250, "2.1.5", "+442079460000")
    (code,) = queued(await client.data(fax_message()))
    (fax,) = await sandbox.wait_for(1)
    assert (fax.code, fax.number) == (code, "442079460000")


async def test_local_fax_domain_takes_numbers_in_national_form(gateway, sandbox, connect):
    gw = await gateway()
    client = await connect(gw.port)
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    assert_reply(await client.command("RCPT TO:<2125550123@fax.localhost>"), 250, "2.1.5", "+12125550123")
    assert_reply(await client.command("RCPT TO:<312-555-0123@FAX.localhost>"), 250, "2.1.5", "+13125550123")
    codes = queued(await client.data(fax_message()), count=2)
    faxes = await sandbox.wait_for(2)
    assert sorted((f.code, f.number) for f in faxes) == sorted(zip(codes, ["12125550123", "13125550123"]))


CLEANED_FORMS = [
    # RCPT arguments that aiosmtpd reduces to 12125551234@greenfax.com before the handler sees them.
    ('TO:<"12125551234"@greenfax.com>', '"12125551234"@greenfax.com'),
    ("TO:<@relay.example:12125551234@greenfax.com>", "@relay.example:"),
    ("TO:<(x)12125551234@greenfax.com>", "(x)12125551234"),
    ("TO:<12125551234@greenfax.com(x)>", "greenfax.com(x)"),
    ("TO:<12125551234@greenfax.com >", "<12125551234@greenfax.com >"),
    ('TO:"12125551234"@greenfax.com', '"12125551234"@greenfax.com'),
    ("TO:(x)12125551234@greenfax.com", "(x)12125551234"),
    ("TO:<12125551234@greenfax.com", "<<12125551234@greenfax.com>"),
]


@pytest.mark.parametrize("argument, shown", CLEANED_FORMS, ids=[row[0] for row in CLEANED_FORMS])
async def test_address_forms_aiosmtpd_cleans_are_refused_as_written(gateway, connect, argument, shown):
    gw = await gateway()
    client = await connect(gw.port)
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    answer = await client.command(f"RCPT {argument}")
    assert_refused(answer, 553, "5.1.3", shown, "plain address", "no quotes, comments or routes")
    assert_reply(await client.command("DATA"), 503)  # no recipient was taken
    await assert_still_serving(client)


@pytest.mark.parametrize("argument", [f"TO:<{FAX}>", f"TO: <{FAX}>", f"to:<{FAX.upper()}>", f"TO:{FAX}"])
async def test_plain_address_forms_are_accepted(gateway, connect, argument):
    gw = await gateway()
    client = await connect(gw.port)
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    assert_reply(await client.command(f"RCPT {argument}"), 250, "2.1.5", f"+{NUMBER}")
    queued(await client.data(fax_message()))


SUBJECT_MAILBOX = {"recipients": {"subject_mailbox": "fax@office.example"}}


@pytest.mark.parametrize("subject", [
    "Invoice 4711 Fax: +1 212 555 0123", "FAX NO. 212 555 0123", "fax to 212/555-0123", "Fax#212.555.0123",
])
async def test_subject_mailbox_faxes_to_the_number_in_the_subject(gateway, sandbox, connect, subject):
    gw = await gateway(addressing=SUBJECT_MAILBOX)
    client = await connect(gw.port)
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250, "2.1.0")
    assert_reply(await client.command("RCPT TO:<fax@office.example>"), 250, "2.1.5", "number from the subject")
    (code,) = queued(await client.data(fax_message("fax@office.example", subject=subject)))
    (fax,) = await sandbox.wait_for(1)
    assert (fax.code, fax.number) == (code, "12125550123")
    assert gw.job(code)["number"] == "+12125550123"


@pytest.mark.parametrize("subject, code, enhanced, named", [
    ("Invoice 4711", 550, "5.1.3", ("no fax number found in the subject", "<fax@office.example>")),
    ("Fax to 1-900-555-0123", 550, "5.7.1", ("<fax@office.example>", "+19005550123", "premium-rate")),
])
async def test_subject_mailbox_refuses_a_subject_without_a_good_number(gateway, connect, subject, code, enhanced,
                                                                       named):
    gw = await gateway(addressing=SUBJECT_MAILBOX)
    client = await connect(gw.port)
    answer = await submit(client, fax_message("fax@office.example", subject=subject), rcpts=("fax@office.example",))
    assert_refused(answer, code, enhanced, *named)
    await assert_still_serving(client)


async def test_too_many_recipients_get_452(gateway, sandbox, connect):
    gw = await gateway(smtp={"max_recipients": 2})
    client = await connect(gw.port)
    await envelope(client, rcpts=(FAX, OTHER_FAX))
    answer = await client.command("RCPT TO:<2125550123@fax.localhost>")
    assert_refused(answer, 452, "4.5.3", "too many recipients", "limit 2")
    codes = queued(await client.data(fax_message()), count=2)
    faxes = await sandbox.wait_for(2)
    assert sorted(f.code for f in faxes) == sorted(codes)


# === content =======================================================================================


async def test_text_only_mail_is_refused_as_nothing_to_fax(gateway, connect):
    gw = await gateway()
    client = await connect(gw.port)
    assert_refused(await submit(client, fax_message(attach=False)), 550, "5.7.0", "nothing to fax", "attach")
    await assert_still_serving(client)


@pytest.mark.parametrize("content_type, filename", [
    ("application/zip", "scans.zip"),
    ("application/x-msdownload", "x.exe"),
    ("application/octet-stream", "setup.exe"),
    ("application/octet-stream", "no-extension"),
])
async def test_refused_attachment_type_is_named(gateway, connect, content_type, filename):
    gw = await gateway()
    client = await connect(gw.port)
    message = fax_message(pdf=b"MZ\x90\x00" * 64, filename=filename, attachment_type=tuple(content_type.split("/")))
    answer = await submit(client, message)
    assert_refused(answer, 554, "5.6.3", f"attachment {filename}", content_type, "cannot be faxed")
    await assert_still_serving(client)


async def test_octet_stream_with_a_pdf_name_is_accepted(gateway, sandbox, connect):
    gw = await gateway()
    client = await connect(gw.port)
    message = fax_message(pdf=pdf_bytes(2), filename="Scan 0001.PDF", attachment_type=("application", "octet-stream"))
    (code,) = queued(await submit(client, message))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code and fax.pages == 2


async def test_inline_image_of_an_html_body_is_not_a_document(gateway, sandbox, connect):
    gw = await gateway()
    client = await connect(gw.port)
    # A BMP is not a faxable type: were the logo taken for a document, the fax would be refused.
    logo = image_bytes("BMP")
    with_pdf = html_with_inline_image(image=logo, image_type=("image", "bmp"), attach_pdf=True)
    (code,) = queued(await submit(client, with_pdf))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code and body(fax.raw) == body(with_pdf)
    # The inline image alone is nothing to fax.
    without = html_with_inline_image(image=image_bytes(), image_type=("image", "png"), attach_pdf=False)
    assert_refused(await submit(client, without), 550, "5.7.0", "nothing to fax")


async def test_refused_type_beside_an_html_body_with_inline_images_is_still_refused(gateway, connect):
    gw = await gateway()
    client = await connect(gw.port)
    message = html_with_inline_image(image=image_bytes(), image_type=("image", "png"), attach_pdf=True,
                                     extra=(b"PK\x03\x04" * 64, "application/zip", "tools.zip", "<tools@x>"))
    assert_refused(await submit(client, message), 554, "5.6.3", "tools.zip", "application/zip")
    await assert_still_serving(client)


async def test_refusal_logs_do_not_carry_file_names(gateway, connect, caplog):
    caplog.set_level(logging.INFO, logger="faxgw")
    gw = await gateway()
    client = await connect(gw.port)
    message = fax_message(pdf=b"PK\x03\x04" * 64, filename="confidential-diagnosis.zip",
                          attachment_type=("application", "zip"))
    assert_refused(await submit(client, message), 554, "5.6.3", "confidential-diagnosis.zip")
    refusals = [r.getMessage() for r in caplog.records if "event=refused" in r.getMessage()]
    assert refusals and all("confidential-diagnosis" not in line for line in refusals), refusals
    assert any("554 5.6.3" in line for line in refusals)


# === the DATA reader ==================================================================================


async def test_dot_stuffed_lines_arrive_unstuffed_byte_for_byte(gateway, sandbox, connect):
    gw = await gateway()
    client = await connect(gw.port)
    message = fax_with_body(b".signature\r\n..two dots\r\n.\r\n...\r\nend.\r\n. \r\n")
    assert b"\r\n...two dots\r\n..\r\n....\r\n" in on_the_wire(message)
    (code,) = queued(await submit(client, message))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code
    assert body(fax.raw) == body(message)


async def test_empty_message_is_refused_and_the_session_goes_on(gateway, connect):
    gw = await gateway(addressing={"content": {"allow_body_only": True}})
    client = await connect(gw.port)
    # "." right after DATA: nothing at all, not even a header.
    assert_refused(await submit(client, b""), 550, "5.6.0", "no header section")
    # A blank line and a body, but no header.
    assert_refused(await submit(client, b"\r\nPlease fax this.\r\n"), 550, "5.6.0", "no header section")
    await assert_still_serving(client)


async def test_header_only_message_is_nothing_to_fax(gateway, connect):
    gw = await gateway()
    client = await connect(gw.port)
    headers = f"From: {SENDER}\r\nTo: {FAX}\r\nSubject: Invoice 4711\r\n".encode()
    assert_refused(await submit(client, headers), 550, "5.7.0", "nothing to fax")
    assert_refused(await submit(client, headers + b"\r\n"), 550, "5.7.0", "nothing to fax")
    await assert_still_serving(client)


def with_bare_lf(message: bytes) -> bytes:
    """The message as a Unix program writes it: LF line endings (the last one is the CRLF of the end)."""
    return message.replace(b"\r\n", b"\n").removesuffix(b"\n")


async def test_bare_lf_is_refused_naming_bare_lf(gateway, connect, caplog):
    caplog.set_level(logging.INFO, logger="faxgw")
    gw = await gateway()
    client = await connect(gw.port)
    message = with_bare_lf(fax_message())
    assert len(message) > 1000  # aiosmtpd would read all of it as one line that is too long
    answer = await submit(client, message)
    assert_refused(answer, 550, "5.6.0", "bare LF", "CRLF", "bare_lf")
    assert "too long" not in answer.text.lower()
    await assert_still_serving(client)
    # Logged and counted like a refusal at RCPT: one line with its stage and check.
    (line,) = [r.getMessage() for r in caplog.records if "event=refused" in r.getMessage()]
    assert line.startswith("event=refused client=127.0.0.1 stage=data check=bare-lf reply=\"550 5.6.0 ")
    assert 'faxgw_messages_refused_total{reason="bare-lf"} 1.0' in gw.service.metrics.render().decode()


@pytest.mark.parametrize("command", ["MAIL FROM:<app@legacy.example", "MAIL FROM:app@legacy.example>",
                                     "MAIL FROM:<app@legacy.example SIZE=100"])
async def test_an_unbalanced_sender_is_refused(gateway, connect, command, caplog):
    caplog.set_level(logging.INFO, logger="faxgw")
    gw = await gateway()
    client = await connect(gw.port)
    assert_refused(await client.command(command), 501, "5.1.7", "unbalanced", "MAIL FROM:<address>")
    assert_reply(await client.command(f"RCPT TO:<{FAX}>"), 503)
    assert "stage=mail check=sender-syntax" in caplog.text
    await assert_still_serving(client)


async def test_bare_lf_is_normalized_when_configured(gateway, sandbox, connect):
    gw = await gateway(smtp={"bare_lf": "normalize"})
    client = await connect(gw.port)
    original = fax_with_body(b"Regards,\r\n.signature\r\n..two dots\r\n")
    sent = with_bare_lf(original)
    # Like Python's smtplib, on_the_wire doubles a leading dot after a bare LF too.
    assert b"\n..signature\n...two dots\n" in on_the_wire(sent)
    (code,) = queued(await submit(client, sent))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code
    assert body(fax.raw) == body(original)


@pytest.mark.parametrize("bad", [b"line one\rline two\r\n", b"ends in CR\r\r\n", b"\r"])
async def test_bare_cr_is_refused(gateway, connect, bad):
    gw = await gateway(smtp={"bare_lf": "normalize"})  # normalising LF never excuses a bare CR
    client = await connect(gw.port)
    answer = await submit(client, fax_with_body(b"text\r\n" + bad + b"more\r\n"))
    assert_refused(answer, 550, "5.6.0", "bare CR", "CRLF")
    await assert_still_serving(client)


async def test_line_over_the_limit_is_refused_and_shorter_long_lines_pass_unchanged(
        gateway, sandbox, connect, long_line_upstream):
    gw = await gateway(long_line_upstream, smtp={"line_length_limit": 2000})
    client = await connect(gw.port)
    too_long = fax_with_body(b"<p>" + b"x" * 1997 + b"!</p>\r\n")
    answer = await submit(client, too_long)
    assert_refused(answer, 552, "5.6.0", "line longer than 2000 octets")
    html_line = b"<p>" + b"y" * 1493 + b"</p>"
    assert len(html_line) == 1500
    message = fax_with_body(html_line + b"\r\n")
    (code,) = queued(await submit(client, message))
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code
    assert body(fax.raw) == body(message)


async def test_line_exactly_at_the_limit_is_accepted(gateway, connect):
    gw = await gateway(smtp={"line_length_limit": 2000})
    client = await connect(gw.port)
    queued(await submit(client, fax_with_body(b"z" * 2000 + b"\r\n")))
    assert_refused(await submit(client, fax_with_body(b"z" * 2001 + b"\r\n")), 552, "5.6.0", "2000")


async def test_commands_pipelined_behind_the_end_of_data_are_answered_in_order(gateway, sandbox, connect):
    gw = await gateway()
    client = await connect(gw.port)
    first = fax_message(pdf=pdf_bytes(marker="z" * 200_000))  # read in several pieces
    second = fax_with_body(b".dotted line\r\nsecond message\r\n")
    await client.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{FAX}>\r\nDATA\r\n".encode())
    mail, rcpt, go = await client.replies(3)
    assert (mail.code, rcpt.code, go.code) == (250, 250, 354)
    # One write: the end of the first message, a whole second transaction and QUIT.
    await client.write(on_the_wire(first) + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{OTHER_FAX}>\r\nDATA\r\n".encode()
                       + on_the_wire(second) + b"QUIT\r\n")
    first_done, mail, rcpt, go, second_done, bye = await client.replies(6)
    (first_code,) = queued(first_done)
    assert_reply(mail, 250, "2.1.0")
    assert_reply(rcpt, 250, "2.1.5", "+13125550123")
    assert_reply(go, 354)
    (second_code,) = queued(second_done)
    assert_reply(bye, 221)
    faxes = {fax.code: fax for fax in await sandbox.wait_for(2)}
    assert body(faxes[first_code].raw) == body(first) and faxes[first_code].number == NUMBER
    assert body(faxes[second_code].raw) == body(second) and faxes[second_code].number == "13125550123"


async def test_pipelined_envelope_with_a_refused_recipient(gateway, sandbox, connect):
    gw = await gateway()
    client = await connect(gw.port)
    await client.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{FAX}>\r\nRCPT TO:<someone@example.org>\r\n"
                       f"RCPT TO:<{OTHER_FAX}>\r\nDATA\r\n".encode())
    mail, good, relay, other, go = await client.replies(5)
    assert_reply(mail, 250, "2.1.0")
    assert_reply(good, 250, "2.1.5")
    assert_refused(relay, 550, "5.7.1", "someone@example.org")
    assert_reply(other, 250, "2.1.5")
    assert_reply(go, 354)
    await client.write(on_the_wire(fax_message()))
    codes = queued(await client.reply(), count=2)
    faxes = await sandbox.wait_for(2)
    assert sorted(f.number for f in faxes) == sorted([NUMBER, "13125550123"])
    assert sorted(f.code for f in faxes) == sorted(codes)


async def test_refused_messages_are_not_forwarded(gateway, sandbox, connect):
    gw = await gateway(smtp={"max_message_size": 50000})
    client = await connect(gw.port)
    refused = [
        fax_message(attach=False),
        fax_message(pdf=b"PK" * 100, filename="a.zip", attachment_type=("application", "zip")),
        fax_of_size(50001),
        with_bare_lf(fax_message()),
        fax_with_body(b"bare\rCR\r\n"),
        b"",
    ]
    for message in refused:
        answer = await submit(client, message)
        assert 500 <= answer.code < 600, answer
    code = await assert_still_serving(client)
    (fax,) = await sandbox.wait_for(1)
    await asyncio.sleep(0.3)  # give a wrongly queued message time to arrive as well
    assert [f.code for f in sandbox.faxes] == [code]
    assert fax.code == code


def test_the_protocol_fork_mirrors_the_installed_aiosmtpd():
    """gateway/outbound/smtpserver.py copies and extends methods of one aiosmtpd version: an upgrade must read it."""
    import aiosmtpd

    from gateway.outbound.smtpserver import AIOSMTPD_MIRRORED

    assert aiosmtpd.__version__ == AIOSMTPD_MIRRORED
