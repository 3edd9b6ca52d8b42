"""Several worker processes on one store ([service] workers): real `faxgw serve` process trees on loopback.

The workers share the listeners and the store, each fax is sent once, the
singletons run in exactly one worker (and move when it dies), a worker
killed mid-send leaves exactly its own jobs `unknown` at once and is
replaced, metrics and health cover every worker, signals reach all of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
import urllib.request
from collections import Counter

import aiosmtplib
import psutil
import pytest
import trustme
from conftest import SandboxServer, codes_in, fax_message, free_port, pdf_bytes
from peers.gatewayproc import ServeProcess, write_config

from gateway import store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def upstream():
    sandbox = SandboxServer()
    await sandbox.start()
    yield sandbox
    await sandbox.stop()


@pytest.fixture
async def serve(tmp_path):
    started: list[ServeProcess] = []

    def start(config) -> ServeProcess:
        started.append(ServeProcess(config).start())
        return started[-1]

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            await proc.stop()


async def send(port: int, number: str) -> str:
    message = fax_message(to=f"{number}@greenfax.com", pdf=pdf_bytes(marker=number))
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=20) as smtp:
        _errors, reply = await smtp.sendmail("erp@legacy.example", [f"{number}@greenfax.com"], message)
    (code,) = codes_in(reply)
    return code


def job(gateway: ServeProcess, code: str) -> dict:
    conn = store.connect(gateway.store_path, readonly=True)
    try:
        found = store.get_job(conn, code)
        assert found is not None, code
        return {**found, "claimed_by": conn.execute("SELECT claimed_by FROM jobs WHERE code = ?",
                                                    (code,)).fetchone()[0]}
    finally:
        conn.close()


async def wait_state(gateway: ServeProcess, code: str, *states: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = job(gateway, code)
        if found["state"] in states:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{code} is {found['state']}, not {states}:\n{gateway.log[-3000:]}")
        await asyncio.sleep(0.05)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await asyncio.to_thread(get)


async def healthy(gateway: ServeProcess, workers: int, timeout: float = 20) -> dict:
    """/healthz once it says ok with `workers` workers (a replaced worker takes a moment to beat)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await http_get(gateway.http_port, "/healthz")
        report = json.loads(body)
        if status == 200 and len(report.get("workers", [])) == workers:
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"not healthy with {workers} workers: {status} {report}")
        await asyncio.sleep(0.1)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_two_workers_share_the_listeners_and_send_each_fax_once(tmp_path, upstream, serve):
    gateway = serve(write_config(tmp_path, upstream.port, workers=2))
    await gateway.wait_listening()
    await gateway.wait_log(r"event=started ", count=2)
    assert len(gateway.worker_pids()) == 2

    numbers = [f"1212555{n:04d}" for n in range(2000, 2080)]
    codes = await asyncio.gather(*(send(gateway.smtp_port, number) for number in numbers))
    assert len(set(codes)) == len(numbers)
    await upstream.wait_for(len(numbers), timeout=30)
    arrived = Counter(fax.code for fax in upstream.faxes)
    assert set(arrived) == set(codes) and set(arrived.values()) == {1}, "each fax sent exactly once"
    for code in codes:
        await wait_state(gateway, code, "submitted")

    # Both workers took mail and sent faxes: the kernel shares the sockets, each claims in its own name.
    accepted_by = Counter(line.split("faxgw.intake[", 1)[1][:2] for line in gateway.lines("accepted"))
    assert set(accepted_by) == {"w0", "w1"}, accepted_by
    claimers = {job(gateway, code)["claimed_by"] for code in codes}
    assert len(claimers) == 2 and all(c.endswith(tuple(f":{pid}" for pid in gateway.worker_pids())) for c in claimers)

    # The singletons run once; /metrics sums both workers; /healthz covers both from either.
    assert len(gateway.lines("singletons")) == 1
    _status, body = await http_get(gateway.http_port, "/metrics")
    assert metric(body.decode(), "faxgw_messages_accepted_total") == len(numbers)
    assert metric(body.decode(), 'faxgw_forward_attempts_total{outcome="submitted"}') == len(numbers)
    report = await healthy(gateway, 2)
    assert sum(w["singletons"] for w in report["workers"]) == 1
    assert report["status"] == "ok" and report["failing"] == []


