"""The one plain value every status channel produces."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from email.utils import parsedate_to_datetime


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



def dedup_key(kind: str, source_id: str | None, content: bytes | str) -> str:
    """A key that is equal for the same report received twice.

    Mail: Message-ID plus a hash of the body, so the copy that came by SMTP
    and the one read by IMAP (different trace headers) are the same report.
    """
    data = content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
    return f"{kind}:{source_id or '-'}:{hashlib.sha256(data).hexdigest()[:32]}"


_GMT_OFFSET = re.compile(r"\(?\b(?:GMT|UTC)\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?\)?", re.IGNORECASE)
_ZONE_WORD = re.compile(r"\s+[A-Z]{2,5}$")
# The feed's "2026-11-27 01:02:03": zero-padded fields in strptime's ranges for %m, %d, %H, %M and %S.
_PLAIN_FORMAT = "%Y-%m-%d %H:%M:%S"
_PLAIN_TIME = re.compile(r"(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]) ([01]\d|2[0-3]):([0-5]\d):([0-5]\d)")


def parse_time(text: str | None, formats: list[str], default_zone: tzinfo = UTC) -> datetime | None:
    """A report's time in UTC, or None when it cannot be read (the raw text is kept anyway).

    An explicit "GMT-5" style offset wins over a zone abbreviation ("EST"),
    which is ambiguous; times without either are in `default_zone`.
    """
    if not text:
        return None
    try:
        return _parse_time(text, formats, default_zone)
    except (ValueError, OverflowError):  # an offset of a day or more ("GMT+99"); year 1 or 9999 moved to UTC
        return None


def _parse_time(text: str, formats: list[str], default_zone: tzinfo) -> datetime | None:
    zone = default_zone
    offset = _GMT_OFFSET.search(text)
    if offset:
        sign = -1 if offset[1] == "-" else 1
        zone = timezone(sign * timedelta(hours=int(offset[2]), minutes=int(offset[3] or 0)))
        text = _ZONE_WORD.sub("", text[: offset.start()].strip())
    for fmt in formats:
        try:
            moment = _plain(text.strip()) if fmt == _PLAIN_FORMAT else None
            moment = moment or datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
        return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)


def _plain(text: str) -> datetime | None:
    """datetime.strptime(text, "%Y-%m-%d %H:%M:%S") for text in exactly that shape, without strptime's cost;
    None for anything else (strptime then decides, as before)."""
    match = _PLAIN_TIME.fullmatch(text)
    if match is None:
        return None
    try:
        return datetime(*map(int, match.groups()))  # type: ignore[misc]
    except ValueError:  # February 30th: strptime says so itself
        return None
