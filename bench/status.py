"""Status-path benchmark: status mails parsed, correlated and stored per second.

Two measurements on a fresh store holding N submitted jobs:

- pipeline: the status mails go straight into the status path in-process
  (mail-parser, the status-mail rules, correlation and a committed store
  write per report, group-committed with `--concurrency` in flight);
- smtp: the same kind of mails arrive over SMTP at a running gateway's
  status listener (a subprocess), `--sessions` concurrent clients.

Every report is committed with synchronous=FULL before it counts.

    .venv/bin/python bench/status.py [--jobs 4000] [--concurrency 64] [--sessions 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib

from gateway import config, store
from gateway.models import FaxNumber, NewMessage, Recipient
from gateway.sandbox.server import SandboxFax
from gateway.sandbox.statusmail import status_email
from gateway.status.inbound import StatusMail, receive
from gateway.status.mailrules import load_rules
from gateway.status.report import Channel

ACCOUNT_SENDER = "faxes@bench.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed(path: Path, count: int) -> list[tuple[str, str]]:
    """A store with `count` submitted jobs; returns (code, digits) pairs."""
    conn = store.connect(path)
    store.migrate(conn)
    jobs = []
    conn.execute("BEGIN")
    for n in range(count):
        digits = f"1212555{1000 + n % 8000:04d}"
        message = NewMessage(raw=b"Subject: bench\r\n\r\nx\r\n", mail_from="erp@bench.example", client="127.0.0.1",
                             helo="bench", auth_user=None, header_from="erp@bench.example", smtputf8=False,
                             needs_8bitmime=False, recipients=[Recipient(f"{digits}@greenfax.com",
                                                                         FaxNumber("+" + digits))])
        (code,) = store.insert_message(conn, message, store.iso(store.utcnow()))
        jobs.append((code, digits))
    conn.execute("UPDATE jobs SET state = 'submitted'")
    conn.execute("COMMIT")
    conn.close()
    return jobs


def mails(jobs: list[tuple[str, str]]) -> list[bytes]:
    now = datetime.now(UTC)
    return [
        status_email(SandboxFax(reference_id=9_000_000 + i, number=digits, code=code, sender=ACCOUNT_SENDER,
                                envelope_sender="", raw=b"", result="delivered" if i % 4 else "failed",
                                reason=None if i % 4 else "busy", pages=2 if i % 4 else 0, received_at=now),
                     ACCOUNT_SENDER)
        for i, (code, digits) in enumerate(jobs)
    ]


def settings_for(tmp: Path, port: int) -> config.Settings:
    return config.validate({
        "smtp": {"listen": [f"127.0.0.1:{port}"]},
        "http": {"listen": ["127.0.0.1:0"]},
        "store": {"path": str(tmp / "store.sqlite3")},
        "upstream": {"host": "127.0.0.1", "port": free_port(), "tls": "none", "account_sender": ACCOUNT_SENDER,
                     "return_path": "bounce@bench.example"},
        "status": {"listen": [f"127.0.0.1:{port}"], "trusted_sender_domains": ["sandbox.greenfax.localhost"]},
        "notifications": {"enabled": False},
    }, source="bench", base=tmp)


async def pipeline(tmp: Path, count: int, concurrency: int) -> dict[str, float]:
    jobs = seed(tmp / "store.sqlite3", count)
    batch = mails(jobs)
    settings = settings_for(tmp, free_port())
    status = StatusMail(settings, load_rules())
    writer = store.Writer(settings.store.path)
    writer.start()
    queue = list(batch)
    started = time.perf_counter()

    async def worker() -> None:
        while queue:
            await receive(status, writer, queue.pop(), channel=Channel.IMAP)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    writer.close()
    applied = check(settings.store.path, count)
    return {"mails": count, "seconds": round(elapsed, 3), "per_second": round(count / elapsed, 1), "applied": applied}


async def over_smtp(tmp: Path, count: int, sessions: int) -> dict[str, float]:
    jobs = seed(tmp / "store.sqlite3", count)
    batch = mails(jobs)
    port = free_port()
    cfg = tmp / "faxgw.toml"
    settings = settings_for(tmp, port)
    cfg.write_text(
        f'[http]\nlisten = ["127.0.0.1:0"]\n[smtp]\nlisten = ["127.0.0.1:{port}"]\n[store]\npath = "{settings.store.path}"\n'
        f'[upstream]\nhost = "127.0.0.1"\nport = {free_port()}\ntls = "none"\naccount_sender = "{ACCOUNT_SENDER}"\n'
        f'return_path = "bounce@bench.example"\n[status]\nlisten = ["127.0.0.1:{port}"]\n'
        f'trusted_sender_domains = ["sandbox.greenfax.localhost"]\n[notifications]\nenabled = false\n'
        f'[log]\nlevel = "warning"\n')
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(cfg), "serve"],
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        queue = list(batch)
        started = time.perf_counter()

        async def client() -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
                while queue:
                    await smtp.sendmail("status@sandbox.greenfax.localhost", [ACCOUNT_SENDER], queue.pop())

        await asyncio.gather(*(client() for _ in range(sessions)))
        elapsed = time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    applied = check(settings.store.path, count)
    return {"mails": count, "seconds": round(elapsed, 3), "per_second": round(count / elapsed, 1), "applied": applied}


def check(path: Path, count: int) -> int:
    conn = store.connect(path, readonly=True)
    applied = conn.execute("SELECT COUNT(*) FROM reports WHERE outcome = 'applied'").fetchone()[0]
    conn.close()
    if applied != count:
        raise SystemExit(f"only {applied} of {count} reports were applied")
    return applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4000, help="status mails (and jobs) per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="reports in flight in the pipeline run")
    parser.add_argument("--sessions", type=int, default=8, help="SMTP clients in the smtp run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                           "kernel": platform.release(), "cpu": platform.processor() or platform.machine()}}
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        results["pipeline"] = asyncio.run(pipeline(Path(one), args.jobs, args.concurrency))
        results["smtp"] = asyncio.run(over_smtp(Path(two), args.jobs, args.sessions))
    print(f"{'path':10} {'mails':>6} {'seconds':>8} {'mails/s':>8}")
    for name in ("pipeline", "smtp"):
        r = results[name]
        print(f"{name:10} {r['mails']:>6} {r['seconds']:>8} {r['per_second']:>8}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
