"""Throughput benchmark: accepted and end-to-end messages/s, acknowledgement latency, peak memory.

A script a user runs by hand (not a test):

    .venv/bin/python bench/throughput.py [--quick] [--json out.json]

For each cell (message size x concurrent sessions) it starts the system
under test as a subprocess, `python -m gateway --config CFG serve`, with a
config written to a throw-away directory (listen on a free 127.0.0.1 port,
store in that directory, upstream = the sink), drives it with real SMTP
clients (aiosmtplib, one connection per session reused across messages,
closed loop) and counts arrivals at the sink. Everything stays on 127.0.0.1.

The gateway runs with its production settings apart from addresses and the
store path: every 250 it gives is a committed SQLite transaction with
synchronous=FULL. The benchmark changes nothing that weakens that; `--set`
(for experiments) refuses store settings.

Sinks (`--sink`): `fast` (default), bench/sink.py in its own process: real
SMTP, counts arrivals, parses nothing. `sandbox`, the GreenFax stand-in
(`gateway.sandbox`) in this process; `sandbox-proc`, the same as
`python -m gateway sandbox`. The sandbox parses every message and counts PDF
pages with pypdf, and reads DATA line by line through aiosmtpd, so it is
slower than the gateway at 200 KB; the `direct` rows (client straight into
the sink) show each sink's capacity.

Relays (`--relays`): `direct` (no relay: client -> sink, the calibration
that shows the client and sink are not the bottleneck), `gateway`, and
`postfix`: a private Postfix instance (tests/peers/postfix.py, needs root)
relaying to the same sink, the yardstick of issue 6.
`--relays direct,gateway,postfix --rounds 2` runs direct, gateway, postfix,
gateway, postfix on each workload and prints gateway/postfix ratios. A relay
is a class with start(workdir, upstream_port), port, pids(), stop(),
verify() and describe(), listed in RELAYS.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import collections
import contextlib
import ctypes
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
SINK_SCRIPT = BENCH_DIR / "sink.py"

ACCOUNT_SENDER = "faxes@office.example"
RETURN_PATH = "fax-bounce@gw.office.example"
ENVELOPE_SENDER = "erp@legacy.example"
HOST = "127.0.0.1"

SIZES = {"2k": 2_000, "200k": 200_000}
BUSY_PCT = 20.0  # other processes' CPU during a cell above which the table flags it
FULL = {"messages": 400, "seconds": 20.0}
QUICK = {"messages": 100, "seconds": 5.0}


# --- child processes ---------------------------------------------------------------------------

CHILDREN: dict[int, asyncio.subprocess.Process] = {}


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


async def spawn(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """Start a child in its own session (a terminal's Ctrl-C reaches only us; we stop it in order)."""
    proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True, preexec_fn=_die_with_parent,
                                                **kwargs)
    CHILDREN[proc.pid] = proc
    return proc


async def terminate(proc: asyncio.subprocess.Process, grace: float = 30.0) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; only this one pid."""
    try:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                print(f"  pid {proc.pid} did not stop in {grace:.0f} s: SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return proc.returncode
    finally:
        CHILDREN.pop(proc.pid, None)


# Private Postfix instances still running. Their master is a daemon (not our child), so it is
# stopped with `postfix abort`, not by pid.
LIVE_POSTFIX: set[Any] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort (an error inside cleanup, a second Ctrl-C): kill what we started, by pid."""
    for instance in list(LIVE_POSTFIX):
        with contextlib.suppress(Exception):
            instance.stop()
        LIVE_POSTFIX.discard(instance)
    for pid in list(CHILDREN):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        CHILDREN.pop(pid, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


async def wait_for_banner(port: int, proc: asyncio.subprocess.Process | None, timeout: float, what: str,
                          log: Path | None = None) -> None:
    """Until the port answers with a 220 greeting (or the process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.returncode is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening:\n{tail}")
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            if line.startswith(b"220"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {HOST}:{port} within {timeout:.0f} s")
        await asyncio.sleep(0.05)


# --- workload: real MIME fax messages ----------------------------------------------------------

FAX_WIDTH = 1728  # pixels per line of a standard-resolution fax page
ROW_BYTES = FAX_WIDTH // 8  # one line of a 1-bit image


def make_pdf(rng: random.Random, ident: str, image_rows: list[int]) -> bytes:
    """A valid PDF: one page per entry of image_rows, each a 1-bit 1728-wide noise image
    (like a scanned page; 0 rows = text only) plus a line of text naming the document."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in below
    pages = add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = []
    for number, rows in enumerate(image_rows, start=1):
        text = f"({ident} page {number} of {len(image_rows)}) Tj".encode()
        resources = b"/Font << /F1 %d 0 R >>" % font
        draw = b""
        if rows:
            data = rng.randbytes(rows * ROW_BYTES)
            image = add(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray"
                        b" /BitsPerComponent 1 /Length %d >>\nstream\n%s\nendstream"
                        % (FAX_WIDTH, rows, len(data), data))
            resources += b" /XObject << /Im1 %d 0 R >>" % image
            height = 612 * rows / FAX_WIDTH
            draw = b"q 612 0 0 %.2f 0 %.2f cm /Im1 Do Q\n" % (height, 792 - 80 - height)
        stream = draw + b"BT /F1 11 Tf 72 760 Td " + text + b" ET\n"
        content = add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Resources << %s >>"
                        b" /Contents %d 0 R >>" % (pages, resources, content)))
    info = add(b"<< /Title (Invoice %s) /Author (ERP export) /Producer (greenfax-gateway bench)"
               b" /CreationDate (D:%s) >>" % (ident.encode(), time.strftime("%Y%m%d%H%M%S").encode()))
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages
    objects[pages - 1] = (b"<< /Type /Pages /Kids [%s] /Count %d >>"
                          % (b" ".join(b"%d 0 R" % k for k in kids), len(kids)))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    doc_id = rng.randbytes(16).hex().encode()
    out += (b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R /ID [<%s> <%s>] >>\nstartxref\n%d\n%%%%EOF\n"
            % (len(objects) + 1, catalog, info, doc_id, doc_id, xref))
    return bytes(out)


