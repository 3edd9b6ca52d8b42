"""Web console benchmark: the job list and the job page on the million-job store of bench/listing.py.

The console's own aiohttp app (gateway/http/console.py, with the store's
writer, as `faxgw serve` runs it) listens on a free loopback port over the
cached store; a logged-in client asks for each page --runs times and the
times are the whole HTTP round trip on loopback (server time plus well
under a millisecond). Target: under 100 ms per page.

Pages: the newest job list; the list filtered by state (a rare one: held),
by number, by sender; its 20th keyset page (?before=); the search box with
a job code and with a text no job has (the slowest search: every way of
matching runs to the end); one job's page (its
timeline, reports, audit, message facts) and that job's thumbnail (cached),
where the generated messages carry a document. The job page writes an audit
row per view, as in production: the bench adds rows to the cached store's
audit table. The counts per state at the top of the list are made at most
once a second, beside the rows' query: the worst sample of a list page is one
that waited for a count.

    .venv/bin/python bench/console.py [--jobs 1000000] [--workdir /var/tmp/faxgw-bench] [--runs 15]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import statistics
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from benchlib import machine  # bench/ is sys.path[0] when this runs as a script
from listing import prepare
from gateway import config, store
from gateway.http.console import Console
from gateway.outbound.passwords import hash_password
from gateway.rules import RulesInForce

USER, PASSWORD = "bench", "bench-password-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def serve(path: Path) -> tuple[web.AppRunner, store.Writer, str]:
    settings = config.validate({"sandbox": {"enabled": True}, "store": {"path": str(path)}, "web": {"enabled": True}},
                               source="bench", base=path.parent)
    writer = store.Writer(path)
    writer.start()
    console = Console(settings, writer=writer, read_store=lambda: store.connect(path, readonly=True),
                      rules=RulesInForce(), health=lambda: asyncio.sleep(0, {"status": "ok"}))
    app = web.Application()
    console.routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, writer, f"http://127.0.0.1:{port}"


async def login(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    async with session.get(base + "/login") as page:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())[1]
        login_cookie = page.cookies["faxgw_login"].value
    async with session.post(base + "/login", data={"csrf": csrf, "user": USER, "password": PASSWORD, "next": "/"},
                            headers={"Cookie": f"faxgw_login={login_cookie}"}, allow_redirects=False) as answer:
        assert answer.status == 303, await answer.text()
        return {"Cookie": f"faxgw_session={answer.cookies['faxgw_session'].value}"}


async def timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        await asyncio.sleep(0.08)  # a dozen pages a second: some of them count again
        started = time.perf_counter()
        async with session.get(url, headers=headers) as answer:
            await answer.read()
            assert answer.status == 200, (url, answer.status)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def run(args: argparse.Namespace) -> None:
    path, facts = prepare(args.workdir, args.jobs)
    conn = store.connect(path)
    store.set_web_user(conn, USER, "operator", hash_password(PASSWORD), store.iso(store.utcnow()))
    newest_code, number, sender = conn.execute(
        "SELECT code, number, sender FROM jobs ORDER BY created_at DESC, id DESC LIMIT 1").fetchone()
    page_20 = conn.execute("SELECT code FROM jobs ORDER BY created_at DESC, id DESC LIMIT 1 OFFSET 1000").fetchone()[0]
    conn.close()
    runner, writer, base = await serve(path)
    try:
        async with aiohttp.ClientSession() as session:
            headers = await login(session, base)
            pages = {
                "list (newest)": "/",
                "list state=held": "/?state=held",
                "list by number": f"/?number={number.replace('+', '%2B')}",
                "list by sender": f"/?sender={sender.split('@')[0]}",
                "list page 20 (keyset)": f"/?before={page_20}",
                "search: a job code": f"/?text={page_20}",
                "search: matching nothing": "/?text=nobody-at-all",
                "job page": f"/jobs/{newest_code}",
            }
            desc = {**machine.machine(), "store_filesystem": machine.filesystem_of(path)}
            print(machine.summary_line(desc))
            print(f"store: {facts['path']} ({args.jobs:,} jobs, {facts['bytes'] / 2**20:.0f} MiB)")
            print(f"{'page':<26} {'median ms':>10} {'p90 ms':>8} {'worst ms':>9}   (the counts per state are made"
                  " at most once a second, beside the rows: the worst is a page that waited for one)")
            for name, target in pages.items():
                samples = await timed(session, base + target, headers, args.runs)
                ordered = sorted(samples)
                print(f"{name:<26} {statistics.median(samples):>10.1f} {ordered[int(len(ordered) * 0.9) - 1]:>8.1f}"
                      f" {ordered[-1]:>9.1f}")
            async with session.get(f"{base}/jobs/{newest_code}/thumbnail.png", headers=headers) as answer:
                has_document = answer.status == 200
            if has_document:
                cached = await timed(session, f"{base}/jobs/{newest_code}/thumbnail.png", headers, args.runs)
                print(f"{'thumbnail (cached)':<26} {statistics.median(cached):>10.1f}")
            else:
                print("thumbnail: the generated store's messages carry no document (tests/test_console.py times none)")
    finally:
        await runner.cleanup()
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000, help="jobs in the store")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/faxgw-bench"), help="where the store is cached")
    parser.add_argument("--runs", type=int, default=15, help="requests per page")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
