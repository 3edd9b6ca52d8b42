"""Status-path benchmark: status reports parsed, correlated and stored per second, by channel.

Each measurement runs on a fresh store holding N submitted jobs, and every
report is committed with synchronous=FULL before it counts (the store's
production settings; nothing here turns durability down):

- pipeline: status mails go straight into the status path in-process
  (parsing, the status-mail rules, correlation and a committed store write
  per report, group-committed with `--concurrency` in flight);
- smtp: the same kind of mails arrive over SMTP at a running gateway's
  status listener (a subprocess), `--sessions` concurrent clients;
- feed: one XML data-feed answer of `--feed-rows` rows, served on loopback
  and polled by the gateway's own FeedPoller (fetch, safe XML reading,
  correlation, the poller's chunked commits); half the rows match their job
  by GreenFax's reference id, half by number and time window. The same
  answer is then polled again (every row a duplicate, as overlapping
  windows bring most rows);
- notify: GreenFax's HTTP Notify calls against a running gateway (a
  subprocess), made by an aiohttp client with `--connections` keep-alive
  connections; each call is committed before its 200.

Every measurement checks that each report was applied to its job, and
prints the CPU the system under test used per item (by thread for the
gateway subprocess). See bench/README.md, "The status path".

    .venv/bin/python bench/status.py [--only pipeline,smtp,feed,notify] [--jobs 4000] [--concurrency 64]
        [--sessions 8] [--feed-rows 40000] [--notify-calls 8000] [--connections 8]
        [--profile DIR [--profile-gil]] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

import aiohttp
import aiosmtplib
from aiohttp import web
from yarl import URL

from gateway import config, store
from gateway.models import FaxNumber, NewMessage, Recipient
from gateway.sandbox.notifycall import notify_parameters
from gateway.sandbox.server import SandboxFax
from gateway.sandbox.statusmail import status_email
from gateway.status.correlate import CorrelationPolicy
from gateway.status.feedpoll import FeedPoller
from gateway.status.feedxml import parse_feed
from gateway.status.inbound import StatusMail, receive
from gateway.status.mailrules import load_rules
from gateway.models import Channel

ACCOUNT_SENDER = "faxes@bench.example"
NOTIFY_TOKEN = "bench-notify-token-0123456789"
FEED_ZONE = "America/New_York"
TIME_LIMIT = 300  # seconds: no measurement runs longer than this


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the workload ---------------------------------------------------------------------------------


def seed(path: Path, count: int, *, with_references: bool = False, age: float = 0) -> list[tuple[str, str, int]]:
    """A store with `count` submitted jobs, each to its own number; returns (code, digits, reference id).

    `with_references`: every other job already knows its GreenFax reference id
    (as after an earlier report), so half the feed rows match by it. `age`:
    the jobs were created that many seconds ago.
    """
    conn = store.connect(path)
    store.migrate(conn)
    jobs = []
    conn.execute("BEGIN")
    for n in range(count):
        digits = f"1212{5_000_000 + n:07d}"
        message = NewMessage(raw=b"Subject: bench\r\n\r\nx\r\n", mail_from="erp@bench.example", client="127.0.0.1",
                             helo="bench", auth_user=None, header_from="erp@bench.example", smtputf8=False,
                             needs_8bitmime=False, recipients=[Recipient(f"{digits}@greenfax.com",
                                                                         FaxNumber("+" + digits))])
        (code,) = store.insert_message(conn, message, store.iso(store.utcnow()))
        jobs.append((code, digits, 9_000_000 + n))
        if with_references and n % 2 == 0:
            conn.execute("UPDATE jobs SET reference_id = ? WHERE code = ?", (str(9_000_000 + n), code))
    conn.execute("UPDATE jobs SET state = 'submitted', created_at = ?, updated_at = ?",
                 (store.iso(store.utcnow() - timedelta(seconds=age)),) * 2)
    conn.execute("COMMIT")
    conn.close()
    return jobs


def fax(index: int, code: str, digits: str, reference: int, now: datetime) -> SandboxFax:
    """One fax's outcome, as GreenFax reports it; every fourth one failed (busy)."""
    ok = index % 4 != 0
    return SandboxFax(reference_id=reference, number=digits, code=code, sender=ACCOUNT_SENDER, envelope_sender="",
                      raw=b"", result="delivered" if ok else "failed", reason=None if ok else "busy",
                      pages=2 if ok else 0, received_at=now)


