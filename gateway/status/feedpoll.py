"""XML data feed poller: asks GreenFax for its list of faxes, one date range at a time.

GreenFax -> (HTTPS GET, at most one per [feed] min_interval) -> this stage ->
one trusted StatusReport per row (gateway/status/feedxml.py) -> the one
correlation path (correlate.apply_report) -> store. Its facts live in the
store (gateway/store/feedlog.py), so GreenFax's rules hold across restarts and
for `faxgw feed poll` run in another process while `faxgw serve` runs:

- The time of a request is committed BEFORE the request is sent, checked and
  written in one transaction: two processes cannot both poll, and a crash
  mid-request still counts the request.
- A stored request time more than CLOCK_TOLERANCE in the future means the
  clock jumped back: it is taken as "the last request was now", once, and
  logged, so polling resumes one min_interval later instead of never.
- Windows are dates in [greenfax] timezone, ending today; each starts a day
  before the previous one ended (late rows are not missed). One request
  spans at most MAX_RANGE_DAYS days: a longer backfill is split, one request
  per allowed poll.
- Rows match by GreenFax's job id, else (only when the row's sender is the
  account sender) by number and time window; a row no job matches is
  recorded as `foreign`. Pending rows turn an `unknown` job `submitted`.
- Reconciliation: `unknown` jobs, and `submitted` ones without a result after
  [reconcile] after, pull the window back to their creation date. Once a
  poll covered that date (and the job has been waiting [reconcile] after),
  a job the feed does not list is resent (resend_unknown = true) or waits
  for the operator, with an event either way; see `_reconcile`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus
from zoneinfo import ZoneInfo

import aiohttp

from gateway import store
from gateway.config import Settings
from gateway.errors import ConfigError, FeedError, FeedRefused, FeedUnavailable
from gateway.logs import log_event
from gateway.status.correlate import (
    CorrelationPolicy,
    MatchScope,
    Outcome,
    apply_pending,
    apply_report,
)
from gateway.status.feedchunk import apply_together
from gateway.status.feedstate import FeedState, PollResult, Window, human_time, when
from gateway.status.feedxml import (
    FeedRow,
    error_text,
    fax_elements,
    read_rows,
)
from gateway.runner import Runner
from gateway.units import backoff
from gateway.store import Writer, iso, parse_iso

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = ["FeedError", "FeedPoller", "FeedState", "PollResult", "Window", "human_time"]

log = logging.getLogger("faxgw.feed")
MAX_RANGE_DAYS = 90  # GreenFax: a date range may not exceed 90 days (counted inclusively, to be safe)
CLOCK_TOLERANCE = timedelta(seconds=60)
REPORT_SLACK = timedelta(minutes=15)  # a row may carry a time a little before its job's creation
MAX_BODY = 64 * 2**20
ROWS_PER_COMMIT = 200  # a large backfill is applied in several commits, so intake never waits long
MAX_BACKOFF = 3600.0
MARGIN = 0.05  # seconds slept past the allowed moment, so the check does not land a hair early
MASK = "********"
WAITING = "not in the feed; waiting for the operator"
RESENT = "resent: not in the feed"


@dataclass(frozen=True)
class _Claim:
    allowed: bool
    next_allowed_at: datetime
    last_request_at: datetime | None
    status: dict[str, Any]
    window: Window | None = None
    clock_reset: bool = False


class FeedPoller(Runner):
    """Polls the XML data feed and applies its rows; a runner for the service, `poll_now()` for one poll.

    A poll is a round: every [feed] interval, never closer than min_interval.
    Feed errors and outages back off (min_interval, doubling, at most an hour
    or the interval); a store error raises, and the runner retries with the
    same backoff. The runner itself never stops on an error.
    """

    name = "feed"
    expected = (Exception,)  # logged masked and without a traceback: an error's text may quote the URL
    error_event = "feed-error"
    logger = log

    def __init__(self, settings: Settings, writer: Writer, policy: CorrelationPolicy, *,
                 clock: Callable[[], datetime] = store.utcnow) -> None:
        if not settings.feed.url:
            raise ConfigError("feed.url is not set: there is no XML data feed to poll")
        super().__init__(clock=clock)
        self._failures = 0  # polls in a row that failed (a round that raises counts in loop_state too)
        self.settings = settings
        self.feed = settings.feed
        self.writer = writer
        self.policy = policy
        self.clock = clock
        self.zone = ZoneInfo(settings.greenfax.timezone)
        self.state = FeedState()
        self.metrics: Metrics | None = None  # set by the service, as for the forwarder
        self._account_sender = (settings.upstream.account_sender or "").lower()
        self._min_interval = timedelta(seconds=self.feed.min_interval)
        self._password = self.feed.password.get_secret_value() if self.feed.password else ""
        self._scopes: dict[str | None, MatchScope] = {}  # the MatchScope of each row sender (see _scope)

    # --- the runner ---------------------------------------------------------------------

    async def step(self) -> float:
        result = await self.poll_now(manual=False)
        self._failures = self._failures + 1 if result.error else 0
        return self._delay(result, self._failures)

    def retry_delay(self, failures: int) -> float:
        return self._backoff(failures)

    def describe_error(self, exc: BaseException) -> str:
        return self._mask(f"{type(exc).__name__}: {exc}")

    def _delay(self, result: PollResult, failures: int) -> float:
        """Seconds until the next poll: the allowed moment, the interval, or the backoff."""
        until_allowed = (result.next_allowed_at - self.clock()).total_seconds()
        # A clock that jumps back after the claim must not make the wait longer than one interval.
        until_allowed = min(max(until_allowed, 0.0), self.feed.min_interval + CLOCK_TOLERANCE.total_seconds())
        soonest = until_allowed + MARGIN
        if not result.polled or result.more:
            return soonest
        if result.error:
            return max(soonest, self._backoff(failures))
        return max(soonest, self.feed.interval)

    def _backoff(self, failures: int) -> float:
        return backoff(failures, max(self.feed.min_interval, 1.0), max(MAX_BACKOFF, self.feed.interval))

    # --- one poll ---------------------------------------------------------------------------

    async def poll_now(self, *, manual: bool) -> PollResult:
        """Poll once if GreenFax's minimum interval allows it; else say when it will.

        Never raises for the feed's own problems (they are in the result and
        logged, the password masked); a store error propagates.
        """
        claim = await self.writer.run(self._claim, self.clock())
        self.state.update(claim.status, iso(claim.last_request_at) if claim.last_request_at else None,
                          self.feed.min_interval)
        self.state.next_allowed_at = claim.next_allowed_at
        if not claim.allowed:
            return self._not_allowed(claim, manual)
        assert claim.window is not None
        request_at = claim.last_request_at
        try:
            body = await self._fetch(claim.window)
            rows = await asyncio.to_thread(fax_elements, body)
        except FeedError as exc:
            return await self._failed(claim, exc, manual)
        counts, listed = await self.apply_rows(rows)
        status = await self.writer.run(self._finish, claim, listed, counts, len(rows), manual)
        self._count("ok", counts)
        self.state.update(status, iso(request_at) if request_at else None, self.feed.min_interval)
        # A scheduled poll that only saw rows known already is routine: an idle gateway logs nothing each time.
        news = manual or any(kind != "duplicate" for kind in status["outcomes"]) or claim.window.more
        log_event(log, "feed-poll", level=logging.INFO if news else logging.DEBUG,
                  url=self._where(claim.window), window=str(claim.window), rows=len(rows),
                  outcomes=" ".join(f"{k}={v}" for k, v in sorted(status["outcomes"].items())) or None,
                  by="manual" if manual else "scheduled", backfill="continues" if claim.window.more else None)
        return PollResult(True, claim.next_allowed_at, request_at, claim.window, len(rows), status["outcomes"])

    async def apply_rows(self, elements: list[Any]) -> tuple[Counter[str], set[str]]:
        """Every row through the one correlation path; the codes of the jobs rows were matched to.

        Rows are read (in a worker thread) a chunk at a time, the next chunk
        while the store writer applies the one before. A crash between
        commits is harmless: the window is asked again, and rows already
        applied are duplicates.
        """
        counts: Counter[str] = Counter()
        listed: set[str] = set()
        writing: asyncio.Future[tuple[Counter[str], set[str]]] | None = None
        try:
            for first in range(0, len(elements), ROWS_PER_COMMIT):
                chunk = await asyncio.to_thread(read_rows, elements[first:first + ROWS_PER_COMMIT], self.zone)
                if writing is not None:
                    self._add(await writing, counts, listed)
                writing = asyncio.ensure_future(self.writer.run(self.apply_chunk, chunk))
            if writing is not None:
                self._add(await writing, counts, listed)
                writing = None
        finally:
            if writing is not None:  # reading failed or the poll was cancelled: the chunk in hand still finishes
                try:
                    await asyncio.shield(writing)
                except Exception:  # logged here, so that the failure that brought us here is the one raised
                    log.exception("a chunk of feed rows could not be stored")
        return counts, listed

    @staticmethod
    def _add(done: tuple[Counter[str], set[str]], counts: Counter[str], listed: set[str]) -> None:
        counts.update(done[0])
        listed |= done[1]

    def _count(self, poll: str, rows: Counter[str] | None = None) -> None:
        """One poll by outcome, and its new rows by correlation outcome (rows seen again are not counted)."""
        self.state.polls[poll] += 1
        if self.metrics is None:
            return
        self.metrics.feed_polls.labels(poll).inc()
        for kind, number in (rows or Counter()).items():
            for _ in range(number if kind != "duplicate" else 0):
                self.metrics.report("feed", kind)

    def _not_allowed(self, claim: _Claim, manual: bool) -> PollResult:
        self._count("too_soon")
        if claim.clock_reset:
            log_event(log, "feed-clock-backwards", level=logging.WARNING,
                      stored_last_request=iso(claim.last_request_at) if claim.last_request_at else None,
                      now=iso(self.clock()), action="counting the last request as now",
                      next_allowed=iso(claim.next_allowed_at))
        else:
            log_event(log, "feed-too-soon", level=logging.INFO if manual else logging.DEBUG,
                      next_allowed=iso(claim.next_allowed_at), by="manual" if manual else "scheduled")
        return PollResult(False, claim.next_allowed_at, claim.last_request_at, clock_reset=claim.clock_reset)

    async def _failed(self, claim: _Claim, exc: FeedError, manual: bool) -> PollResult:
        problem = self._mask(str(exc))
        refused = isinstance(exc, FeedRefused)
        self._count("refused" if refused else "error")
        self.state.last_error, self.state.last_error_at = problem, claim.last_request_at
        await self.writer.run(self._record_failure, problem, claim)
        log_event(log, "feed-refused" if refused else "feed-error", level=logging.ERROR if refused else logging.WARNING,
                  url=self._where(claim.window), problem=problem, by="manual" if manual else "scheduled",
                  next_allowed=iso(claim.next_allowed_at))
        return PollResult(True, claim.next_allowed_at, claim.last_request_at, claim.window, error=problem)

    # --- in the store writer's transaction ---------------------------------------------------

    def _claim(self, conn: Any, now: datetime) -> _Claim:
        """Check GreenFax's minimum interval and, if it allows a request, record it and plan its window."""
        stored = store.last_request(conn)
        last = when(stored)
        status = store.load_status(conn)
        if last is not None and last - now > CLOCK_TOLERANCE:
            store.record_request(conn, iso(now))  # the clock went back: the last request counts as now
            return _Claim(False, now + self._min_interval, last, status, clock_reset=True)
        if last is not None and now < last + self._min_interval:
            return _Claim(False, last + self._min_interval, last, status)
        window = self._plan(conn, now)
        store.record_request(conn, iso(now))
        return _Claim(True, now + self._min_interval, now, status, window)

    def _plan(self, conn: Any, now: datetime) -> Window:
        """From the stored next start (or the backfill), pulled back for reconciliation, at most 90 days."""
        today = now.astimezone(self.zone).date()
        try:
            start = date.fromisoformat(store.next_start(conn) or "")
        except ValueError:
            start = today - timedelta(days=self.feed.backfill_days)
        earliest = self._candidates(conn, now, limit=1)  # they come oldest first
        if earliest:
            start = min(start, self._local_date(earliest[0]["created_at"]))
        start = min(start, today)
        return Window(start, min(today, start + timedelta(days=MAX_RANGE_DAYS - 1)), today)

    def apply_chunk(self, conn: Any, rows: list[FeedRow]) -> tuple[Counter[str], set[str]]:
        """A chunk of rows, each applied through the correlation path; a row that fails is set aside alone.

        The rows are first applied together (gateway/status/feedchunk.py:
        their lookups and plain results a statement per chunk) under one
        savepoint (a savepoint per row costs SQLite a copy of every page
        each row changes). Should
        one fail, the chunk is undone and applied again row by row, each in a
        savepoint of its own, so that only the failing row is set aside.
        """
        now = iso(self.clock())
        try:
            with store.savepoint(conn, "feed_chunk"):
                outcomes = apply_together(conn, rows, now, self.policy, self._scope, self.apply_row)
        except Exception:
            if not conn.in_transaction:
                raise  # SQLite undid the whole transaction (a full disk): the writer fails the call
            return self._apply_apart(conn, rows, now)
        counts: Counter[str] = Counter(outcome.kind for outcome in outcomes)
        return counts, {outcome.job_code for outcome in outcomes if outcome.job_code}

    def _apply_apart(self, conn: Any, rows: list[FeedRow], now: str) -> tuple[Counter[str], set[str]]:
        counts: Counter[str] = Counter()
        listed: set[str] = set()
        for row in rows:
            try:
                with store.savepoint(conn):
                    outcome = self.apply_row(conn, row, now)
            except Exception as exc:  # one bad row is logged and set aside; the others go on
                counts["error"] += 1
                log_event(log, "feed-row-error", level=logging.ERROR, reference=row.report.reference_id,
                          problem=f"{type(exc).__name__}: {exc}")
                continue
            counts[outcome.kind] += 1
            if outcome.job_code:
                listed.add(outcome.job_code)
        return counts, listed

    def _finish(self, conn: Any, claim: _Claim, listed: set[str], counts: Counter[str], rows: int,
                manual: bool) -> dict[str, Any]:
        """Reconciliation, the next window's start and the poll's facts, in one commit."""
        assert claim.window is not None
        now = iso(self.clock())
        counts = counts + self._reconcile(conn, claim, listed, now)
        store.set_next_start(conn, (claim.window.end - timedelta(days=1)).isoformat())
        status = {
            "last_poll_at": iso(claim.last_request_at) if claim.last_request_at else now, "window": str(claim.window),
            "rows": rows, "outcomes": dict(counts), "by": "manual" if manual else "scheduled",
            "error": None, "error_at": None, "more": claim.window.more, "unknown_jobs": store.count_unknown(conn),
        }
        store.save_status(conn, status)
        return status

    def apply_row(self, conn: Any, row: FeedRow, now: str) -> Outcome:
        """Number matching only for rows whose sender is the account's: other senders' faxes are not ours."""
        apply = apply_pending if row.pending else apply_report
        return apply(conn, row.report, now, self.policy, self._scope(row.sender))

    def _scope(self, sender: str | None) -> MatchScope:
        scope = self._scopes.get(sender)
        if scope is None:
            if len(self._scopes) > 256:
                self._scopes.clear()  # a feed has a few senders; odd ones must not pile up
            scope = self._scopes[sender] = MatchScope(
                by_number=bool(sender) and sender == self._account_sender, created_before_report=REPORT_SLACK,
                no_match="foreign", not_by_number=f"the row's sender ({sender or 'none'}) is not the account sender")
        return scope

    def _reconcile(self, conn: Any, claim: _Claim, listed: set[str], now: str) -> Counter[str]:
        """Judge each job reconciliation waits for whose date this poll covered and the feed did not resolve.

        Only jobs waiting at least [reconcile] after are judged (the feed may
        lag behind a fax just sent); the others stay candidates.
        """
        assert claim.window is not None and claim.last_request_at is not None
        counts: Counter[str] = Counter()
        settled_before = iso(claim.last_request_at - timedelta(seconds=self.settings.reconcile.after))
        for job in self._candidates(conn, claim.last_request_at):
            if job["updated_at"] > settled_before or not claim.window.covers(self._local_date(job["created_at"])):
                continue
            verdict = self._verdict(conn, job, job["code"] in listed, claim.window, now)
            counts[verdict] += 1
            if verdict in ("resent", "waiting"):
                log_event(log, "feed-reconcile", level=logging.WARNING, code=job["code"], window=str(claim.window),
                          action=RESENT if verdict == "resent" else WAITING)
        return counts

    def _verdict(self, conn: Any, job: Any, listed: bool, window: Window, now: str) -> str:
        if listed:
            store.mark_looked_up(conn, job["id"], now, f"listed in the feed ({window}) without a final status")
            return "looked_up"
        if job["state"] == "submitted":
            store.mark_looked_up(conn, job["id"], now, f"not in the feed ({window}) yet; waiting for a status report")
            return "looked_up"
        if self.settings.reconcile.resend_unknown:
            store.requeue_unknown(conn, job["id"], now, f"{RESENT} ({window}); [reconcile] resend_unknown is on")
            return "resent"
        store.mark_looked_up(conn, job["id"], now, f"{WAITING} ({window}): check with GreenFax, then"
                               f" `faxgw retry {job['code']}` or `faxgw cancel {job['code']}`")
        return "waiting"

    def _candidates(self, conn: Any, now: datetime, limit: int | None = None) -> list[Any]:
        overdue = iso(now - timedelta(seconds=self.settings.reconcile.after))
        ignore = WAITING if self.settings.reconcile.resend_unknown else None
        return store.reconcile_candidates(conn, overdue_before=overdue, ignore_marker=ignore, limit=limit)

    def _record_failure(self, conn: Any, problem: str, claim: _Claim) -> None:
        status = store.load_status(conn)
        status.update(error=problem, error_at=iso(claim.last_request_at or self.clock()),
                      failed_window=str(claim.window))
        store.save_status(conn, status)

    # --- HTTP ---------------------------------------------------------------------------------

    async def _fetch(self, window: Window) -> bytes:
        """GET one window; any network or HTTP problem becomes FeedUnavailable, the password masked."""
        assert self.feed.url
        params = {"accountid": self.feed.accountid or "", "password": self._password,
                  "startdate": window.start.isoformat(), "enddate": window.end.isoformat()}
        try:
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.feed.timeout)) as session,
                        session.get(self.feed.url, params=params, ssl=self._ssl(), allow_redirects=False) as response):
                body = await _read_capped(response)
                status = response.status
        except FeedError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError, ValueError) as exc:
            raise FeedUnavailable(self._mask(f"cannot reach the feed: {type(exc).__name__}: {exc}")) from exc
        if status != 200:
            raise FeedUnavailable(f"the feed answered HTTP {status}: {self._mask(error_text(body))}")
        return body

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.feed.ca_file:
            return True
        return ssl.create_default_context(cafile=str(self.feed.ca_file))

    def _where(self, window: Window | None) -> str:
        """The request's URL as logs may show it: the password masked."""
        dates = f"&startdate={window.start.isoformat()}&enddate={window.end.isoformat()}" if window else ""
        return f"{self.feed.url}?accountid={quote(self.feed.accountid or '')}&password={MASK}{dates}"

    def _mask(self, text: str) -> str:
        text = re.sub(r"(?i)(password=)[^&\s'\"]*", rf"\g<1>{MASK}", text)
        if self._password:
            for form in {self._password, quote(self._password, safe=""), quote_plus(self._password)}:
                text = text.replace(form, MASK)
        return text

    def _local_date(self, stored: str) -> date:
        return parse_iso(stored).astimezone(self.zone).date()


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The body, refused beyond MAX_BODY (a feed is never that large; an endless answer must not fill memory)."""
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY:
            raise FeedRefused(f"the answer is larger than {MAX_BODY // 2**20} MiB")
        chunks.append(chunk)
    return b"".join(chunks)
