"""The `faxgw` command as an operator runs it: a real subprocess on a real store.

Stores with jobs in several states are made by a real gateway (the `gateway`
fixture) forwarding to the sandbox, whose table of numbers picks the outcome
(README, "The sandbox"): 0550 is refused at RCPT (rejected), 0450 is a
temporary refusal (deferred), 0999 drops the connection after the data
(unknown), other numbers are accepted (submitted). Tests of `faxgw serve`
itself start it as a subprocess in sandbox mode on free ports.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ACCOUNT_SENDER, NUMBER, RETURN_PATH, RunningGateway, codes_in, fax_message, free_port, send

from gateway import store
from gateway.cli.main import cli

# --- running the command ---------------------------------------------------------


def _argv(args: tuple[str, ...], config: Path | None) -> list[str]:
    return [sys.executable, "-m", "gateway", *(["--config", str(config)] if config else []), *args]


def _environ(extra: dict[str, str] | None) -> dict[str, str]:
    """The caller's environment without its FAXGW_CONFIG: a test names its config explicitly."""
    return {key: value for key, value in os.environ.items() if key != "FAXGW_CONFIG"} | (extra or {})


def faxgw(*args: str, cwd: Path, config: Path | None = None, env: dict[str, str] | None = None,
          stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `faxgw` command and capture what it prints."""
    return subprocess.run(_argv(args, config), cwd=cwd, env=_environ(env), input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on standard error (never a traceback); return it."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def rows(table: str) -> dict[str, list[str]]:
    """A printed table's rows by their first column (columns are separated by two spaces or more)."""
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in table.splitlines()[1:])}


# --- stores with jobs ---------------------------------------------------------------

# label: (number, sender, the state the sandbox brings it to), in order of creation
JOBS = {
    "submitted": (NUMBER, "erp@legacy.example", "submitted"),
    "scanner": ("13125550123", "scanner@copier.example", "submitted"),
    "rejected": ("12125550550", "erp@legacy.example", "rejected"),
    "deferred": ("12125550450", "erp@legacy.example", "deferred"),
    "unknown": ("12125550999", "erp@legacy.example", "unknown"),
}


def cli_config(gw: RunningGateway, directory: Path) -> Path:
    """A config file for the command that names the running gateway's store."""
    upstream = gw.settings.upstream
    return write_config(directory / "faxgw.toml", f"""
        [store]
        path = "{gw.store_path}"
        [upstream]
        host = "{upstream.host}"
        port = {upstream.port}
        tls = "none"
        account_sender = "{ACCOUNT_SENDER}"
        return_path = "{RETURN_PATH}"
    """)


