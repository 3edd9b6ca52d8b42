"""Quotas: intake's abuse and cost controls. Intake asks, this module answers with a refusal or None.

Each refusal carries its exact reply, naming the limit and when it resets:

- connect: concurrent connections per client address (421 4.7.0); on a
  status-only listener, which faces the internet, `[status]
  max_connections_per_client`, counted apart;
- AUTH: concurrent sessions per user (421 4.7.0); wrong passwords are
  answered after a delay that grows per client address and per user name,
  and a user name takes only a few logins at a time (`AuthThrottle`);
- status mail: messages per minute per client address (451 4.7.1);
- MAIL, and again at DATA: messages per minute per client and per sender
  (451 4.7.1, with the time the oldest message leaves the minute);
- RCPT, and again at DATA: faxes and pages per day per client and per
  sender (451 4.7.1, resetting at local midnight in [greenfax] timezone);
- DATA: the documents' pages and digest (documents.py) and the hold reasons known before
  the store is asked; `store.limits.admit_message` then applies the daily
  limits, the duplicate guard and the hold rules in the same transaction as
  the insert.

The sender is the AUTH user when the client logged in, else the envelope
sender. Connection and per-minute counts live in memory (a restart forgives
them, which is harmless); daily counts are read from the jobs in the store,
so they survive restarts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Literal
from zoneinfo import ZoneInfo


from gateway import replies
from gateway.outbound import mime
from gateway.outbound.documents import DocumentFacts, document_facts
from gateway.replies import refuse
from gateway.units import backoff, span
from gateway.config import LimitSettings, Settings, client_key, in_networks
from gateway.models import FaxNumber, Recipient, Refusal, Reply
from gateway.outbound.policy import Policy
from gateway.store import Writer, iso, parse_iso, utcnow
from gateway.store import (
    Admission,
    DailyQuota,
    Duplicate,
    HoldReason,
    OverQuota,
    usage_since,
)

KINDS = ("connections", "messages_per_minute", "faxes_per_day", "pages_per_day")
# The bounded set of limit names: refusal checks, log fields and metric labels.
LIMIT_NAMES = frozenset(
    [f"{scope}-{kind.replace('_', '-')}" for scope in ("client", "sender") for kind in KINDS]
    + ["duplicate", "status-connections", "status-messages-per-minute", "auth-concurrent", "smtp-connections"]
)
WINDOW = 60.0  # seconds of "messages per minute"


@dataclass(frozen=True)
class Party:
    """Whom a limit counts for: a client address, or a sender (an AUTH user or an envelope sender)."""

    scope: Literal["client", "sender"]
    key: str  # as the store keeps it: the address, "user:NAME" or "sender:ADDRESS"
    shown: str  # as replies name it

    @classmethod
    def client(cls, address: str) -> Party:
        return cls("client", address, f"client {address}")

    @classmethod
    def sender(cls, user: str | None, mail_from: str) -> Party:
        if user:
            return cls("sender", f"user:{user}", f"user {user}")
        # The same key at MAIL, RCPT and DATA, and one SQLite can store: 8-bit
        # bytes that were not UTF-8 (kept by aiosmtpd as surrogates) become U+FFFD.
        address = mime.storable(mail_from)
        return cls("sender", f"sender:{address.lower()}", f"sender {address}")


def limit_name(party: Party, kind: str) -> str:
    return f"{party.scope}-{kind.replace('_', '-')}"


def day_start(moment: datetime, zone: ZoneInfo) -> datetime:
    """Local midnight of the day `moment` falls on, in UTC (where midnight is skipped, the day's first instant)."""
    return datetime.combine(moment.astimezone(zone).date(), clock_time(0), tzinfo=zone).astimezone(UTC)


def counted(amount: int, unit: str) -> str:
    """An amount with its unit, given in the plural: "2 faxes", "1 fax", "1 concurrent connection"."""
    if amount != 1:
        return f"{amount} {unit}"
    return f"1 {unit[:-2] if unit.endswith('xes') else unit[:-1]}"


# --- counting in memory --------------------------------------------------------------------------


class _Windows:
    """Message times per key in the last WINDOW seconds (monotonic clock)."""

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}
        self._added = 0

    def count(self, key: str, now: float) -> tuple[int, float]:
        """How many are in the window, and when the oldest of them leaves it."""
        times = self._times.get(key)
        while times and times[0] <= now - WINDOW:
            times.popleft()
        return (len(times), times[0] + WINDOW) if times else (0, now)

    def add(self, key: str, now: float) -> None:
        self._times.setdefault(key, deque()).append(now)
        self._added += 1
        if self._added % 1024 == 0:  # forget keys that have been quiet for a minute
            self._times = {k: v for k, v in self._times.items() if v and v[-1] > now - WINDOW}