def make_message(seq: int, ident: str, image_rows: list[int], rng: random.Random) -> tuple[str, bytes]:
    """A fax email as a legacy ERP sends it (CRLF, text body + base64 PDF); returns (recipient, bytes)."""
    number = f"1212555{100 + seq % 100:04d}"  # +1 212 555 01xx: valid-looking, no sandbox fault/outcome code
    pdf = make_pdf(rng, ident, image_rows)
    boundary = f"===============bench{rng.getrandbits(64):016x}=="
    encoded = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    text = (f"Dear customer,\r\n\r\nplease find invoice {ident} attached ({len(image_rows)} page(s)).\r\n"
            f"Amount due: {rng.randint(10, 99999) / 100:.2f} EUR.\r\n\r\n-- \r\nAccounts department\r\n")
    head = (
        f"From: Accounts <{ACCOUNT_SENDER}>\r\n"
        f"To: {number}@greenfax.com\r\n"
        f"Subject: Invoice {ident}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <{ident}.{seq}@erp.legacy.example>\r\n"
        f"X-Bench-Id: {ident}\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        f"\r\n"
        f"--{boundary}\r\n"
        f'Content-Type: text/plain; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: 7bit\r\n"
        f"\r\n{text}\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: application/pdf\r\n"
        f"Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="invoice-{ident}.pdf"\r\n'
        f"\r\n"
    ).encode()
    return f"{number}@greenfax.com", head + encoded + f"--{boundary}--\r\n".encode()


@dataclass
class Message:
    ident: str
    rcpt: str
    wire: bytes  # dot-stuffed, ends with CRLF.CRLF: what goes on the wire after DATA
    size: int  # the message's own size


def build_pool(label: str, target: int, count: int, nonce: str) -> list[Message]:
    """`count` different messages of about `target` bytes (deterministic per nonce and index)."""
    base_rng = random.Random(f"{nonce}-{label}")
    _rcpt, empty = make_message(0, f"{label}-{nonce}-00000", [0], random.Random(0))
    # base64 turns 57 bytes into 78 on the wire (76 + CRLF); each image row adds ~ROW_BYTES + a little.
    room = max(0, target - len(empty)) * 57 / 78
    rows_total = max(0, int(room / ROW_BYTES))
    pool = []
    for seq in range(count):
        rng = random.Random(base_rng.getrandbits(64))
        pages = 1 if rows_total < 64 else 1 + seq % 3
        rows = [rows_total // pages + (1 if i < rows_total % pages else 0) for i in range(pages)]
        ident = f"{label}-{nonce}-{seq:05d}"
        rcpt, raw = make_message(seq, ident, rows, rng)
        stuffed = re.sub(rb"(?m)^\.", b"..", raw)
        pool.append(Message(ident=ident, rcpt=rcpt, wire=stuffed + b".\r\n", size=len(raw)))
    return pool


def check_pool(pool: list[Message]) -> dict[str, Any]:
    """Make sure the workload is what it claims: a parseable MIME mail with a real PDF."""
    import email
    import email.policy
    import io

    from pypdf import PdfReader

    sample = pool[0]
    raw = sample.wire[:-3].replace(b"\r\n..", b"\r\n.")
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    parts = [p for p in message.walk() if p.get_content_type() == "application/pdf"]
    assert len(parts) == 1, "no PDF attachment in the generated message"
    pdf = parts[0].get_payload(decode=True)
    reader = PdfReader(io.BytesIO(pdf))
    assert len({m.wire for m in pool[:50]}) == min(len(pool), 50), "generated messages are not all different"
    return {"pages": len(reader.pages), "pdf_bytes": len(pdf), "title": str(reader.metadata.title)}


# --- sinks: what the relay forwards to -------------------------------------------------------


@dataclass
class Arrivals:
    count: int
    last: float | None  # time.monotonic() of the latest arrival
    unique: int | None = None


class FastSink:
    """bench/sink.py in its own process: real SMTP, counts, parses nothing."""

    name = "fast"

    def __init__(self, reply_limit: int = 2**16) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.reply_limit = reply_limit  # the longest control reply read (asyncio's default; `ids` needs more)
        self._lock = asyncio.Lock()

    async def start(self, workdir: Path) -> None:
        self.proc = await spawn(sys.executable, str(SINK_SCRIPT), "--listen", f"{HOST}:0",
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=self.reply_limit)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line.startswith(b"ready "):
            raise RuntimeError(f"the sink did not start: {line!r}")
        self.port = int(line.split()[1])

    async def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc and self.proc.stdin and self.proc.stdout
        async with self._lock:
            self.proc.stdin.write(command.encode() + b"\n")
            await self.proc.stdin.drain()
            return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 30))

    async def arrivals(self) -> Arrivals:
        stats = await self._ask("stats")
        return Arrivals(stats["count"], stats["last"], stats["unique"])

    async def ids(self) -> list[str]:
        """Every X-Bench-Id that arrived (one JSON line: give a large enough reply_limit)."""
        return (await self._ask("ids"))["ids"]

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.returncode is None else []

    async def stop(self) -> None:
        if self.proc is not None:
            await terminate(self.proc, grace=5)
            self.proc = None


class SandboxInProcess:
    """The GreenFax stand-in in the benchmark's own process and event loop."""

    name = "sandbox"

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.count = 0
        self.last: float | None = None
        self.ids: set[str] = set()

    async def start(self, workdir: Path) -> None:
        from gateway.rules import load_addressing
        from gateway.sandbox import SandboxHandler, start_sandbox

        sink = self

        class CountingHandler(SandboxHandler):
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                reply = await super().handle_DATA(server, session, envelope)
                if reply.startswith("250"):
                    for fax in self.faxes:
                        match = re.search(rb"(?im)^X-Bench-Id:[ \t]*(\S+)", fax.raw)
                        if match:
                            sink.ids.add(match[1].decode())
                        sink.count += 1
                    sink.last = time.monotonic()
                    self.faxes.clear()  # keep the benchmark's memory flat
                return reply

        rules = load_addressing()
        handler = CountingHandler(domain="greenfax.com", account_sender=ACCOUNT_SENDER,
                                  code_pattern=rules.tag_pattern(), code_header=None, credentials=None)
        import logging

        logging.getLogger("faxgw.sandbox").setLevel(logging.WARNING)  # one log line per fax otherwise
        logging.getLogger("pypdf").setLevel(logging.ERROR)
        self.server = await start_sandbox(handler, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def arrivals(self) -> Arrivals:
        return Arrivals(self.count, self.last, len(self.ids))

    def pids(self) -> list[int]:
        return []  # its CPU is counted with the client's (this process)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class SandboxProcess:
    """`python -m gateway --config CFG sandbox --listen 127.0.0.1:0`; arrivals counted from its log lines."""

    name = "sandbox-proc"
    BANNER = re.compile(rb"stand-in on [0-9.]+:(\d+)")

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.count = 0
        self.last: float | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, workdir: Path) -> None:
        config = workdir / "sandbox.toml"
        config.write_text(f'[sandbox]\nenabled = true\n\n[upstream]\naccount_sender = "{ACCOUNT_SENDER}"\n'
                          f'return_path = "{RETURN_PATH}"\n\n[store]\npath = "{workdir / "sandbox-unused.sqlite3"}"\n')
        self.proc = await spawn(sys.executable, "-m", "gateway", "--config", str(config), "sandbox",
                                "--listen", f"{HOST}:0", stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                cwd=workdir)
        assert self.proc.stderr is not None
        while True:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 30)
            if not line:
                raise RuntimeError("the sandbox process exited before listening")
            match = self.BANNER.search(line)
            if match:
                self.port = int(match[1])
                break
        self._reader = asyncio.create_task(self._count())

    async def _count(self) -> None:
        assert self.proc and self.proc.stderr
        while line := await self.proc.stderr.readline():
            if b"event=sandbox-fax" in line:
                self.count += 1
                self.last = time.monotonic()

    async def arrivals(self) -> Arrivals:
        return Arrivals(self.count, self.last)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.returncode is None else []

    async def stop(self) -> None:
        if self.proc is not None:
            await terminate(self.proc, grace=5)
            self.proc = None
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