def mails(jobs: list[tuple[str, str, int]]) -> list[bytes]:
    now = datetime.now(UTC)
    return [status_email(fax(i, *job, now), ACCOUNT_SENDER) for i, job in enumerate(jobs)]


def feed_body(jobs: list[tuple[str, str, int]], since: float) -> bytes:
    """A feed answer listing every job, in the format gateway/status/feedxml.py documents.

    The rows' times are spread over the last `since` seconds, in the account's zone.
    """
    start = datetime.now(ZoneInfo(FEED_ZONE)) - timedelta(seconds=since)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<outbound>"]
    for i, (_code, digits, reference) in enumerate(jobs):
        ok = i % 4 != 0
        stamp = (start + timedelta(seconds=since * i / len(jobs))).strftime("%Y-%m-%d %H:%M:%S")
        values = {"jobid": reference, "faxnumber": digits, "sender": ACCOUNT_SENDER,
                  "status": "Success" if ok else "Busy", "pages": 2 if ok else 0, "duration": 52 if ok else 0,
                  "cost": "0.20" if ok else "0.00", "timestamp": stamp}
        lines.append("  <fax>" + "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in values.items()) + "</fax>")
    lines.append("</outbound>")
    return ("\n".join(lines) + "\n").encode()


def notify_urls(base: str, jobs: list[tuple[str, str, int]]) -> list[URL]:
    now = datetime.now(UTC)
    return [URL(f"{base}?{urlencode(notify_parameters(fax(i, *job, now)))}", encoded=True)
            for i, job in enumerate(jobs)]


def settings_for(tmp: Path, port: int, **sections: dict[str, Any]) -> config.Settings:
    data: dict[str, Any] = {
        "smtp": {"listen": [f"127.0.0.1:{port}"]},
        "http": {"listen": ["127.0.0.1:0"]},
        "store": {"path": str(tmp / "store.sqlite3")},
        "upstream": {"host": "127.0.0.1", "port": free_port(), "tls": "none", "account_sender": ACCOUNT_SENDER,
                     "return_path": "bounce@bench.example"},
        # The load generator is GreenFax's servers here: its mail is trusted from loopback (and the rate limit off).
        "status": {"listen": [f"127.0.0.1:{port}"], "trusted_sender_domains": ["sandbox.greenfax.localhost"],
                   "require_dkim": False, "trusted_networks": ["127.0.0.0/8"], "max_messages_per_minute": 0},
        "notifications": {"enabled": False},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config.validate(data, source="bench", base=tmp)


def applied(path: Path, count: int) -> int:
    """How many reports were applied to a job; exits when it is not every one."""
    conn = store.connect(path, readonly=True)
    done = conn.execute("SELECT COUNT(*) FROM reports WHERE outcome = 'applied'").fetchone()[0]
    conn.close()
    if done != count:
        raise SystemExit(f"only {done} of {count} reports were applied")
    return done


def result(name: str, count: int, elapsed: float, path: Path, cpu: float, **extra: Any) -> dict[str, Any]:
    """One measurement's figures; `cpu`: the CPU seconds the system under test used meanwhile."""
    return {"unit": name, "count": count, "seconds": round(elapsed, 3), "per_second": round(count / elapsed, 1),
            "cpu_us_per_item": round(cpu / count * 1e6, 1), "cpu_percent": round(100 * cpu / elapsed, 1),
            "applied": applied(path, count), **extra}


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of process `pid` (the main thread's id is the pid)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return times


def thread_split(pid: int, before: dict[int, float], count: int) -> dict[str, float]:
    """CPU microseconds per item of the main thread and of the others, busiest first."""
    after = thread_cpu(pid)
    used = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
    return {("main" if t == pid else f"thread-{t}"): round(seconds / count * 1e6, 1)
            for seconds, t in used if seconds > 0}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of process `pid` (from /proc)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def gateway(tmp: Path, settings: config.Settings, extra: str = "", log_level: str = "warning",
            also_wait_for: int | None = None, profile: Path | None = None, gil: bool = False) -> Iterator[int]:
    """`faxgw serve` in a subprocess on the settings' store and ports, until the block ends.

    `profile`: py-spy records the gateway (all threads, raw collapsed stacks) into this file; `gil`:
    only the thread holding the GIL (Python's CPU, not waits).
    """
    smtp_port = settings.smtp.listen[0][1]
    cfg = tmp / "faxgw.toml"
    cfg.write_text(
        f'[http]\nlisten = ["127.0.0.1:{free_port()}"]\n[smtp]\nlisten = ["127.0.0.1:{smtp_port}"]\n'
        f'[store]\npath = "{settings.store.path}"\n'
        f'[upstream]\nhost = "127.0.0.1"\nport = {settings.upstream.port}\ntls = "none"\n'
        f'account_sender = "{ACCOUNT_SENDER}"\nreturn_path = "bounce@bench.example"\n'
        f'[status]\nlisten = ["127.0.0.1:{smtp_port}"]\ntrusted_sender_domains = ["sandbox.greenfax.localhost"]\n'
        'require_dkim = false\ntrusted_networks = ["127.0.0.0/8"]\nmax_messages_per_minute = 0\n'
        f'[notifications]\nenabled = false\n[log]\nlevel = "{log_level}"\n{extra}')
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(cfg), "serve"],
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(smtp_port, proc)
        if also_wait_for:
            wait_listening(also_wait_for, proc)
        spy = None
        if profile is not None:
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(proc.pid),
                                    "--threads", "--rate", "200", "--format", "raw", "--output", str(profile),
                                    *(["--gil"] if gil else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        if spy is not None:
            spy.wait(30)


def profile_path(args: argparse.Namespace, name: str) -> Path | None:
    if args.profile is None:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    return args.profile / f"{name}.txt"


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the gateway did not start listening within 30 s")


# --- the measurements ---------------------------------------------------------------------------------


async def closed_loop(queue: list[Any], workers: int, work: Callable[[Any], Awaitable[None]],
                      pid: int | None = None) -> tuple[float, float]:
    """Run `work` on every item with `workers` in flight; returns the elapsed and CPU seconds (of `pid`)."""
    async def worker() -> None:
        while queue:
            await work(queue.pop())

    cpu, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), TIME_LIMIT)
    return time.perf_counter() - started, cpu_seconds(pid) - cpu


async def pipeline(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    jobs = seed(tmp / "store.sqlite3", args.jobs)
    settings = settings_for(tmp, free_port())
    status = StatusMail(settings, load_rules())
    writer = store.Writer(settings.store.path)
    writer.start()
    try:
        elapsed, cpu = await closed_loop(mails(jobs), args.concurrency,
                                         lambda raw: receive(status, writer, raw, channel=Channel.IMAP, client="127.0.0.1"))
    finally:
        writer.close()
    return result("mails", args.jobs, elapsed, settings.store.path, cpu, concurrency=args.concurrency)


async def over_smtp(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    jobs = seed(tmp / "store.sqlite3", args.jobs)
    queue = mails(jobs)
    settings = settings_for(tmp, free_port())
    port = settings.smtp.listen[0][1]
    with gateway(tmp, settings, log_level=args.log_level, profile=profile_path(args, "smtp"),
                 gil=args.profile_gil) as pid:
        async def client() -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
                while queue:
                    await smtp.sendmail("status@sandbox.greenfax.localhost", [ACCOUNT_SENDER], queue.pop())

        cpu, threads, started = cpu_seconds(pid), thread_cpu(pid), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(args.sessions))), TIME_LIMIT)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
        threads = thread_split(pid, threads, args.jobs)
    return result("mails", args.jobs, elapsed, settings.store.path, cpu, sessions=args.sessions,
                  cpu_us_per_thread=threads)


