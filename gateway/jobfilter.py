"""Job list filters as people write them (`faxgw status` options, `/api/jobs` parameters), checked once.

A bad value is a FilterError naming the parameter and what is expected; the
CLI and the API turn it into their own one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.units import parse_duration
from gateway.models import JobState
from gateway.store import iso, utcnow
from gateway.errors import FilterError

STATES = tuple(state.value for state in JobState)


@dataclass(frozen=True)
class JobFilter:
    states: tuple[str, ...] = ()
    number: str | None = None  # E.164
    sender: str | None = None
    since: str | None = None  # store time
    text: str | None = None  # a job code, reference id, billing code, number or part of the sender
    text_number: str | None = None  # the text read as a fax number (E.164), when it is one
    limit: int = 50

    def as_query(self) -> dict:
        return {"states": self.states, "number": self.number, "sender": self.sender, "since": self.since,
                "text": self.text, "text_number": self.text_number, "limit": self.limit}


def parse_filter(*, states: tuple[str, ...] = (), number: str | None = None, sender: str | None = None,
                 since: str | None = None, text: str | None = None, limit: int | str = 50,
                 region: str = "US") -> JobFilter:
    for state in states:
        if state not in STATES:
            raise FilterError("state", f"{state!r} is not a job state; expected one of {', '.join(STATES)}")
    try:
        limit = int(limit)
    except (TypeError, ValueError):
        raise FilterError("limit", f"{limit!r}: expected a whole number") from None
    if not 1 <= limit <= 100_000:
        raise FilterError("limit", f"{limit}: expected 1 to 100000")
    text = (text or "").strip() or None
    if text is not None and len(text) > 200:
        raise FilterError("text", "longer than 200 characters; expected a job code, a reference id, a billing"
                                  " code, a fax number or part of a sender address")
    return JobFilter(states=tuple(states), number=parse_number(number, region), sender=sender or None,
                     since=parse_since(since), text=text, text_number=_as_number(text, region), limit=limit)


def _as_number(text: str | None, region: str) -> str | None:
    """The search text as a fax number, if it reads as one ("+1 212 555 0123", "(212) 555-0123")."""
    if not text or sum(char.isdigit() for char in text) < 5:
        return None
    try:
        return parse_number(text, region)
    except FilterError:
        return None


def parse_since(value: str | None) -> str | None:
    """A duration back from now ("2h", "3d") or a date/time ("2026-11-20"), as store time."""
    if not value:
        return None
    # A moment outside the calendar (years 1 to 9999, in UTC too) is an OverflowError, not a ValueError.
    try:
        return iso(utcnow() - timedelta(seconds=parse_duration(value)))
    except OverflowError:
        raise _outside_calendar(value) from None
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError("since", f"{value!r}: expected a duration (\"2h\", \"3d\") or a date (\"2026-11-20\")")\
            from None
    try:
        return iso(moment if moment.tzinfo else moment.astimezone())
    except (OverflowError, ValueError):  # "0001-01-01" local: year 0 in UTC
        raise _outside_calendar(value) from None


def _outside_calendar(value: str) -> FilterError:
    return FilterError("since", f"{value!r} is outside the calendar (years 1 to 9999); expected a duration such as"
                                " \"3d\" or a date such as \"2026-11-20\"")


def parse_number(value: str | None, region: str) -> str | None:
    """Any common notation of a number, in E.164, without the intake's refusals: past jobs stay findable."""
    if not value:
        return None
    # Imported here: `faxgw status` without --number does without phonenumbers' import time.
    from gateway.numbers import NotANumber, read_number

    number = read_number(value, region)
    if isinstance(number, NotANumber):
        raise FilterError("number", number.message)
    return number.e164