@dataclass
class Jobs:
    gw: RunningGateway
    config: Path
    codes: dict[str, str]  # by label of JOBS

    def faxgw(self, *args: str) -> subprocess.CompletedProcess[str]:
        return faxgw(*args, cwd=self.config.parent, config=self.config)

    def json(self, *args: str) -> Any:
        result = self.faxgw(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def labels(self, listed: list[dict[str, Any]]) -> set[str]:
        by_code = {code: label for label, code in self.codes.items()}
        return {by_code[job["code"]] for job in listed}


@pytest.fixture
async def jobs(gateway, tmp_path: Path) -> Jobs:
    """A production-mode store with one job per entry of JOBS; deferred jobs wait an hour."""
    gw = await gateway(upstream={"retry_initial": 3600, "retry_max": 3600})
    codes = {}
    for label, (number, sender, state) in JOBS.items():
        address = f"{number}@greenfax.com"
        reply = await gw.send(fax_message(address, sender=sender), rcpts=[address], sender=sender)
        (codes[label],) = codes_in(reply.message)
        await gw.wait_state(codes[label], state)
    return Jobs(gw, cli_config(gw, tmp_path), codes)


# --- help ----------------------------------------------------------------------------

COMMANDS = sorted(cli.commands)


def test_top_level_help_lists_every_command_with_examples(tmp_path):
    result = faxgw("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(tmp_path, command):
    # Help needs no config: it works even when the named one is missing.
    result = faxgw(command, "--help", cwd=tmp_path, env={"FAXGW_CONFIG": str(tmp_path / "missing.toml")})
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


# --- the store's guarantees --------------------------------------------------------


async def test_store_is_private_and_durable(gateway):
    gw = await gateway()
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")

    path = gw.store_path
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # The database and its companions (-wal, -shm, .lock) are the owner's alone.
    for file in path.parent.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    conn = store.connect(path)
    try:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    finally:
        conn.close()


def sandbox_config(path: Path) -> tuple[Path, int]:
    """A sandbox-mode config on free ports (store under ./var/ next to it); returns it and its SMTP port."""
    port = free_port()
    config = write_config(path, f"""
        [sandbox]
        enabled = true
        listen = ["127.0.0.1:{free_port()}"]
        [smtp]
        listen = ["127.0.0.1:{port}"]
        hostname = "gw.test"
        [http]
        listen = ["127.0.0.1:0"]
    """)
    return config, port


@pytest.fixture
def serve(tmp_path: Path):
    """`serve(config, port)` starts `faxgw serve` as a subprocess and waits until `port` accepts connections."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path, port: int) -> subprocess.Popen[bytes]:
        log = tmp_path / f"serve-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(_argv(("serve",), config), cwd=tmp_path, env=_environ(None),
                                    stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert proc.poll() is None, f"faxgw serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"faxgw serve does not listen: {log.read_text()}"
            time.sleep(0.1)
        return proc

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_second_serve_on_the_same_store_refuses_to_start(tmp_path, serve):
    first, _port = sandbox_config(tmp_path / "first.toml")
    serve(first, _port)
    # Other ports, same store (./var/ next to both configs): only the lock can stop it.
    second, second_port = sandbox_config(tmp_path / "second.toml")
    result = faxgw("serve", cwd=tmp_path, config=second, timeout=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "in use" in result.stderr
    assert not port_open(second_port)


async def test_status_works_while_serve_runs_and_says_sandbox(tmp_path, serve):
    config, port = sandbox_config(tmp_path / "faxgw.toml")
    serve(config, port)
    reply = await send(port, fax_message())
    assert "SANDBOX" in reply.message
    (code,) = codes_in(reply.message)

    table = faxgw("status", cwd=tmp_path, config=config)
    assert table.returncode == 0, table.stderr
    assert "SANDBOX" in table.stdout.splitlines()[0]
    assert code in rows(table.stdout.split("\n", 1)[1])
    # The banner never spoils the JSON.
    listed = faxgw("status", "--json", cwd=tmp_path, config=config)
    assert [job["code"] for job in json.loads(listed.stdout)] == [code]


# --- faxgw status ---------------------------------------------------------------------


async def test_status_table_shows_every_job(jobs):
    result = jobs.faxgw("status")
    assert result.returncode == 0, result.stderr
    header, *_ = result.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["CODE", "NUMBER", "SENDER", "STATE", "AGE", "LAST RESULT"]
    assert "SANDBOX" not in result.stdout  # the gateway fixture's store is production mode
    table = rows(result.stdout)
    assert set(table) == set(jobs.codes.values())
    for label, (number, sender, state) in JOBS.items():
        code, shown_number, shown_sender, shown_state, age, last_result = table[jobs.codes[label]]
        assert (shown_number, shown_sender, shown_state) == ("+" + number, sender, state)
        assert re.fullmatch(r"\d+[smhd]", age)
        assert last_result != "-"
    assert "refused" in table[jobs.codes["rejected"]][-1]


async def test_status_json_is_an_array_of_jobs_newest_first(jobs):
    listed = jobs.json("status")
    assert [job["code"] for job in listed] == list(reversed(jobs.codes.values()))
    for job in listed:
        assert {"code", "number", "sender", "state", "created_at", "updated_at", "last_result"} <= job.keys()
    by_code = {job["code"]: job for job in listed}
    for label, (number, sender, state) in JOBS.items():
        job = by_code[jobs.codes[label]]
        assert (job["number"], job["sender"], job["state"]) == ("+" + number, sender, state)
        assert store.parse_iso(job["created_at"]) <= store.parse_iso(job["updated_at"])


STATUS_FILTERS = [
    (["--state", "rejected"], {"rejected"}),
    (["--state", "deferred", "--state", "unknown"], {"deferred", "unknown"}),
    (["--number", "+1 212 555 1234"], {"submitted"}),
    (["--number", "12125551234"], {"submitted"}),
    (["--sender", "COPIER.example"], {"scanner"}),
    (["--sender", "erp@", "--state", "submitted"], {"submitted"}),
    (["--since", "1h"], set(JOBS)),
    (["--since", "2026-01-01"], set(JOBS)),
    (["--since", "2999-01-01"], set()),
    (["--limit", "2"], {"deferred", "unknown"}),  # the newest two
    (["--text", "copier"], {"scanner"}),
    (["--text", "+1 312 555 0123"], {"scanner"}),
    (["--text", "ERP@", "--state", "rejected"], {"rejected"}),
    (["--text", "%"], set()),
]


async def test_status_filters(jobs):
    for args, labels in STATUS_FILTERS:
        assert jobs.labels(jobs.json("status", *args)) == labels, args


async def test_status_text_finds_a_job_by_its_code(jobs):
    assert jobs.labels(jobs.json("status", "--text", jobs.codes["deferred"].lower())) == {"deferred"}


async def test_number_filter_finds_jobs_the_current_rules_would_refuse(gateway, tmp_path):
    gw = await gateway(addressing={"numbers": {"allow_international": True}})
    address = "442079460958@greenfax.com"
    (code,) = codes_in((await gw.send(fax_message(address), rcpts=[address])).message)
    # The command's config no longer allows international faxes; the job is still found.
    result = faxgw("status", "--number", "+44 20 7946 0958", "--json", cwd=tmp_path, config=cli_config(gw, tmp_path))
    assert result.returncode == 0, result.stderr
    assert [job["code"] for job in json.loads(result.stdout)] == [code]


@pytest.mark.parametrize("args, named", [
    (["--state", "nosuch"], "nosuch"),
    (["--since", "yesterdayish"], "yesterdayish"),
    (["--number", "abc"], "abc"),
    (["--number", "1234"], "1234"),
    (["--limit", "0"], "--limit"),
])
def test_bad_status_filters_are_one_line_errors(tmp_path, args, named):
    # The filter is checked before the store is opened (none exists here).
    line = one_line_error(faxgw("status", *args, cwd=tmp_path))
    assert named in line


# --- faxgw show and queue -------------------------------------------------------------


async def test_show_tells_the_whole_story_in_order(jobs):
    code = jobs.codes["submitted"]
    result = jobs.faxgw("show", code.lower())
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^code:\s+{code}$", result.stdout, re.MULTILINE)
    assert re.search(r"^state:\s+submitted$", result.stdout, re.MULTILINE)
    history = [cells[1:3] for cells in rows(result.stdout.split("\n\n", 1)[1]).values()]
    assert history == [["intake", "queued"], ["forwarder", "sending"], ["forwarder", "submitted"]]

    job = jobs.json("show", code)
    assert (job["code"], job["number"], job["state"]) == (code, "+" + NUMBER, "submitted")
    assert [(event["source"], event["state"]) for event in job["events"]] == [
        ("intake", "queued"), ("forwarder", "sending"), ("forwarder", "submitted")]
    times = [event["at"] for event in job["events"]]
    assert times == sorted(times)


async def test_unknown_codes_are_one_line_errors(jobs):
    for command in ("show", "retry", "cancel", "release"):
        result = jobs.faxgw(command, "FXZZZZZZ")
        assert result.returncode == 1, command
        assert "FXZZZZZZ" in one_line_error(result)


async def test_queue_lists_waiting_jobs_with_their_next_attempt(jobs):
    deferred, unknown = jobs.codes["deferred"], jobs.codes["unknown"]
    result = jobs.faxgw("queue")
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert set(table) == {deferred, unknown}
    next_attempt = store.parse_iso(table[deferred][4])
    assert next_attempt > store.utcnow() + timedelta(minutes=30)
    assert table[unknown][4] == "-"  # never resent by itself
    assert {job["code"] for job in jobs.json("queue")} == {deferred, unknown}


# --- operator actions -------------------------------------------------------------------


def operator_events(job: dict[str, Any]) -> list[tuple[str, str]]:
    return [(event["state"], event["detail"]) for event in job["events"] if event["source"] == "operator"]


async def test_retry_resends_an_unknown_job(gateway, sandbox, tmp_path):
    gw = await gateway()
    sandbox.handler.faults.drop_after_data = True
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "unknown")
    sandbox.handler.faults.drop_after_data = False

    result = faxgw("retry", code, cwd=tmp_path, config=cli_config(gw, tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{code}: queued"
    # The running gateway sees the operator's change and sends the fax.
    job = await gw.wait_state(code, "submitted", timeout=5)
    (fax,) = await sandbox.wait_for(1)
    assert fax.code == code
    assert operator_events(job) == [("queued", "faxgw retry (was unknown)")]


async def test_cancel_a_deferred_job(jobs):
    code = jobs.codes["deferred"]
    result = jobs.faxgw("cancel", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{code}: cancelled"
    job = jobs.gw.job(code)
    assert job["state"] == "cancelled"
    assert operator_events(job) == [("cancelled", "faxgw cancel (was deferred)")]
    assert code not in jobs.faxgw("queue").stdout


async def test_release_of_a_job_that_is_not_held_is_refused(jobs):
    code = jobs.codes["submitted"]
    before = jobs.gw.job(code)
    result = jobs.faxgw("release", code)
    assert result.returncode == 1
    line = one_line_error(result)
    assert code in line and "submitted" in line
    assert jobs.gw.job(code) == before  # nothing changed, nothing recorded


async def test_show_gives_units_the_currency_and_a_reports_time_to_its_precision(jobs):
    code = jobs.codes["submitted"]
    conn = store.connect(jobs.gw.store_path)
    try:
        with conn:
            conn.execute("UPDATE jobs SET duration = 78, cost = '0.20', pages = 2,"
                         " reported_at = '2005-01-10T19:10:25.000000Z' WHERE code = ?", (code,))
    finally:
        conn.close()
    text = jobs.faxgw("show", code).stdout
    assert re.search(r"^duration:\s+78 s$", text, re.MULTILINE)
    assert re.search(r"^cost:\s+0\.20 USD$", text, re.MULTILINE)
    assert re.search(r"^reported_at:\s+2005-01-10 19:10:25 UTC$", text, re.MULTILINE)
    job = jobs.json("show", code)  # the machine form stays as stored
    assert (job["duration"], job["cost"]) == (78, "0.20")
