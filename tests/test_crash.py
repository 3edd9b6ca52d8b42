"""Durability under kill -9: the gateway runs as a real process and is killed mid-batch.

Every message acknowledged with 250 must, after a restart, have reached the
sandbox or be `unknown` (the upstream may have it); none is lost and none is
sent twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiosmtplib
import pytest
from conftest import ACCOUNT_SENDER, RETURN_PATH, SandboxServer, codes_in, fax_message, free_port, pdf_bytes

from gateway import store

pytestmark = pytest.mark.timeout(120)

CLIENTS = 8
MESSAGES = 240
KILL_AFTER = 90  # acknowledged messages before the kill


def write_config(tmp_path: Path, smtp_port: int, upstream_port: int) -> Path:
    path = tmp_path / "faxgw.toml"
    path.write_text(f"""
[http]
listen = ["127.0.0.1:0"]

[smtp]
listen = ["127.0.0.1:{smtp_port}"]
hostname = "gw.test"

[store]
path = "store/faxgw.sqlite3"

[upstream]
host = "127.0.0.1"
port = {upstream_port}
tls = "none"
account_sender = "{ACCOUNT_SENDER}"
return_path = "{RETURN_PATH}"
retry_initial = "200ms"
retry_max = "1s"
""")
    return path


def start_gateway(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "serve"],
                            cwd=config.parent, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


async def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.stderr.read().decode()}")
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("gateway did not start listening")


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


async def test_kill_9_mid_batch_loses_no_acknowledged_fax(tmp_path):
    sandbox = SandboxServer()
    await sandbox.start()
    smtp_port = free_port()
    config = write_config(tmp_path, smtp_port, sandbox.port)
    proc = start_gateway(config)
    restarted = None
    try:
        await wait_listening(smtp_port, proc)
        acked: list[str] = []
        enough = asyncio.Event()
        numbers = [f"1212555{n:04d}" for n in range(1000, 1000 + MESSAGES)]
        tasks = [asyncio.create_task(client(smtp_port, numbers[i::CLIENTS], acked, enough)) for i in range(CLIENTS)]
        await asyncio.wait_for(enough.wait(), 60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        await asyncio.gather(*tasks)
        acknowledged = set(acked)
        assert len(acknowledged) >= KILL_AFTER

        restarted = start_gateway(config)
        await wait_listening(smtp_port, restarted)
        conn = store.connect(config.parent / "store" / "faxgw.sqlite3", readonly=True)
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
    finally:
        for p in (proc, restarted):
            if p is not None and p.poll() is None:
                p.terminate()
                # Waited for off the event loop: the sandbox, the gateway's upstream, runs on it and must
                # answer the sends still in flight, or the gateway's stop waits out its grace for them.
                await asyncio.to_thread(p.wait, 30)
        await sandbox.stop()
