"""Plain values that cross stages: job states, jobs, replies and policy decisions."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
        return f"{self.code} {self.enhanced} {self.text}"

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
