"""The SMTP client: one aiosmtplib connection per session, reused across messages, closed loop.

Each message is MAIL, RCPT, DATA and the message's bytes, timed from writing
the data to its reply (ack) and from MAIL FROM to that reply (transaction).
A refusal or a lost connection is an outcome with its code (-1: no reply),
never an exception: the loop counts it and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

import aiosmtplib

from .procs import HOST
from .workload import ENVELOPE_SENDER, Message


@dataclass
class Outcome:
    code: int
    latency: float  # seconds from writing the message data to the reply
    done_at: float  # time.monotonic() of the reply
    transaction: float = math.nan  # seconds from MAIL FROM to the final reply


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


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
