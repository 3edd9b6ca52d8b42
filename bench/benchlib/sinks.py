"""Sinks: what the relay under test forwards to, counting what arrives.

`fast` (FastSink) is bench/sink.py in its own process: real SMTP, counts
arrivals and their X-Bench-Id, parses nothing. `sandbox` runs the GreenFax
stand-in in the benchmark's own process, `sandbox-proc` as
`python -m gateway sandbox`; both parse every message, so they are slower.
A sink has start(workdir), port, arrivals(), pids() and stop().
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import BENCH_DIR, procs
from .procs import HOST
from .workload import ACCOUNT_SENDER, RETURN_PATH

SINK_SCRIPT = BENCH_DIR / "sink.py"


@dataclass
class Arrivals:
    count: int
    last: float | None  # time.monotonic() of the latest arrival
    unique: int | None = None


async def wait_arrivals(sink: Any, want: int, timeout: float) -> Arrivals:
    """Until `want` messages have arrived at the sink, or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = await sink.arrivals()
        if got.count >= want or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.01)


class _Child:
    """A sink that runs as a child process (`self.proc`): its pid for the measurements, and its stop."""

    proc: asyncio.subprocess.Process | None = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.returncode is None else []

    async def stop(self) -> None:
        if self.proc is not None:
            await procs.terminate(self.proc, grace=5)
            self.proc = None


class FastSink(_Child):
    """bench/sink.py in its own process: real SMTP, counts, parses nothing."""

    name = "fast"

    def __init__(self, reply_limit: int = 2**16) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.reply_limit = reply_limit  # the longest control reply read (asyncio's default; `ids` needs more)
        self._lock = asyncio.Lock()

    async def start(self, workdir: Path) -> None:
        self.proc = await procs.spawn(sys.executable, str(SINK_SCRIPT), "--listen", f"{HOST}:0",
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



class SandboxInProcess:
    """The GreenFax stand-in in the benchmark's own process and event loop."""

    name = "sandbox"

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.count = 0
        self.last: float | None = None
        self.ids: set[str] = set()

    def _handler(self) -> Any:
        """The stand-in's SMTP handler, counting each fax it takes (and forgetting it)."""
        from gateway.rules import RulesInForce
        from gateway.sandbox import SandboxHandler

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

        return CountingHandler(domain="greenfax.com", account_sender=ACCOUNT_SENDER, rules=RulesInForce(),
                               credentials=None)

    async def start(self, workdir: Path) -> None:
        import logging

        from gateway.sandbox import start_sandbox

        handler = self._handler()
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


class SandboxProcess(_Child):
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
        self.proc = await procs.spawn(sys.executable, "-m", "gateway", "--config", str(config), "sandbox",
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

    async def stop(self) -> None:
        await super().stop()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


SINKS = {"fast": FastSink, "sandbox": SandboxInProcess, "sandbox-proc": SandboxProcess}
