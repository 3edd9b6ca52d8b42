"""The XML data feed (issue 4, sections 2 and 3): the sandbox's feed over real HTTP on loopback, a real store.

GreenFax's rules are hard limits here: one request per min_interval (kept in
the store, so across restarts and `faxgw feed poll` in another process), at
most 90 days per request, XML read without DTDs or entities. Intervals are
a second or less (allowed for a loopback feed URL); the sandbox's own
interval is a little shorter than the poller's, as GreenFax's 20 minutes
are shorter than the default 21.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    ACCOUNT_SENDER,
    RETURN_PATH,
    SandboxServer,
    codes_in,
    fax_message,
    free_port,
    send,
    settings_for,
)

from gateway import store
from gateway.cli.feedcmd import feed as feed_group
from gateway.metrics import Metrics
from gateway.sandbox.feedserver import FEED, FEED_PATH, SandboxFeed, start_feed
from gateway.sandbox.greenfax import SandboxFax
from gateway.status.correlate import CorrelationPolicy
from gateway.status.feedpoll import FeedPoller, PollResult
from gateway.status.feedxml import parse_feed

ACCOUNT = "acct-4711"
PASSWORD = "Pa55&w0rd/?x=1 +y"  # URL-special characters: masked in every form it may take
ZONE = "America/New_York"
NUMBER = "+12125551234"
FORBIDDEN = [PASSWORD, quote(PASSWORD, safe=""), quote_plus(PASSWORD), quote(PASSWORD)]

pytestmark = pytest.mark.timeout(90)


def today() -> date:
    return datetime.now(ZoneInfo(ZONE)).date()


def assert_no_password(text: str) -> None:
    for form in FORBIDDEN:
        assert form not in text, f"the password ({form!r}) leaked: {text}"


# --- fixtures: the sandbox feed, a store, pollers ------------------------------------------------


@dataclass
class RunningFeed:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{FEED_PATH}"

    @property
    def rules(self) -> SandboxFeed:
        return self.runner.app[FEED]

    async def wait_requests(self, count: int, timeout: float = 15) -> list:
        deadline = time.monotonic() + timeout
        while len(self.rules.requests) < count:
            assert time.monotonic() < deadline, f"only {len(self.rules.requests)} requests: {self.rules.requests}"
            await asyncio.sleep(0.02)
        return self.rules.requests


@pytest.fixture
async def feed(sandbox: SandboxServer) -> AsyncIterator[Callable[..., Any]]:
    """`await feed(min_interval=0.8, **options)` serves the sandbox's feed on a free loopback port."""
    runners: list[web.AppRunner] = []

    async def start(min_interval: float = 0.8, **options: Any) -> RunningFeed:
        runner, port = await start_feed(sandbox.handler, "127.0.0.1", 0, accountid=ACCOUNT, password=PASSWORD,
                                        timezone=ZONE, min_interval=min_interval, **options)
        runners.append(runner)
        return RunningFeed(runner, port)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[store.Writer]:
    """The store writer of a fresh store (where the gateway fixture would put it)."""
    path = tmp_path / "store" / "faxgw.sqlite3"
    conn = store.connect(path)
    store.migrate(conn)
    conn.close()
    started = store.Writer(path)
    started.start()
    yield started
    started.close()


def feed_settings(tmp_path: Path, url: str, *, password: str = PASSWORD, reconcile: dict | None = None,
                  **feed: Any):
    values = {"url": url, "accountid": ACCOUNT, "password": password, "min_interval": 1.0, "interval": 60,
              "timeout": 5, **feed}
    return settings_for(tmp_path, 2526, feed=values, greenfax={"timezone": ZONE}, reconcile=reconcile or {})


def poller(tmp_path: Path, writer: store.Writer, url: str, *, clock: Callable[[], datetime] = store.utcnow,
           **options: Any) -> FeedPoller:
    settings = feed_settings(tmp_path, url, **options)
    return FeedPoller(settings, writer, CorrelationPolicy.from_settings(settings), clock=clock)


