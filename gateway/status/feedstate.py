"""Plain values of the XML feed poller: a request's window, one poll's result, the poller's state.

FeedState is what the health check, metrics and `faxgw feed status` read;
it is rebuilt from the store (gateway/store/feedlog.py), since a manual poll
may have run in another process.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from gateway.store import parse_iso
from gateway import store


@dataclass(frozen=True)
class Window:
    """The dates one request asks for, in the account's zone; `today` is the day it was planned."""

    start: date
    end: date
    today: date

    def covers(self, day: date) -> bool:
        """Rows of `day` are in this answer (the next day's too, for a fax sent near midnight)."""
        return self.start <= day and (day < self.end or self.end >= self.today)

    @property
    def more(self) -> bool:
        """A backfill goes on: this window ends before today."""
        return self.end < self.today

    def __str__(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}"


@dataclass(frozen=True)
class PollResult:
    """What one poll_now() did: polled or not (and until when not), its window, rows and outcomes."""

    polled: bool  # a request was sent
    next_allowed_at: datetime
    last_request_at: datetime | None = None
    window: Window | None = None
    rows: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    clock_reset: bool = False  # the stored request time was in the future: it now counts as the last request

    @property
    def ok(self) -> bool:
        return self.polled and self.error is None

    @property
    def more(self) -> bool:
        return self.ok and self.window is not None and self.window.more

    def describe(self, now: datetime) -> str:
        """One line for a person: what happened and exactly when the next poll is allowed."""
        wait = max(0, round((self.next_allowed_at - now).total_seconds()))
        allowed = f"the next poll is allowed at {human_time(self.next_allowed_at)} (in {wait} s)"
        if not self.polled:
            why = ("the stored time of the last request lies in the future (the clock went back);"
                   " it now counts as the last request") if self.clock_reset else (
                f"GreenFax allows one request per interval; the last was at {human_time(self.last_request_at)}")
            return f"not polled: {why}; {allowed}"
        if self.error:
            return f"poll of {self.window} failed: {self.error}; {allowed}"
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.outcomes.items())) or "nothing to apply"
        more = "; the backfill goes on with the next poll" if self.more else ""
        return f"polled {self.window}: {self.rows} rows ({counts}){more}; {allowed}"


@dataclass
class FeedState:
    """The poller's facts for the health check, `faxgw feed status` and metrics."""

    last_poll_at: datetime | None = None  # the last successful poll
    last_window: str | None = None
    last_rows: int | None = None
    last_outcomes: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None  # None once a poll succeeded after it
    last_error_at: datetime | None = None
    last_request_at: datetime | None = None
    next_allowed_at: datetime | None = None
    backfill_continues: bool = False
    unknown_jobs: int | None = None  # jobs in `unknown` after the last poll: the operator decides
    polls: Counter[str] = field(default_factory=Counter)  # this process's polls: ok, error, refused, too_soon

    def update(self, status: dict[str, Any], last_request: str | None, min_interval: float) -> None:
        """Take the facts stored by any process (a manual poll may have run elsewhere)."""
        self.last_poll_at = when(status.get("last_poll_at"))
        self.last_window = status.get("window")
        self.last_rows = status.get("rows")
        self.last_outcomes = dict(status.get("outcomes") or {})
        self.last_error = status.get("error")
        self.last_error_at = when(status.get("error_at"))
        self.backfill_continues = bool(status.get("more"))
        self.unknown_jobs = status.get("unknown_jobs")
        self.last_request_at = when(last_request)
        if self.last_request_at is not None:
            self.next_allowed_at = self.last_request_at + timedelta(seconds=min_interval)

    @classmethod
    def from_store(cls, conn: Any, min_interval: float) -> FeedState:
        """The stored facts, read by another process (`faxgw feed status`, the health check)."""
        state = cls()
        state.update(store.load_status(conn), store.last_request(conn), min_interval)
        return state


def when(text: str | None) -> datetime | None:
    """A stored time, or None when there is none (or it cannot be read)."""
    try:
        return parse_iso(text) if text else None
    except ValueError:
        return None


def human_time(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"
