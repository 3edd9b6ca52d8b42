"""The inbound SMTP status path end to end (issue 3, sections 3 and 7): real gateway, real sandbox, loopback.

A fax is sent through the gateway and forwarded to the sandbox; then a
status mail is delivered over SMTP to the gateway's status listener, as
GreenFax's servers (or a bouncing MTA) would, and the job's state, its
events, the stored reports and `faxgw show` / `unmatched` / `match` are
checked. Trust (DESIGN.md, "Correlation and trust"): these gateways trust
status mail from greenfax.com and from the sandbox's domain when it comes
from this machine (here GreenFax's own sending servers, as `trusted_networks`
says); mail with any other From is untrusted and changes
nothing. tests/test_trust.py tries the trust rules themselves as an attacker.

The status listener is the fax listener itself (`[status] listen` equal to
`[smtp] listen`, both 127.0.0.1:0), unless a test needs a status-only one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import dkim
import pytest
from conftest import (
    ACCOUNT_SENDER,
    NUMBER,
    RETURN_PATH,
    RunningGateway,
    codes_in,
    fax_message,
    free_port,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import config, store
from gateway.sandbox.greenfax import SandboxFax
from gateway.sandbox.statusmail import STATUS_SENDER, status_email
from gateway.service import Service

DATA = Path(__file__).parent / "data" / "status"
SENDER = "erp@legacy.example"
# The fax listener takes status mail too, and trusts it from loopback with a trusted From domain.
STATUS = {"listen": ["127.0.0.1:0"], "trusted_sender_domains": ["greenfax.com", "sandbox.greenfax.localhost"],
          "require_dkim": False, "trusted_networks": ["127.0.0.0/8"]}
# GreenFax's mail comes in from elsewhere, so mail from this machine is anyone's: untrusted, whatever its From.
UNTRUSTING = {**STATUS, "trusted_networks": ["192.0.2.0/24"]}
BUSY_NUMBER = "12125550000"  # the sandbox reports busy for numbers ending in 0000
OTHER_NUMBER = "12157018714"  # +1 215 701 8714, the number in the shipped samples


# --- a small SMTP client that shows every reply ------------------------------------------


class Client:
    """SMTP over a plain socket: each command returns its reply as one line "CODE TEXT"."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        assert (await client.reply()).startswith("220")
        assert (await client.command("EHLO greenfax-mx.test")).startswith("250")
        return client

    async def reply(self) -> str:
        lines: list[str] = []
        while not lines or lines[-1][3:4] == "-":
            line = await asyncio.wait_for(self.reader.readline(), 15)
            if not line:
                raise ConnectionError(f"connection closed after {lines}")
            lines.append(line.decode().rstrip("\r\n"))
        return lines[-1] if len(lines) == 1 else " | ".join(lines)

    async def command(self, line: str) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def data(self, message: bytes) -> str:
        go = await self.command("DATA")
        assert go.startswith("354"), go
        stuffed = re.sub(rb"(?m)^\.", b"..", message)
        self.writer.write(stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        await self.writer.drain()
        return await self.reply()

    async def mail(self, sender: str, rcpts: list[str], message: bytes) -> str:
        """One whole transaction; every envelope reply must be a 250; returns the reply to the data."""
        reply = await self.command(f"MAIL FROM:<{sender}>")
        assert reply.startswith("250"), reply
        for rcpt in rcpts:
            reply = await self.command(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("250"), reply
        return await self.data(message)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    clients: list[Client] = []

    async def open_client(port: int) -> Client:
        clients.append(await Client.connect(port))
        return clients[-1]

    yield open_client
    for client in clients:
        await client.close()


async def deliver(port: int, message: bytes, *, sender: str = STATUS_SENDER, rcpt: str = ACCOUNT_SENDER) -> str:
    """Deliver one status mail to the status listener; the reply to its data."""
    client = await Client.connect(port)
    try:
        return await client.mail(sender, [rcpt], message)
    finally:
        await client.close()


def status_port(gw: RunningGateway) -> int:
    (host, port), *_ = gw.service.status_addresses
    assert host == "127.0.0.1"
    return port


# --- faxes and status mails --------------------------------------------------------------------


async def submitted_fax(gw: RunningGateway, sandbox, number: str = NUMBER) -> tuple[str, SandboxFax]:
    """Send one fax through the gateway; its job code and what the sandbox received, once submitted."""
    address = f"{number}@greenfax.com"
    before = len(sandbox.faxes)
    reply = await gw.send(fax_message(address), rcpts=[address], sender=SENDER)
    (code,) = codes_in(reply.message)
    await gw.wait_state(code, "submitted")
    fax = (await sandbox.wait_for(before + 1))[before]
    assert fax.code == code and fax.number == number
    return code, fax


def sample(name: str, **replace: str) -> bytes:
    """A shipped layout's sample mail with values replaced (old -> new), CRLF line endings."""
    text = (DATA / name).read_text()
    for old, new in replace.items():
        assert old in text, f"{old} is not in {name}"
        text = text.replace(old, new)
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def plaintext_report(*, status: str, number: str, code: str | None, reference: str) -> bytes:
    """A status mail in the shipped plain-text layout (rules/status/20-plaintext.toml), from greenfax.com."""
    lines = [
        "From: GreenFax <noreply@greenfax.com>",
        f"To: {ACCOUNT_SENDER}",
        f"Subject: GreenFax Delivery Report - Job {reference}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: {email.utils.make_msgid('dr', 'greenfax.com')}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "Your fax has been processed.",
        "",
        f"  Status ..........: {status}",
        f"  Recipient .......: {number}",
        "  Pages sent ......: 1",
        "  Transmission time: 26 sec",
        f"  Job reference ...: {reference}",
        *([f"  Your reference ..: {code}"] if code else []),
        "",
    ]
    return "\r\n".join(lines).encode()


def job_events(gw: RunningGateway, code: str) -> list[dict[str, Any]]:
    return gw.job(code)["events"]


def query(gw: RunningGateway, sql: str, *args: Any) -> list[sqlite3.Row]:
    conn = store.connect(gw.store_path, readonly=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def reports(gw: RunningGateway) -> list[dict[str, Any]]:
    return [dict(row) for row in query(gw, "SELECT id, channel, trusted, outcome, rule, result, reason, job_code,"
                                           " number, reference_id, note FROM reports ORDER BY id")]


def notifications(gw: RunningGateway, code: str) -> int:
    return len(query(gw, "SELECT n.id FROM notifications n JOIN jobs j ON j.id = n.job_id WHERE j.code = ?", code))


# --- the `faxgw` command -------------------------------------------------------------------


def faxgw(gw: RunningGateway, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `faxgw` command on the running gateway's store."""
    up = gw.settings.upstream
    path = tmp_path / "cli.toml"
    path.write_text(textwrap.dedent(f"""
        [store]
        path = "{gw.store_path}"
        [upstream]
        host = "{up.host}"
        port = {up.port}
        tls = "none"
        account_sender = "{ACCOUNT_SENDER}"
        return_path = "{RETURN_PATH}"
    """))
    env = {key: value for key, value in os.environ.items() if key != "FAXGW_CONFIG"}
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(path), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def faxgw_json(gw: RunningGateway, tmp_path: Path, *args: str) -> Any:
    result = faxgw(gw, tmp_path, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("number, state, reason", [(NUMBER, "delivered", None), (BUSY_NUMBER, "failed", "busy")])
async def test_sandbox_status_mail_over_smtp_takes_the_job_to_its_final_state(
        gateway, sandbox, tmp_path, number, state, reason):
    gw = await gateway(status=STATUS)
    assert gw.service.status_addresses == gw.service.smtp_addresses  # one listener, both roles
    code, fax = await submitted_fax(gw, sandbox, number)
    assert (fax.result, fax.reason) == (state, reason)

    reply = await deliver(status_port(gw), status_email(fax, ACCOUNT_SENDER))

    assert reply == f"250 2.0.0 Status report applied for {code}"
    job = gw.job(code)
    assert (job["state"], job["reason"]) == (state, reason)
    assert job["reference_id"] == str(fax.reference_id) and job["pages"] == fax.pages
    assert job["events"][-1]["source"] == "email-smtp" and job["events"][-1]["state"] == state
    (shown,) = faxgw_json(gw, tmp_path, "show", code)["reports"]
    assert shown["channel"] == "email-smtp" and shown["outcome"] == "applied"
    assert shown["rule"] == "greenfax-sandbox" and shown["result"] == state and shown["reason"] == reason
    assert shown["reference_id"] == str(fax.reference_id) and shown["job_code"] == code
    # Trusted (a trusted From domain, from a trusted network), and matched by its job code.
    assert shown["trusted"] == 2 and "by job code" in shown["note"]
    # A failure queues a notification to the fax's sender; a delivery does not (the default).
    assert notifications(gw, code) == (1 if state == "failed" else 0)


LAYOUTS = [
    # sample file, what to replace (besides the job code), the rule, the job's state and reason after it
    ("sandbox-busy.eml", {"FXAAAA22": "{code}", "12125551234": OTHER_NUMBER, "8591334": "{ref}"},
     "greenfax-sandbox", "failed", "busy"),
    ("plaintext-success.eml", {"FXBBBB33": "{code}", "8591400": "{ref}"}, "greenfax-plaintext", "delivered", None),
    ("htmltable-busy.eml", {"FXCCCC44": "{code}", "8591500": "{ref}"}, "greenfax-html-table", "failed", "busy"),
]


@pytest.mark.parametrize("name, replace, rule, state, reason", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
async def test_each_shipped_layout_over_smtp(gateway, sandbox, tmp_path, name, replace, rule, state, reason):
    gw = await gateway(status=STATUS)
    code, fax = await submitted_fax(gw, sandbox, OTHER_NUMBER)
    ref = f"77{fax.reference_id}"  # a reference id the job does not have yet
    message = sample(name, **{old: new.format(code=code, ref=ref) for old, new in replace.items()})
    sender = re.search(rb"^From:.*<(.+)>", message, re.MULTILINE)[1].decode()

    reply = await deliver(status_port(gw), message, sender=sender)

    assert reply == f"250 2.0.0 Status report applied for {code}"
    job = gw.job(code)
    assert (job["state"], job["reason"], job["reference_id"]) == (state, reason, ref)
    (report,) = reports(gw)
    assert (report["rule"], report["outcome"], report["number"]) == (rule, "applied", "+" + OTHER_NUMBER)
    assert notifications(gw, code) == (1 if state == "failed" else 0)


async def mail_reports(gw: RunningGateway, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """Wait until `count` status mails came in by SMTP; those reports."""
    deadline = time.monotonic() + timeout
    while len(found := [r for r in reports(gw) if r["channel"] == "email-smtp"]) < count:
        assert time.monotonic() < deadline, f"status mail did not come: {reports(gw)}"
        await asyncio.sleep(0.05)
    return found


@pytest.mark.parametrize("sandbox_options", [{}, {"notify": False}], ids=["bare", "status-mail-only"])
async def test_bare_sandbox_gateway_takes_faxes_to_final_states_by_itself(tmp_path, sandbox_options):
    """No [status] and no [upstream]: the sandbox sends its status mail back to the gateway's own listener.

    With the sandbox's HTTP Notify call switched off, the status mail alone takes the jobs to their end.
    """
    settings = config.validate(
        {"sandbox": {"enabled": True, "listen": ["127.0.0.1:0"], **sandbox_options},
         "smtp": {"listen": ["127.0.0.1:0"]}, "http": {"listen": ["127.0.0.1:0"]},
         "store": {"path": str(tmp_path / "store" / "faxgw.sqlite3")}},
        source="test", base=tmp_path)
    assert settings.status.listen == settings.smtp.listen
    service = Service(settings)
    await service.start()
    gw = RunningGateway(service, settings)
    try:
        codes = {}
        for number in (NUMBER, BUSY_NUMBER):
            address = f"{number}@greenfax.com"
            reply = (await gw.send(fax_message(address), rcpts=[address], sender=SENDER)).message
            assert "SANDBOX" in reply
            (codes[number],) = codes_in(reply)
        job = await gw.wait_state(codes[NUMBER], "delivered", "failed")
        assert (job["state"], job["reason"], job["pages"]) == ("delivered", None, 1)
        job = await gw.wait_state(codes[BUSY_NUMBER], "delivered", "failed")
        assert (job["state"], job["reason"]) == ("failed", "busy")
        by_code = {r["job_code"]: r for r in await mail_reports(gw, 2)}
        assert set(by_code) == set(codes.values())
        for code, report in by_code.items():
            # The sandbox's sender is trusted in sandbox mode; the mail agrees with what the job became
            # (a duplicate when the sandbox's HTTP Notify call came first).
            assert (report["rule"], report["trusted"]) == ("greenfax-sandbox", 2)
            assert report["outcome"] in (("applied",) if sandbox_options else ("applied", "duplicate")), report
            if report["outcome"] == "applied":
                # The mail set the final state; a Notify call after it adds only an "also reported" event.
                final = [event for event in job_events(gw, code) if event["state"] in ("delivered", "failed")]
                assert [event["source"] for event in final] == ["email-smtp"]
    finally:
        await service.stop()


# --- forged status mail --------------------------------------------------------------------------


async def test_forged_status_mail_naming_no_job_code_changes_nothing(gateway, sandbox, tmp_path):
    gw = await gateway(status=UNTRUSTING)
    code, fax = await submitted_fax(gw, sandbox)
    events = job_events(gw, code)
    # A mail in the sandbox's layout from an untrusted From; it names the right number but no job code.
    forged = status_email(dataclasses.replace(fax, code=None, reference_id=4242), ACCOUNT_SENDER)
    assert b"FX" not in forged

    reply = await deliver(status_port(gw), forged, sender="someone@elsewhere.example")

    assert reply == "250 2.0.0 Status report unmatched"
    assert gw.job(code)["state"] == "submitted" and job_events(gw, code) == events
    (report,) = reports(gw)
    assert (report["outcome"], report["trusted"], report["number"]) == ("unmatched", 0, "+" + NUMBER)
    assert report["note"] == "untrusted report carries no job secret (kept for review: `faxgw match`)"
    assert notifications(gw, code) == 0


async def test_forged_status_mail_naming_a_final_job_changes_nothing(gateway, sandbox):
    gw = await gateway(status=UNTRUSTING, notify={"token": "n0tify"})
    code, fax = await submitted_fax(gw, sandbox)
    host, port = gw.service.web.addresses["http"][0]
    async with aiohttp.ClientSession() as http, http.get(  # GreenFax's Notify call: authentic by its token
            f"http://{host}:{port}/greenfax/notify/n0tify", params={"result": "success", "userjobcode": code}) as r:
        assert r.status == 200
    before = gw.job(code)
    assert before["state"] == "delivered"
    forged = status_email(dataclasses.replace(fax, result="failed", reason="busy", pages=0), ACCOUNT_SENDER)

    reply = await deliver(status_port(gw), forged)

    assert reply == "250 2.0.0 Status report unmatched"
    after = gw.job(code)
    assert after == before and not after["flagged"]
    assert reports(gw)[-1]["note"] == (f"untrusted report names {code} but carries no job secret"
                                       " (kept for review: `faxgw match`)")


def rsa_key() -> tuple[bytes, str]:
    """A new RSA key: the private key in PEM and the DNS TXT record of its public half."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


def signed(message: bytes, private_key: bytes, domain: str = "greenfax.com") -> bytes:
    signature = dkim.sign(message, b"fax2024", domain.encode(), private_key,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id", b"content-type",
                                           b"mime-version"])
    return signature + message


async def test_with_require_dkim_only_a_valid_signature_makes_status_mail_trusted(gateway, sandbox):
    key, record = rsa_key()
    other_key, _ = rsa_key()
    gw = await gateway(status={"listen": STATUS["listen"], "require_dkim": True,
                               "dkim_keys": {"fax2024._domainkey.greenfax.com": record}})
    code, _fax = await submitted_fax(gw, sandbox)

    def report_mail(n: int) -> bytes:  # names the number only: it needs a trusted source to match
        return plaintext_report(status="SUCCESS", number=NUMBER, code=None, reference=f"91{n}")

    tampered = signed(report_mail(3), key).replace(b"Pages sent ......: 1", b"Pages sent ......: 9")
    untrusted = {"unsigned": report_mail(1), "signed with another key": signed(report_mail(2), other_key),
                 "changed after signing": tampered,
                 "signed by another domain": signed(report_mail(4), key, "greenfax.example")}
    for label, message in untrusted.items():
        reply = await deliver(status_port(gw), message, sender="noreply@greenfax.com")
        assert reply == "250 2.0.0 Status report unmatched", label
        assert gw.job(code)["state"] == "submitted", label

    reply = await deliver(status_port(gw), signed(report_mail(5), key), sender="noreply@greenfax.com")

    assert reply == f"250 2.0.0 Status report applied for {code}"
    job = gw.job(code)
    assert (job["state"], job["reference_id"]) == ("delivered", "915")
    assert [(r["trusted"], r["outcome"]) for r in reports(gw)] == [(0, "unmatched")] * 4 + [(2, "applied")]


# --- duplicates and contradictions -------------------------------------------------------


async def test_same_status_mail_twice_is_a_duplicate_and_a_contradiction_is_flagged(gateway, sandbox):
    gw = await gateway(status=STATUS)
    code, fax = await submitted_fax(gw, sandbox, BUSY_NUMBER)
    message = status_email(fax, ACCOUNT_SENDER)
    assert await deliver(status_port(gw), message) == f"250 2.0.0 Status report applied for {code}"
    job = gw.job(code)

    assert await deliver(status_port(gw), message) == f"250 2.0.0 Status report duplicate for {code}"
    assert gw.job(code) == job and len(reports(gw)) == 1 and notifications(gw, code) == 1

    # GreenFax (trusted) later says the same fax was delivered: recorded and flagged, never applied.
    contradiction = plaintext_report(status="SUCCESS", number=BUSY_NUMBER, code=code,
                                     reference=str(fax.reference_id))
    reply = await deliver(status_port(gw), contradiction, sender="noreply@greenfax.com")

    assert reply == f"250 2.0.0 Status report contradicting for {code}"
    after = gw.job(code)
    assert (after["state"], after["reason"], after["flagged"]) == ("failed", "busy", 1)
    assert after["events"][:-1] == job["events"]
    assert after["events"][-1]["state"] is None and "contradicting report" in after["events"][-1]["detail"]
    assert notifications(gw, code) == 1


# --- bounces to the return path --------------------------------------------------------------


def dsn(*, to: str, action: str = "failed", status: str = "5.1.1", layout: str = "rfc3464",
        returned_subject: str = "Invoice 4711", number: str = NUMBER, message_id: bool = True,
        returned_message_id: str | None = None) -> bytes:
    """A delivery status notification for a forwarded fax, as an upstream MTA returns it (RFC 3464).

    `layout` imitates MTAs seen in the corpus: "merged" puts the per-recipient
    fields in the per-message block (no blank line, bounces/err/make-test-09),
    "unfolded" writes Diagnostic-Code continuation lines without indentation
    before Status and Action (bounces/bsd/rhost-messagelabs-01), "two-parts"
    has a first message/delivery-status part of free text (mikel-mail
    multipart_report_multiple_status), "mixed" sends the parts as
    multipart/mixed (bounces/bsd/lhost-mcafee-01, lhost-opensmtpd-10).
    """
    per_message = ["Reporting-MTA: dns; mx.upstream.example", "Arrival-Date: Fri, 27 Nov 2026 10:00:00 +0000"]
    per_recipient = [f"Final-Recipient: rfc822; {number}@greenfax.com", f"Action: {action}", f"Status: {status}",
                     f"Diagnostic-Code: smtp; {status[0]}50 {status} fax line problem"]
    if layout == "merged":
        fields = "\r\n".join(per_message + per_recipient) + "\r\n"
    elif layout == "unfolded":
        fields = "\r\n".join(per_message + ["", f"Final-Recipient: rfc822; {number}@greenfax.com",
                                            "Diagnostic-Code: smtp; 550-The fax line",
                                            "550-mx.greenfax.example [192.0.2.1]:25 is not accepting",
                                            "550 this fax", f"Status: {status}", f"Action: {action}"]) + "\r\n"
    else:
        fields = "\r\n".join(per_message + [""] + per_recipient) + "\r\n"
    free_text = ("--BOUNDARY\r\nContent-Type: message/delivery-status\r\n\r\n"
                 f"This message was undeliverable:\r\n\r\n<{number}@greenfax.com> is busy\r\n\r\n")
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.upstream.example>\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {email.utils.formatdate()}\r\n"
        + (f"Message-ID: {email.utils.make_msgid('dsn', 'mx.upstream.example')}\r\n" if message_id else "")
        + "MIME-Version: 1.0\r\n"
        + ('Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n' if layout == "mixed" else
           'Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"\r\n')
        + "\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        f"The fax to {number}@greenfax.com could not be delivered ({action}).\r\n"
        "\r\n"
        + (free_text if layout == "two-parts" else "")
        + "--BOUNDARY\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        + fields
        + "\r\n"
        "--BOUNDARY\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        f"From: {ACCOUNT_SENDER}\r\n"
        f"To: {number}@greenfax.com\r\n"
        f"Subject: {returned_subject}\r\n"
        + (f"Message-ID: {returned_message_id}\r\n" if returned_message_id else "")
        + 
        "\r\n"
        "--BOUNDARY--\r\n"
    ).encode()


def bounce_address(code: str, gw: RunningGateway | None = None) -> str:
    """The job's VERP address: with the job's secret when `gw` has the job (only the upstream saw it)."""
    local, _, domain = RETURN_PATH.partition("@")
    return f"{local}+{code}{'.' + gw.secret(code) if gw else ''}@{domain}"



@pytest.mark.parametrize("layout", ["rfc3464", "merged", "unfolded", "two-parts", "mixed"])
async def test_failed_dsn_to_the_return_path_fails_the_job(gateway, sandbox, tmp_path, layout):
    gw = await gateway(status=STATUS)
    code, _fax = await submitted_fax(gw, sandbox)

    reply = await deliver(status_port(gw), dsn(to=bounce_address(code, gw), layout=layout), sender="",
                          rcpt=bounce_address(code, gw))

    assert reply == f"250 2.0.0 Status report applied for {code}"
    job = gw.job(code)
    assert (job["state"], job["reason"]) == ("failed", "bounced")
    (report,) = faxgw_json(gw, tmp_path, "show", code)["reports"]
    assert (report["channel"], report["rule"], report["outcome"]) == ("bounce", "dsn", "applied")
    assert notifications(gw, code) == 1


async def test_bounces_without_message_id_for_two_jobs_to_one_number_fail_both(gateway, sandbox):
    """Same MTA, same number, same body, no Message-ID: only the return path tells them apart."""
    gw = await gateway(status=STATUS)
    codes = [(await submitted_fax(gw, sandbox))[0] for _ in range(2)]
    for code in codes:
        message = dsn(to=bounce_address(code, gw), message_id=False)
        assert await deliver(status_port(gw), message, sender="", rcpt=bounce_address(code, gw)) == (
            f"250 2.0.0 Status report applied for {code}")
    assert [gw.job(code)["state"] for code in codes] == ["failed", "failed"]


@pytest.mark.parametrize("layout", ["rfc3464", "mixed"])
async def test_failed_dsn_to_the_account_sender_names_its_job_by_the_returned_message_id(gateway, sandbox, layout):
    """Some MTAs answer the From address (the account sender) instead of the return path."""
    gw = await gateway(status=STATUS)
    code, fax = await submitted_fax(gw, sandbox)
    message_id = re.search(rb"(?mi)^Message-ID: (.*)\r$", fax.raw)[1].decode()
    message = dsn(to=ACCOUNT_SENDER, returned_subject=f"[{code}] Invoice 4711", layout=layout,
                  returned_message_id=message_id)

    assert await deliver(status_port(gw), message, sender="") == f"250 2.0.0 Status report applied for {code}"
    assert (gw.job(code)["state"], gw.job(code)["reason"]) == ("failed", "bounced")


@pytest.mark.parametrize("action, status", [("delayed", "4.4.1"), ("relayed", "2.0.0"), ("delivered", "2.0.0")])
async def test_dsn_that_is_not_a_failure_changes_nothing(gateway, sandbox, action, status):
    """Only a line in the job's history: the state stays, nothing is flagged or left unmatched."""
    gw = await gateway(status=STATUS)
    code, _fax = await submitted_fax(gw, sandbox)
    events = job_events(gw, code)

    reply = await deliver(status_port(gw), dsn(to=bounce_address(code, gw), action=action, status=status),
                          sender="", rcpt=bounce_address(code, gw))

    assert reply == f"250 2.0.0 Status report informational for {code}", reply
    job = gw.job(code)
    assert job["state"] == "submitted" and not job["flagged"]
    assert len(job_events(gw, code)) == len(events) + 1
    assert job["events"][-1]["state"] is None and job["events"][-1]["detail"].startswith("informational DSN")
    (report,) = reports(gw)
    assert report["result"] is None and report["channel"] == "bounce"
    assert notifications(gw, code) == 0


# --- listener roles ---------------------------------------------------------------------------


async def test_status_only_listener_refuses_fax_recipients_from_any_client(gateway, connect):
    status_only = free_port()
    gw = await gateway(status={"listen": [f"127.0.0.1:{status_only}"]})
    assert gw.service.status_addresses == [("127.0.0.1", status_only)]
    client = await connect(status_only)

    assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")  # loopback may send faxes...
    assert await client.command(f"RCPT TO:<{NUMBER}@greenfax.com>") == (
        f"550 5.7.1 <{NUMBER}@greenfax.com> is not a status address; this listener takes status mail only")
    assert await client.command(f"RCPT TO:<{ACCOUNT_SENDER}>") == "250 2.1.5 Status address OK"
    assert await client.command(f"RCPT TO:<{bounce_address('FXABCD12')}>") == "250 2.1.5 Status address OK"
    assert (await client.data(plaintext_report(status="SUCCESS", number=NUMBER, code=None, reference="1")))\
        .startswith("250 2.0.0 Status report unmatched")
    # ...but not here; the fax listener still takes faxes from it and no status mail.
    fax = await connect(gw.port)
    assert (await fax.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
    assert (await fax.command(f"RCPT TO:<{ACCOUNT_SENDER}>")).startswith("550 5.7.1 Relay denied")
    assert (await fax.command(f"RCPT TO:<{NUMBER}@greenfax.com>")).startswith("250 2.1.5 Fax recipient OK")


async def test_status_listener_refuses_fax_recipients_only_to_clients_not_allowed_to_fax(gateway, connect):
    fax_and_status, fax_only = free_port(), free_port()
    gw = await gateway(smtp={"listen": [f"127.0.0.1:{fax_and_status}", f"127.0.0.1:{fax_only}"],
                             "allowed_networks": ["10.0.0.0/8"]},  # loopback may not send faxes
                       status={"listen": [f"127.0.0.1:{fax_and_status}"]})
    assert gw.service.status_addresses == [("127.0.0.1", fax_and_status)]
    both = await connect(fax_and_status)
    assert (await both.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
    assert await both.command(f"RCPT TO:<{NUMBER}@greenfax.com>") == (
        "550 5.7.1 Client host 127.0.0.1 may not send faxes here; authenticate or ask the administrator"
        " to allow its network")
    assert await both.command(f"RCPT TO:<{ACCOUNT_SENDER}>") == "250 2.1.5 Status address OK"
    assert await both.data(b"From: a@b.example\r\nSubject: hello\r\n\r\nhi\r\n") == (
        "250 2.0.0 Kept for review: not recognised as a status mail (see faxgw unmatched)")
    # The null sender is taken for status mail (bounces) and still refused for faxes.
    assert (await both.command("MAIL FROM:<>")).startswith("250")
    assert (await both.command(f"RCPT TO:<{NUMBER}@greenfax.com>")).startswith("550 5.7.1 Client host")
    assert await both.command("RSET") == "250 OK"
    fax = await connect(fax_only)  # not a status listener: the client is refused at once
    assert (await fax.command(f"MAIL FROM:<{SENDER}>")).startswith("550 5.7.1 Client host 127.0.0.1")


async def test_fax_and_status_recipients_in_one_message_are_refused(gateway, connect):
    gw = await gateway(status=STATUS)
    mixed = "452 4.5.3 Status mail and faxes cannot share one message; send the rest in another message"
    client = await connect(gw.port)
    for first, second in [(f"{NUMBER}@greenfax.com", ACCOUNT_SENDER), (ACCOUNT_SENDER, f"{NUMBER}@greenfax.com"),
                          (bounce_address("FXABCD12"), f"{NUMBER}@greenfax.com")]:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{first}>")).startswith("250"), first
        assert await client.command(f"RCPT TO:<{second}>") == mixed, (first, second)
        assert await client.command("RSET") == "250 OK"
    assert query(gw, "SELECT COUNT(*) FROM jobs")[0][0] == 0


# --- mail no rule recognises, and linking by hand ---------------------------------------------


async def test_unrecognised_mail_is_kept_for_review_and_unmatched_reports_can_be_linked_by_hand(
        gateway, sandbox, tmp_path):
    gw = await gateway(status=UNTRUSTING)
    code, fax = await submitted_fax(gw, sandbox, BUSY_NUMBER)
    person = (b"From: Alice <alice@customer.example>\r\nTo: " + ACCOUNT_SENDER.encode() + b"\r\n"
              b"Subject: Did you get my fax?\r\nMessage-ID: <q1@customer.example>\r\n\r\nPlease call me.\r\n")

    reply = await deliver(status_port(gw), person, sender="alice@customer.example")

    assert reply == "250 2.0.0 Kept for review: not recognised as a status mail (see faxgw unmatched)"
    assert faxgw_json(gw, tmp_path, "unmatched") == []
    (kept,) = faxgw_json(gw, tmp_path, "unmatched", "--all")
    assert (kept["outcome"], kept["channel"], kept["result"]) == ("unrecognised", "email-smtp", None)
    assert query(gw, "SELECT raw FROM reports WHERE id = ?", kept["id"])[0][0] == person.decode()

    # Another person's mail, as short and as lacking a Message-ID, is kept too: not one mail with the first.
    for n, person in enumerate(("bob@customer.example", "carol@customer.example")):
        short = f"From: {person}\r\nTo: {ACCOUNT_SENDER}\r\nSubject: Thanks\r\n\r\nThanks.\r\n".encode()
        assert (await deliver(status_port(gw), short, sender=person)).startswith("250 2.0.0 Kept for review"), n
    assert [r["outcome"] for r in reports(gw)] == ["unrecognised"] * 3

    # A forged-looking report (no job code, untrusted sender) stays unmatched until an operator links it.
    unmatched = status_email(dataclasses.replace(fax, code=None), ACCOUNT_SENDER)
    assert await deliver(status_port(gw), unmatched) == "250 2.0.0 Status report unmatched"
    assert gw.job(code)["state"] == "submitted"
    (listed,) = faxgw_json(gw, tmp_path, "unmatched")
    assert (listed["outcome"], listed["number"], listed["reason"]) == ("unmatched", "+" + BUSY_NUMBER, "busy")

    linked = faxgw(gw, tmp_path, "match", str(listed["id"]), code.lower())

    assert linked.returncode == 0, linked.stderr
    assert linked.stdout.startswith(f"report {listed['id']}: applied {code}")
    job = gw.job(code)
    assert (job["state"], job["reason"]) == ("failed", "busy")
    assert any(e["source"] == "operator" and f"#{listed['id']}" in e["detail"] for e in job["events"])
    assert faxgw_json(gw, tmp_path, "unmatched") == []
    # Mail no rule understood cannot be applied to a job.
    refused = faxgw(gw, tmp_path, "match", str(kept["id"]), code)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"faxgw: error: status report {kept['id']} is unrecognised, not unmatched")
