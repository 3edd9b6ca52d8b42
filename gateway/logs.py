"""Structured logs: one `key=value` line per event on standard error.

Log lines carry job codes, clients, numbers and SMTP replies; never
subjects, bodies, file names or secrets (DESIGN.md, "Privacy"). Warnings
and errors are rate-limited (`RateLimit`): a flood of one kind, such as
asyncio's "socket.accept() out of system resource" once logged 61,545
times, cannot bury the journal.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def setup(level: str = "info", *, tag: str | None = None) -> None:
    """Log lines to standard error; `tag` names the worker process that writes them (faxgw.service[w1])."""
    handler = logging.StreamHandler(sys.stderr)
    name = f"%(name)s[{tag}]" if tag else "%(name)s"
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name} %(message)s"))
    # On the handler, not a logger: it sees every record, asyncio's and aiohttp's included.
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line (addresses, AUTH exchanges) at INFO: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("mail.debug").setLevel(logging.WARNING)
    # pypdf complains about every imperfect PDF the sandbox counts pages of.
    logging.getLogger("pypdf").setLevel(logging.ERROR)


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def format_event(event: str, **fields: Any) -> str:
    parts = [f"event={event}"]
    parts += [f"{key}={_quote(value)}" for key, value in fields.items() if value is not None and value != ""]
    return " ".join(parts)


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        # The event name travels with the record: RateLimit tells kinds of lines apart by it.
        logger.log(level, "%s", format_event(event, **fields), extra={"event": event})


@dataclass
class _Window:
    ends: float
    passed: int = 1
    suppressed: int = 0


class RateLimit(logging.Filter):
    """Lets the same warning or error through at most `burst` times per `interval` seconds.

    "The same" is one logger and one message template: the event name of a
    `log_event` line, else the first line of the message before formatting.
    INFO and below always pass: they are the record of what was done. When a
    window ends with lines held back, the next line logged (of any kind) is
    preceded by one `event=log-suppressed` line from the same logger, with
    the template and how many.
    """

    def __init__(self, *, burst: int = 10, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._next_end = math.inf
        self._lock = threading.Lock()  # records come from the event loop and from worker threads

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now >= self._next_end:
            self._end_windows(now)
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, _template(record))
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(ends=now + self.interval)
                self._next_end = min(self._next_end, now + self.interval)
                return True
            if window.passed < self.burst:
                window.passed += 1
                return True
            window.suppressed += 1
            return False

    def _end_windows(self, now: float) -> None:
        with self._lock:
            ended = {key: window for key, window in self._windows.items() if now >= window.ends}
            for key in ended:
                del self._windows[key]
            self._next_end = min((window.ends for window in self._windows.values()), default=math.inf)
        # Logged outside the lock: the summary passes through this filter too.
        for (name, template), window in ended.items():
            if window.suppressed:
                logger = logging.getLogger(name)
                log_event(logger, "log-suppressed", level=logging.WARNING, message=template,
                          count=window.suppressed, seconds=round(self.interval))


def _template(record: logging.LogRecord) -> str:
    event = getattr(record, "event", None)
    if event:
        return str(event)
    return str(record.msg).split("\n", 1)[0][:200]