SINKS = {"fast": FastSink, "sandbox": SandboxInProcess, "sandbox-proc": SandboxProcess}


# --- relays: the systems under test ----------------------------------------------------------

FORBIDDEN_OVERRIDES = ("store.",)  # durability is not a knob of this benchmark


class DirectRelay:
    """No relay: the client talks straight to the sink (client + sink capacity)."""

    name = "direct"

    def __init__(self, options: argparse.Namespace) -> None:
        self.port = 0

    async def start(self, workdir: Path, upstream_port: int) -> None:
        self.port = upstream_port

    def pids(self) -> list[int]:
        return []

    async def stop(self) -> None:
        pass

    def verify(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {}


class GatewayRelay:
    """`python -m gateway --config CFG serve` with a fresh store per cell."""

    name = "gateway"

    def __init__(self, options: argparse.Namespace) -> None:
        self.overrides: dict[str, dict[str, Any]] = {}
        for item in options.set:
            key, _, value = item.partition("=")
            if not _ or "." not in key:
                raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
            if key.startswith(FORBIDDEN_OVERRIDES):
                raise SystemExit(f"--set {key}: store settings are not changed by the benchmark (durability)")
            section, name = key.split(".", 1)
            import tomllib

            try:
                parsed = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                parsed = value
            self.overrides.setdefault(section, {})[name] = parsed
        self.log_level = options.gateway_log_level
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.workdir: Path | None = None

    def config_text(self, workdir: Path, port: int, upstream_port: int) -> str:
        sections: dict[str, dict[str, Any]] = {
            "smtp": {"listen": [f"{HOST}:{port}"], "hostname": "gw.bench.localhost"},
            "http": {"listen": [f"{HOST}:0"]},
            "store": {"path": str(workdir / "store" / "faxgw.sqlite3")},
            "upstream": {"host": HOST, "port": upstream_port, "tls": "none", "account_sender": ACCOUNT_SENDER,
                         "return_path": RETURN_PATH},
            "log": {"level": self.log_level},
        }
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    async def start(self, workdir: Path, upstream_port: int) -> None:
        self.workdir = workdir
        for attempt in range(3):
            self.port = free_port()
            config = workdir / "faxgw.toml"
            config.write_text(self.config_text(workdir, self.port, upstream_port))
            log = workdir / "gateway.log"
            with log.open("ab") as err:
                self.proc = await spawn(sys.executable, "-m", "gateway", "--config", str(config), "serve",
                                        stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                        cwd=workdir)
            try:
                await wait_for_banner(self.port, self.proc, 60, "the gateway", log)
                return
            except RuntimeError:
                if attempt == 2 or "cannot listen" not in log.read_text(errors="replace"):
                    raise
                await terminate(self.proc)  # the free port was taken meanwhile: try another

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.returncode is None else []

    async def stop(self) -> None:
        if self.proc is not None:
            code = await terminate(self.proc)
            self.proc = None
            if code not in (0, -signal.SIGTERM):
                print(f"  warning: the gateway exited with {code}; see its log", file=sys.stderr)

    def verify(self) -> dict[str, Any]:
        """After stop: job states in the store, warnings in the log."""
        assert self.workdir is not None
        result: dict[str, Any] = {}
        path = self.workdir / "store" / "faxgw.sqlite3"
        if path.exists():
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                result["job_states"] = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
                result["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                conn.close()
        log = self.workdir / "gateway.log"
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()
            bad = [line for line in lines if " WARNING " in line or " ERROR " in line]
            result["log_warnings"] = len(bad)
            if bad:
                result["log_warning_sample"] = bad[:3]
        return result

    def describe(self) -> dict[str, Any]:
        return {"command": "python -m gateway --config CFG serve", "overrides": self.overrides,
                "log_level": self.log_level}


def _postfix_peer() -> Any:
    """tests/peers/postfix.py, the private Postfix instance the tests use (loaded by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_postfix_peer", REPO_DIR / "tests" / "peers" / "postfix.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# main.cf settings of the relay, each with the reason. Most are Postfix's defaults, written out so
# that the comparison does not change silently with another Postfix version; none weakens
# durability (the cleanup server fsyncs every queue file before smtpd answers 250, and main.cf
# has no switch for that). tests/peers/postfix.py adds the private paths, the relayhost and
# loopback-only settings.
POSTFIX_SETTINGS: dict[str, tuple[str, str]] = {
    "default_process_limit": ("100", "default; room for 32 smtpd + 20 smtp + cleanup processes at once"),
    "in_flow_delay": ("1s", ("default, left on: smtpd's cleanup waits up to 1 s per message when intake"
                             " runs ahead of the queue manager (shows as slower MAIL..RCPT, see txn p99)")),
    "message_size_limit": ("10240000", "default (10 MB), far above the 200 KB messages"),
    "smtpd_client_connection_count_limit": ("50", ("default; loopback is exempt anyway"
                                                   " (smtpd_client_event_limit_exceptions = $mynetworks)")),
    "smtpd_client_connection_rate_limit": ("0", "default: no rate limit"),
    "smtpd_client_message_rate_limit": ("0", "default: no rate limit"),
    "smtp_connection_cache_on_demand": ("yes", "default: reuse connections to the sink while mail is queued"),
    "initial_destination_concurrency": ("5", "default: deliveries to the sink start at 5 in parallel"),
    "default_destination_concurrency_limit": ("20", ("default, and at least the gateway's upstream.concurrency"
                                                     " (4 unless --set raises it, then raised to match)")),
}


class PostfixRelay:
    """A private Postfix instance as a plain relay to the sink: the yardstick for the gateway (issue 6).

    Built on tests/peers/postfix.py: config, queue, data directory and
    maillog live in the cell's directory, smtpd listens on a free 127.0.0.1
    port, and everything is relayed to [127.0.0.1]:upstream_port without DNS.
    /etc/postfix and any system instance are left alone. Needs root.
    """

    name = "postfix"

    def __init__(self, options: argparse.Namespace) -> None:
        self.settings = {name: value for name, (value, _why) in POSTFIX_SETTINGS.items()}
        self.reasons = {name: why for name, (_value, why) in POSTFIX_SETTINGS.items()}
        # Never fewer parallel deliveries to the sink than the gateway is given (--set upstream.concurrency).
        gateway_concurrency = GatewayRelay(options).overrides.get("upstream", {}).get("concurrency", 0)
        limit = "default_destination_concurrency_limit"
        if isinstance(gateway_concurrency, int) and gateway_concurrency > int(self.settings[limit]):
            self.settings[limit] = str(gateway_concurrency)
            self.reasons[limit] = "raised to the gateway's upstream.concurrency (--set)"
        for item in options.postfix_set:
            name, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--postfix-set {item!r}: expected NAME=VALUE")
            self.settings[name.strip()] = value.strip()
            self.reasons[name.strip()] = "--postfix-set (experiment)"
        self.peer = _postfix_peer()
        self.instance: Any = None
        self.port = 0

    async def start(self, workdir: Path, upstream_port: int) -> None:
        if reason := self.peer.unavailable_reason():
            raise RuntimeError(reason)
        self.port = free_port()
        self.instance = self.peer.PostfixInstance(workdir / "postfix", upstream_port, smtpd_port=self.port,
                                                  settings=self.settings)
        LIVE_POSTFIX.add(self.instance)
        await asyncio.to_thread(self.instance.start)
        await wait_for_banner(self.port, None, 30, "postfix")

    def pids(self) -> list[int]:
        """The master: smtpd, cleanup, qmgr, smtp... are its children, started on demand; the
        sampler walks the tree again at every sample, so they are all counted."""
        pid = self.instance.master_pid if self.instance is not None else None
        return [pid] if pid else []

    async def stop(self) -> None:
        if self.instance is None:
            return
        if self.instance.master_pid is None:  # it never started
            LIVE_POSTFIX.discard(self.instance)
            return
        # Everything has reached the sink by now, but the queue manager may not have removed
        # the last queue files yet: give it a moment so that verify() sees the real state.
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(self.instance.queue_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.instance.stop)
        LIVE_POSTFIX.discard(self.instance)

    def verify(self) -> dict[str, Any]:
        """After stop: the queue must be empty, every queued message sent, and the maillog clean."""
        assert self.instance is not None
        listing = self.instance.queue_listing()
        log = self.instance.maillog()
        queued = set(re.findall(r" (\w+): from=<.*?>, size=\d+, nrcpt=\d+ \(queue active\)", log))
        sent = set(re.findall(r" (\w+): to=<.*?>, .*status=sent ", log))
        problems = [line for line in log.splitlines()
                    if re.search(r"\b(warning|error|fatal|panic):|status=(deferred|bounced|expired)", line)]
        result: dict[str, Any] = {"queued": len(queued), "sent": len(sent), "not_sent": len(queued - sent),
                                  "queue_left": 0 if "Mail queue is empty" in listing else len(
                                      re.findall(r"(?m)^[0-9A-F]+\*?!? ", listing)),
                                  "log_warnings": len(problems)}
        if problems:
            result["log_warning_sample"] = problems[:3]
        return result

    def describe(self) -> dict[str, Any]:
        instance = self.peer.PostfixInstance(Path("/CELL_DIR/postfix"), 0, settings=self.settings)
        postconf = os.path.join(os.path.dirname(self.peer.POSTFIX), "postconf")
        version = ""
        with contextlib.suppress(Exception):
            version = subprocess.run([postconf, "-dh", "mail_version"], capture_output=True, text=True,
                                     timeout=10, check=False).stdout.strip()
        return {"command": "postfix -c DIR start (tests/peers/postfix.py, one fresh instance per cell)",
                "version": version,
                "main.cf": instance.main_settings() | {"relayhost": "[127.0.0.1]:SINK_PORT"},
                "why": self.reasons | {
                    "the rest (tests/peers/postfix.py)": "private paths; loopback only; no local delivery;"
                    " relay from mynetworks = 127.0.0.0/8 to relayhost [127.0.0.1]:SINK_PORT without DNS"
                    " (smtp_host_lookup = native, smtp_dns_support_level = disabled); retry timers of 2-4 s"
                    " (they only matter for deferred mail, and verify() counts any as a problem)"},
                "master.cf": "smtpd on 127.0.0.1:PORT plus the usual services, chroot n, maxproc from"
                             " default_process_limit (cleanup unlimited)",
                "durability": "Postfix defaults: each queue file is fsynced before the 250"}


RELAYS = {"direct": DirectRelay, "gateway": GatewayRelay, "postfix": PostfixRelay}


# --- measuring the relay's processes ---------------------------------------------------------


def _tree(pids: list[int]) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs.append(proc)
            procs += proc.children(recursive=True)
    return procs


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup as {field: bytes} (Rss, Pss, Pss_Anon, Pss_File, Pss_Shmem...); {} if gone."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(b":") and parts[2] == b"kB":
                fields[parts[0][:-1].decode()] = int(parts[1]) * 1024
    return fields


def _vm_hwm(pid: int) -> int:
    """Peak RSS (VmHWM) of one process, in bytes; 0 if gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_memory(pids: list[int]) -> dict[str, int]:
    """The process trees of `pids` as they are now, in bytes: Pss summed (and its Anon, File and Shmem
    parts, Rss and its Anonymous part), the largest single process's VmHWM, and how many processes
    (0: none left)."""
    totals = {"processes": 0, "pss": 0, "pss_anon": 0, "pss_file": 0, "pss_shmem": 0, "rss": 0, "anonymous": 0,
              "hwm": 0}
    for proc in _tree(pids):
        rollup = smaps_rollup(proc.pid)
        totals["processes"] += 1
        totals["pss"] += rollup.get("Pss", 0)
        totals["pss_anon"] += rollup.get("Pss_Anon", 0)
        totals["pss_file"] += rollup.get("Pss_File", 0)
        totals["pss_shmem"] += rollup.get("Pss_Shmem", 0)
        totals["rss"] += rollup.get("Rss", 0)
        totals["anonymous"] += rollup.get("Anonymous", 0)
        totals["hwm"] = max(totals["hwm"], _vm_hwm(proc.pid))
    return totals


def thread_seconds(procs: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds per thread ("main" = each process's main thread; others by thread id)."""
    out: dict[str, float] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for thread in proc.threads():
                name = "main" if thread.id == proc.pid else f"thread-{thread.id}"
                if len(procs) > 1:
                    name = f"{proc.name()}-{proc.pid}:{name}"
                out[name] = thread.user_time + thread.system_time
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent (all cores), to see load we did not cause."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "guest", 0.0) \
        - getattr(times, "guest_nice", 0.0)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of a process tree as it is now, including the children it has already reaped.

    Postfix's master starts and reaps smtpd, cleanup and smtp processes during
    a cell (each serves at most max_use = 100 clients), so the tree is walked
    again at each reading and the exited children's time comes from their
    parent's children_user/children_system.
    """
    total = 0.0
    for proc in _tree(pids):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


class MemorySampler:
    """Samples the summed PSS of a process tree every `interval` seconds; keeps the peak."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_pss = 0
        self.peak_hwm = 0  # the largest single process's own peak RSS, exact (kernel-tracked)
        self.first_pss = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, int] | None:
        """Take one sample; returns tree_memory()'s reading (None if the tree is gone)."""
        now = tree_memory(self.pids)
        if not now["processes"]:
            return None
        self.peak_hwm = max(self.peak_hwm, now["hwm"])
        if self.samples == 0:
            self.first_pss = now["pss"]
        self.samples += 1
        self.peak_pss = max(self.peak_pss, now["pss"])
        return now

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self.pids:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self.sample()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Profiler:
    """py-spy record of the relay's process tree during the timed phase (optional)."""

    def __init__(self, out: Path | None, *, gil: bool = False) -> None:
        self.out = out
        self.gil = gil  # sample only the thread holding the GIL: where Python spends CPU, not waits
        self.proc: asyncio.subprocess.Process | None = None
        self.path: Path | None = None

    async def start(self, pids: list[int], name: str) -> None:
        if self.out is None or not pids:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / f"{name}.collapsed"
        self.proc = await spawn(exe, "record", "--pid", str(pids[0]), "--rate", "250", "--format", "raw",
                                "--threads", "--output", str(self.path), "--nonblocking", "--subprocesses",
                                *(["--gil"] if self.gil else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(0.3)

    async def stop(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        CHILDREN.pop(self.proc.pid, None)
        self.proc = None
        if self.path is None or not self.path.exists():
            return None
        return {"file": str(self.path), **summarize_profile(self.path)}


BOILERPLATE = re.compile(r"\((<frozen runpy>|click/|asyncio/(runners|base_events|events)\.py|threading\.py"
                         r"|gateway/(cli|__main__)\.py)")


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive share of samples per function (and per thread) from py-spy's raw stacks.

    Inclusive shares leave out the start-up frames every stack has (runpy,
    click, the event loop's run methods), so what remains says where the
    time goes.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if frames and frames[0].startswith("thread ("):
            threads[re.sub(r"^thread \(\d+\):?\s*", "", frames.pop(0)) or "?"] += count
        names = [re.sub(r" \((.*?)(?::\d+)?\)$", lambda m: f" ({_short(m[1])})", f) for f in frames]
        if names:
            own[names[-1]] += count
        for name in set(names):
            if not BOILERPLATE.search(name):
                inclusive[name] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "threads": share(threads), "self": share(own), "inclusive": share(inclusive)}


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", str(REPO_DIR) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    latency: float  # seconds from writing the message data to the reply
    done_at: float  # time.monotonic() of the reply
    transaction: float = math.nan  # seconds from MAIL FROM to the final reply


class ClientSession:
    """One SMTP session (aiosmtplib), reused across messages."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.smtp: aiosmtplib.SMTP | None = None

    async def connect(self) -> None:
        self.smtp = aiosmtplib.SMTP(hostname=HOST, port=self.port, start_tls=False, use_tls=False,
                                    local_hostname="erp.legacy.example", timeout=120)
        await self.smtp.connect()
        await self.smtp.ehlo()

    async def send(self, message: Message) -> Outcome:
        try:
            if self.smtp is None or not self.smtp.is_connected:
                await self.connect()
        except (aiosmtplib.SMTPException, OSError):
            self.smtp = None
            await asyncio.sleep(0.1)  # the relay is gone or refuses connections: count it, do not spin
            return Outcome(-1, math.nan, time.monotonic())
        smtp = self.smtp
        assert smtp is not None
        begun = time.monotonic()
        try:
            await smtp.mail(ENVELOPE_SENDER)
            await smtp.rcpt(message.rcpt)
            reply = await smtp.execute_command(b"DATA")
            if reply.code != 354:
                raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
            protocol = smtp.protocol
            assert protocol is not None
            started = time.monotonic()
            protocol.write(message.wire)
            reply = await protocol.read_response(timeout=120)
            now = time.monotonic()
            if reply.code != 250:
                await self._reset()
            return Outcome(reply.code, now - started, now, now - begun)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset()
            return Outcome(exc.code, math.nan, time.monotonic())
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()  # connection lost: counted as refused "-1", the next message reconnects
            self.smtp = None
            return Outcome(-1, math.nan, time.monotonic())

    async def _reset(self) -> None:
        with contextlib.suppress(Exception):
            assert self.smtp is not None
            await self.smtp.rset()

    async def close(self) -> None:
        if self.smtp is not None:
            with contextlib.suppress(Exception):
                await self.smtp.quit(timeout=5)
            self.smtp.close()
            self.smtp = None


# --- one cell --------------------------------------------------------------------------------------


@dataclass
class CellResult:
    relay: str
    sink: str
    size: str
    sessions: int
    round: int
    message_bytes: int
    sent: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    stopped_by: str = ""
    accept_seconds: float = 0.0
    accepted_per_s: float = 0.0
    arrived: int = 0
    missing: int = 0
    duplicates: int | None = None
    e2e_seconds: float = 0.0
    e2e_per_s: float = 0.0
    arrived_while_sending: int = 0  # at the sink by the time the last 250 came back
    e2e_while_sending_per_s: float = 0.0  # the forwarding rate while intake is busy too
    backlog_at_last_ack: int = 0  # accepted but not yet at the sink when sending stopped
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0
    ack_max_ms: float = 0.0
    txn_p50_ms: float = 0.0  # MAIL FROM .. final 250: includes waits before DATA (Postfix's in_flow_delay)
    txn_p99_ms: float = 0.0
    peak_pss_mib: float | None = None
    start_pss_mib: float | None = None
    peak_rss_hwm_mib: float | None = None
    cpu_pct: dict[str, float] = field(default_factory=dict)
    relay_cpu_ms_per_msg: float | None = None
    relay_thread_cpu_pct: dict[str, float] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


async def wait_arrivals(sink: Any, want: int, timeout: float) -> Arrivals:
    deadline = time.monotonic() + timeout
    while True:
        got = await sink.arrivals()
        if got.count >= want or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.01)


async def wait_idle(limit: float) -> None:
    """Before a cell on a shared machine: wait (up to `limit` s) until others use under 10% of a core."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds()
        await asyncio.sleep(1.0)
        busy = machine_busy_seconds() - before
        if busy < 0.10 or time.monotonic() > deadline:
            return


async def run_cell(relay_name: str, sink_name: str, size: str, sessions: int, round_no: int,
                   pool: list[Message], opts: argparse.Namespace, workroot: Path) -> CellResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"{relay_name}-{size}-{sessions}-", dir=workroot))
    sink = SINKS[sink_name]()
    relay = RELAYS[relay_name](opts)
    result = CellResult(relay=relay_name, sink=sink_name, size=size, sessions=sessions, round=round_no,
                        message_bytes=round(sum(m.size for m in pool) / len(pool)))
    clients = [ClientSession(0) for _ in range(sessions)]
    sampler: MemorySampler | None = None
    profiler = Profiler(opts.profile, gil=opts.profile_gil)
    try:
        await sink.start(workdir)
        await relay.start(workdir, sink.port)
        sampler = MemorySampler(relay.pids())
        sampler.start()
        for client in clients:
            client.port = relay.port
        await asyncio.gather(*(client.connect() for client in clients))

        # Warm-up, not measured: one message per session, all the way to the sink.
        warm = pool[-sessions:]
        outcomes = await asyncio.gather(*(c.send(m) for c, m in zip(clients, warm, strict=True)))
        if any(o.code != 250 for o in outcomes):
            raise RuntimeError(f"warm-up refused: {sorted({o.code for o in outcomes})}")
        base = await wait_arrivals(sink, sessions, 60)
        if base.count < sessions:
            raise RuntimeError(f"warm-up: only {base.count} of {sessions} messages reached the sink")

        # Timed phase: closed loop, bounded by count and by time.
        limit = min(opts.messages, len(pool) - sessions)
        next_index = 0
        results: list[Outcome] = []
        me = psutil.Process()
        relay_procs, sink_procs = _tree(relay.pids()), _tree(sink.pids())
        cpu_before = (tree_cpu_seconds(relay.pids()), tree_cpu_seconds(sink.pids()), cpu_seconds([me]))
        threads_before = thread_seconds(relay_procs)
        busy_before = machine_busy_seconds()
        if relay_name == "gateway":  # py-spy reads Python processes only
            await profiler.start(relay.pids(), f"{relay_name}-{size}-{sessions}s-r{round_no}")
        started = time.monotonic()
        deadline = started + opts.seconds

        async def loop(client: ClientSession) -> None:
            nonlocal next_index
            while next_index < limit and time.monotonic() < deadline:
                message = pool[next_index]
                next_index += 1
                results.append(await client.send(message))

        await asyncio.gather(*(loop(client) for client in clients))
        during = await sink.arrivals()
        result.stopped_by = "count" if next_index >= limit else "time"
        accepted = [o for o in results if o.code == 250]
        result.sent = len(results)
        result.accepted = len(accepted)
        result.refused = dict(collections.Counter(str(o.code) for o in results if o.code != 250))
        last_ack = max((o.done_at for o in accepted), default=started)
        result.accept_seconds = last_ack - started
        result.accepted_per_s = len(accepted) / result.accept_seconds if accepted else 0.0
        result.arrived_while_sending = during.count - base.count
        result.e2e_while_sending_per_s = (result.arrived_while_sending / result.accept_seconds
                                          if result.accept_seconds > 0 else 0.0)
        result.backlog_at_last_ack = max(0, len(accepted) - result.arrived_while_sending)
        latencies = [o.latency * 1000 for o in accepted]
        result.ack_p50_ms = percentile(latencies, 50)
        result.ack_p99_ms = percentile(latencies, 99)
        result.ack_max_ms = max(latencies, default=math.nan)
        transactions = [o.transaction * 1000 for o in accepted]
        result.txn_p50_ms = percentile(transactions, 50)
        result.txn_p99_ms = percentile(transactions, 99)

        # End to end: until every accepted message reached the sink (or the drain timeout).
        final = await wait_arrivals(sink, base.count + len(accepted), opts.drain_timeout)
        ended = time.monotonic()
        profile = await profiler.stop()
        cpu_after = (tree_cpu_seconds(relay.pids()), tree_cpu_seconds(sink.pids()), cpu_seconds([me]))
        threads_after = thread_seconds(_tree(relay.pids()))
        busy_after = machine_busy_seconds()
        result.arrived = final.count - base.count
        result.missing = max(0, len(accepted) - result.arrived)
        if final.unique is not None:
            result.duplicates = final.count - final.unique
        last_arrival = final.last if final.last is not None else ended
        result.e2e_seconds = max(last_arrival - started, 1e-9)
        result.e2e_per_s = result.arrived / result.e2e_seconds
        span = max(ended - started, 1e-9)
        names = ("relay", "sink", "client")
        result.cpu_pct = {name: round(100 * (after - before) / span, 1)
                          for name, before, after in zip(names, cpu_before, cpu_after, strict=True)
                          if not (name == "relay" and not relay_procs) and not (name == "sink" and not sink_procs)}
        result.relay_thread_cpu_pct = {
            name: round(100 * (seconds - threads_before.get(name, 0.0)) / span, 1)
            for name, seconds in threads_after.items() if seconds - threads_before.get(name, 0.0) > 0.005}
        ours = sum(after - before for before, after in zip(cpu_before, cpu_after, strict=True))
        result.cpu_pct["other"] = round(max(0.0, 100 * ((busy_after - busy_before) - ours) / span), 1)
        if relay_procs and result.arrived:
            result.relay_cpu_ms_per_msg = round(1000 * (cpu_after[0] - cpu_before[0]) / result.arrived, 3)
        result.profile = profile
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        await profiler.stop()
        if sampler is not None:
            await sampler.stop()
        await relay.stop()
        await sink.stop()
    if sampler is not None and sampler.samples:
        result.peak_pss_mib = round(sampler.peak_pss / 2**20, 1)
        result.start_pss_mib = round(sampler.first_pss / 2**20, 1)
        result.peak_rss_hwm_mib = round(sampler.peak_hwm / 2**20, 1)
    result.checks = relay.verify()
    if not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# --- report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    os_name = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "gateway"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit and dirty:
            commit += " (gateway/ has uncommitted changes)"
    return {
        "cpu_model": cpu_model,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "memory_total_mib": round(psutil.virtual_memory().total / 2**20),
        "os": os_name,
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "packages": {p: version(p) for p in ("greenfax-gateway", "aiosmtpd", "aiosmtplib", "pypdf", "psutil")},
        "gateway_commit": commit,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def filesystem_of(path: Path) -> str:
    best, fstype = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(cells: list[CellResult]) -> str:
    header = ["relay", "size", "sess", "sent", "acc/s", "e2e/s", "e2e/s@send", "backlog", "ack p50 ms",
              "ack p99 ms", "txn p99 ms", "peak PSS MiB", "CPU% relay/sink/client/other", "notes"]
    rows = [header]
    for c in cells:
        notes = []
        if c.refused:
            notes.append("refused " + ",".join(f"{k}x{v}" for k, v in c.refused.items()))
        if c.missing:
            notes.append(f"{c.missing} never arrived")
        if c.duplicates:
            notes.append(f"{c.duplicates} duplicates")
        if c.stopped_by == "time":
            notes.append("time-bound")
        if c.cpu_pct.get("other", 0) >= BUSY_PCT:
            notes.append("other load on the machine")
        warnings = c.checks.get("log_warnings")
        if warnings:
            notes.append(f"{warnings} log warnings")
        if c.checks.get("not_sent"):
            notes.append(f"{c.checks['not_sent']} queued but not sent")
        if c.checks.get("queue_left"):
            notes.append(f"{c.checks['queue_left']} left in the queue")
        cpu = "/".join(_fmt(c.cpu_pct.get(k), 0) for k in ("relay", "sink", "client", "other"))
        rows.append([c.relay + (f"#{c.round}" if c.round > 1 else ""), c.size, str(c.sessions), str(c.sent),
                     _fmt(c.accepted_per_s), _fmt(c.e2e_per_s), _fmt(c.e2e_while_sending_per_s),
                     str(c.backlog_at_last_ack), _fmt(c.ack_p50_ms, 2), _fmt(c.ack_p99_ms, 2),
                     _fmt(c.txn_p99_ms, 2), _fmt(c.peak_pss_mib), cpu, "; ".join(notes)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def headroom(cells: list[CellResult], relay: str, baseline: str = "direct") -> list[str]:
    """How much faster the client straight into the sink is than the relay (should be several times)."""
    out = []
    best: dict[tuple[str, int, str], float] = {}
    for c in cells:
        key = (c.size, c.sessions, c.relay)
        best[key] = max(best.get(key, 0.0), c.e2e_per_s)
    for (size, sessions, name), rate in best.items():
        if name != relay:
            continue
        base = best.get((size, sessions, baseline))
        if base and rate:
            ratio = base / rate
            flag = "" if ratio >= 2 else "  <-- client/sink may limit this cell"
            out.append(f"  {size:>5} x {sessions:>2} sessions: client->sink {base:7.1f}/s vs client->{relay}->sink"
                       f" {rate:7.1f}/s = {ratio:4.1f}x headroom{flag}")
    return out


# Figures compared between two relays: (label, CellResult attribute).
RATIO_FIGURES = [("acc/s", "accepted_per_s"), ("e2e/s", "e2e_per_s"), ("ack p50", "ack_p50_ms"),
                 ("ack p99", "ack_p99_ms"), ("peak PSS", "peak_pss_mib")]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def ratios(cells: list[CellResult], relay: str = "gateway", yardstick: str = "postfix") -> list[dict[str, Any]]:
    """Per size x sessions cell: the median of each figure over the rounds, for both relays, and
    relay/yardstick. Above 1 is better for msg/s and worse for latency and memory."""
    runs: dict[tuple[str, int, str], list[CellResult]] = {}
    for c in cells:
        runs.setdefault((c.size, c.sessions, c.relay), []).append(c)
    out = []
    for (size, sessions, name), mine in runs.items():
        theirs = runs.get((size, sessions, yardstick))
        if name != relay or not theirs:
            continue
        entry: dict[str, Any] = {"size": size, "sessions": sessions, "rounds": [len(mine), len(theirs)]}
        for _label, attr in RATIO_FIGURES:
            a = _median([getattr(c, attr) for c in mine])
            b = _median([getattr(c, attr) for c in theirs])
            entry[attr] = {relay: a and round(a, 3), yardstick: b and round(b, 3),
                           "ratio": round(a / b, 2) if a and b else None}
        out.append(entry)
    return out


def ratio_lines(entries: list[dict[str, Any]], relay: str = "gateway", yardstick: str = "postfix") -> list[str]:
    header = ["size", "sess"] + [label for label, _attr in RATIO_FIGURES]
    rows = [header]
    for e in entries:
        rows.append([e["size"], str(e["sessions"])]
                    + [_fmt(e[attr]["ratio"], 2) + "x" if e[attr]["ratio"] else "-" for _label, attr in RATIO_FIGURES])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [(f"{relay} / {yardstick} (median over rounds; msg/s: above 1 = {relay} faster;"
              f" ack and PSS: above 1 = {relay} slower or bigger):")]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return lines


# --- main --------------------------------------------------------------------------------------------


# The one setting the benchmarks change from the gateway's defaults, unless --set gives it: every
# message comes from one envelope sender, and the default daily quota of 1,000 faxes per sender
# would refuse the rest of a long cell (Postfix has no such quota to compare with).
QUOTA_OVERRIDE = "limits.sender.faxes_per_day=0"


def with_quota_off(settings: list[str]) -> list[str]:
    """The --set list with the sender's daily quota switched off, unless it sets that quota itself."""
    if any(s.startswith("limits.sender.faxes_per_day=") for s in settings):
        return settings
    return [*settings, QUOTA_OVERRIDE]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput benchmark of the fax gateway (accepted and end-to-end msg/s, ack latency, "
                    "peak PSS), with real SMTP clients on 127.0.0.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller cells: {QUICK['messages']} messages or {QUICK['seconds']:.0f} s "
                             f"(default {FULL['messages']} or {FULL['seconds']:.0f} s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--sizes", default="2k,200k", help=f"message sizes, from {list(SIZES)}")
    parser.add_argument("--sessions", default="1,8,32", help="concurrent SMTP sessions per cell")
    parser.add_argument("--messages", type=int, help="messages per cell (after warm-up)")
    parser.add_argument("--seconds", type=float, help="time bound per cell's sending phase")
    parser.add_argument("--relays", default="direct,gateway",
                        help=f"systems to run in turn on each workload, from {list(RELAYS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat each cell's relays this often (A B A B); direct runs in the first round only")
    parser.add_argument("--sink", choices=list(SINKS), default="fast", help="what the relay forwards to")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="gateway config override for experiments, e.g. upstream.concurrency=8 (not store.*)")
    parser.add_argument("--postfix-set", action="append", default=[], metavar="NAME=VALUE",
                        help="main.cf parameter for the postfix relay, for experiments, e.g. in_flow_delay=0s")
    parser.add_argument("--gateway-log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the gateway's [log] level (info = the production default)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait after the last 250 for everything to reach the sink")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="on a shared machine: before each cell, wait up to this long for other load to stop")
    parser.add_argument("--workdir", type=Path, help="parent of the throw-away directories (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away directories (stores, logs)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each gateway cell with py-spy into DIR and print a summary")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL (CPU spent in Python, not"
                             " waits for the disk, the network or other processes)")
    opts = parser.parse_args(argv)
    opts.set = with_quota_off(opts.set)
    defaults = QUICK if opts.quick else FULL
    opts.messages = opts.messages or defaults["messages"]
    opts.seconds = opts.seconds or defaults["seconds"]
    opts.size_list = [s.strip() for s in opts.sizes.split(",") if s.strip()]
    opts.session_list = [int(s) for s in opts.sessions.split(",") if s.strip()]
    opts.relay_list = [r.strip() for r in opts.relays.split(",") if r.strip()]
    for size in opts.size_list:
        if size not in SIZES:
            parser.error(f"--sizes: {size!r} is not one of {list(SIZES)}")
    for relay in opts.relay_list:
        if relay not in RELAYS:
            parser.error(f"--relays: {relay!r} is not one of {list(RELAYS)}")
    if "postfix" in opts.relay_list and (reason := _postfix_peer().unavailable_reason()):
        parser.error(f"--relays postfix: {reason}")
    return opts


async def run(opts: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    workroot = Path(tempfile.mkdtemp(prefix="faxgw-bench-", dir=opts.workdir))
    desc = machine()
    desc["store_filesystem"] = filesystem_of(workroot)
    print(f"machine: {desc['cpu_model']}, {desc['cores_logical']} cores, {desc['memory_total_mib']} MiB, "
          f"{desc['python']}, {desc['kernel'].split(' #')[0]}, store on {desc['store_filesystem']}")
    print(f"cells: sizes {opts.size_list} x sessions {opts.session_list} x relays {opts.relay_list}"
          f" x {opts.rounds} round(s); {opts.messages} messages or {opts.seconds:g} s each; sink: {opts.sink}")
    cells: list[CellResult] = []
    workload: dict[str, Any] = {}
    started = time.time()
    try:
        nonce = f"{int(started) % 100000:05d}"
        for size in opts.size_list:
            pool = build_pool(size, SIZES[size], opts.messages + max(opts.session_list), nonce)
            workload[size] = {"target_bytes": SIZES[size],
                              "mean_bytes": round(sum(m.size for m in pool) / len(pool)),
                              "min_bytes": min(m.size for m in pool), "max_bytes": max(m.size for m in pool),
                              "sample": check_pool(pool)}
            print(f"workload {size}: {len(pool)} different messages, mean {workload[size]['mean_bytes']} bytes"
                  f" (PDF of {workload[size]['sample']['pages']} page(s) in the first)")
            for sessions in opts.session_list:
                for round_no in range(1, opts.rounds + 1):
                    for relay in opts.relay_list:
                        if relay == "direct" and round_no > 1:
                            continue  # the calibration; the relays are what the rounds compare
                        if opts.wait_idle:
                            await wait_idle(opts.wait_idle)
                        cell = await run_cell(relay, opts.sink, size, sessions, round_no, pool, opts, workroot)
                        cells.append(cell)
                        print(f"  {relay:>8} {size:>5} x {sessions:>2}: {cell.accepted_per_s:7.1f} acc/s"
                              f" {cell.e2e_per_s:7.1f} e2e/s  p50 {_fmt(cell.ack_p50_ms, 2)} ms"
                              f" p99 {_fmt(cell.ack_p99_ms, 2)} ms txn p99 {_fmt(cell.txn_p99_ms, 2)} ms"
                              f"  PSS {_fmt(cell.peak_pss_mib)} MiB"
                              f"  CPU {cell.cpu_pct}", flush=True)
                        if cell.profile:
                            print_profile(cell.profile)
            del pool
    finally:
        if not opts.keep:
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            print(f"kept: {workroot}")
    print()
    print(table(cells))
    for relay in opts.relay_list:
        if relay != "direct" and "direct" in opts.relay_list:
            lines = headroom(cells, relay)
            if lines:
                print(f"\nclient+sink headroom over {relay} (end to end):")
                print("\n".join(lines))
    compared = ratios(cells)
    if compared:
        print()
        print("\n".join(ratio_lines(compared)))
    print(LEGEND)
    if opts.json:
        report = {
            "benchmark": "greenfax-gateway bench/throughput.py",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": desc,
            "settings": {"quick": opts.quick, "messages_per_cell": opts.messages, "seconds_per_cell": opts.seconds,
                         "sizes": opts.size_list, "sessions": opts.session_list, "relays": opts.relay_list,
                         "rounds": opts.rounds, "sink": opts.sink, "warmup_messages_per_cell": "one per session",
                         "gateway": GatewayRelay(opts).describe(),
                         "durability": "gateway defaults: SQLite WAL, synchronous=FULL, 250 after commit"},
            "workload": workload,
            "cells": [asdict(c) for c in cells],
            "ratios": compared,
        }
        if "postfix" in opts.relay_list:
            report["settings"]["postfix"] = PostfixRelay(opts).describe()
        opts.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON written to {opts.json}")
    return 0


LEGEND = """
acc/s       250 replies / (first send .. last 250)
e2e/s       arrivals at the sink / (first send .. last arrival)
e2e/s@send  arrivals while the clients were still sending: the forwarding rate under intake load
backlog     accepted but not yet at the sink at the last 250; a backlog that grows means e2e/s holds only
            for a burst: run longer cells (e.g. --messages 5000 --seconds 20) to see the sustained rate
ack         from writing the message data to its reply
txn         from MAIL FROM to the final reply (waits before DATA, such as Postfix's in_flow_delay, show here)
peak PSS    the relay's process tree, sampled every 50 ms
CPU%        CPU time / wall time of the timed phase (100% = one core); client = this process;
            other = everything else on the machine (other load makes a cell's numbers unreliable)"""


def print_profile(profile: dict[str, Any]) -> None:
    print(f"    py-spy: {profile['samples']} samples -> {profile['file']}")
    print("    threads: " + ", ".join(f"{name} {pct}%" for name, pct in profile["threads"]))
    print("    top self time:")
    for name, pct in profile["self"][:10]:
        print(f"      {pct:5.1f}%  {name}")
    print("    top inclusive time:")
    for name, pct in profile["inclusive"][:12]:
        print(f"      {pct:5.1f}%  {name}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return asyncio.run(run(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: everything the benchmark started has been stopped", file=sys.stderr)
        return 130
    finally:
        _kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
