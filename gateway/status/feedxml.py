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
ones left None) and safe: DTDs are forbidden, as defusedxml's forbid_dtd
does it (and with its exceptions), so entity expansion ("billion laughs")
and external entities are refused, never resolved. A DTD can only come
before the first element, so only that prolog is read with a DTD check
(expat, stopped at the first element); the whole answer is then read by
ElementTree's C parser, which is many times faster than defusedxml's
pure-Python one and builds the same tree (tests/test_feed.py compares the
two, refusals and errors included). The sandbox (gateway/sandbox/feedserver.py)
writes this same format.
"""

from __future__ import annotations

import email.utils
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import tzinfo
from functools import lru_cache
from xml.parsers import expat

import defusedxml

from gateway.errors import FeedRefused, FeedUnavailable
from gateway.numbers import normalise_number
from gateway.status.report import dedup_key, parse_time
from gateway.models import Channel, Result, StatusReport, Trust

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


@dataclass(frozen=True)
class FeedRow:
    """One <fax> row as a status report, with what matching needs besides it."""

    report: StatusReport
    pending: bool  # GreenFax is still working on it
    sender: str | None  # the address the fax came from, lower case


def parse_feed(body: bytes, zone: tzinfo) -> list[FeedRow]:
    """Every <fax> row of a feed answer; raises FeedRefused for XML that is not accepted."""
    return read_rows(fax_elements(body), zone)


def read_rows(elements: list[ET.Element], zone: tzinfo) -> list[FeedRow]:
    """The <fax> elements (from fax_elements) as rows; the poller reads them a chunk at a time."""
    return [row_report(_fields(element), row_xml(element), zone) for element in elements]


def fax_elements(body: bytes) -> list[ET.Element]:
    """The <fax> elements of a feed answer, in order; raises FeedRefused for XML that is not accepted."""
    try:
        root = read_tree(body)
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
    return [element for element in root.iter() if _key(element.tag) == "fax"]


class _Prolog(Exception):
    """The first element began: no DTD can follow."""


def read_tree(body: bytes) -> ET.Element:
    """What defusedxml.ElementTree.fromstring(body, forbid_dtd=True) returns or raises, read faster.

    The prolog is read by expat configured as ElementTree's parser configures
    it, raising defusedxml's DTDForbidden where a DOCTYPE starts (before its
    entities are read) and ParseError for what is not well-formed before the
    first element; the rest cannot hold a DTD, and the C parser reads it all.
    """
    prolog = expat.ParserCreate(None, "}")

    def doctype(name: str, sysid: str | None, pubid: str | None, has_internal_subset: bool) -> None:
        raise defusedxml.DTDForbidden(name, sysid, pubid)

    def element(name: str, attributes: object) -> None:
        raise _Prolog

    prolog.StartDoctypeDeclHandler = doctype
    prolog.StartElementHandler = element
    try:
        prolog.Parse(body, False)
        prolog.Parse(b"", True)
    except _Prolog:
        pass
    except expat.ExpatError as exc:  # as ElementTree reports it
        error = ET.ParseError(exc)
        error.code, error.position = exc.code, (exc.lineno, exc.offset)
        raise error from None
    parser = ET.XMLParser(target=ET.TreeBuilder())
    parser.feed(body)
    return parser.close()


def error_text(body: bytes) -> str:
    """The text of an error answer (`<error>...</error>`, or the start of whatever came)."""
    match = re.search(rb"<error[^>]*>(.*?)</error>", body, re.IGNORECASE | re.DOTALL)
    text = (match[1] if match else body[:200]).decode("utf-8", "replace")
    return " ".join(text.split())[:200] or "(empty answer)"


def row_report(fields: dict[str, str], raw: str, zone: tzinfo) -> FeedRow:
    """One row as a trusted StatusReport (the feed is GreenFax's own account data)."""
    jobid = fields.get("jobid") or None
    status = fields.get("status")
    status_key = _STATUS_NOISE.sub("", (status or "").lower())
    result, reason = STATUSES.get(status_key, (None, None))
    sender = _address(fields.get("sender") or "")
    stamp = fields.get("timestamp") or None
    report = StatusReport(
        channel=Channel.FEED, trust=Trust.TRUSTED, raw=raw, result=result, result_text=status, reason=reason,
        fax_number=normalise_number(fields.get("faxnumber")), pages=_int(fields.get("pages")),
        duration=_seconds(fields.get("duration")), cost=fields.get("cost") or None, reference_id=jobid,
        reported_at=parse_time(stamp, TIME_FORMATS, zone), reported_at_raw=stamp,
        dedup_key=dedup_key("feed", jobid, status_key) if jobid else dedup_key("feed", None, raw),
    )
    return FeedRow(report=report, pending=status_key == PENDING, sender=sender)


# Each alias -> its canonical name (the first canonical name that lists it, as ALIASES is read in order).
_CANONICAL: dict[str, str] = {}
for _canonical, _names in ALIASES.items():
    for _name in _names:
        _CANONICAL.setdefault(_name, _canonical)


def _fields(element: ET.Element) -> dict[str, str]:
    """A row's child elements by canonical name (the first of a name wins)."""
    values: dict[str, str] = {}
    for child in element:
        name = _CANONICAL.get(_key(child.tag))
        if name and name not in values:
            values[name] = (child.text or "").strip()
    return values


@lru_cache(maxsize=512)
def _key(tag: object) -> str:
    """A tag without namespace, lower case, letters and digits only (cached: a feed has a handful of tags)."""
    text = str(tag).rpartition("}")[2]
    return _NOT_KEY.sub("", text.lower())


def row_xml(element: ET.Element) -> str:
    """ET.tostring(element, encoding="unicode"), written directly for a row of plain fields.

    A row without namespaces or attributes whose children hold text only is
    written as ElementTree writes it (its tail included); anything else is
    left to ElementTree. tests/test_feed.py compares the two.
    """
    tag = element.tag
    if not isinstance(tag, str) or "{" in tag or element.attrib:
        return ET.tostring(element, encoding="unicode")
    if not (element.text or len(element)):
        return f"<{tag} />{_escape(element.tail)}"
    parts = [f"<{tag}>{_escape(element.text)}"]
    for child in element:
        name = child.tag
        if not isinstance(name, str) or "{" in name or child.attrib or len(child):
            return ET.tostring(element, encoding="unicode")
        text = child.text
        parts.append(f"<{name}>{_escape(text)}</{name}>{_escape(child.tail)}" if text
                     else f"<{name} />{_escape(child.tail)}")
    parts.append(f"</{tag}>{_escape(element.tail)}")
    return "".join(parts)


def _escape(text: str | None) -> str:
    """Text as ElementTree writes it (its _escape_cdata)."""
    if not text:
        return ""
    if "&" in text or "<" in text or ">" in text:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


@lru_cache(maxsize=256)
def _address(sender: str) -> str | None:
    """A sender field's address, lower case (cached: most rows have the account sender)."""
    return email.utils.parseaddr(sender)[1].lower() or None


_NOT_KEY = re.compile(r"[^a-z0-9]")
_STATUS_NOISE = re.compile(r"[\s_-]+")
_NUMBER = re.compile(r"\d+")
_CLOCK = re.compile(r"\s*(\d{1,12})(?::(\d{1,2}))(?::(\d{1,2}))?\s*")


def _int(text: str | None) -> int | None:
    match = _NUMBER.search(text or "")
    # Up to 18 digits: what the store's INTEGER holds (and int() refuses over 4,300).
    return int(match[0]) if match and len(match[0]) <= 18 else None


def _seconds(text: str | None) -> int | None:
    """A duration in seconds: "78", or "1:18" / "0:01:18"."""
    clock = _CLOCK.fullmatch(text or "")
    if not clock:
        return _int(text)
    parts = [int(part) for part in clock.groups() if part is not None]
    return sum(value * 60 ** power for power, value in enumerate(reversed(parts)))
