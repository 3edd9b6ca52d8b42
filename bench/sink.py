"""A cheap SMTP sink for the benchmark: speaks real SMTP, counts arrivals, keeps nothing.

Run as a subprocess by bench/throughput.py and bench/soak.py (FastSink in
bench/benchlib/sinks.py); it is not a test and not part of the gateway:

    python bench/sink.py --listen 127.0.0.1:PORT

It answers EHLO (PIPELINING, 8BITMIME, SMTPUTF8, SIZE), MAIL, RCPT, DATA,
RSET, NOOP and QUIT, reads DATA in large blocks up to CRLF.CRLF, and for
each message reads the `X-Bench-Id` header (set by the benchmark's client) so
that duplicates and losses can be told apart. Nothing is parsed beyond that:
the point is a receiver that is several times faster than any relay under
test, so that the relay is what the benchmark measures.

Control over standard input, one command per line, one JSON line back:
    stats   {"count", "unique", "bytes", "first", "last"}  (times: time.monotonic(),
            the system-wide CLOCK_MONOTONIC, comparable with the parent's clock)
    ids     {"ids": [...]}  every X-Bench-Id seen
    reset   {"ok": true}    forget everything counted so far
It prints `ready PORT` on standard output once it listens, and exits on
SIGTERM/SIGINT or when standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time

END = b"\r\n.\r\n"
HEADER_ID = re.compile(rb"(?im)^X-Bench-Id:[ \t]*([^\r\n]+)")
EHLO_REPLY = (b"250-sink.bench.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
              b"250-SIZE 104857600\r\n250 HELP\r\n")


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.bytes = 0
        self.ids: set[bytes] = set()
        self.first: float | None = None
        self.last: float | None = None

    def arrived(self, message: bytes | bytearray) -> None:
        now = time.monotonic()
        self.count += 1
        self.bytes += len(message)
        if self.first is None:
            self.first = now
        self.last = now
        head_end = message.find(b"\r\n\r\n")
        match = HEADER_ID.search(message, 0, head_end if head_end >= 0 else len(message))
        if match:
            self.ids.add(match[1].strip())

    def as_dict(self) -> dict[str, object]:
        return {"count": self.count, "unique": len(self.ids), "bytes": self.bytes,
                "first": self.first, "last": self.last}


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = bytearray()
        self.data: bytearray | None = None  # not None while reading DATA
        self.scan = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 sink.bench.localhost ESMTP bench sink\r\n")

    def data_received(self, chunk: bytes) -> None:
        if self.data is not None:
            self.data += chunk
        else:
            self.buffer += chunk
        self._process()

    def _process(self) -> None:
        out: list[bytes] = []
        while self.transport is not None:
            if self.data is not None:
                end = self.data.find(END, self.scan)
                if end < 0:
                    self.scan = max(0, len(self.data) - 4)
                    break
                message = self.data[2 : end + 2]
                rest = self.data[end + len(END):]
                self.data = None
                self.buffer = bytearray(rest)
                self.stats.arrived(message)
                out.append(f"250 2.0.0 Ok: queued as S{self.stats.count}\r\n".encode())
                continue
            newline = self.buffer.find(b"\r\n")
            if newline < 0:
                if len(self.buffer) > 4096:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    self.buffer.clear()
                break
            line = bytes(self.buffer[:newline])
            del self.buffer[: newline + 2]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"HELO":
                out.append(b"250 sink.bench.localhost\r\n")
            elif verb == b"MAIL":
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                # The CRLF that ended DATA counts as the end of the line before
                # the first data line, so an empty message is found like others.
                self.data = bytearray(b"\r\n") + self.buffer
                self.buffer = bytearray()
                self.scan = 0
            elif verb in (b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                self.transport = None
                return
            else:
                out.append(b"502 5.5.2 Command not recognised\r\n")
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def control(stats: Stats, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            stop.set()
            return
        command = line.strip().decode()
        if command == "stats":
            reply: dict[str, object] = stats.as_dict()
        elif command == "ids":
            reply = {"ids": sorted(i.decode("ascii", "replace") for i in stats.ids)}
        elif command == "reset":
            stats.reset()
            reply = {"ok": True}
        else:
            reply = {"error": f"unknown command {command!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the benchmark sink listens on loopback only")
    loop = asyncio.get_running_loop()
    stats = Stats()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: SinkProtocol(stats), host, int(port), reuse_address=True)
    sys.stdout.write(f"ready {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    control_task = asyncio.create_task(control(stats, stop))
    await stop.wait()
    control_task.cancel()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
