"""Postfix from Debian as a real legacy client: its relayhost is the gateway.

A program hands mail to Postfix's `sendmail`; Postfix relays it to the
gateway over SMTP; the gateway forwards it to the sandbox as a fax job.
"""

from __future__ import annotations

import asyncio
import email
import time

import pytest
from conftest import NUMBER, fax_message, pdf_bytes
from peers.postfix import PostfixInstance, unavailable_reason

from gateway import store

pytestmark = [
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
    pytest.mark.timeout(90),
]


async def wait_until(predicate, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError("timed out")


async def test_sendmail_through_postfix_arrives_at_the_sandbox_as_a_job(gateway, sandbox, tmp_path):
    gw = await gateway()
    message = fax_message(to=f"{NUMBER}@greenfax.com", subject="Lab report", pdf=pdf_bytes(2))
    with PostfixInstance(tmp_path / "postfix", gw.port) as postfix:
        await asyncio.to_thread(postfix.sendmail, "practice@legacy.example", [f"{NUMBER}@greenfax.com"], message)
        (fax,) = await sandbox.wait_for(1, timeout=30)
        log = postfix.maillog()
    assert fax.number == NUMBER and fax.pages == 2
    forwarded = email.message_from_bytes(fax.raw)
    assert forwarded["Subject"] == f"[{fax.code}] Lab report"
    job = await gw.wait_state(fax.code, "submitted")
    assert job["sender"] == "erp@legacy.example"
    # Postfix logged the gateway's 250 with the job code as the relay's reply.
    assert f"queued as {fax.code}" in log


async def test_postfix_gets_the_gateways_refusal_and_bounces(gateway, sandbox, tmp_path):
    gw = await gateway()
    with PostfixInstance(tmp_path / "postfix", gw.port) as postfix:
        await asyncio.to_thread(postfix.sendmail, "practice@legacy.example", ["someone@example.com"], fax_message())
        log = await wait_until(lambda: (text := postfix.maillog()) and "status=bounced" in text and text)
    assert "Relay denied: <someone@example.com> is not a fax address" in log
    conn = store.connect(gw.store_path, readonly=True)
    assert store.list_jobs(conn) == []
    assert sandbox.faxes == []