def sandbox_fax(reference_id: int, *, number: str = "12125551234", sender: str = ACCOUNT_SENDER,
                reason: str | None = None, received_at: datetime | None = None) -> SandboxFax:
    """A fax as the sandbox records one it received (for rows of faxes the gateway never sent)."""
    return SandboxFax(reference_id=reference_id, number=number, code=None, sender=sender, envelope_sender=sender,
                      raw=b"", result="failed" if reason else "delivered", reason=reason,
                      pages=0 if reason else 2, received_at=received_at or datetime.now(UTC))


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def stored(path: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    conn = store.connect(path, readonly=True)
    try:
        return [dict(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


# --- the command, as a subprocess -----------------------------------------------------------------

# Until gateway/cli/main.py adds the group (`cli.add_command(feed)`), the launcher adds it the same way.
LAUNCHER = ("import sys; from gateway import cli; from gateway.cli.feedcmd import feed;"
            " 'feed' in cli.cli.commands or cli.cli.add_command(feed); cli.main()")


def write_config(tmp_path: Path, url: str, *, min_interval: float = 1.0, password: str = PASSWORD) -> Path:
    path = tmp_path / "faxgw.toml"
    path.write_text(f"""
[store]
path = "store/faxgw.sqlite3"

[upstream]
host = "127.0.0.1"
port = 2526
tls = "none"
account_sender = "{ACCOUNT_SENDER}"
return_path = "{RETURN_PATH}"

[greenfax]
timezone = "{ZONE}"

[feed]
url = "{url}"
accountid = "{ACCOUNT}"
password = {json.dumps(password)}
min_interval = {min_interval}
""")
    return path


async def faxgw_feed(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `faxgw --config CONFIG feed ARGS` in its own process (without blocking the loop serving the feed)."""
    env = {key: value for key, value in os.environ.items() if key != "FAXGW_CONFIG"}
    argv = [sys.executable, "-c", LAUNCHER, "--config", str(config), "feed", *args]
    result = await asyncio.to_thread(subprocess.run, argv, cwd=config.parent, env=env, capture_output=True,
                                     text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert_no_password(result.stdout + result.stderr)
    return result


# --- the sandbox's feed -------------------------------------------------------------------------


async def test_sandbox_feed_answers_by_greenfax_rules(sandbox, feed):
    running = await feed(min_interval=0.5)
    sandbox.faxes.append(sandbox_fax(8591334, reason="busy"))
    day = today()

    async def get(session: aiohttp.ClientSession, **query: str) -> tuple[int, str]:
        params = {"accountid": ACCOUNT, "password": PASSWORD, **query}
        async with session.get(running.url, params={k: v for k, v in params.items() if v is not None}) as response:
            return response.status, await response.text()

    async with aiohttp.ClientSession() as session:
        assert (await get(session, password=None, startdate=str(day), enddate=str(day)))[0] == 401
        assert (await get(session, password="wrong", startdate=str(day), enddate=str(day)))[0] == 403
        status, body = await get(session, startdate=str(day), enddate=str(day))
        assert status == 200, body
        assert "<jobid>8591334</jobid>" in body and "<status>Busy</status>" in body
        local = sandbox.faxes[0].received_at.astimezone(ZoneInfo(ZONE)).strftime("%Y-%m-%d %H:%M:%S")
        assert f"<timestamp>{local}</timestamp>" in body
        status, body = await get(session, startdate=str(day), enddate=str(day))
        assert status == 429 and "<error>too many requests" in body
        await asyncio.sleep(0.55)
        status, body = await get(session, startdate=str(day - timedelta(days=90)), enddate=str(day))
        assert status == 400 and "may not exceed 90 days" in body  # 91 days
        await asyncio.sleep(0.55)
        assert (await get(session, startdate=str(day - timedelta(days=89)), enddate=str(day)))[0] == 200
        await asyncio.sleep(0.55)
        assert (await get(session, startdate="2026-13-45", enddate=str(day)))[0] == 400
        await asyncio.sleep(0.55)
        assert (await get(session, startdate=str(day), enddate=str(day - timedelta(days=1))))[0] == 400
        await asyncio.sleep(0.55)
        status, body = await get(session, startdate=f"{day} 00:00:00", enddate=f"{day} 23:59:59")
        assert status == 200 and "<jobid>8591334</jobid>" in body


def test_feed_xml_is_read_tolerantly():
    body = b"""<?xml version="1.0"?>
    <Outbound xmlns="urn:x"><FAX><JobID>17</JobID><FaxNumber>+1 (212) 555-1234</FaxNumber>
      <Sender>Faxes &lt;FAXES@office.example&gt;</Sender><Status>no answer</Status><Extra>x</Extra>
      <TimeStamp>2026-11-27 01:02:03</TimeStamp></FAX>
    <fax><status>Pending</status></fax></Outbound>"""
    first, second = parse_feed(body, ZoneInfo(ZONE))
    report = first.report
    assert (report.reference_id, report.fax_number, report.reason, first.sender) == (
        "17", NUMBER, "no_answer", ACCOUNT_SENDER)
    assert report.reported_at == datetime(2026, 11, 27, 6, 2, 3, tzinfo=UTC) and report.pages is None
    assert second.pending and second.report.result is None and second.report.fax_number is None


async def test_the_feed_is_read_over_https_with_the_configured_ca(tmp_path, sandbox, writer):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    runner, port = await start_feed(sandbox.handler, "127.0.0.1", 0, ssl_context=context, accountid=ACCOUNT,
                                    password=PASSWORD, timezone=ZONE, min_interval=0.1)
    url = f"https://127.0.0.1:{port}{FEED_PATH}"
    try:
        untrusted = await poller(tmp_path, writer, url, min_interval=0.2).poll_now(manual=False)
        assert "cannot reach the feed" in untrusted.error and "certificate" in untrusted.error.lower()
        await asyncio.sleep(0.25)
        trusted = poller(tmp_path, writer, url, min_interval=0.2, ca_file=str(tmp_path / "ca.pem"))
        assert (await trusted.poll_now(manual=False)).ok
    finally:
        await runner.cleanup()


# --- GreenFax's limits ------------------------------------------------------------------------------


async def test_a_91_day_backfill_is_split_into_requests_an_interval_apart(tmp_path, sandbox, feed, writer):
    running = await feed(min_interval=0.8)
    runner = poller(tmp_path, writer, running.url, backfill_days=90, min_interval=1.0)
    task = asyncio.create_task(runner.run())
    try:
        first, second = await running.wait_requests(2)
        await wait_until(lambda: runner.state.polls["ok"] == 2)  # the second answer is applied too
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    day = today()
    assert (first.startdate, first.enddate) == (str(day - timedelta(days=90)), str(day - timedelta(days=1)))
    assert (second.startdate, second.enddate) == (str(day - timedelta(days=2)), str(day))  # overlaps a day
    assert first.status == second.status == 200
    assert second.at - first.at >= 0.95
    assert runner.state.last_window == f"{day - timedelta(days=2)}..{day}" and runner.state.last_error is None


async def test_rate_limit_holds_across_a_restart_and_against_faxgw_feed_poll(tmp_path, sandbox, feed):
    running = await feed(min_interval=50)
    path = tmp_path / "store" / "faxgw.sqlite3"
    config = write_config(tmp_path, running.url, min_interval=60)
    first_writer = store.Writer(path)
    conn = store.connect(path)
    store.migrate(conn)
    conn.close()
    first_writer.start()
    try:
        result = await poller(tmp_path, first_writer, running.url, min_interval=60).poll_now(manual=False)
        assert result.ok, result
    finally:
        first_writer.close()  # the service stops...
    second_writer = store.Writer(path)  # ...and starts again: a new poller on the same store
    second_writer.start()
    try:
        restarted = poller(tmp_path, second_writer, running.url, min_interval=60)
        again = await restarted.poll_now(manual=True)
        assert not again.polled and again.next_allowed_at == result.last_request_at + timedelta(seconds=60)
        # The command runs in its own process while this poller exists, and reads the limit from the store.
        cli = await faxgw_feed(config, "poll")
        assert cli.returncode != 0 and cli.stdout == ""
        (line,) = cli.stderr.strip().splitlines()
        when = again.next_allowed_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        assert line.startswith("faxgw: error: not polled:") and f"the next poll is allowed at {when}" in line
    finally:
        second_writer.close()
    assert len(running.rules.requests) == 1  # nothing else reached GreenFax


async def test_a_manual_poll_in_another_process_counts_for_the_service(tmp_path, sandbox, feed, writer):
    running = await feed(min_interval=50)
    config = write_config(tmp_path, running.url, min_interval=60)
    service_poller = poller(tmp_path, writer, running.url, min_interval=60)
    cli = await faxgw_feed(config, "poll")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("polled ") and "the next poll is allowed at" in cli.stdout
    result = await service_poller.poll_now(manual=False)
    assert not result.polled and result.next_allowed_at > store.utcnow() + timedelta(seconds=55)
    assert service_poller.state.last_window == f"{today() - timedelta(days=2)}..{today()}"
    status = json.loads((await faxgw_feed(config, "status", "--json")).stdout)
    assert status["last_window"] == service_poller.state.last_window and status["last_rows"] == 0
    assert status["next_allowed_at"] == store.iso(result.next_allowed_at)
    text = (await faxgw_feed(config, "status")).stdout
    assert "next poll:" in text and "allowed at" in text and "rows seen:" in text
    assert len(running.rules.requests) == 1


async def test_a_clock_that_jumps_back_does_not_block_polling(tmp_path, sandbox, feed, writer, caplog):
    caplog.set_level(logging.INFO, logger="faxgw.feed")
    running = await feed(min_interval=0.4)
    assert (await poller(tmp_path, writer, running.url, min_interval=0.5).poll_now(manual=False)).ok
    behind = poller(tmp_path, writer, running.url, min_interval=0.5,
                    clock=lambda: store.utcnow() - timedelta(days=1))
    task = asyncio.create_task(behind.run())
    try:
        await running.wait_requests(2, timeout=5)  # one interval later, not a day
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert "event=feed-clock-backwards" in caplog.text
    assert all(request.status == 200 for request in running.rules.requests)


# --- hostile XML ------------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<outbound><fax><jobid>&lol9;</jobid><status>Success</status></fax></outbound>
"""


async def test_hostile_xml_is_refused_without_harm(tmp_path, writer, caplog):
    caplog.set_level(logging.DEBUG)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-MARKER")
    served: list[str] = []
    answer: dict[str, bytes] = {}

    async def outbound(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.Response(body=answer["body"], content_type="text/xml")

    app = web.Application()
    app.router.add_get(FEED_PATH, outbound)
    app.router.add_get("/{tail:.*}", outbound)  # an external entity or DTD fetched from here would show up
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    hostile = {
        "billion laughs": BILLION_LAUGHS,
        "external file": (f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>'
                          "<outbound><fax><jobid>&x;</jobid><status>Success</status></fax></outbound>").encode(),
        "external URL": (f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "{base}/stolen">]>'
                         "<outbound><fax><jobid>&x;</jobid></fax></outbound>").encode(),
        "external DTD": f'<?xml version="1.0"?><!DOCTYPE r SYSTEM "{base}/evil.dtd"><outbound/>'.encode(),
    }
    feed_poller = poller(tmp_path, writer, base + FEED_PATH, min_interval=0.3)
    try:
        for name, body in hostile.items():
            answer["body"] = body
            started = time.monotonic()
            result = await feed_poller.poll_now(manual=False)
            assert result.polled and result.error and "DTD" in result.error, name
            assert time.monotonic() - started < 2, name
            await asyncio.sleep(0.35)
        answer["body"] = (b'<?xml version="1.0"?><outbound><fax><jobid>1</jobid><faxnumber>14155550100</faxnumber>'
                          b"<sender>x@else.example</sender><status>Success</status></fax></outbound>")
        assert (await feed_poller.poll_now(manual=False)).ok  # and the poller keeps working
    finally:
        await runner.cleanup()
    assert served == [FEED_PATH] * 5  # no entity or DTD was ever fetched
    assert feed_poller.state.polls["refused"] == 4 and feed_poller.state.last_error is None
    refusals = [r for r in caplog.records if "event=feed-refused" in r.getMessage()]
    assert len(refusals) == 4 and all(r.levelno == logging.ERROR for r in refusals)
    reports = stored(writer.path, "SELECT reference_id, raw FROM reports")
    assert [r["reference_id"] for r in reports] == ["1"]  # only the well-formed row
    assert "TOPSECRET-MARKER" not in caplog.text + json.dumps(reports) and "lollol" not in caplog.text


# --- rows, jobs and reconciliation ----------------------------------------------------------------


async def test_a_row_for_a_fax_not_sent_here_is_foreign(tmp_path, sandbox, feed, writer, caplog):
    caplog.set_level(logging.DEBUG, logger="faxgw.feed")
    running = await feed(min_interval=0.4)
    sandbox.faxes.append(sandbox_fax(9000001, sender="someone@elsewhere.example"))
    sandbox.faxes.append(sandbox_fax(9000002, number="13125550123", reason="busy"))  # ours, but no such job
    feed_poller = poller(tmp_path, writer, running.url, min_interval=0.5)
    feed_poller.metrics = Metrics()
    result = await feed_poller.poll_now(manual=False)
    assert result.ok and result.rows == 2 and result.outcomes == {"foreign": 2}
    await asyncio.sleep(0.55)
    again = await feed_poller.poll_now(manual=False)
    assert again.outcomes == {"duplicate": 2}  # the overlap shows them again; they are kept once
    # The poll that found something is logged; the one that saw only known rows is not (debug), as on an idle gateway.
    assert [r.levelname for r in caplog.records if "event=feed-poll" in r.getMessage()] == ["INFO", "DEBUG"]
    metrics = feed_poller.metrics.render().decode()
    assert 'faxgw_feed_polls_total{outcome="ok"} 2.0' in metrics
    assert 'faxgw_status_reports_total{channel="feed"} 2.0' in metrics  # rows seen again are not counted
    config = write_config(tmp_path, running.url)
    cli = await faxgw_feed(config, "foreign", "--json")
    rows = json.loads(cli.stdout)
    assert sorted(row["reference_id"] for row in rows) == ["9000001", "9000002"]
    assert {row["number"] for row in rows} == {NUMBER, "+13125550123"}
    assert all(row["outcome"] == "foreign" for row in rows)
    notes = {row["reference_id"]: row["note"] for row in rows}
    assert "is not the account sender" in notes["9000001"] and "no job to +13125550123" in notes["9000002"]
    table = (await faxgw_feed(config, "foreign")).stdout
    assert "9000001" in table and "JOB ID" in table
    assert stored(writer.path, "SELECT COUNT(*) AS n FROM reports WHERE outcome = 'unmatched'")[0]["n"] == 0


async def test_a_large_answer_is_applied_in_several_commits(tmp_path, sandbox, feed, writer):
    running = await feed(min_interval=0.4)
    sandbox.faxes.extend(sandbox_fax(9100000 + n, sender="other@elsewhere.example") for n in range(450))
    result = await poller(tmp_path, writer, running.url, min_interval=0.5).poll_now(manual=False)
    assert result.ok and result.rows == 450 and result.outcomes == {"foreign": 450}
    assert stored(writer.path, "SELECT COUNT(*) AS n FROM reports WHERE outcome = 'foreign'")[0]["n"] == 450


async def unknown_job_that_greenfax_has(tmp_path: Path, sandbox: SandboxServer, gateway: Any):
    """A gateway process killed (-9) after the upstream took the fax and before its reply arrived.

    The sandbox kills it from its `on_fax` hook, which runs after it has
    recorded the fax and before it answers the data. The same store is then
    served again in-process: the job left `sending` is `unknown`.
    """
    from peers.gatewayproc import ServeProcess, write_config

    served = ServeProcess(write_config(tmp_path, sandbox.port, workers=1)).start()
    process = served.proc
    sandbox.handler.on_fax.append(lambda fax: os.kill(process.pid, signal.SIGKILL))
    try:
        await served.wait_listening()
        (code,) = codes_in((await send(served.smtp_port, fax_message())).message)
        (fax,) = await sandbox.wait_for(1)
        await asyncio.to_thread(process.wait, 15)
    finally:
        if process.poll() is None:
            served.kill_all()
    sandbox.handler.on_fax.clear()
    restarted = await gateway()
    assert restarted.job(code)["state"] == "unknown"
    return restarted, code, fax


async def test_unknown_job_left_by_kill_9_mid_send_is_resolved_by_the_feed(tmp_path, sandbox, feed, gateway):
    restarted, code, fax = await unknown_job_that_greenfax_has(tmp_path, sandbox, gateway)
    running = await feed(min_interval=0.4)
    feed_poller = poller(tmp_path, restarted.service.writer, running.url, min_interval=0.5)
    result = await feed_poller.poll_now(manual=False)
    assert result.ok and result.outcomes == {"applied": 1}, result
    job = restarted.job(code)
    assert job["state"] == "delivered" and job["reference_id"] == str(fax.reference_id)
    assert any(e["source"] == "feed" and e["state"] == "delivered" for e in job["events"])
    assert len(sandbox.faxes) == 1 and job["attempts"] == 1  # never sent twice


async def test_a_pending_row_makes_an_unknown_job_submitted(tmp_path, sandbox, feed, gateway):
    gw, code, fax = await unknown_job_that_greenfax_has(tmp_path, sandbox, gateway)
    running = await feed(min_interval=0.4, pending_for=3600)
    feed_poller = poller(tmp_path, gw.service.writer, running.url, min_interval=0.5, reconcile={"after": "0s"})
    assert (await feed_poller.poll_now(manual=False)).outcomes == {"applied": 1}
    job = gw.job(code)
    assert job["state"] == "submitted" and job["reference_id"] == str(fax.reference_id)
    assert "listed as pending" in job["events"][-1]["detail"]
    running.rules.pending_for = 0  # GreenFax has finished it
    await asyncio.sleep(0.55)
    assert (await feed_poller.poll_now(manual=False)).outcomes == {"applied": 1}
    assert gw.job(code)["state"] == "delivered" and len(sandbox.faxes) == 1


async def test_unknown_job_not_in_the_feed_waits_unless_resend_unknown_is_on(tmp_path, sandbox, feed, gateway):
    sandbox.handler.faults.drop_after_data = True  # GreenFax never got it, but the gateway cannot know
    gw = await gateway()
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "unknown")
    running = await feed(min_interval=0.4)
    waiting = poller(tmp_path, gw.service.writer, running.url, min_interval=0.5, reconcile={"after": "0s"})
    assert (await waiting.poll_now(manual=False)).outcomes == {"waiting": 1}
    await asyncio.sleep(0.55)
    assert (await waiting.poll_now(manual=False)).outcomes == {}  # judged once
    job = gw.job(code)
    notes = [e for e in job["events"] if e["detail"].startswith("not in the feed; waiting for the operator")]
    assert job["state"] == "unknown" and len(notes) == 1 and notes[0]["source"] == "reconcile"
    assert sandbox.faxes == [] and job["attempts"] == 1

    sandbox.handler.faults.drop_after_data = False
    resending = poller(tmp_path, gw.service.writer, running.url, min_interval=0.5,
                       reconcile={"after": "0s", "resend_unknown": True})
    await asyncio.sleep(0.55)
    assert (await resending.poll_now(manual=False)).outcomes == {"resent": 1}
    job = await gw.wait_state(code, "submitted")
    assert any(e["state"] == "queued" and e["detail"].startswith("resent: not in the feed") for e in job["events"])
    assert len(sandbox.faxes) == 1 and job["attempts"] == 2


async def test_submitted_job_without_a_result_pulls_the_window_back(tmp_path, sandbox, feed, gateway):
    gw = await gateway()
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    (fax,) = await sandbox.wait_for(1)
    fax.received_at -= timedelta(days=10)  # GreenFax dates it long ago, outside the usual overlap
    conn = store.connect(gw.store_path)
    old = store.iso(store.utcnow() - timedelta(days=10, minutes=5))
    conn.execute("UPDATE jobs SET created_at = ?, updated_at = ? WHERE code = ?", (old, old, code))
    conn.close()
    running = await feed(min_interval=0.4)
    feed_poller = poller(tmp_path, gw.service.writer, running.url, min_interval=0.5, reconcile={"after": "1h"})
    result = await feed_poller.poll_now(manual=False)
    assert result.window.start <= today() - timedelta(days=10) and result.outcomes == {"applied": 1}
    assert gw.job(code)["state"] == "delivered"


# --- secrets ---------------------------------------------------------------------------------------


async def test_the_password_never_appears_in_logs_or_output(tmp_path, sandbox, feed, writer, caplog):
    caplog.set_level(logging.DEBUG)
    running = await feed(min_interval=30)
    results: list[PollResult] = []
    closed = f"http://127.0.0.1:{free_port()}{FEED_PATH}"
    for url, options in ((closed, {}), (running.url, {"password": PASSWORD + "-old"}),
                         (running.url, {}), (running.url, {})):
        results.append(await poller(tmp_path, writer, url, min_interval=0.2, **options).poll_now(manual=True))
        await asyncio.sleep(0.25)
    outage, forbidden, ok, too_many = results
    assert "cannot reach the feed" in outage.error and "HTTP 403" in forbidden.error
    assert ok.ok and "HTTP 429" in too_many.error
    assert "password=********" in caplog.text
    assert_no_password(caplog.text + " ".join(r.describe(store.utcnow()) for r in results))
    cli = await faxgw_feed(write_config(tmp_path, running.url, min_interval=0.2, password=PASSWORD + "-x"), "poll")
    assert cli.returncode != 0 and "HTTP" in cli.stderr  # 429 or 403: either way one line, no password
    assert len(cli.stderr.strip().splitlines()) == 1


def test_every_feed_command_has_help_with_an_example():
    assert "Example:" in (feed_group.help or "")
    for name, command in feed_group.commands.items():
        assert "Example:" in (command.help or ""), name


async def test_feed_status_before_any_poll(tmp_path, writer):
    config = write_config(tmp_path, "http://127.0.0.1:9/api/xml/outbound.php")
    text = (await faxgw_feed(config, "status")).stdout
    assert "last poll:     never" in text and "allowed now" in text
