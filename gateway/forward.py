"""Forwarder: claims due jobs from the store, sends each upstream, records the outcome.

A dispatcher claims up to as many jobs as there are idle workers (marking
them `sending` in the store first, so a crash leaves them `unknown`, never
resent); each worker keeps its own upstream connection open between jobs.
One bad job never stops the runner: an unexpected error defers that job and
is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from functools import partial
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import format_datetime

from gateway import mime
from gateway.config import UpstreamSettings
from gateway.errors import (
    StoreError,
    UpstreamError,
    UpstreamLacksExtension,
    UpstreamRejected,
    UpstreamSetupError,
    UpstreamUnknown,
)
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.models import ClaimedJob, JobState
from gateway.rules import JobCodeRules
from gateway.store import Writer, add_event, backoff, claim_due, iso, parse_iso, record_outcome
from gateway.tnef import TnefError
from gateway.upstream import Endpoint, UpstreamConnection

log = logging.getLogger("faxgw.forward")
POLL_INTERVAL = 1.0  # operator actions from other processes are seen within this time
CLOCK_SLACK = 3600.0  # seconds beyond retry_max before a next attempt counts as a clock jump


class Forwarder:
    def __init__(self, *, settings: UpstreamSettings, endpoint: Endpoint, writer: Writer,
                 jobcode: JobCodeRules, hostname: str, clock: Callable[[], datetime],
                 notify_states: frozenset[str] = frozenset(), on_notice: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.notify_states = notify_states
        self.on_notice = on_notice
        self.endpoint = endpoint
        self.writer = writer
        self.jobcode = jobcode
        self.hostname = hostname
        self.clock = clock
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[ClaimedJob] = asyncio.Queue()
        self._busy = 0
        self._finishing: set[asyncio.Task[None]] = set()  # outcomes being committed
        self._paused_until = 0.0  # monotonic time: set after a set-up failure
        self._stopping = False
        self._dispatcher_done = asyncio.Event()
        self._shutdown_done = asyncio.Event()
        self.last_success: datetime | None = None
        self.last_setup_failure: str | None = None
        self.last_setup_failure_at: datetime | None = None
        self.metrics: Metrics | None = None

    @property
    def setup_failing(self) -> bool:
        """The last set-up failure is newer than the last success: the operator must act."""
        if self.last_setup_failure_at is None:
            return False
        return self.last_success is None or self.last_setup_failure_at > self.last_success

    def wake(self) -> None:
        """Called by intake after a commit: there is new work."""
        self._wake.set()

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, give back claimed jobs not yet started, let sends in flight finish.

        A job cut off mid-send would become `unknown` at the next start; a
        normal stop or restart must not do that to anyone's fax.
        """
        self._stopping = True
        self._wake.set()
        # A claim in progress finishes first, so every job it marked `sending`
        # is either in the local queue (given back below) or with a worker.
        await self._dispatcher_done.wait()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            await self._record(job, JobState.QUEUED, "returned to the queue at shutdown, not sent", None)
        deadline = time.monotonic() + grace
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._finishing:  # outcomes of finished sends: quick commits, never cut off
            await asyncio.gather(*self._finishing, return_exceptions=True)
        self._shutdown_done.set()

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._worker(UpstreamConnection(self.endpoint)), name=f"forward-{n}")
            for n in range(self.settings.concurrency)
        ]
        try:
            try:
                await self._dispatch()
            finally:
                self._dispatcher_done.set()
            await self._shutdown_done.wait()  # shutdown() lets sends in flight finish
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, *self._finishing, return_exceptions=True)

    async def _dispatch(self) -> None:
        while not self._stopping:
            idle = self.settings.concurrency - self._busy - self._queue.qsize()
            jobs: list[ClaimedJob] = []
            if idle > 0 and time.monotonic() >= self._paused_until and not self._stopping:
                try:
                    now = self.clock()
                    horizon = iso(now + timedelta(seconds=self.settings.retry_max + CLOCK_SLACK))
                    jobs = await self.writer.run(claim_due, iso(now), idle, horizon)
                except StoreError as exc:
                    log.error("cannot claim jobs: %s", exc)
            for job in jobs:
                self._queue.put_nowait(job)
            if not jobs or idle <= len(jobs):
                self._wake.clear()
                try:
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def _worker(self, connection: UpstreamConnection) -> None:
        try:
            while True:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
                # the cancellation that stops this worker.
                try:
                    async with asyncio.timeout(self.settings.idle_close):
                        job = await self._queue.get()
                except TimeoutError:
                    await connection.close()  # idle: do not hold the upstream's connection slot
                    continue
                self._busy += 1
                try:
                    await self._attempt(job, connection)
                except Exception:  # the runner goes on; the job stays `sending`, so `unknown` at restart
                    log.exception("forwarding %s failed unexpectedly", job.code)
                finally:
                    self._busy -= 1
                    self._wake.set()
        finally:
            connection.abort()

    async def _attempt(self, job: ClaimedJob, connection: UpstreamConnection) -> None:
        started = time.monotonic()
        to_address = f"{job.number.lstrip('+')}@{self.settings.domain}"
        try:
            if mime.without_winmail(job.raw):  # an ordinary fax: its copy is built here, quickly
                message, note = self._prepare(job, to_address, unwrap=False)
            else:  # unusual MIME takes the email package, which must not stall the event loop
                message, note = await asyncio.to_thread(self._prepare, job, to_address)
            if note is not None:
                await self._event(job, note)
            reply = await connection.send(
                sender=self.settings.return_path_for(job.code), recipient=to_address,
                message=message, needs_8bitmime=job.needs_8bitmime, smtputf8=job.smtputf8,
            )
        except TnefError as exc:
            # The intake unwrapped this same winmail.dat before its 250; only a
            # changed library could fail here. Never send it blank: an operator decides.
            state, detail, reply = JobState.HELD, f"winmail.dat cannot be unwrapped: {exc}", None
        except UpstreamError as exc:
            state, detail, reply = self._classify(job, exc)
        except Exception as exc:  # a bug must not stop the runner or lose the job
            log.exception("forwarding %s failed unexpectedly", job.code)
            connection.abort()
            state, detail, reply = self._retry_or_expire(job), f"internal error ({type(exc).__name__})", None
        else:
            state, detail = JobState.SUBMITTED, "accepted by the upstream"
            self.last_success = self.clock()
        ms = round((time.monotonic() - started) * 1000, 1)
        # The worker takes its next job while the outcome is committed: the
        # job stays `sending` until then (so `unknown` after a crash, as
        # before), and shutdown() waits for these commits.
        task = asyncio.create_task(self._finish(job, state, detail, reply, ms))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, job: ClaimedJob, state: JobState, detail: str, reply: str | None, ms: float) -> None:
        try:
            await self._record(job, state, detail, reply)
            if self.metrics is not None:
                self.metrics.forwards.labels(state.value).inc()
            log_event(log, "forward", code=job.code, number=job.number, attempt=job.attempts,
                      result=state.value, reply=reply or detail, ms=ms,
                      level=logging.WARNING if state in (JobState.UNKNOWN, JobState.REJECTED) else logging.INFO)
        except Exception:  # a task of its own: nobody else would see it
            log.exception("recording the outcome of %s (%s) failed; it stays `sending`, so `unknown` at the"
                          " next start", job.code, state.value)

    def _classify(self, job: ClaimedJob, exc: UpstreamError) -> tuple[JobState, str, str | None]:
        reply = exc.reply if exc.reply != str(exc) else None
        if isinstance(exc, UpstreamRejected):
            return JobState.REJECTED, str(exc), reply
        if isinstance(exc, UpstreamUnknown):
            return JobState.UNKNOWN, str(exc), reply
        if isinstance(exc, UpstreamLacksExtension):
            return JobState.HELD, str(exc), reply
        if isinstance(exc, UpstreamSetupError):
            self.last_setup_failure = f"{exc}{': ' + reply if reply else ''}"
            self.last_setup_failure_at = self.clock()
            self._paused_until = time.monotonic() + self.settings.retry_initial
            log_event(log, "upstream-setup-failure", level=logging.ERROR, upstream=self.endpoint.describe(),
                      problem=str(exc), reply=reply,
                      action="fix the [upstream] settings; jobs wait as deferred")
        return self._retry_or_expire(job), str(exc), reply

    def _retry_or_expire(self, job: ClaimedJob) -> JobState:
        """Expired once the job is older than the queue lifetime and has really been retried for half of it.

        The second condition keeps a clock that jumps forwards (or a gateway
        that was down for days) from expiring every waiting job at once.
        """
        lifetime = self.settings.max_queue_lifetime
        age = (self.clock() - parse_iso(job.created_at)).total_seconds()
        waited = sum(backoff(n, self.settings.retry_initial, self.settings.retry_max).total_seconds()
                     for n in range(1, job.attempts + 1))
        return JobState.EXPIRED if age >= lifetime and waited >= lifetime / 2 else JobState.DEFERRED

    async def _record(self, job: ClaimedJob, state: JobState, detail: str, reply: str | None) -> None:
        next_at = iso(self.clock()) if state is JobState.QUEUED else None
        if state is JobState.DEFERRED:
            delay = backoff(job.attempts, self.settings.retry_initial, self.settings.retry_max)
            next_at = iso(self.clock() + delay)
            detail = f"{detail}; next attempt {next_at}"
        reason = detail if state is JobState.HELD else None
        try:
            notify = state.value in self.notify_states
            await self.writer.run(partial(record_outcome, detail=detail, reply=reply, next_attempt_at=next_at,
                                          reason=reason, notify=notify), job.id, iso(self.clock()), state)
            if notify:
                self.on_notice()
        except StoreError as exc:
            # The job stays `sending` in the store and becomes `unknown` at the
            # next start: never sent twice without an operator.
            log.error("cannot record the outcome of %s (%s): %s", job.code, state.value, exc)

    async def _event(self, job: ClaimedJob, detail: str) -> None:
        try:
            await self.writer.run(add_event, job.id, iso(self.clock()), "forwarder", None, detail)
        except StoreError as exc:
            log.error("cannot record an event of %s: %s", job.code, exc)

    def _prepare(self, job: ClaimedJob, to_address: str, *, unwrap: bool = True) -> tuple[bytes, str | None]:
        """The copy sent upstream, and the event that records a body rewrite (None: headers only).

        The body bytes go out as stored, except that a winmail.dat is
        replaced by the documents inside it (tnef.py says why here).
        """
        raw, note = job.raw, None
        unwrapped = mime.unwrap_tnef(raw) if unwrap else None
        if unwrapped is not None:
            raw, note = unwrapped.raw, unwrapped.note
        now = self.clock()
        subject_tag = self.jobcode.subject_tag.format(code=job.code) if self.jobcode.placement == "subject" else None
        code_header = self.jobcode.header if self.jobcode.placement == "header" else None
        received = (f"by {self.hostname} (greenfax-gateway) with ESMTP id {job.code}\r\n"
                    f"\tfor <{to_address}>; {format_datetime(now)}")
        return mime.rewrite_headers(
            raw, code=job.code, to_address=to_address, account_sender=self.settings.account_sender or "",
            received=received, message_id=f"<{job.code}.{secrets.token_hex(6)}@{self.hostname}>",
            subject_tag=subject_tag, code_header=code_header, date=format_datetime(now),
        ), note
