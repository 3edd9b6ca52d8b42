"""Faults the gateway must ride out and keep serving through (issue: "Safe to run for years", faults).

Each test drives a real gateway on loopback through one kind of trouble:
a flapping upstream, a full store, a clock that jumps, the IMAP server gone
for a while, a storm of status mail.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import timedelta

import aiosmtplib
import pytest
from conftest import ACCOUNT_SENDER, RunningGateway, SandboxServer, codes_in, fax_message, free_port, pdf_bytes, \
    settings_for
from peers.dovecot import DovecotInstance, unavailable_reason

from gateway import store
from gateway.sandbox.statusmail import status_email
from gateway.service import Service

pytestmark = pytest.mark.timeout(120)


class FlakyUpstream:
    """A minimal SMTP server whose transactions follow a script: drop mid-DATA, 4xx, slow, then accept."""

    def __init__(self, script: list[str], *, greeting_delay: float = 0) -> None:
        self.script = list(script)
        self.greeting_delay = greeting_delay  # seconds before the 220: an upstream slow to take connections
        self.accepted: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.greeting_delay)
        writer.write(b"220 flaky.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-flaky.test\r\n250 8BITMIME\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb == b"DATA":
                    if not await self._data(reader, writer):
                        return
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def _data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        behaviour = self.script.pop(0) if self.script else "accept"
        writer.write(b"354 go ahead\r\n")
        await writer.drain()
        if behaviour == "drop":
            await reader.read(1000)  # a part of the message, then the line goes dead
            writer.transport.abort()
            return False
        message = await reader.readuntil(b"\r\n.\r\n")
        if behaviour == "4xx":
            writer.write(b"451 4.3.0 Temporary trouble, try again\r\n")
        elif behaviour == "slow":
            await asyncio.sleep(2.0)
            self.accepted.append(message)
            writer.write(b"250 2.0.0 accepted slowly\r\n")
        else:
            self.accepted.append(message)
            writer.write(b"250 2.0.0 accepted\r\n")
        return True


async def test_flapping_upstream_loses_nothing_and_sends_nothing_twice(gateway):
    flaky = FlakyUpstream(["drop", "4xx", "slow", "drop", "4xx"])
    await flaky.start()
    try:
        gw = await gateway(upstream_port=flaky.port)
        codes = []
        for n in range(6):
            big = pdf_bytes(marker=f"doc {n}" * 4000)  # large enough to be cut off mid-DATA
            codes += codes_in((await gw.send(fax_message(pdf=big))).message)
        states = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = {code: gw.job(code)["state"] for code in codes}
            if all(state in ("submitted", "unknown") for state in states.values()):
                break
            await asyncio.sleep(0.1)
        assert all(state in ("submitted", "unknown") for state in states.values()), states
        # Every fax the upstream accepted is submitted, once; the others are unknown, never lost.
        accepted = [code for code in codes if any(f"[{code}]".encode() in m for m in flaky.accepted)]
        assert all(sum(f"[{code}]".encode() in m for m in flaky.accepted) == 1 for code in accepted)
        assert all(states[code] == "submitted" for code in accepted)
        assert sum(state == "submitted" for state in states.values()) >= 4
        events = [e["detail"] for code in codes for e in gw.job(code)["events"] if e["state"] == "deferred"]
        assert any("451 4.3.0" in detail for detail in events)
        assert (await gw.send()).code == 250  # still serving
    finally:
        await flaky.stop()


async def test_no_job_is_sending_while_the_upstream_connection_is_not_ready(gateway):
    """A job is claimed only when its connection is ready, so a crash meanwhile leaves nothing `unknown`."""
    slow = FlakyUpstream([], greeting_delay=2.0)
    await slow.start()
    try:
        gw = await gateway(upstream_port=slow.port, upstream={"connect_timeout": 10})
        codes = [code for _ in range(10) for code in codes_in((await gw.send()).message)]
        deadline = time.monotonic() + 1.5  # within the upstream's greeting delay
        while time.monotonic() < deadline:
            states = {gw.job(code)["state"] for code in codes}
            assert states == {"queued"}, states
            await asyncio.sleep(0.05)
        for code in codes:
            job = await gw.wait_state(code, "submitted", timeout=30)
            assert [e["state"] for e in job["events"]] == ["queued", "sending", "submitted"]
        assert len(slow.accepted) == 10
    finally:
        await slow.stop()


async def test_an_outcome_the_store_refuses_is_recorded_when_it_takes_writes_again(gateway, caplog):
    """The upstream has the fax, the store refuses the write (here: another connection holds it locked, as a
    full disk refuses it): the job does not stay `sending` behind the running gateway."""
    caplog.set_level(logging.INFO, logger="faxgw")
    slow = FlakyUpstream(["slow"])
    await slow.start()
    try:
        gw = await gateway(upstream_port=slow.port, upstream={"concurrency": 1})
        (code,) = codes_in((await gw.send()).message)
        await gw.wait_state(code, "sending")
        blocker = sqlite3.connect(gw.store_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            while not slow.accepted:
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 30
            while "event=outcome-not-recorded" not in caplog.text:
                assert time.monotonic() < deadline, "the refused write was not reported"
                await asyncio.sleep(0.1)
            assert gw.job(code)["state"] == "sending"
            assert gw.service.forwarder.unrecorded == 1
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        job = await gw.wait_state(code, "submitted", timeout=45)
        assert job["upstream_reply"] == "250 2.0.0 accepted slowly"
        assert gw.service.forwarder.unrecorded == 0
        assert f"event=outcome-recorded code={code}" in caplog.text
        assert len(slow.accepted) == 1  # recorded, never sent again
    finally:
        await slow.stop()


async def test_full_store_answers_452_keeps_serving_and_loses_nothing(tmp_path, sandbox):
    settings = settings_for(tmp_path, sandbox.port, store={"max_size": "1MiB"})
    service = Service(settings)
    await service.start()
    acknowledged: list[str] = []
    full_reply = None
    try:
        gw = RunningGateway(service, settings)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, start_tls=False) as smtp:
            for n in range(40):
                message = fax_message(pdf=pdf_bytes(marker=f"page {n}" * 6000))
                try:
                    _errors, reply = await smtp.sendmail("erp@legacy.example", ["12125551234@greenfax.com"], message)
                    acknowledged += codes_in(reply)
                except aiosmtplib.SMTPDataError as exc:
                    full_reply = f"{exc.code} {exc.message}"
                    break
            assert full_reply is not None and full_reply.startswith("452 4.3.1"), full_reply
            assert (await smtp.noop())[0] == 250  # the session and the gateway go on
        health = await service.health()
        assert health["status"] in ("ok", "failing")  # answered, whatever the disk says
    finally:
        await service.stop()
    assert acknowledged
    # More room (a bigger disk): everything acknowledged is still there and gets sent.
    roomy = settings_for(tmp_path, sandbox.port)
    service = Service(roomy)
    await service.start()
    try:
        gw = RunningGateway(service, roomy)
        for code in acknowledged:
            await gw.wait_state(code, "submitted", "unknown", timeout=30)
        sent = {fax.code for fax in sandbox.faxes}
        assert all(code in sent or gw.job(code)["state"] == "unknown" for code in acknowledged)
    finally:
        await service.stop()


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self):
        return store.utcnow() + self.offset


async def test_clock_jumping_forward_expires_nothing_at_once(tmp_path):
    upstream = SandboxServer(port=free_port())  # not started yet: the upstream is down
    clock = Clock()
    settings = settings_for(tmp_path, upstream.port, upstream={"max_queue_lifetime": "1d"})
    service = Service(settings, clock=clock)
    await service.start()
    try:
        gw = RunningGateway(service, settings)
        (code,) = codes_in((await gw.send()).message)
        await gw.wait_state(code, "deferred")
        clock.offset = timedelta(days=10)  # the clock leaps ahead
        await asyncio.sleep(2.0)  # several more attempts
        job = gw.job(code)
        assert job["state"] == "deferred" and job["attempts"] >= 2
        await upstream.start()
        await gw.wait_state(code, "submitted")
    finally:
        await service.stop()
        await upstream.stop()


async def test_clock_jumping_backwards_does_not_park_jobs(tmp_path):
    upstream = SandboxServer(port=free_port())
    clock = Clock()
    settings = settings_for(tmp_path, upstream.port, upstream={"retry_initial": "1h", "retry_max": "2h"})
    service = Service(settings, clock=clock)
    await service.start()
    try:
        gw = RunningGateway(service, settings)
        (code,) = codes_in((await gw.send()).message)
        job = await gw.wait_state(code, "deferred")
        assert job["next_attempt_at"] > store.iso(store.utcnow() + timedelta(minutes=50))
        await upstream.start()
        clock.offset = -timedelta(days=2)  # next attempt now lies 2 days + 1 hour ahead: impossible
        await gw.wait_state(code, "submitted", timeout=10)
    finally:
        await service.stop()
        await upstream.stop()


@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
async def test_imap_server_gone_for_a_while(gateway, sandbox, tmp_path):
    with DovecotInstance(tmp_path / "imap") as imap:
        gw = await gateway(status={"imap": {
            "host": imap.host, "port": imap.port_tls, "tls": "implicit", "ca_file": str(imap.ca_file),
            "username": "faxes", "password": "imap-secret-1", "idle_refresh": 5, "timeout": 3,
            "trusted": True}})  # a mailbox only GreenFax writes to: its unsigned mail counts
        deadline = time.monotonic() + 10
        while not gw.service.imap.state.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        imap.stop()
        (code,) = codes_in((await gw.send()).message)
        await gw.wait_state(code, "submitted")
        await asyncio.sleep(4.0)  # several failed reconnects
        assert gw.service.imap.state.last_error is not None
        assert (await gw.send()).code == 250  # faxes flow on meanwhile
        imap.start()
        fax = next(f for f in sandbox.faxes if f.code == code)
        imap.deliver(status_email(fax, ACCOUNT_SENDER))
        await gw.wait_state(code, "delivered", timeout=40)


async def test_status_storm_is_absorbed(gateway, sandbox):
    # The storm comes from a trusted network (GreenFax's servers, which send every status mail: no rate limit).
    gw = await gateway(smtp={"listen": ["127.0.0.1:0"]}, notifications={"enabled": False},
                       status={"listen": ["127.0.0.1:0"], "trusted_sender_domains": ["sandbox.greenfax.localhost"],
                               "require_dkim": False, "trusted_networks": ["127.0.0.0/8"]})
    codes = []
    for _ in range(5):
        codes += codes_in((await gw.send()).message)
    for code in codes:
        await gw.wait_state(code, "submitted")
    faxes = {fax.code: fax for fax in sandbox.faxes}
    mails = []
    for n in range(300):  # the real reports, each many times over, and strangers' mail
        fax = faxes[codes[n % len(codes)]]
        mails.append(status_email(fax, ACCOUNT_SENDER) if n % 3 else
                     f"From: someone{n}@example.net\r\nSubject: hello {n}\r\n\r\nhi\r\n".encode())
    port = gw.service.status_addresses[0][1]

    async def client(batch: list[bytes]) -> int:
        ok = 0
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
            for mail in batch:
                await smtp.sendmail("status@sandbox.greenfax.localhost", [ACCOUNT_SENDER], mail)
                ok += 1
        return ok

    accepted = await asyncio.gather(*(client(mails[i::10]) for i in range(10)))
    assert sum(accepted) == 300
    for code in codes:
        assert gw.job(code)["state"] == "delivered"
    assert (await gw.send()).code == 250


async def test_feed_unreachable_for_a_while(tmp_path, sandbox):
    from gateway.sandbox.feedserver import FEED_PATH, start_feed

    port = free_port()  # nothing serves the feed yet
    settings = settings_for(tmp_path, sandbox.port, feed={
        "url": f"http://127.0.0.1:{port}{FEED_PATH}", "accountid": "acct", "password": "feed-pw-1",
        "min_interval": 0.2, "interval": 0.5})
    service = Service(settings)
    await service.start()
    runner = None
    try:
        gw = RunningGateway(service, settings)
        await asyncio.sleep(2.0)
        assert "cannot reach the feed" in (service.feed.state.last_error or "")
        assert (await gw.send()).code == 250  # faxes flow on meanwhile
        runner, _port = await start_feed(sandbox.handler, "127.0.0.1", port, accountid="acct", password="feed-pw-1",
                                         timezone=settings.greenfax.timezone, min_interval=0.1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and service.feed.state.last_error is not None:
            await asyncio.sleep(0.1)
        assert service.feed.state.last_error is None and service.feed.state.last_poll_at is not None
    finally:
        await service.stop()
        if runner is not None:
            await runner.cleanup()
