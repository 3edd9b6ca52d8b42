"""Reading a report: its dedup key, and times as status channels write them (the values are in models.py)."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from email.utils import parsedate_to_datetime


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
            moment = plain_time(text.strip()) if fmt == _PLAIN_FORMAT else None
            moment = moment or datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
        return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)


def plain_time(text: str) -> datetime | None:
    """datetime.strptime(text, "%Y-%m-%d %H:%M:%S") for text in exactly that shape, without strptime's cost;
    None for anything else (strptime then decides, as before)."""
    match = _PLAIN_TIME.fullmatch(text)
    if match is None:
        return None
    try:
        return datetime(*map(int, match.groups()))  # type: ignore[misc]
    except ValueError:  # February 30th: strptime says so itself
        return None
