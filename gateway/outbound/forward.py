"""Forwarder: claims due jobs from the store, sends each upstream, records the outcome.

A dispatcher counts the due jobs and hands each idle worker a ticket; a
worker with a ticket first makes its upstream connection ready (connect,
STARTTLS, AUTH) and only then claims one job (marking it `sending` in the
store) and sends it at once; a worker whose job the upstream took goes
straight on to claim the next (none due: it waits for a ticket again), so
under load a job costs one commit on this side, its claim sharing it with
the previous job's outcome. So a job is `sending` only while it is really
being written: a crash leaves as few jobs `unknown` (never resent) as
possible. Each worker keeps its connection open between jobs. One bad job
never stops the runner: an unexpected error defers that job and is logged
with its traceback. An outcome the store cannot take (a full disk) is
retried until it can: a running gateway never leaves a job `sending`.

The copy sent upstream is built by `rewrite_headers()`: a new header block
in front of the original body bytes, which are never touched (DESIGN.md,
"Sender identity"), except that a winmail.dat is replaced by the documents
inside it (winmail.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import time
from functools import partial
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import format_datetime

from gateway.outbound import winmail
from gateway.outbound.mimeparse import field_value, header_fields, split
from gateway.config import UpstreamSettings
from gateway.errors import (
    StoreError,
    TnefError,
    TokenRefused,
    TokenUnavailable,
    UpstreamError,
    UpstreamLacksExtension,
    UpstreamRejected,
    UpstreamSetupError,
    UpstreamUnknown,
)
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.models import ClaimedJob, JobState
from gateway.outbound.billing import without_tag
from gateway.rules import ContentRules, JobCodeRules, RulesInForce
from gateway.store import Writer, add_event, claim_due, count_due, iso, parse_iso, record_outcome

from gateway.outbound.upstream import Endpoint, UpstreamConnection
from gateway.runner import Runner
from gateway.units import backoff

log = logging.getLogger("faxgw.forward")

# Headers the forwarded copy does not carry over: the addressing is replaced,
# and a signature over the changed headers would only fail verification.
DROPPED_HEADERS = frozenset(
    {b"from", b"to", b"cc", b"bcc", b"reply-to", b"subject", b"message-id", b"return-path",
     b"dkim-signature", b"sender", b"resent-to", b"resent-cc", b"resent-bcc"}
)
POLL_INTERVAL = 1.0  # operator actions from other processes are seen within this time
CLOCK_SLACK = 3600.0  # seconds beyond retry_max before a next attempt counts as a clock jump
OUTCOME_RETRY_INITIAL = 0.5  # seconds before an outcome the store refused is tried again, doubling...
OUTCOME_RETRY_MAX = 30.0  # ...up to this


class Forwarder(Runner):
    """Runner: each round counts the due jobs and hands out tickets; the workers claim, send and record."""

    name = "forwarder"
    idle = POLL_INTERVAL  # operator actions from other processes are seen within this time
    expected = (StoreError,)  # a store that cannot be read for now: tried again after the backoff
    retry_max = 10.0

    def __init__(self, *, settings: UpstreamSettings, endpoint: Endpoint, writer: Writer,
                 rules: RulesInForce, hostname: str, clock: Callable[[], datetime],
                 notify_states: frozenset[str] = frozenset(), on_notice: Callable[[], None] = lambda: None,
                 owner: str | None = None) -> None:
        super().__init__(clock=clock)
        self.owner = owner  # the process the claimed jobs are recorded against (it may die mid-send)
        self.settings = settings
        self.notify_states = notify_states
        self.on_notice = on_notice
        self.endpoint = endpoint
        self.writer = writer
        self.rules = rules
        self.hostname = hostname
        self._tickets: asyncio.Queue[None] = asyncio.Queue()  # one per due job a free worker may claim
        self._busy = 0  # workers holding a ticket
        self._claiming = 0  # workers holding a ticket that have not claimed their job yet
        self._unrecorded: dict[int, str] = {}  # job id -> code: outcomes the store has not taken yet
        self._finishing: set[asyncio.Task[None]] = set()  # outcomes being committed
        self._paused_until = 0.0  # monotonic time: set after a set-up failure
        self._dispatcher_done = asyncio.Event()
        self._shutdown_done = asyncio.Event()
        self.last_success: datetime | None = None
        self.last_setup_failure: str | None = None
        self.last_setup_failure_at: datetime | None = None
        self._told_refusal: TokenRefused | None = None  # the refusal one deferred job has recorded
        self.metrics: Metrics | None = None

    @property
    def setup_failing(self) -> bool:
        """The last set-up failure is newer than the last success: the operator must act."""
        if self.last_setup_failure_at is None:
            return False
        return self.last_success is None or self.last_setup_failure_at > self.last_success

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, let sends in flight finish and their outcomes be recorded.

        A job cut off mid-send would become `unknown` at the next start; a
        normal stop or restart must not do that to anyone's fax. No job is
        claimed without being sent at once, so none waits to be given back.
        """
        self.stop()
        await self._dispatcher_done.wait()
        while not self._tickets.empty():  # tickets no worker took: no job was claimed for them
            self._tickets.get_nowait()
        deadline = time.monotonic() + grace
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._finishing:  # outcomes of finished sends: quick commits, unless the store refuses them
            _done, pending = await asyncio.wait(set(self._finishing), timeout=max(1.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            if pending:
                log.error("%d outcomes could not be recorded before the stop; those jobs stay `sending` and"
                          " become `unknown` at the next start", len(pending))
        self._shutdown_done.set()

    @property
    def unrecorded(self) -> int:
        """Outcomes of sends that wait for the store to take them (health reports them)."""
        return len(self._unrecorded)

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._worker(UpstreamConnection(self.endpoint)), name=f"forward-{n}")
            for n in range(self.settings.concurrency)
        ]
        try:
            try:
                await super().run()  # the rounds: step() until shutdown() stops them
            finally:
                self._dispatcher_done.set()
            await self._shutdown_done.wait()  # shutdown() lets sends in flight finish
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for task in self._finishing:
                task.cancel()
            await asyncio.gather(*self._finishing, return_exceptions=True)

    async def step(self) -> None:
        """Hand out one ticket per due job, to at most as many workers as are free; then wait for work."""
        free = self.settings.concurrency - self._busy - self._tickets.qsize()
        tokens = self.endpoint.tokens
        if tokens is not None and tokens.refused is not None and tokens.refused is self._told_refusal:
            # The token endpoint refused the credentials and a job's history says so: nothing
            # is claimed (no attempt counted, no request made) until the credentials change.
            return
        if free > 0 and time.monotonic() >= self._paused_until:
            now = self.clock()
            horizon = iso(now + timedelta(seconds=self.settings.retry_max + CLOCK_SLACK))
            due = await self.writer.run(count_due, iso(now), free + self._claiming, horizon)
            for _ in range(min(free, due - self._claiming)):
                self._tickets.put_nowait(None)

    async def _worker(self, connection: UpstreamConnection) -> None:
        try:
            while True:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
                # the cancellation that stops this worker.
                try:
                    async with asyncio.timeout(self.settings.idle_close):
                        await self._tickets.get()
                except TimeoutError:
                    await connection.close()  # idle: do not hold the upstream's connection slot
                    continue
                self._busy += 1
                try:
                    while await self._take_and_send(connection) and not self.stopping:
                        # Sent: straight on to the next due job, without a round through the dispatcher;
                        # the outcome's task queues its write first, so both share one commit.
                        await asyncio.sleep(0)
                except Exception:  # the runner goes on
                    log.exception("a forwarder worker failed unexpectedly")
                finally:
                    self._busy -= 1
                    self.wake()
        finally:
            connection.abort()

    async def _take_and_send(self, connection: UpstreamConnection) -> bool:
        """With a ticket: get the connection ready, then claim one job and send it; True if the upstream took it."""
        self._claiming += 1
        try:
            if self.stopping:
                return False
            failure: UpstreamError | None = None
            try:
                await connection.ready()
            except UpstreamError as exc:
                failure = exc
            job = await self._claim()
        finally:
            self._claiming -= 1
        if job is None:
            return False
        if failure is not None:
            # The connection could not be opened: certainly not sent. The job
            # still counts an attempt, so that it expires like any other.
            self._finish_later(job, *self._classify(job, failure), 0.0)
            return False
        return await self._attempt(job, connection)

    async def _claim(self) -> ClaimedJob | None:
        try:
            now = self.clock()
            horizon = iso(now + timedelta(seconds=self.settings.retry_max + CLOCK_SLACK))
            jobs = await self.writer.run(functools.partial(claim_due, owner=self.owner), iso(now), 1, horizon)
        except StoreError as exc:
            log.error("cannot claim a job: %s", exc)
            return None
        return jobs[0] if jobs else None

    async def _attempt(self, job: ClaimedJob, connection: UpstreamConnection) -> bool:
        started = time.monotonic()
        to_address = f"{job.number.lstrip('+')}@{self.settings.domain}"
        try:
            if winmail.without_winmail(job.raw):  # an ordinary fax: its copy is built here, quickly
                message, note = self._prepare(job, to_address, unwrap=False)
            else:  # unusual MIME takes the email package, which must not stall the event loop
                message, note = await asyncio.to_thread(self._prepare, job, to_address)
            if note is not None:
                await self._event(job, note)
            reply = await connection.send(
                sender=self.settings.return_path_for(job.code, job.secret), recipient=to_address,
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
        self._finish_later(job, state, _redacted(detail, job), _redacted(reply, job),
                           round((time.monotonic() - started) * 1000, 1))
        return state is JobState.SUBMITTED

    def _finish_later(self, job: ClaimedJob, state: JobState, detail: str, reply: str | None, ms: float) -> None:
        """Record the outcome in a task of its own: the worker takes its next job meanwhile.

        The job stays `sending` until the commit (so `unknown` after a
        crash), and shutdown() waits for these commits.
        """
        task = asyncio.create_task(self._finish(job, state, detail, reply, ms))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, job: ClaimedJob, state: JobState, detail: str, reply: str | None, ms: float) -> None:
        """Record an outcome, retrying while the store cannot take it (a full disk), then log it."""
        delay = OUTCOME_RETRY_INITIAL
        try:
            while True:
                try:
                    await self._record(job, state, detail, reply)
                    break
                except StoreError as exc:
                    if job.id not in self._unrecorded:
                        log_event(log, "outcome-not-recorded", level=logging.ERROR, code=job.code,
                                  result=state.value, problem=str(exc),
                                  action="retrying until the store takes it; free disk space or raise store.max_size")
                    self._unrecorded[job.id] = job.code
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, OUTCOME_RETRY_MAX)
            if self._unrecorded.pop(job.id, None) is not None:
                log_event(log, "outcome-recorded", code=job.code, result=state.value, after="store came back")
            if self.metrics is not None:
                self.metrics.forwards.labels(state.value).inc()
            log_event(log, "forward", code=job.code, number=job.number, attempt=job.attempts,
                      result=state.value, reply=reply or detail, ms=ms,
                      level=logging.WARNING if state in (JobState.UNKNOWN, JobState.REJECTED) else logging.INFO)
        except Exception:  # a task of its own: nobody else would see it
            log.exception("recording the outcome of %s (%s) failed; it stays `sending`, so `unknown` at the"
                          " next start", job.code, state.value)

    def _classify(self, job: ClaimedJob, exc: UpstreamError) -> tuple[JobState, str, str | None]:
        # An upstream may echo the envelope sender in its reply: the job's secret stays out of every record.
        reply, detail = _redacted(exc.reply, job), _redacted(str(exc), job) or ""
        if isinstance(exc, UpstreamRejected):
            return JobState.REJECTED, detail, reply
        if isinstance(exc, UpstreamUnknown):
            return JobState.UNKNOWN, detail, reply
        if isinstance(exc, UpstreamLacksExtension):
            return JobState.HELD, detail, reply
        if isinstance(exc, UpstreamSetupError):
            if isinstance(exc, TokenRefused):
                self._told_refusal = exc
            self.last_setup_failure = f"{detail}{': ' + reply if reply else ''}"
            self.last_setup_failure_at = self.clock()
            self._paused_until = time.monotonic() + self.settings.retry_initial
            action = ("the OAuth2 token endpoint does not answer; jobs wait as deferred and are retried"
                      if isinstance(exc, TokenUnavailable) else "fix the [upstream] settings; jobs wait as deferred")
            log_event(log, "upstream-setup-failure", level=logging.ERROR, upstream=self.endpoint.describe(),
                      problem=detail, reply=reply, action=action)
        return self._retry_or_expire(job), detail, reply

    def _retry_or_expire(self, job: ClaimedJob) -> JobState:
        """Expired once the job is older than the queue lifetime and has really been retried for half of it.

        The second condition keeps a clock that jumps forwards (or a gateway
        that was down for days) from expiring every waiting job at once.
        """
        lifetime = self.settings.max_queue_lifetime
        age = (self.clock() - parse_iso(job.created_at)).total_seconds()
        waited = sum(backoff(n, self.settings.retry_initial, self.settings.retry_max)
                     for n in range(1, job.attempts + 1))
        return JobState.EXPIRED if age >= lifetime and waited >= lifetime / 2 else JobState.DEFERRED

    async def _record(self, job: ClaimedJob, state: JobState, detail: str, reply: str | None) -> None:
        next_at = iso(self.clock()) if state is JobState.QUEUED else None
        if state is JobState.DEFERRED:
            delay = timedelta(seconds=backoff(job.attempts, self.settings.retry_initial, self.settings.retry_max))
            next_at = iso(self.clock() + delay)
            detail = f"{detail}; next attempt {next_at}"
        reason = detail if state is JobState.HELD else None
        notify = state.value in self.notify_states
        await self.writer.run(partial(record_outcome, detail=detail, reply=reply, next_attempt_at=next_at,
                                      reason=reason, notify=notify), job.id, iso(self.clock()), state)
        if notify:
            self.on_notice()

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
        unwrapped = winmail.unwrap_tnef(raw) if unwrap else None
        if unwrapped is not None:
            raw, note = unwrapped.raw, unwrapped.note
        now = self.clock()
        jobcode: JobCodeRules = self.rules.addressing.jobcode  # the rules in force: a reload replaces them
        subject_tag = jobcode.subject_tag.format(code=job.code) if jobcode.placement == "subject" else None
        code_header = self.rules.code_header
        received = (f"by {self.hostname} (greenfax-gateway) with ESMTP id {job.code}\r\n"
                    f"\tfor <{to_address}>; {format_datetime(now)}")
        return rewrite_headers(
            raw, code=job.code, to_address=to_address, account_sender=self.settings.account_sender or "",
            received=received, message_id=_message_id(job, self.hostname),
            subject_tag=subject_tag, code_header=code_header, date=format_datetime(now),
            billing=self.rules.addressing.content,
        ), note