async def feed(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    count = args.feed_rows
    jobs = seed(tmp / "store.sqlite3", count, with_references=True, age=86400 + 600)
    body = feed_body(jobs, since=86400)
    parse_started = time.perf_counter()
    parse_feed(body, ZoneInfo(FEED_ZONE))
    parse_seconds = time.perf_counter() - parse_started

    async def outbound(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/xml")

    app = web.Application()
    app.router.add_get("/api/xml/outbound.php", outbound)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    settings = settings_for(tmp, free_port(), greenfax={"timezone": FEED_ZONE},
                            feed={"url": f"http://127.0.0.1:{port}/api/xml/outbound.php", "accountid": "bench",
                                  "password": "bench", "min_interval": 1})
    writer = store.Writer(settings.store.path)
    writer.start()
    try:
        poller = FeedPoller(settings, writer, CorrelationPolicy.from_settings(settings))
        cpu, started = cpu_seconds(), time.perf_counter()
        polled = await asyncio.wait_for(poller.poll_now(manual=True), TIME_LIMIT)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        # The same answer again, as the overlapping windows bring it: every row was seen before.
        await asyncio.sleep(settings.feed.min_interval + 0.1)
        again_cpu, started = cpu_seconds(), time.perf_counter()
        again = await asyncio.wait_for(poller.poll_now(manual=True), TIME_LIMIT)
        again_elapsed, again_cpu = time.perf_counter() - started, cpu_seconds() - again_cpu
    finally:
        writer.close()
        await runner.cleanup()
    for poll in (polled, again):
        if poll.error or poll.rows != count:
            raise SystemExit(f"the feed poll failed: {poll.error or poll.rows}")
    if again.outcomes != {"duplicate": count}:
        raise SystemExit(f"the second poll was not all duplicates: {again.outcomes}")
    return result("rows", count, elapsed, settings.store.path, cpu, body_bytes=len(body),
                  parse_only_per_second=round(count / parse_seconds, 1),
                  again={"seconds": round(again_elapsed, 3), "per_second": round(count / again_elapsed, 1),
                         "cpu_us_per_item": round(again_cpu / count * 1e6, 1)})


async def notify(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    count = args.notify_calls
    jobs = seed(tmp / "store.sqlite3", count)
    settings = settings_for(tmp, free_port())
    http_port = free_port()
    extra = f'[notify]\ntoken = "{NOTIFY_TOKEN}"\nlisten = ["127.0.0.1:{http_port}"]\n'
    queue = notify_urls(f"http://127.0.0.1:{http_port}/greenfax/notify/{NOTIFY_TOKEN}", jobs)
    refused: list[int] = []
    with gateway(tmp, settings, extra, log_level=args.log_level, also_wait_for=http_port,
                 profile=profile_path(args, "notify"), gil=args.profile_gil) as pid:
        connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def call(url: URL) -> None:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        refused.append(response.status)

            client, threads = cpu_seconds(), thread_cpu(pid)
            elapsed, cpu = await closed_loop(queue, args.connections, call, pid)
            client, threads = cpu_seconds() - client, thread_split(pid, threads, count)
    if refused:
        raise SystemExit(f"{len(refused)} Notify calls were refused: {sorted(set(refused))}")
    return result("calls", count, elapsed, settings.store.path, cpu, connections=args.connections,
                  client_cpu_percent=round(100 * client / elapsed, 1), cpu_us_per_thread=threads)


MEASUREMENTS = {"pipeline": pipeline, "smtp": over_smtp, "feed": feed, "notify": notify}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="measurements to run, comma-separated")
    parser.add_argument("--jobs", type=int, default=4000, help="status mails (and jobs) per mail measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="reports in flight in the pipeline run")
    parser.add_argument("--sessions", type=int, default=8, help="SMTP clients in the smtp run")
    parser.add_argument("--feed-rows", type=int, default=40000, help="rows in the feed answer (and jobs)")
    parser.add_argument("--notify-calls", type=int, default=8000, help="Notify calls (and jobs)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive HTTP connections in the notify run")
    parser.add_argument("--log-level", default="warning", help="the gateway subprocess's [log] level")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy records the gateway subprocess (smtp, notify) into DIR/NAME.txt")
    parser.add_argument("--profile-gil", action="store_true", help="with --profile: only samples holding the GIL")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(names) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                           "kernel": platform.release(), "load": os.getloadavg(),
                                           "cpu": platform.processor() or platform.machine()}}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = asyncio.run(MEASUREMENTS[name](Path(tmp), args))
    print(f"{'path':10} {'unit':6} {'count':>7} {'seconds':>8} {'per s':>9} {'CPU us/item':>11} {'CPU %':>6}")
    for name in names:
        r = results[name]
        print(f"{name:10} {r['unit']:6} {r['count']:>7} {r['seconds']:>8} {r['per_second']:>9}"
              f" {r['cpu_us_per_item']:>11} {r['cpu_percent']:>6}")
    print("(CPU: the gateway process for smtp and notify; this process, with the feed's HTTP server, otherwise)")
    for name in ("smtp", "notify"):
        if name in results:
            split = ", ".join(f"{k} {v}" for k, v in results[name]["cpu_us_per_thread"].items())
            print(f"({name}: gateway CPU us/item by thread: {split})")
    if "notify" in results:
        print(f"(notify: the HTTP client used {results['notify']['client_cpu_percent']}% CPU)")
    if "feed" in results:
        again = results["feed"]["again"]
        print(f"(feed: parsing alone {results['feed']['parse_only_per_second']} rows/s; the same answer polled again,"
              f" every row a duplicate: {again['per_second']} rows/s, {again['cpu_us_per_item']} CPU us/row)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