def smtp_connections(pids: list[int], port: int) -> dict[int, int]:
    """The established connections each process holds on the SMTP port (from the kernel's own tables)."""
    return {pid: sum(1 for c in psutil.Process(pid).net_connections("tcp")
                     if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port) for pid in pids}


async def greeted(port: int) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=20)
    await smtp.connect()
    return smtp


async def test_connections_are_shared_out_among_the_workers_even_when_opened_at_once(tmp_path, upstream, serve):
    # asyncio's own server would let the first worker to wake accept the whole burst (7 or 8 of 8);
    # clients that keep their connection would then leave the other core idle.
    gateway = serve(write_config(tmp_path, upstream.port, workers=2))
    await gateway.wait_listening()
    await healthy(gateway, 2)
    pids = gateway.worker_pids()
    burst = await asyncio.gather(*(greeted(gateway.smtp_port) for _ in range(8)))
    held = smtp_connections(pids, gateway.smtp_port)
    assert sum(held.values()) == 8 and min(held.values()) >= 3, held
    one_by_one = [await greeted(gateway.smtp_port) for _ in range(8)]
    held = smtp_connections(pids, gateway.smtp_port)
    assert sum(held.values()) == 16 and min(held.values()) >= 7, held
    for smtp in burst + one_by_one:
        await smtp.quit()

    # A dead worker's share is not waited for: the survivor takes every connection at once.
    victim, survivor = pids
    os.kill(victim, signal.SIGKILL)
    await gateway.wait_log(rf"event=worker-exited .*pid={victim} ")
    alone = [await greeted(gateway.smtp_port) for _ in range(6)]
    assert smtp_connections([survivor], gateway.smtp_port)[survivor] == 6
    for smtp in alone:
        await smtp.quit()
    assert await send(gateway.smtp_port, "12125552199")


async def test_implicit_tls_on_shared_sockets_and_failed_handshakes_leave_no_count_behind(tmp_path, upstream, serve):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    tls_port = free_port()
    gateway = serve(write_config(tmp_path, upstream.port, workers=2, smtp=f"""
listen_tls = ["127.0.0.1:{tls_port}"]
tls_cert = "{cert}"
tls_key = "{key}"
"""))
    await gateway.wait_listening()
    await healthy(gateway, 2)
    for _ in range(6):  # plain text to the TLS port: each handshake fails and the connection is closed
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_port)
        writer.write(b"EHLO plain.example\r\n")
        assert await reader.read() == b""
        writer.close()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    sessions = []
    for _ in range(6):
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=tls_port, use_tls=True, tls_context=client, timeout=20)
        await smtp.connect()
        sessions.append(smtp)
    held = smtp_connections(gateway.worker_pids(), tls_port)
    assert sum(held.values()) == 6 and min(held.values()) >= 2, held
    message = fax_message(to="12125552198@greenfax.com", pdf=pdf_bytes(marker="tls"))
    _errors, reply = await sessions[0].sendmail("erp@legacy.example", ["12125552198@greenfax.com"], message)
    (code,) = codes_in(reply)
    await wait_state(gateway, code, "submitted")
    for smtp in sessions:
        await smtp.quit()