def rewrite_headers(
    raw: bytes, *, code: str, to_address: str, account_sender: str, received: str,
    message_id: str, subject_tag: str | None, code_header: str | None, date: str,
    billing: ContentRules | None = None,
) -> bytes:
    """The message as forwarded upstream: new header block, original body bytes.

    From becomes the account's registered sender and the original From moves
    to Reply-To; To is the one fax address; Cc and Bcc are dropped; the job
    code goes where the rules place it.
    """
    block, body = split(raw)
    kept: list[bytes] = []
    original_from = b""
    subject = b""
    has_date = False
    for name, field in header_fields(block):
        if name == b"from":
            original_from = field_value(field)
        elif name == b"subject":
            subject = field_value(field)
            if billing is not None:
                subject = without_tag(subject, billing)  # the code is ours to allocate costs, not GreenFax's
        elif name == b"date":
            has_date = True
        if name in DROPPED_HEADERS or (code_header and name == code_header.lower().encode()) \
                or (billing is not None and name == billing.billing_header.lower().encode()):
            continue
        kept.append(field)
    head = [
        f"Received: {received}\r\n".encode(),
        f"From: {account_sender}\r\n".encode(),
        f"To: {to_address}\r\n".encode(),
    ]
    if original_from:
        head.append(b"Reply-To: " + original_from + b"\r\n")
    if subject_tag:
        tag = subject_tag.encode()
        head.append(b"Subject: " + (tag + b" " + subject if subject else tag) + b"\r\n")
    elif subject:
        head.append(b"Subject: " + subject + b"\r\n")
    if code_header:
        head.append(f"{code_header}: {code}\r\n".encode())
    head.append(f"Message-ID: {message_id}\r\n".encode())
    if not has_date:
        head.append(f"Date: {date}\r\n".encode())
    if not body:
        body = b"\r\n"
    return b"".join(head) + b"".join(kept) + body


def _redacted(text: str | None, job: ClaimedJob) -> str | None:
    """`text` without the job's secret (an upstream's reply may quote the return path or Message-ID)."""
    if text is None or not job.secret:
        return text
    return re.sub(re.escape(job.secret), "<secret>", text, flags=re.IGNORECASE)


def _message_id(job: ClaimedJob, hostname: str) -> str:
    """<CODE.SECRET.ATTEMPT@host>: a bounce quoting it proves it is ours; the attempt keeps each send's ID unique."""
    if job.secret is None:  # a job stored before jobs had secrets
        return f"<{job.code}.{secrets.token_hex(6)}@{hostname}>"
    return f"<{job.code}.{job.secret}.{job.attempts}@{hostname}>"
