"""The XML data feed's format: GreenFax's answer to the poller, read safely into status reports.

GET {url}?accountid=..&password=..&startdate=YYYY-MM-DD&enddate=YYYY-MM-DD
(dates in the account's time zone; `YYYY-MM-DD hh:mm:ss` works too) answers:

    <?xml version="1.0" encoding="UTF-8"?>
    <outbound>
      <fax><jobid>8591334</jobid><faxnumber>12125551234</faxnumber>
        <sender>faxes@office.example</sender><status>Success</status><pages>2</pages>
        <duration>78</duration><cost>0.20</cost><timestamp>2026-11-27 01:02:03</timestamp></fax>
      ...
    </outbound>

status: Success | Busy | No Answer | Invalid Number | Refused | Failed |
Pending (GreenFax is still working on it: not a result). The timestamp is
in the account's zone. Errors are HTTP 4xx with `<error>text</error>`.

Reading is tolerant (tag names in any case, extra fields ignored, missing
ones left None) and safe: defusedxml with DTDs forbidden, so entity
expansion ("billion laughs") and external entities are refused, never
resolved. The sandbox (gateway/sandbox/feed.py) writes this same format.
"""

from __future__ import annotations

import email.utils
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import tzinfo

import defusedxml
import defusedxml.ElementTree as SafeET

from gateway.errors import GatewayError
from gateway.status.mailrules import normalise_number
from gateway.status.report import Channel, Result, StatusReport, dedup_key, parse_time

# status text (lower case, without spaces, "_" or "-") -> (result, reason); Pending is not a result.
STATUSES: dict[str, tuple[Result, str | None]] = {
    "success": (Result.DELIVERED, None),
    "busy": (Result.FAILED, "busy"),
    "noanswer": (Result.FAILED, "no_answer"),
    "invalidnumber": (Result.FAILED, "invalid_number"),
    "refused": (Result.FAILED, "refused_by_service"),
    "failed": (Result.FAILED, "other"),
}
PENDING = "pending"
# The names a field may have, as normalised by _key().
ALIASES = {
    "jobid": ("jobid", "id", "faxid", "referenceid", "greenfaxreferenceid"),
    "faxnumber": ("faxnumber", "number", "destination", "faxno"),
    "sender": ("sender", "from", "email"),
    "status": ("status", "result"),
    "pages": ("pages",),
    "duration": ("duration",),
    "cost": ("cost",),
    "timestamp": ("timestamp", "date", "time", "completed"),
}
TIME_FORMATS = ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%m/%d/%Y %I:%M:%S %p",
                "%m/%d/%Y %H:%M:%S"]


class FeedError(GatewayError):
    """The feed could not be polled; the message never holds the password."""


class FeedUnavailable(FeedError):
    """Network, timeout or an HTTP error answer: try again at the next allowed poll."""


class FeedRefused(FeedError):
    """The answer is not XML the gateway accepts (a DTD, entities, not well-formed)."""


@dataclass(frozen=True)
class FeedRow:
    """One <fax> row as a status report, with what matching needs besides it."""

    report: StatusReport
    pending: bool  # GreenFax is still working on it
    sender: str | None  # the address the fax came from, lower case


def parse_feed(body: bytes, zone: tzinfo) -> list[FeedRow]:
    """Every <fax> row of a feed answer; raises FeedRefused for XML that is not accepted."""
    try:
        root = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden as exc:
        raise FeedRefused(f"the answer declares a DTD (<!DOCTYPE {exc.name}>); entity declarations and"
                          " external entities are never processed") from exc
    except defusedxml.DefusedXmlException as exc:
        raise FeedRefused(f"the answer uses entities, which are never processed ({type(exc).__name__})") from exc
    except ET.ParseError as exc:
        raise FeedRefused(f"the answer is not well-formed XML ({exc})") from exc
    except (LookupError, ValueError) as exc:  # expat on an encoding it cannot read ("TF-8", "shift_jis")
        raise FeedRefused(f"the answer declares an encoding that cannot be read ({exc})") from exc
    if _key(root.tag) == "error":
        raise FeedUnavailable(f"the feed answered an error: {(root.text or '').strip()[:200]}")
    return [row_report(_fields(element), ET.tostring(element, encoding="unicode"), zone)
            for element in root.iter() if _key(element.tag) == "fax"]


def error_text(body: bytes) -> str:
    """The text of an error answer (`<error>...</error>`, or the start of whatever came)."""
    match = re.search(rb"<error[^>]*>(.*?)</error>", body, re.IGNORECASE | re.DOTALL)
    text = (match[1] if match else body[:200]).decode("utf-8", "replace")
    return " ".join(text.split())[:200] or "(empty answer)"


def row_report(fields: dict[str, str], raw: str, zone: tzinfo) -> FeedRow:
    """One row as a trusted StatusReport (the feed is GreenFax's own account data)."""
    jobid = fields.get("jobid") or None
    status = fields.get("status")
    status_key = re.sub(r"[\s_-]+", "", (status or "").lower())
    result, reason = STATUSES.get(status_key, (None, None))
    sender = email.utils.parseaddr(fields.get("sender") or "")[1].lower() or None
    stamp = fields.get("timestamp") or None
    report = StatusReport(
        channel=Channel.FEED, trusted=True, raw=raw, result=result, result_text=status, reason=reason,
        fax_number=normalise_number(fields.get("faxnumber")), pages=_int(fields.get("pages")),
        duration=_seconds(fields.get("duration")), cost=fields.get("cost") or None, reference_id=jobid,
        reported_at=parse_time(stamp, TIME_FORMATS, zone), reported_at_raw=stamp,
        dedup_key=dedup_key("feed", jobid, status_key) if jobid else dedup_key("feed", None, raw),
    )
    return FeedRow(report=report, pending=status_key == PENDING, sender=sender)


def _fields(element: ET.Element) -> dict[str, str]:
    """A row's child elements by canonical name (the first of a name wins)."""
    values: dict[str, str] = {}
    for child in element:
        key = _key(child.tag)
        name = next((canonical for canonical, names in ALIASES.items() if key in names), None)
        if name and name not in values:
            values[name] = (child.text or "").strip()
    return values


def _key(tag: object) -> str:
    """A tag without namespace, lower case, letters and digits only."""
    text = str(tag).rpartition("}")[2]
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _int(text: str | None) -> int | None:
    match = re.search(r"\d+", text or "")
    # Up to 18 digits: what the store's INTEGER holds (and int() refuses over 4,300).
    return int(match[0]) if match and len(match[0]) <= 18 else None


def _seconds(text: str | None) -> int | None:
    """A duration in seconds: "78", or "1:18" / "0:01:18"."""
    clock = re.fullmatch(r"\s*(\d{1,12})(?::(\d{1,2}))(?::(\d{1,2}))?\s*", text or "")
    if not clock:
        return _int(text)
    parts = [int(part) for part in clock.groups() if part is not None]
    return sum(value * 60 ** power for power, value in enumerate(reversed(parts)))
