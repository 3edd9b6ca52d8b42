"""Sender notifications: the DSN a real SMTP sink receives when a fax ends badly."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest
from conftest import codes_in, fax_message

from gateway import store
from gateway.outbound.smtpserver import NullSenderSMTP
from gateway.models import NULL_SENDER

pytestmark = pytest.mark.timeout(60)


class Sink:
    """An SMTP server that keeps every envelope it receives (null sender included)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server, session, envelope) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 kept"


@pytest.fixture
async def sink():
    handler = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: NullSenderSMTP(handler, hostname="sink.test"), "127.0.0.1", 0)
    handler.port = server.sockets[0].getsockname()[1]
    yield handler
    server.close()
    await server.wait_closed()


async def test_rejected_fax_sends_a_dsn_with_null_sender(gateway, sandbox, sink):
    # confirm_success is for deliveries: a listed sender's failure is still told by the DSN.
    gw = await gateway(notifications={"relay": f"127.0.0.1:{sink.port}", "confirm_success": ["*"]})
    original = fax_message(to="12125550550@greenfax.com", subject="Secret lab report",
                           body="Confidential body text")
    (code,) = codes_in((await gw.send(original, rcpts=["12125550550@greenfax.com"])).message)
    await gw.wait_state(code, "rejected")
    await asyncio.wait_for(sink.arrived.wait(), 10)

    ((mail_from, rcpts, raw),) = sink.received
    assert mail_from == NULL_SENDER and rcpts == ["erp@legacy.example"]
    notice = email.message_from_bytes(raw, policy=email.policy.default)
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    assert code in notice["Subject"] and notice["Auto-Submitted"] == "auto-replied"
    human, status, headers = notice.get_payload()
    assert "+12125550550" in human.get_content() and code in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()
    assert per_message["X-Fax-Job-Code"] == code
    assert per_recipient["Action"] == "failed" and per_recipient["Status"].startswith("5.")
    assert per_recipient["Final-Recipient"] == "rfc822; 12125550550@greenfax.com"
    # The original's headers only: never the document or the body.
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Secret lab report" in raw and b"Confidential body text" not in raw
    assert b"JVBERi0" not in raw  # the base64 of "%PDF-"

    job = gw.job(code)
    assert any(e["source"] == "notifier" and "sender notified" in e["detail"] for e in job["events"])


async def test_a_listed_sender_gets_the_transmission_report_when_a_fax_is_delivered(gateway, sandbox, sink):
    import io

    from pypdf import PdfReader

    token = "notify-token-for-notice-tests"
    gw = await gateway(notify={"token": token}, notifications={
        "relay": f"127.0.0.1:{sink.port}", "confirm_success": ["@Clinic.example", "boss@legacy.example"]})
    codes = {}
    for sender in ("front@clinic.example", "erp@legacy.example"):
        (codes[sender],) = codes_in((await gw.send(fax_message(sender=sender), sender=sender)).message)
        await gw.wait_state(codes[sender], "submitted")
        assert await gw.notify(token, result="Success", userjobcode=codes[sender], pages="2", cost="0.14",
                               greenfaxreferenceid=f"77{len(sender)}", destination="12125551234") == 200
        await gw.wait_state(codes[sender], "delivered")
    await asyncio.wait_for(sink.arrived.wait(), 10)
    await asyncio.sleep(2.5)  # longer than the notifier's poll interval: a second message would be here

    ((mail_from, rcpts, raw),) = sink.received  # the unlisted sender is not told of a delivery
    code = codes["front@clinic.example"]
    assert mail_from == NULL_SENDER and rcpts == ["front@clinic.example"]
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == f"Fax to +12125551234 delivered [{code}]"
    assert message["Auto-Submitted"] == "auto-replied" and message["X-Fax-Job-Code"] == code
    text, attachment = message.iter_parts()
    assert "was delivered, 2 pages" in text.get_content()
    assert attachment.get_content_type() == "application/pdf" and attachment.get_filename() == f"fax-{code}.pdf"
    report = PdfReader(io.BytesIO(attachment.get_content()))
    assert len(report.pages) == 1
    words = report.pages[0].extract_text()
    assert code in words and "DELIVERED" in words and "0.14 USD" in words
    assert report.pages[0].images  # the first page's thumbnail
    assert any(e["detail"] == "sender notified (transmission report)" for e in gw.job(code)["events"])
    assert not any(e["source"] == "notifier" for e in gw.job(codes["erp@legacy.example"])["events"])


