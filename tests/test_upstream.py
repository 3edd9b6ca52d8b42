"""Forward outcomes against a real upstream on loopback (the sandbox), one per kind of reply.

Each test drives the gateway's forwarder through the fault the sandbox is
told to produce and checks the job's state and history in the store.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme
from conftest import ACCOUNT_SENDER, SandboxServer, codes_in, fax_message, free_port

from gateway.sandbox import SandboxHandler

pytestmark = pytest.mark.timeout(60)


async def test_upstream_down_then_back_defers_then_submits(gateway):
    port = free_port()  # nothing listens here yet
    gw = await gateway(upstream_port=port)
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert "cannot reach 127.0.0.1" in job["last_result"] and job["next_attempt_at"]

    upstream = SandboxServer(port=port)
    await upstream.start()
    try:
        job = await gw.wait_state(code, "submitted")
        (fax,) = await upstream.wait_for(1)
        assert fax.code == code
        assert [e["state"] for e in job["events"]].count("deferred") >= 1
        assert job["attempts"] >= 2
    finally:
        await upstream.stop()


async def test_5xx_to_rcpt_rejects_for_good(gateway, sandbox):
    gw = await gateway()
    (code,) = codes_in((await gw.send(rcpts=["12125550550@greenfax.com"])).message)
    job = await gw.wait_state(code, "rejected")
    assert job["upstream_reply"].startswith("550 5.1.1")
    await asyncio.sleep(0.8)  # longer than retry_max: a rejected job is never tried again
    assert gw.job(code)["attempts"] == 1 and sandbox.faxes == []


async def test_4xx_to_rcpt_defers_and_retries(gateway, sandbox):
    gw = await gateway()
    (code,) = codes_in((await gw.send(rcpts=["12125550450@greenfax.com"])).message)
    job = await gw.wait_state(code, "deferred")
    assert job["upstream_reply"].startswith("450 4.2.1")
    await asyncio.sleep(1.0)
    assert gw.job(code)["attempts"] >= 2  # retried with backoff, still deferred


async def test_5xx_to_data_rejects_and_4xx_defers(gateway, sandbox):
    gw = await gateway()
    (rejected,) = codes_in((await gw.send(rcpts=["12125550554@greenfax.com"])).message)
    (deferred,) = codes_in((await gw.send(rcpts=["12125550451@greenfax.com"])).message)
    assert (await gw.wait_state(rejected, "rejected"))["upstream_reply"].startswith("554 5.6.0")
    assert (await gw.wait_state(deferred, "deferred"))["upstream_reply"].startswith("451 4.3.0")


async def test_5xx_to_auth_is_a_setup_problem_and_the_job_waits(gateway, sandbox):
    sandbox.handler.credentials = ("gw", "s3cret-pass")
    sandbox.handler.faults.auth = "535 5.7.8 Authentication credentials invalid"
    gw = await gateway(upstream={"username": "gw", "password": "s3cret-pass"})
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert "refused the session set-up" in job["last_result"]
    assert job["upstream_reply"].startswith("535 5.7.8")
    assert "535" in gw.service.forwarder.last_setup_failure

    sandbox.handler.faults.auth = None  # the operator fixed the account
    await gw.wait_state(code, "submitted")
    assert len(sandbox.faxes) == 1


async def test_auth_with_password_from_environment_submits(gateway, sandbox, monkeypatch):
    sandbox.handler.credentials = ("gw", "s3cret-pass")
    monkeypatch.setenv("FAXGW_TEST_UPSTREAM_PW", "s3cret-pass")
    gw = await gateway(upstream={"username": "gw", "password": {"env": "FAXGW_TEST_UPSTREAM_PW"}})
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")


async def test_connection_dropped_after_data_is_unknown_and_never_resent(gateway, sandbox):
    gw = await gateway()
    (code,) = codes_in((await gw.send(rcpts=["12125550999@greenfax.com"])).message)
    job = await gw.wait_state(code, "unknown")
    assert "no reply after the message was sent" in job["last_result"]
    await asyncio.sleep(0.8)
    assert gw.job(code)["attempts"] == 1 and gw.job(code)["state"] == "unknown"


async def test_upstream_without_8bitmime_holds_8bit_message(gateway, tmp_path):
    upstream = SandboxServer()
    await upstream.start(eightbitmime=False)
    try:
        gw = await gateway(upstream_port=upstream.port)
        body = "Grüße aus dem Büro, bitte faxen."
        message = fax_message(body=body).replace(b"Content-Transfer-Encoding: 7bit", b"Content-Transfer-Encoding: 8bit")
        message = message.replace(body.encode("ascii", "replace"), body.encode())
        assert not message.isascii()
        (code,) = codes_in((await gw.send(message)).message)
        job = await gw.wait_state(code, "held")
        assert "8BITMIME" in job["reason"]
        assert upstream.faxes == []
    finally:
        await upstream.stop()


async def test_queue_lifetime_expires_a_job_that_cannot_be_sent(gateway):
    gw = await gateway(upstream_port=free_port(), upstream={"max_queue_lifetime": 0.3})
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "expired")
    assert "cannot reach" in job["last_result"]


@pytest.fixture
def ca(tmp_path):
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(ca_file)
    return server_context, ca_file


async def test_starttls_upstream_is_required_and_verified(gateway, ca):
    server_context, ca_file = ca
    upstream = SandboxServer()
    await upstream.start(tls_context=server_context)
    try:
        trusted = await gateway(upstream_port=upstream.port, upstream={"tls": "starttls", "ca_file": str(ca_file)})
        (code,) = codes_in((await trusted.send()).message)
        await trusted.wait_state(code, "submitted")
    finally:
        await upstream.stop()


async def test_starttls_upstream_with_untrusted_certificate_waits(tmp_path, ca):
    from conftest import RunningGateway, settings_for

    from gateway.service import Service

    server_context, _ca_file = ca  # the gateway is not told about this CA
    upstream = SandboxServer()
    await upstream.start(tls_context=server_context)
    service = Service(settings_for(tmp_path, upstream.port, upstream={"tls": "starttls"}))
    await service.start()
    try:
        gw = RunningGateway(service, service.settings)
        (code,) = codes_in((await gw.send()).message)
        job = await gw.wait_state(code, "deferred")
        assert "TLS with 127.0.0.1" in job["last_result"]
        assert upstream.faxes == []
    finally:
        await service.stop()
        await upstream.stop()


async def test_starttls_required_but_not_offered_waits(gateway, sandbox):
    gw = await gateway(upstream={"tls": "starttls"})
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert "does not offer STARTTLS" in job["last_result"]


async def test_unregistered_account_sender_is_rejected_by_the_service(gateway, sandbox):
    handler: SandboxHandler = sandbox.handler
    handler.account_sender = "someone-else@office.example"
    gw = await gateway()
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "rejected")
    assert f"<{ACCOUNT_SENDER}> is not registered" in job["upstream_reply"]


async def test_stop_lets_a_send_in_flight_finish(gateway, sandbox):
    sandbox.handler.faults.delay = 1.0
    gw = await gateway()
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "sending")
    await gw.service.stop()  # a normal stop or restart must not leave the fax `unknown`
    assert gw.job(code)["state"] == "submitted"
    assert len(sandbox.faxes) == 1
