"""Sender notifications: the DSN a real SMTP sink receives when a fax ends badly."""

from __future__ import annotations

import asyncio
import email
import email.policy

import pytest
from conftest import codes_in, fax_message

from gateway import store
from gateway.outbound.intake import NullSenderSMTP
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
    gw = await gateway(notifications={"relay": f"127.0.0.1:{sink.port}"})
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