def test_confirm_success_names_addresses_or_domains(tmp_path):
    from gateway import config
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        config.validate({"notifications": {"confirm_success": ["clinic.example"]}}, source="test", base=tmp_path)
    assert "'clinic.example': expected an address" in str(refused.value)


async def test_submitted_fax_sends_no_notice_and_failures_can_be_switched_off(gateway, sandbox, sink):
    gw = await gateway(notifications={"relay": f"127.0.0.1:{sink.port}", "enabled": False})
    (rejected,) = codes_in((await gw.send(rcpts=["12125550550@greenfax.com"])).message)
    (submitted,) = codes_in((await gw.send()).message)
    await gw.wait_state(rejected, "rejected")
    await gw.wait_state(submitted, "submitted")
    await asyncio.sleep(2.5)  # longer than the notifier's poll interval
    assert sink.received == []


async def test_notice_is_retried_when_the_relay_is_down(gateway, sandbox):
    from conftest import free_port

    port = free_port()
    gw = await gateway(notifications={"relay": f"127.0.0.1:{port}"})
    (code,) = codes_in((await gw.send(rcpts=["12125550550@greenfax.com"])).message)
    await gw.wait_state(code, "rejected")
    await asyncio.sleep(1.0)
    conn = store.connect(gw.store_path, readonly=True)
    row = conn.execute("SELECT state, attempts, last_error FROM notifications").fetchone()
    assert row["state"] == "pending" and row["attempts"] >= 1 and "cannot reach" in row["last_error"]


class HoldingSink(Sink):
    """A sink that holds its reply to the data until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def handle_DATA(self, server, session, envelope) -> str:
        self.holding.set()
        await self.release.wait()
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem of its own (tmpfs) for the store, so that it can really fill up."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root is needed): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk) -> None:
    """Write a filler file until the disk has no room left."""
    with open(disk / "filler", "wb", buffering=0) as out:
        for size in (65536, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                pass


async def test_a_full_disk_during_notices_is_reported_and_notices_resume(gateway, sandbox, small_disk):
    holding = HoldingSink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: NullSenderSMTP(holding, hostname="sink.test"), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway(store={"path": str(small_disk / "faxgw.sqlite3")},
                           notifications={"relay": f"127.0.0.1:{port}"})
        first = codes_in((await gw.send(rcpts=["12125550550@greenfax.com"])).message)[0]
        await gw.wait_state(first, "rejected")
        await asyncio.wait_for(holding.holding.wait(), 10)  # the notice is on its way
        fill(small_disk)
        holding.release.set()  # sent: recording that needs the full disk
        for _ in range(200):
            health = await gw.service.health()
            if health["runners"]["notifier"]["failures"]:
                break
            await asyncio.sleep(0.05)
        notifier = health["runners"]["notifier"]
        assert health["status"] == "failing" and notifier["running"]
        assert "full" in notifier["last_error"] and any(f.startswith("notifier: ") for f in health["failing"])
        assert len(holding.received) == 1

        (small_disk / "filler").unlink()  # room again
        for _ in range(400):
            if not (await gw.service.health())["runners"]["notifier"]["failures"]:
                break
            await asyncio.sleep(0.05)
        assert (await gw.service.health())["status"] == "ok"
        # The first notice is recorded as sent (not sent again), and the next one goes out.
        second = codes_in((await gw.send(rcpts=["12125550550@greenfax.com"])).message)[0]
        await gw.wait_state(second, "rejected")
        for _ in range(200):
            if len(holding.received) == 2:
                break
            await asyncio.sleep(0.05)
        assert [second in raw.decode() for _mail_from, _rcpts, raw in holding.received] == [False, True]
        states = gw.service.read_store().execute("SELECT state FROM notifications ORDER BY id").fetchall()
        assert [row[0] for row in states] == ["sent", "sent"]
        metrics = gw.service.metrics.render().decode()
        assert 'faxgw_runner_errors_total{runner="notifier"}' in metrics
    finally:
        server.close()
        await server.wait_closed()