async def test_a_worker_killed_mid_send_leaves_its_job_unknown_at_once_and_is_replaced(tmp_path, upstream, serve):
    gateway = serve(write_config(tmp_path, upstream.port, workers=2))
    await gateway.wait_listening()
    await healthy(gateway, 2)
    upstream.handler.faults.delay = 60  # the upstream takes the data and does not answer: the send hangs
    code = await send(gateway.smtp_port, "12125552101")
    sending = await wait_state(gateway, code, "sending")
    victim = int(sending["claimed_by"].rsplit(":", 1)[1])
    survivor = next(pid for pid in gateway.worker_pids() if pid != victim)

    os.kill(victim, signal.SIGKILL)
    # Not at the next start: the supervisor marks the dead worker's job at once.
    found = await wait_state(gateway, code, "unknown", timeout=5)
    assert found["last_result"] == "interrupted while sending"
    await gateway.wait_log(rf"event=worker-exited .*pid={victim} how=\"signal 9\" unknown={code}")
    await gateway.wait_log(r"event=worker-restart ")
    await gateway.wait_log(r"event=started ", count=3)
    pids = gateway.worker_pids()
    assert survivor in pids and victim not in pids and len(pids) == 2

    # The gateway took mail all along and still does; the unknown job was not sent again.
    upstream.handler.faults.delay = 0
    after = await send(gateway.smtp_port, "12125552102")
    await wait_state(gateway, after, "submitted")
    assert [fax.code for fax in upstream.faxes] == [after]
    assert job(gateway, code)["state"] == "unknown"
    report = await healthy(gateway, 2)
    assert victim not in [w["pid"] for w in report["workers"]]


async def test_the_singletons_move_to_another_worker_when_their_holder_dies(tmp_path, upstream, serve):
    gateway = serve(write_config(tmp_path, upstream.port, workers=2))
    await gateway.wait_listening()
    report = await healthy(gateway, 2)
    holder = next(w["pid"] for w in report["workers"] if w["singletons"])
    os.kill(holder, signal.SIGKILL)
    # Taken over within a second or so: by the survivor, or by the worker started in the dead one's place.
    found = await gateway.wait_log(r"event=singletons worker=w\d pid=(\d+)", count=2, timeout=5)
    successor = int(found[1].group(1))
    assert successor != holder and successor in gateway.worker_pids()
    report = await healthy(gateway, 2)
    assert [w["pid"] for w in report["workers"] if w["singletons"]] == [successor]
    await asyncio.sleep(1.5)  # the other worker keeps trying, and must keep failing
    assert len(gateway.lines("singletons")) == 2


async def test_a_second_serve_on_the_same_store_refuses_while_any_worker_lives(tmp_path, upstream, serve):
    config = write_config(tmp_path, upstream.port, workers=2)
    first = serve(config)
    await first.wait_listening()
    second = serve(config)
    assert await asyncio.to_thread(second.proc.wait, 30) != 0
    assert "in use by another `faxgw serve`" in second.log

    # The supervisor killed alone: its workers see it gone and stop (sends finish), releasing the store.
    workers = first.worker_pids()
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    await first.wait_log(r"event=supervisor-gone ", count=2)
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{pid}") and "zombie" not in _status(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived their supervisor"
        await asyncio.sleep(0.1)
    third = serve(config)
    await third.wait_listening()


def _status(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return fh.read()
    except FileNotFoundError:
        return "zombie"


async def test_sigterm_stops_every_worker_after_the_sends_in_flight(tmp_path, upstream, serve):
    gateway = serve(write_config(tmp_path, upstream.port, workers=2))
    await gateway.wait_listening()
    upstream.handler.faults.delay = 1.5  # a slow upstream: the send is in flight when the stop comes
    code = await send(gateway.smtp_port, "12125552201")
    await wait_state(gateway, code, "sending")
    assert await gateway.stop() == 0
    assert not gateway.group_alive()
    assert job(gateway, code)["state"] == "submitted"  # finished, not cut off into `unknown`
    assert [fax.code for fax in upstream.faxes] == [code]
    assert len(gateway.lines("worker-exited")) == 2 and "level=ERROR" not in gateway.log
    assert not [line for line in gateway.log.splitlines() if " ERROR " in line]


async def test_sighup_reaches_every_worker(tmp_path, upstream, serve):
    gateway = serve(write_config(tmp_path, upstream.port, workers=2))
    await gateway.wait_listening()
    await gateway.wait_log(r"event=started ", count=2)
    gateway.proc.send_signal(signal.SIGHUP)
    found = await gateway.wait_log(r"faxgw\.service\[(w\d)\] event=reloaded", count=2)
    assert {m.group(1) for m in found} == {"w0", "w1"}
