"""The sandbox's XML data feed: GreenFax's list of outbound faxes, with GreenFax's rules.

`GET /api/xml/outbound.php?accountid=&password=&startdate=&enddate=` answers
the faxes the sandbox received (SandboxHandler.faxes) in that range, in the
format gateway/status/feedxml.py documents and reads. Its rules, as GreenFax
states them:

- wrong credentials: 403 (missing ones: 401);
- a request closer than `min_interval` to the previous one: 429 (the time
  counts from the last request with good credentials that was not itself
  refused with 429);
- a bad or missing date, an end before the start, or a range over 90 days:
  400. Dates are `YYYY-MM-DD` (a whole day) or `YYYY-MM-DD hh:mm:ss`, in
  the account's time zone.

Errors are `<error>text</error>`. There is no access log: the query holds
the password. Faxes younger than `pending_for` seconds are listed as Pending.
"""

from __future__ import annotations

import hmac
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.sandbox.greenfax import SandboxFax, SandboxHandler

FEED_PATH = "/api/xml/outbound.php"
MAX_RANGE = timedelta(days=90)
STATUS_TEXT = {None: "Success", "busy": "Busy", "no_answer": "No Answer", "invalid_number": "Invalid Number",
               "refused_by_service": "Refused"}


@dataclass(frozen=True)
class FeedRequest:
    """One request the sandbox feed answered (for tests; the password is not kept)."""

    startdate: str | None
    enddate: str | None
    status: int
    at: float  # monotonic


@dataclass
class SandboxFeed:
    """The feed's rules and memory: credentials, zone, minimum interval, the requests seen."""

    handler: SandboxHandler
    accountid: str
    password: str
    zone: ZoneInfo
    min_interval: float
    pending_for: float = 0.0
    clock: Callable[[], float] = time.monotonic
    requests: list[FeedRequest] = field(default_factory=list)
    _last_served: float | None = None

    def answer(self, query: dict[str, str]) -> tuple[int, str]:
        """(HTTP status, XML body) for one request, by GreenFax's rules in their order."""
        if not query.get("accountid") or not query.get("password"):
            return 401, _error("accountid and password are required")
        if not (hmac.compare_digest(query["accountid"].encode(), self.accountid.encode())
                and hmac.compare_digest(query["password"].encode(), self.password.encode())):
            return 403, _error("invalid accountid or password")
        now = self.clock()
        if self._last_served is not None and now - self._last_served < self.min_interval:
            wait = self.min_interval - (now - self._last_served)
            return 429, _error(f"too many requests: one request per {self.min_interval:g} seconds is allowed;"
                               f" try again in {wait:.1f} seconds")
        self._last_served = now
        start, end = _date(query.get("startdate"), end=False), _date(query.get("enddate"), end=True)
        if start is None or end is None:
            return 400, _error("startdate and enddate must be YYYY-MM-DD or YYYY-MM-DD hh:mm:ss")
        if end < start:
            return 400, _error("enddate is before startdate")
        if end - start > MAX_RANGE:
            return 400, _error("the date range may not exceed 90 days")
        return 200, self._rows(start, end)

    def _rows(self, start: datetime, end: datetime) -> str:
        lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<outbound>"]
        for fax in self.handler.faxes:
            local = fax.received_at.astimezone(self.zone).replace(tzinfo=None)
            if start <= local <= end:
                lines.append("  " + self._row(fax, local))
        lines.append("</outbound>")
        return "\n".join(lines) + "\n"

    def _row(self, fax: SandboxFax, local: datetime) -> str:
        age = (datetime.now(fax.received_at.tzinfo) - fax.received_at).total_seconds()
        status = "Pending" if age < self.pending_for else STATUS_TEXT.get(fax.reason, "Failed")
        values = {"jobid": fax.reference_id, "faxnumber": fax.number, "sender": fax.sender, "status": status,
                  "pages": fax.pages, "duration": fax.pages * 26, "cost": f"{fax.pages * 0.10:.2f}",
                  "timestamp": local.strftime("%Y-%m-%d %H:%M:%S")}
        return "<fax>" + "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in values.items()) + "</fax>"


FEED = web.AppKey("feed", SandboxFeed)


def feed_app(handler: SandboxHandler, *, accountid: str, password: str, timezone: str, min_interval: float,
             pending_for: float = 0.0) -> web.Application:
    """The sandbox feed as an aiohttp application; `app[FEED]` holds its rules and the requests seen."""
    app = web.Application()
    app[FEED] = SandboxFeed(handler, accountid, password, ZoneInfo(timezone), min_interval, pending_for)
    app.router.add_get(FEED_PATH, _outbound)
    return app


async def start_feed(handler: SandboxHandler, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                     **options: Any) -> tuple[web.AppRunner, int]:
    """Serve the feed on host:port (0 = any free port; HTTPS with `ssl_context`), options as feed_app's.

    Returns the runner (stop it with `await runner.cleanup()`) and the port.
    """
    runner = web.AppRunner(feed_app(handler, **options), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


async def _outbound(request: web.Request) -> web.Response:
    feed = request.app[FEED]
    status, body = feed.answer(dict(request.query))
    feed.requests.append(FeedRequest(request.query.get("startdate"), request.query.get("enddate"), status,
                                     feed.clock()))
    return web.Response(status=status, text=body, content_type="text/xml", charset="utf-8")


def _date(text: str | None, *, end: bool) -> datetime | None:
    """A feed date as a naive local time; a bare date means the whole day."""
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            moment = datetime.strptime((text or "").strip(), fmt)
        except ValueError:
            continue
        if fmt == "%Y-%m-%d" and end:
            moment += timedelta(days=1, microseconds=-1)
        return moment
    return None


def _error(text: str) -> str:
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<error>{escape(text)}</error>\n'
