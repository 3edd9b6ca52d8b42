"""Durability under kill -9: the gateway runs as a real process and is killed mid-batch.

Every message acknowledged with 250 must, after a restart, have reached the
sandbox or be `unknown` (the upstream may have it); none is lost and none is
sent twice. With one process and with two workers (the whole tree killed at
once, as by a power cut).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiosmtplib
import pytest
from conftest import SandboxServer, codes_in, fax_message, pdf_bytes
from peers.gatewayproc import ServeProcess, write_config

from gateway import store

pytestmark = pytest.mark.timeout(120)

CLIENTS = 8
MESSAGES = 240
KILL_AFTER = 90  # acknowledged messages before the kill


async def client(port: int, numbers: list[str], acked: list[str], enough: asyncio.Event) -> None:
    """Send messages until told to stop; record the job codes of every 250."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    try:
        await smtp.connect()
        for number in numbers:
            message = fax_message(to=f"{number}@greenfax.com", pdf=pdf_bytes(marker=number))
            _errors, reply = await smtp.sendmail("erp@legacy.example", [f"{number}@greenfax.com"], message)
            acked.extend(codes_in(reply))
            if len(acked) >= KILL_AFTER:
                enough.set()
    except (aiosmtplib.SMTPException, OSError):
        return  # the gateway was killed under us: whatever was not acknowledged is not ours to keep
    finally:
        smtp.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_kill_9_mid_batch_loses_no_acknowledged_fax(tmp_path, workers):
    sandbox = SandboxServer()
    await sandbox.start()
    config = write_config(tmp_path, sandbox.port, workers=workers)
    gateway = ServeProcess(config).start()
    restarted = None
    try:
        await gateway.wait_listening()
        smtp_port = gateway.smtp_port
        acked: list[str] = []
        enough = asyncio.Event()
        numbers = [f"1212555{n:04d}" for n in range(1000, 1000 + MESSAGES)]
        tasks = [asyncio.create_task(client(smtp_port, numbers[i::CLIENTS], acked, enough)) for i in range(CLIENTS)]
        await asyncio.wait_for(enough.wait(), 60)
        gateway.kill_all()
        await asyncio.gather(*tasks)
        acknowledged = set(acked)
        assert len(acknowledged) >= KILL_AFTER

        restarted = ServeProcess(config).start()
        await restarted.wait_listening()
        conn = store.connect(restarted.store_path, readonly=True)
        deadline = time.monotonic() + 60
        while True:
            states = {job["code"]: job["state"] for job in store.list_jobs(conn, limit=10_000)}
            pending = [c for c in acknowledged if states.get(c) in ("queued", "sending", "deferred")]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        conn.close()

        arrived = Counter(fax.code for fax in sandbox.faxes)
        assert not pending, f"still waiting: {pending}"
        missing = [c for c in acknowledged if c not in states]
        assert not missing, f"acknowledged but not in the store: {missing}"
        lost = [c for c in acknowledged if arrived[c] == 0 and states[c] != "unknown"]
        assert not lost, f"acknowledged, not at the sandbox and not unknown: {[(c, states[c]) for c in lost]}"
        assert all(count == 1 for count in arrived.values()), "a fax reached the upstream twice"
        assert all(states[c] == "submitted" for c in acknowledged if arrived[c]
                   and states[c] != "unknown")
        if workers > 1:
            assert len(gateway.lines("workers-started")) == 1
    finally:
        for p in (gateway, restarted):
            if p is not None:
                await p.stop()
        await sandbox.stop()