class AuthThrottle:
    """Failed AUTH attempts per client address and per user name; each failure is answered later than the last.

    Counting per address alone lets an attacker guess one user's password
    from many connections in parallel, each waiting out its own delay. So
    failures are counted per user name too (the longer delay of the two
    applies), and a user name takes at most CONCURRENT logins at a time:
    further ones are answered 454 at once, without checking the password.
    """

    MAX_KEYS = 10_000
    CONCURRENT = 2

    def __init__(self, settings: LimitSettings, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.delay = settings.auth_failure_delay
        self.maximum = settings.auth_failure_delay_max
        self.memory = settings.auth_failure_memory
        self.monotonic = monotonic
        self._failures: dict[str, tuple[int, float]] = {}
        self._checking: Counter[str] = Counter()

    def __len__(self) -> int:
        """How many clients and user names it remembers failed logins of (at most MAX_KEYS)."""
        return len(self._failures)

    def begin(self, user: str) -> bool:
        """A login for `user` starts; False when it already has CONCURRENT of them in progress."""
        if self._checking[user] >= self.CONCURRENT:
            return False
        self._checking[user] += 1
        return True

    def end(self, user: str) -> None:
        _release(self._checking, user)

    def failed(self, client: str, user: str | None = None) -> tuple[int, float]:
        """Count a failure; return the failures in a row (of the client or the user, the more) and the delay."""
        count = max(self._count(f"client:{client}"), self._count(f"user:{user}") if user is not None else 0)
        return count, backoff(count, self.delay, self.maximum)

    def _count(self, key: str) -> int:
        now = self.monotonic()
        count, last = self._failures.pop(key, (0, now))
        count = 1 if now - last > self.memory else count + 1
        self._failures[key] = (count, now)
        if len(self._failures) > self.MAX_KEYS:
            # Oldest first (dicts keep insertion order, and a failure re-inserts its key).
            for stale in list(self._failures)[: len(self._failures) // 2]:
                del self._failures[stale]
        return count


# --- the limits intake asks about ----------------------------------------------------------------


class IntakeLimits:
    """The limits of one gateway, asked by intake at each step of a session."""

    def __init__(self, settings: Settings, policy: Policy, *, writer: Writer,
                 clock: Callable[[], datetime] = utcnow, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.limits = settings.limits
        self.status = settings.status
        self.duplicates = settings.duplicates
        self.hold = settings.hold
        self.policy = policy
        self.zone_name = settings.greenfax.timezone
        self.zone = ZoneInfo(self.zone_name)
        self.writer = writer
        self.clock = clock
        self.monotonic = monotonic
        self.connections: Counter[str] = Counter()
        self.status_connections: Counter[str] = Counter()  # on status-only listeners, by client_key
        self.total = 0  # SMTP connections on every listener
        self.total_limit = 0  # set by the service from the descriptor limit; 0 = none
        self.sessions: Counter[str] = Counter()
        self.windows = _Windows()
        self.auth = AuthThrottle(self.limits, monotonic=monotonic)
        # (scope, key) -> (day start, faxes, pages): at least the day's usage
        # (see check_daily), so that RCPT reads the store only near a limit.
        self._usage: dict[tuple[str, str], tuple[str, int, int]] = {}

    def amount(self, party: Party, kind: str) -> int:
        return getattr(self.limits.client if party.scope == "client" else self.limits.sender, kind)

    def enabled(self) -> list[str]:
        """The names of the limits in force (for metrics, so each shows from the start)."""
        names = [limit_name(Party(scope, "", ""), kind) for scope in ("client", "sender") for kind in KINDS
                 if getattr(getattr(self.limits, scope), kind)]
        return names + (["duplicate"] if self.duplicates.action == "refuse" else [])

    # --- concurrent connections and sessions ---

    def open_connection(self, client: str, *, status_only: bool = False) -> Refusal | None:
        """At connect: the gateway's share of descriptors, then the listener's and the client's limits."""
        if self.total_limit and self.total >= self.total_limit:
            return refuse(replies.GATEWAY_BUSY, "smtp-connections")
        if status_only:
            key = client_key(client)
            trusted = in_networks(client, self.status.trusted_networks)
            per_client = self.status.max_connections_per_client
            if not trusted and sum(self.status_connections.values()) >= self.status.max_connections:
                return refuse(replies.GATEWAY_BUSY, "status-connections")
            if per_client and self.status_connections[key] >= per_client and not trusted:
                return refuse(replies.CONNECTION_LIMIT, "status-connections",
                              limit=counted(per_client, "concurrent connections"), who=f"client {client}")
            self.status_connections[key] += 1
        else:
            refusal = self._open(self.connections, Party.client(client), replies.CONNECTION_LIMIT,
                                 "concurrent connections")
            if refusal is not None:
                return refusal
        self.total += 1
        return None

    def close_connection(self, client: str, *, status_only: bool = False) -> None:
        self.total -= 1
        if status_only:
            _release(self.status_connections, client_key(client))
        else:
            _release(self.connections, client)

    def take_status_message(self, client: str) -> Refusal | None:
        """At DATA of a status mail: count it, or refuse it over `[status] max_messages_per_minute`."""
        limit = self.status.max_messages_per_minute
        if not limit or in_networks(client, self.status.trusted_networks):
            return None  # GreenFax's own servers send every fax's status mail: not held to a stranger's rate
        now = self.monotonic()
        key = f"status:{client}"
        count, frees_at = self.windows.count(key, now)
        if count >= limit:
            reset = self.clock() + timedelta(seconds=frees_at - now)
            return refuse(replies.MESSAGE_RATE_LIMIT, "status-messages-per-minute",
                            limit=counted(limit, "status mails"), who=f"client {client}",
                            at=reset.astimezone(self.zone).strftime("%H:%M:%S"), zone=self.zone_name,
                            seconds=max(1, math.ceil(frees_at - now)))
        self.windows.add(key, now)
        return None

    def open_session(self, user: str) -> Refusal | None:
        return self._open(self.sessions, Party.sender(user, ""), replies.SESSION_LIMIT, "concurrent sessions")

    def close_session(self, user: str) -> None:
        _release(self.sessions, f"user:{user}")

    def _open(self, counts: Counter[str], party: Party, reply: Reply, unit: str) -> Refusal | None:
        limit = self.amount(party, "connections")
        if limit and counts[party.key] >= limit:
            return refuse(reply, limit_name(party, "connections"), limit=counted(limit, unit), who=party.shown)
        counts[party.key] += 1
        return None

    # --- messages per minute ---

    def check_rate(self, client: Party, sender: Party) -> Refusal | None:
        """At MAIL: is a message per minute limit reached already?"""
        now = self.monotonic()
        for party in (client, sender):
            limit = self.amount(party, "messages_per_minute")
            if not limit:
                continue
            count, frees_at = self.windows.count(f"{party.scope}:{party.key}", now)
            if count >= limit:
                reset = self.clock() + timedelta(seconds=frees_at - now)
                return refuse(replies.MESSAGE_RATE_LIMIT, limit_name(party, "messages_per_minute"),
                                limit=counted(limit, "messages"),
                                who=party.shown, at=reset.astimezone(self.zone).strftime("%H:%M:%S"),
                                zone=self.zone_name, seconds=max(1, math.ceil(frees_at - now)))
        return None

    def take_message(self, client: Party, sender: Party) -> Refusal | None:
        """At DATA: check again and count the message (no await in between, so concurrent sessions cannot both pass)."""
        refusal = self.check_rate(client, sender)
        if refusal is None:
            now = self.monotonic()
            for party in (client, sender):
                if self.amount(party, "messages_per_minute"):
                    self.windows.add(f"{party.scope}:{party.key}", now)
        return refusal

    # --- faxes and pages per day ---

    def quotas(self, client: Party, sender: Party) -> tuple[DailyQuota, ...]:
        return tuple(
            DailyQuota(party.scope, party.key, self.amount(party, "faxes_per_day"), self.amount(party, "pages_per_day"))
            for party in (client, sender)
            if self.amount(party, "faxes_per_day") or self.amount(party, "pages_per_day")
        )

    async def check_daily(self, client: Party, sender: Party, faxes: int) -> Refusal | None:
        """At RCPT: would `faxes` faxes (this envelope's so far, this one included) pass the daily limits?

        The final word is `admit_message`'s, at DATA, in the same transaction
        as the insert; this refuses early, before the client sends the data.
        Every fax has at least one page. The store is read once per party
        and day, and again only when the remembered usage says a limit is
        reached: it is an upper bound, since usage grows only by this
        process's admissions (one `faxgw serve` per store) and an operator's
        cancel only lowers it.
        """
        since = iso(day_start(self.clock(), self.zone))
        for quota in self.quotas(client, sender):
            over = _over(quota, await self._usage_since(quota, since), faxes)
            if over is not None:
                over = _over(quota, await self._usage_since(quota, since, fresh=True), faxes)
            if over is not None:
                return self.daily_refusal(client if quota.scope == "client" else sender, over)
        return None

    async def _usage_since(self, quota: DailyQuota, since: str, *, fresh: bool = False) -> tuple[int, int]:
        remembered = self._usage.get((quota.scope, quota.key))
        if remembered is not None and remembered[0] == since and not fresh:
            return remembered[1], remembered[2]
        used = await self.writer.run(usage_since, quota.scope, quota.key, since)
        if len(self._usage) >= 10_000:  # many senders: forget rather than grow
            self._usage.clear()
        self._usage[(quota.scope, quota.key)] = (since, *used)
        return used

    def admitted(self, admission: Admission, faxes: int) -> None:
        """Count an admitted message in the remembered usage."""
        pages = faxes * (admission.pages or 1)
        for quota in admission.quotas:
            remembered = self._usage.get((quota.scope, quota.key))
            if remembered is not None and remembered[0] == admission.since:
                self._usage[(quota.scope, quota.key)] = (admission.since, remembered[1] + faxes,
                                                         remembered[2] + pages)

    def daily_refusal(self, party: Party, over: OverQuota) -> Refusal:
        name = limit_name(party, f"{over.unit}_per_day")
        if over.needed > over.limit:
            return refuse(replies.OVER_DAILY_LIMIT, name, needed=counted(over.needed, over.unit),
                            limit=counted(over.limit, over.unit), who=party.shown)
        if over.unit == "pages":
            detail = f"{over.used} today, this message needs {over.needed}"
        else:
            detail = f"{over.used} today" + (f", {over.needed} in this message" if over.needed > 1 else "")
        return refuse(replies.DAILY_LIMIT, name, limit=counted(over.limit, over.unit), who=party.shown,
                        detail=detail, zone=self.zone_name)

    # --- DATA: duplicates and holds ---

    async def admission(self, raw: bytes, recipients: list[Recipient], client: Party, sender: Party,
                        now: datetime) -> Admission:
        """What `admit_message` needs: the documents' facts, the quotas, the duplicate window, hold reasons."""
        count_pages = bool(self.hold.max_pages or self.limits.client.pages_per_day or self.limits.sender.pages_per_day)
        guard = self.duplicates.action != "off"
        facts = DocumentFacts()
        if count_pages or guard:
            # pypdf and the MIME parse take milliseconds on a large fax: off the event loop.
            facts = await asyncio.to_thread(document_facts, raw, pages=count_pages, digest=guard)
        return Admission(
            sender_key=sender.key, since=iso(day_start(now, self.zone)), pages=facts.pages, digest=facts.digest,
            quotas=self.quotas(client, sender),
            duplicate_since=iso(now - timedelta(seconds=self.duplicates.window)) if guard else None,
            duplicate_action="hold" if self.duplicates.action == "hold" else "refuse",
            duplicate_window=span(self.duplicates.window), hold_new_numbers=self.hold.new_number,
            holds={r.number.e164: self.hold_reasons(r.number, facts.pages) for r in recipients},
        )

    def hold_reasons(self, number: FaxNumber, pages: int | None) -> tuple[HoldReason, ...]:
        """The hold rules that need no store: international numbers, too many pages."""
        reasons = []
        region = self.policy.foreign_region(number) if self.hold.international else None
        if region is not None:
            reasons.append(HoldReason("international", "international", f"international number {number.e164}"
                                      f" ({region})"))
        if self.hold.max_pages and pages is not None and pages > self.hold.max_pages:
            reasons.append(HoldReason("pages", f"{pages} pages",
                                      f"{pages} pages, more than hold.max_pages = {self.hold.max_pages}"))
        return tuple(reasons)

    def duplicate_refusal(self, duplicate: Duplicate) -> Refusal:
        at = parse_iso(duplicate.created_at).astimezone(self.zone).strftime("%H:%M")
        return refuse(replies.DUPLICATE_FAX, "duplicate", number=duplicate.number, code=duplicate.code, at=at,
                        zone=self.zone_name, window=span(self.duplicates.window))


def _over(quota: DailyQuota, used: tuple[int, int], faxes: int) -> OverQuota | None:
    if quota.faxes and used[0] + faxes > quota.faxes:
        return OverQuota(quota.scope, "faxes", quota.faxes, used[0], faxes)
    if quota.pages and used[1] + faxes > quota.pages:
        return OverQuota(quota.scope, "pages", quota.pages, used[1], faxes)
    return None


def _release(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
