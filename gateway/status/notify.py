"""HTTP Notify: GreenFax's GET to our URL when a job completes, as a StatusReport.

Query parameters: result, timestamp, destination, pages, duration,
userjobcode, greenfaxreferenceid, cost (values may be URL-encoded). Only
`result` and one identifier (userjobcode, greenfaxreferenceid or
destination) are required; anything else missing or malformed is kept raw
and the call still succeeds, because GreenFax does not retry a refused call.
A result we do not know makes the report unmatched, never `failed`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlencode

from gateway.numbers import normalise_number
from gateway.status.report import dedup_key, parse_time
from gateway.models import Channel, Result, StatusReport, Trust
from gateway.errors import MissingParameters

IDENTIFIERS = ("userjobcode", "greenfaxreferenceid", "destination")
PARAMETERS = ("result", "timestamp", "destination", "pages", "duration", "userjobcode", "greenfaxreferenceid",
              "cost")
TIMESTAMP_FORMATS = ["%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S"]
RESULTS: dict[str, tuple[Result, str | None]] = {
    "success": (Result.DELIVERED, None), "successful": (Result.DELIVERED, None),
    "delivered": (Result.DELIVERED, None), "sent": (Result.DELIVERED, None), "ok": (Result.DELIVERED, None),
    "busy": (Result.FAILED, "busy"), "linebusy": (Result.FAILED, "busy"),
    "noanswer": (Result.FAILED, "no_answer"),
    "invalid": (Result.FAILED, "invalid_number"), "invalidnumber": (Result.FAILED, "invalid_number"),
    "badnumber": (Result.FAILED, "invalid_number"),
    "refused": (Result.FAILED, "refused_by_service"), "rejected": (Result.FAILED, "refused_by_service"),
    "blocked": (Result.FAILED, "refused_by_service"),
    "failed": (Result.FAILED, "other"), "failure": (Result.FAILED, "other"), "error": (Result.FAILED, "other"),
}


def notify_report(query: Mapping[str, str], *, trusted: bool) -> StatusReport:
    """The report of one Notify call; raises MissingParameters when result or every identifier is missing."""
    values = {key.lower(): value.strip() for key, value in query.items() if value is not None}
    missing = []
    if not values.get("result"):
        missing.append("result")
    if not any(values.get(key) for key in IDENTIFIERS):
        missing.append("one of " + ", ".join(IDENTIFIERS))
    if missing:
        raise MissingParameters("missing " + " and ".join(missing))
    result, reason = RESULTS.get(_NOT_LETTER.sub("", values["result"].lower()), (None, None))
    # The raw call, in a canonical order, is both what is kept and what identifies a repeat.
    raw = urlencode(sorted((k, v) for k, v in values.items()))
    return StatusReport(
        channel=Channel.NOTIFY, trust=Trust.TRUSTED if trusted else Trust.AUTHENTIC, raw=raw, result=result, result_text=values["result"],
        reason=reason, fax_number=normalise_number(values.get("destination")), pages=_int(values.get("pages")),
        duration=_int(values.get("duration")), cost=values.get("cost") or None,
        reference_id=values.get("greenfaxreferenceid") or None,
        job_code=(values.get("userjobcode") or "").upper() or None,
        reported_at=parse_time(values.get("timestamp"), TIMESTAMP_FORMATS),
        reported_at_raw=values.get("timestamp") or None, dedup_key=dedup_key("notify", None, raw),
        rule="http-notify",
    )


_NOT_LETTER = re.compile(r"[^a-z]")


def _int(text: str | None) -> int | None:
    """A whole number, or None when missing or malformed (the raw call keeps what was sent)."""
    # isdigit() alone admits "²", which int() refuses; 18 digits is what the store's INTEGER holds.
    return int(text) if text and text.isascii() and text.isdigit() and len(text) <= 18 else None
