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
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import aiosmtplib
import psutil
from aiohttp import web
from yarl import URL

from benchlib import machine, procs  # bench/ is sys.path[0] when this runs as a script
from benchlib.gatewayproc import GatewayProcess, Sections
from benchlib.procs import free_port
from benchlib.profiling import Profiler
from benchlib.report import fixed_row, write_json
from benchlib.sampling import process_cpu_seconds, thread_seconds
from benchlib.statusload import ACCOUNT_SENDER, FEED_ZONE, feed_body, mails, notify_urls, seed
from gateway import config, store
from gateway.rules import RulesInForce
from gateway.models import Channel
from gateway.status.correlate import CorrelationPolicy
from gateway.status.feedpoll import FeedPoller
from gateway.status.feedxml import parse_feed
from gateway.status.inbound import StatusMail, receive
from gateway.status.mailrules import load_rules

NOTIFY_TOKEN = "bench-notify-token-0123456789"
TIME_LIMIT = 300  # seconds: no measurement runs longer than this


def sections(tmp: Path, port: int, **extra: dict[str, Any]) -> Sections:
    """The gateway's config for a measurement: SMTP and status mail on `port`, the store in `tmp`."""
    data: Sections = {
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
    for name, values in extra.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def settings_for(data: Sections, tmp: Path) -> config.Settings:
    return config.validate(data, source="bench", base=tmp)


def served(data: Sections, log_level: str, **extra: dict[str, Any]) -> Sections:
    """The same config for a gateway subprocess: its own HTTP port, `[log] level`, and `extra` sections."""
    return {**data, "http": {"listen": [f"127.0.0.1:{free_port()}"]}, "log": {"level": log_level}, **extra}


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


def thread_split(pid: int, before: dict[str, float], count: int) -> dict[str, float]:
    """CPU microseconds per item of the main thread and of the others, busiest first."""
    after = thread_seconds([psutil.Process(pid)])
    used = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
    return {t: round(seconds / count * 1e6, 1) for seconds, t in used if seconds > 0}


def gateway_threads(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of the gateway ("main", "thread-ID")."""
    return thread_seconds([psutil.Process(pid)])


@contextlib.asynccontextmanager
async def gateway(tmp: Path, data: Sections, *, ports: list[int], profile: Path | None = None,
                  gil: bool = False) -> AsyncIterator[int]:
    """`faxgw serve` in a subprocess on this config, until the block ends; waits until `ports` take
    connections.

    `profile`: py-spy records the gateway (all threads, raw collapsed stacks) into this file; `gil`:
    only the thread holding the GIL (Python's CPU, not waits).
    """
    proc = GatewayProcess(tmp)
    profiler = Profiler(gil=gil, rate=200, settle=0.5)
    try:
        try:
            await proc.start(data, ports=ports, banner=False, timeout=30)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from exc
        if profile is not None:
            await profiler.start(proc.pid, profile)
        yield proc.pid
    finally:
        await proc.stop(grace=15)
        await profiler.stop(interrupt=False)  # py-spy ends with the gateway


def profile_path(args: argparse.Namespace, name: str) -> Path | None:
    if args.profile is None:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    return args.profile / f"{name}.txt"


# --- the measurements ---------------------------------------------------------------------------------


async def closed_loop(queue: list[Any], workers: int, work: Callable[[Any], Awaitable[None]],
                      pid: int | None = None) -> tuple[float, float]:
    """Run `work` on every item with `workers` in flight; returns the elapsed and CPU seconds (of `pid`)."""
    async def worker() -> None:
        while queue:
            await work(queue.pop())

    cpu, started = process_cpu_seconds(pid), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), TIME_LIMIT)
    return time.perf_counter() - started, process_cpu_seconds(pid) - cpu


async def pipeline(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    jobs = seed(tmp / "store.sqlite3", args.jobs)
    settings = settings_for(sections(tmp, free_port()), tmp)
    status = StatusMail(settings, RulesInForce(mail=load_rules()))
    writer = store.Writer(settings.store.path)
    writer.start()
    try:
        elapsed, cpu = await closed_loop(
            mails(jobs), args.concurrency,
            lambda raw: receive(status, writer, raw, channel=Channel.IMAP, client="127.0.0.1"))
    finally:
        writer.close()
    return result("mails", args.jobs, elapsed, settings.store.path, cpu, concurrency=args.concurrency)


async def over_smtp(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    jobs = seed(tmp / "store.sqlite3", args.jobs)
    queue = mails(jobs)
    port = free_port()
    data = sections(tmp, port)
    settings = settings_for(data, tmp)
    async with gateway(tmp, served(data, args.log_level), ports=[port], profile=profile_path(args, "smtp"),
                       gil=args.profile_gil) as pid:
        async def client() -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
                while queue:
                    await smtp.sendmail("status@sandbox.greenfax.localhost", [ACCOUNT_SENDER], queue.pop())

        cpu, threads, started = process_cpu_seconds(pid), gateway_threads(pid), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(args.sessions))), TIME_LIMIT)
        elapsed, cpu = time.perf_counter() - started, process_cpu_seconds(pid) - cpu
        threads = thread_split(pid, threads, args.jobs)
    return result("mails", args.jobs, elapsed, settings.store.path, cpu, sessions=args.sessions,
                  cpu_us_per_thread=threads)


async def serve_feed(body: bytes) -> tuple[web.AppRunner, int]:
    """The feed's one answer on a loopback port; returns the runner (to clean up) and the port."""
    async def outbound(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/xml")

    app = web.Application()
    app.router.add_get("/api/xml/outbound.php", outbound)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def timed_poll(poller: FeedPoller) -> tuple[Any, float, float]:
    """One poll of the feed; returns it with its elapsed and CPU seconds (this process)."""
    cpu, started = process_cpu_seconds(), time.perf_counter()
    polled = await asyncio.wait_for(poller.poll_now(manual=True), TIME_LIMIT)
    return polled, time.perf_counter() - started, process_cpu_seconds() - cpu


async def feed(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    count = args.feed_rows
    jobs = seed(tmp / "store.sqlite3", count, with_references=True, age=86400 + 600)
    body = feed_body(jobs, since=86400)
    parse_started = time.perf_counter()
    parse_feed(body, ZoneInfo(FEED_ZONE))
    parse_seconds = time.perf_counter() - parse_started
    runner, port = await serve_feed(body)
    settings = settings_for(sections(tmp, free_port(), greenfax={"timezone": FEED_ZONE},
                                     feed={"url": f"http://127.0.0.1:{port}/api/xml/outbound.php",
                                           "accountid": "bench", "password": "bench", "min_interval": 1}), tmp)
    writer = store.Writer(settings.store.path)
    writer.start()
    try:
        poller = FeedPoller(settings, writer, CorrelationPolicy.from_settings(settings))
        polled, elapsed, cpu = await timed_poll(poller)
        # The same answer again, as the overlapping windows bring it: every row was seen before.
        await asyncio.sleep(settings.feed.min_interval + 0.1)
        again, again_elapsed, again_cpu = await timed_poll(poller)
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
    port = free_port()
    data = sections(tmp, port)
    settings = settings_for(data, tmp)
    http_port = free_port()
    extra = {"notify": {"token": NOTIFY_TOKEN, "listen": [f"127.0.0.1:{http_port}"]}}
    queue = notify_urls(f"http://127.0.0.1:{http_port}/greenfax/notify/{NOTIFY_TOKEN}", jobs)
    refused: list[int] = []
    async with gateway(tmp, served(data, args.log_level, **extra), ports=[port, http_port],
                       profile=profile_path(args, "notify"), gil=args.profile_gil) as pid:
        connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def call(url: URL) -> None:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        refused.append(response.status)

            client, threads = process_cpu_seconds(), gateway_threads(pid)
            elapsed, cpu = await closed_loop(queue, args.connections, call, pid)
            client, threads = process_cpu_seconds() - client, thread_split(pid, threads, count)
    if refused:
        raise SystemExit(f"{len(refused)} Notify calls were refused: {sorted(set(refused))}")
    return result("calls", count, elapsed, settings.store.path, cpu, connections=args.connections,
                  client_cpu_percent=round(100 * client / elapsed, 1), cpu_us_per_thread=threads)


MEASUREMENTS = {"pipeline": pipeline, "smtp": over_smtp, "feed": feed, "notify": notify}


def parse_args() -> argparse.Namespace:
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
    args.names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.names) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    return args


# The results table: (heading, key in a measurement's results), with the column's format.
COLUMNS = [("unit", "unit"), ("count", "count"), ("seconds", "seconds"), ("per s", "per_second"),
           ("CPU us/item", "cpu_us_per_item"), ("CPU %", "cpu_percent")]
COLUMN_SPEC = "<10 <6 >7 >8 >9 >11 >6"


def print_results(names: list[str], results: dict[str, Any]) -> None:
    print(fixed_row(["path"] + [heading for heading, _key in COLUMNS], COLUMN_SPEC))
    for name in names:
        print(fixed_row([name] + [results[name][key] for _heading, key in COLUMNS], COLUMN_SPEC))
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


def main() -> int:
    args = parse_args()
    results: dict[str, Any] = {"machine": machine.brief("cores", "python", "kernel", "load", "cpu")}
    for name in args.names:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = procs.run_async(MEASUREMENTS[name](Path(tmp), args))
    print_results(args.names, results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(procs.run_main(main, "the benchmark"))
