"""Plain values that cross stages: job states, jobs, replies, policy decisions, and status reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypedDict
from datetime import datetime


class JobState(enum.StrEnum):
    """Where a fax job stands (DESIGN.md, "Job states")."""

    QUEUED = "queued"
    SENDING = "sending"
    SUBMITTED = "submitted"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEFERRED = "deferred"
    HELD = "held"
    UNKNOWN = "unknown"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


NULL_SENDER = "<>"  # the envelope's mail_from for `MAIL FROM:<>` (bounces, notices)

FINAL_STATES = frozenset(
    {JobState.DELIVERED, JobState.FAILED, JobState.REJECTED, JobState.EXPIRED, JobState.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, enhanced status code and text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}" if self.enhanced else f"{self.code} {self.text}"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


@dataclass(frozen=True, slots=True)
class FaxNumber:
    """A validated fax number."""

    e164: str  # "+12125550123": how the store keeps and compares numbers

    @property
    def digits(self) -> str:
        """The form GreenFax expects in its address: country code and number, digits only."""
        return self.e164.lstrip("+")


@dataclass(frozen=True, slots=True)
class Recipient:
    """An accepted fax recipient of one message: the address as given and its number."""

    address: str
    number: FaxNumber


@dataclass(frozen=True, slots=True)
class Refusal:
    """A policy check said no; the reply says what and why."""

    reply: Reply
    check: str  # the name of the check, a bounded label for logs and metrics


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What intake learned about a message's content, without keeping any of it."""

    header_from: str = ""
    subject: str = ""
    attachments: tuple[Attachment, ...] = ()
    needs_8bitmime: bool = False
    needs_smtputf8: bool = False
    defects: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Attachment:
    """One document part of a fax email."""

    content_type: str
    filename: str
    size: int


@dataclass(slots=True)
class NewMessage:
    """An accepted message on its way into the store, with one job per recipient."""

    raw: bytes
    mail_from: str
    client: str
    helo: str
    auth_user: str | None
    header_from: str
    smtputf8: bool
    needs_8bitmime: bool
    recipients: list[Recipient] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)  # filled by the store
    billing_code: str | None = None  # for cost allocation (gateway/outbound/billing.py)


class JobSummary(TypedDict):
    """A job as lists show it (`faxgw status`, `/api/jobs`); times as the store writes them (ISO, UTC)."""

    code: str
    number: str  # E.164
    sender: str
    state: str  # a JobState value
    created_at: str
    updated_at: str
    last_result: str | None
    attempts: int
    next_attempt_at: str | None
    reason: str | None


class JobEvent(TypedDict):
    at: str
    source: str
    state: str | None  # the state the job entered, None for an event without a change
    detail: str


class JobDetail(JobSummary):
    """One job with what its own page shows (`faxgw show`, `/api/jobs/CODE`)."""

    recipient: str
    upstream_reply: str | None
    reference_id: str | None
    pages: int | None
    duration: int | None
    cost: str | None
    reported_at: str | None
    flagged: int | None
    billing_code: str | None
    events: list[JobEvent]


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job the forwarder has marked `sending`, with what it needs to send it."""

    id: int
    code: str
    secret: str | None  # None for a job stored before jobs had secrets
    number: str
    attempts: int
    created_at: str
    raw: bytes
    mail_from: str
    header_from: str
    smtputf8: bool
    needs_8bitmime: bool


# --- status reports: the one value every status channel produces -------------------------------


class Channel(enum.StrEnum):
    SMTP = "email-smtp"  # a status email received by the gateway's own status listener
    IMAP = "email-imap"  # a status email read from the account sender's mailbox
    BOUNCE = "bounce"  # a delivery status notification to the return path
    NOTIFY = "notify"  # GreenFax's HTTP Notify call
    FEED = "feed"  # a row of the XML data feed
    OPERATOR = "operator"  # `faxgw match`


class Result(enum.StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"


class Trust(enum.IntEnum):
    """How far a report may be believed, which decides what it may match (DESIGN.md, "Correlation and trust").

    UNTRUSTED: anyone could have sent it (status mail that is neither DKIM-
    signed by a trusted domain nor from a trusted network, any bounce). It
    changes a job only when it carries that job's secret (the VERP tag or our
    Message-ID, which only the upstream saw); job codes and GreenFax's
    reference ids are guessable, so alone they never suffice.
    AUTHENTIC: the sender is proven (the Notify URL's secret token): it may
    match by job code and by reference id, not by number.
    TRUSTED: from a trusted source (the IMAP mailbox, the XML feed, status
    mail that passed the configured checks): also by number and time window.
    """

    UNTRUSTED = 0
    AUTHENTIC = 1
    TRUSTED = 2


# Reasons a fax failed, a bounded set (also metric labels).
REASONS = ("busy", "no_answer", "invalid_number", "refused_by_service", "bounced", "other")


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What one channel knows of one fax's outcome. Unknown fields are None."""

    channel: Channel
    trust: Trust
    raw: str  # the raw text of the report (mail source, query string, XML row)
    result: Result | None = None  # None: the report's result text was not understood
    result_text: str | None = None  # the result as the source wrote it
    reason: str | None = None
    fax_number: str | None = None  # E.164
    pages: int | None = None
    duration: int | None = None  # seconds
    cost: str | None = None
    reference_id: str | None = None  # GreenFax's job id
    job_code: str | None = None  # ours, echoed back
    reported_at: datetime | None = None  # UTC
    reported_at_raw: str | None = None
    dedup_key: str = ""  # equal for the same report received twice, by any channel (see dedup_key())
    rule: str | None = None  # the status-mail rule that matched
    notes: tuple[str, ...] = field(default=())
    job_secret: str | None = None  # the job's secret as the report presents it (a bounce's VERP tag)

    @property
    def trusted(self) -> bool:
        return self.trust is Trust.TRUSTED
