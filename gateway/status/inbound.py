"""The status side of the SMTP intake: status mail and bounces addressed to the gateway.

Mail to the account sender, the return path (with or without a job code)
or another configured status address is not faxed: it is parsed here into
a StatusReport (by the status-mail rules, or as a DSN bounce), applied
through the one correlation path, and stored before the 250. Mail that no
rule recognises is kept too (as `unrecognised`, raw), never dropped silently.

Trust (DESIGN.md, "Correlation and trust"): a From domain alone never makes
mail trusted, since anyone can write any From. Mail counts as trusted when
its From domain is one of `status.trusted_sender_domains` and it passes every
check the config turns on, at least one of them: `status.require_dkim` (a
valid DKIM signature of a trusted domain that aligns with the From) and
`status.trusted_networks` (the connection comes from one of them). Mail read
from the configured IMAP mailbox is trusted as a source. Anything else is
untrusted: it changes a job only where it carries that job's secret (a
bounce to the job's VERP address, or quoting our Message-ID), and is
otherwise kept for review with a bounded excerpt of its text.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from email.message import Message
from typing import Any

import dkim

from gateway import replies
from gateway.config import Settings, in_networks
from gateway.errors import StoreError, StoreFull
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.models import Channel, Refusal, Reply, StatusReport, Trust
from gateway.replies import refuse
from gateway.status.batches import Gathered
from gateway.status.correlate import (
    CorrelationPolicy,
    Outcome,
    apply_report,
    keep_unrecognised,
)
from gateway.status.dsn import bounce_report, is_dsn, parse_bounce
from gateway.status.mailparse import ParsedMail, parse_mail
from gateway.rules import RulesInForce
from gateway.status.mailrules import MailRules
from gateway.status.report import dedup_key
from gateway.store import Writer, iso, utcnow

log = logging.getLogger("faxgw.status")

# Status mails that arrive together are read together (see _Batches).
UNTRUSTED_READ = 64 * 1024  # untrusted mail is read from this much of its start (status mail is a few KB)
MAX_SIGNATURES = 5  # more DKIM signatures than this: not trusted, none verified
# The fields a report is read from or matched by: a trusting signature covers each of them that the mail has
# (as DKIM signers commonly do), and none of these nor the MIME fields may appear twice (the first is read).
SIGNED_FIELDS = ("from", "to", "cc", "subject", "date", "message-id")
SINGLE_FIELDS = (*SIGNED_FIELDS, "content-type", "content-transfer-encoding")
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
BATCH_MAILS = 32  # at most this many mails per thread call...
BATCH_BYTES = 1 << 20  # ...and about this much mail: a big one is read with few others
READERS = 2  # batches read at the same time


@dataclass(frozen=True)
class Verdict:
    """How one status mail was understood (also what `faxgw rules test` prints)."""

    report: StatusReport
    kind: str  # "rule", "bounce" or "unrecognised"
    explanation: str


class StatusMail:
    """Turns status mail into reports; shared by the SMTP status listener and the IMAP reader."""

    def __init__(self, settings: Settings, rules: RulesInForce, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.in_force = rules
        self.policy = CorrelationPolicy.from_settings(settings)
        up = settings.upstream
        addresses = {a.lower() for a in (up.account_sender, up.return_path, *settings.status.addresses) if a}
        self.addresses = frozenset(addresses)
        local, _, domain = (up.return_path or "").lower().rpartition("@")
        self._bounce_prefix, self._bounce_domain = local + "+", "@" + domain
        self._trusted_domains = tuple(d.lower().lstrip("@") for d in settings.status.trusted_sender_domains)
        self._dkim_keys = {k.lower().rstrip("."): v.encode() for k, v in settings.status.dkim_keys.items()}
        self.batches = _Batches(self)

    @property
    def rules(self) -> MailRules:
        """The status-mail rules in force (a reload replaces them)."""
        return self.in_force.mail

    def is_status_address(self, address: str) -> bool:
        address = address.lower()
        if address in self.addresses:
            return True
        return address.startswith(self._bounce_prefix) and address.endswith(self._bounce_domain)

    def understand(self, raw: bytes, *, channel: Channel, envelope_rcpts: tuple[str, ...] = (),
                   trusted_source: bool = False, client: str = "") -> Verdict:
        """Parse one status mail into a report; never raises.

        `trusted_source`: the mail comes from a place only GreenFax writes to
        (an IMAP mailbox marked `[status.imap] trusted`), so it is trusted
        whatever its sender. `client`: the address of the SMTP client that
        delivered it ("" for mail read by IMAP: no network check applies).
        Untrusted mail is read from its first UNTRUSTED_READ bytes only:
        anyone may send it, and a hostile mail must not cost seconds to read.
        """
        trusted = trusted_source or self.trust_checks(raw, client)[0]
        trust = Trust.TRUSTED if trusted else Trust.UNTRUSTED
        mail = parse_mail(raw if trusted or len(raw) <= UNTRUSTED_READ else raw[:UNTRUSTED_READ])
        if is_dsn(mail) or any(self._is_bounce_address(a) for a in envelope_rcpts):
            bounce = parse_bounce(mail, envelope_rcpts)
            if bounce is not None:
                report = self._bounded(bounce_report(mail, bounce), raw)
                proof = "with the job's secret" if bounce.job_secret else "without the job's secret (not ours?)"
                return Verdict(report, "bounce", f"DSN: {bounce.action} {bounce.status} for {bounce.recipient},"
                                                 f" {proof}")
        extraction = self.rules.extract(mail, channel=channel, trust=trust)
        if extraction is not None:
            fields = ", ".join(f"{k}={v!r}" for k, v in extraction.values.items())
            return Verdict(self._bounded(extraction.report, raw), "rule", f"{extraction.rule.name}: {fields}")
        reasons = "; ".join(self.rules.explain(mail)) or "no rules loaded"
        report = StatusReport(channel=channel, trust=trust, raw=self._excerpt(raw), dedup_key=_dedup_key(raw, mail),
                              rule=None, notes=("not recognised as a status mail",))
        return Verdict(report, "unrecognised", f"no rule recognised it ({reasons})")

    def _bounded(self, report: StatusReport, raw: bytes) -> StatusReport:
        """An untrusted report keeps only an excerpt of the mail: anyone may send it, as often as the limits let.

        Its dedup key is the whole mail's, as a trusted copy's (IMAP) would be.
        """
        if report.trust is not Trust.UNTRUSTED:
            return report
        return replace(report, raw=self._excerpt(raw), dedup_key=_dedup_key(raw, None, report.dedup_key))

    def _excerpt(self, raw: bytes) -> str:
        keep = self.settings.status.review_excerpt
        if len(raw) <= keep:
            return raw.decode("utf-8", "replace")
        # Cut at a line end where one is near, and never inside a UTF-8 sequence ("replace" mends the rest).
        cut = raw.rfind(b"\n", 0, keep) + 1 or keep
        return raw[:cut].decode("utf-8", "replace") + f"\n[{len(raw) - cut} more bytes not kept: status.review_excerpt]\n"

    def trusted(self, raw: bytes, client: str = "") -> bool:
        """Whether mail delivered by SMTP from `client` (or read by IMAP: "") counts as coming from GreenFax."""
        return self.trust_checks(raw, client)[0]

    def trust_checks(self, raw: bytes, client: str = "") -> tuple[bool, list[str]]:
        """Trusted or not, and each check's result in words (for logs and `faxgw rules test`).

        Read from the header block alone. The From must be of a trusted
        domain and the To or Cc one of our status addresses (a signed report
        GreenFax sent to someone else, replayed to us, is not ours); then
        every check the config turns on must pass, at least one: a DKIM
        signature (see `_dkim_signer`) and the client's network. Mail read
        by IMAP (no client) can only be trusted by its signature.
        """
        status = self.settings.status
        headers = _HEADERS.parsebytes(raw[:raw.find(b"\r\n\r\n") + 4] if b"\r\n\r\n" in raw else raw, headersonly=True)
        from_addr = email.utils.parseaddr(str(headers.get("from", "")))[1].lower()
        domain = from_addr.rpartition("@")[2]
        if not self._trusted_domain(domain):
            return False, [f"From domain {domain or '(none)'} is not in status.trusted_sender_domains"]
        recipients = {a.lower() for _n, a in email.utils.getaddresses(
            [str(v) for name in ("to", "cc") for v in headers.get_all(name, [])])}
        if not recipients & self.addresses:
            return False, ["neither To nor Cc is one of our status addresses (a report for someone else?)"]
        network = bool(status.trusted_networks) and bool(client)
        checks = []
        ok = status.require_dkim or network
        if not ok:
            checks.append("no check applies (status.require_dkim is off, and status.trusted_networks is not set"
                          " or the mail came by IMAP): not trusted")
        if status.require_dkim or not client:
            signer, why = self._dkim_signer(raw, headers, domain)
            ok = ok and signer is not None
            checks.append(f"dkim=pass (d={signer})" if signer else f"dkim=fail: {why}")
        if network:
            inside = in_networks(client, status.trusted_networks)
            ok = ok and inside
            checks.append(f"client {client} {'is' if inside else 'is not'} in status.trusted_networks")
        return ok, checks

    def _trusted_domain(self, domain: str) -> bool:
        return any(_within(domain, d) for d in self._trusted_domains)

    def _dkim_signer(self, raw: bytes, headers: Message, from_domain: str) -> tuple[str | None, str]:
        """The domain of a valid DKIM signature that makes the mail trusted, or None and why not.

        The signature must align with the From as DMARC's relaxed mode has
        it (the configured trusted domain as the organisational domain),
        sign the whole body (no l= tag), and cover every occurrence of the
        fields a report is read from: a field the signature does not cover,
        or a second Subject above a signed one, could say anything. At most
        MAX_SIGNATURES are looked at, each (domain, selector) once: verifying
        one costs a key lookup and a pass over the body.
        """
        for name in SINGLE_FIELDS:
            if len(headers.get_all(name, [])) > 1:
                return None, f"the mail has more than one {name} header"
        try:
            verifier = dkim.DKIM(raw)
            signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
        except Exception as exc:  # dkimpy raises on some malformed mail
            log.debug("DKIM: cannot read the mail: %s", exc)
            return None, "the mail cannot be read for DKIM"
        if len(signatures) > MAX_SIGNATURES:
            return None, f"more than {MAX_SIGNATURES} DKIM signatures"
        present = {name for name in SIGNED_FIELDS if name in headers}
        tried: set[tuple[bytes, bytes]] = set()
        why = f"no valid signature aligned with {from_domain}"
        for index, value in enumerate(signatures):
            try:
                tags = dkim.util.parse_tag_value(value)
                signer = tags.get(b"d", b"").decode("ascii").strip().lower().rstrip(".")
                if not any(_within(from_domain, d) and _within(signer, d) for d in self._trusted_domains):
                    continue
                if (tags.get(b"d", b""), tags.get(b"s", b"")) in tried:
                    continue
                tried.add((tags.get(b"d", b""), tags.get(b"s", b"")))
                signed = {h.strip().lower() for h in tags.get(b"h", b"").decode("ascii").split(":")}
                if b"l" in tags or not present <= signed:
                    why = "the signature does not cover the whole mail (l=, or unsigned " + ", ".join(
                        sorted(present - signed)) + ")" if present - signed else "the signature has l="
                    continue
                if verifier.verify(idx=index, dnsfunc=self._dns):
                    return signer, ""
            except Exception as exc:  # a malformed signature is simply not valid
                log.debug("DKIM signature %d not valid: %s", index + 1, exc)
        return None, why

    def _dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        key = name.decode().lower().rstrip(".")
        if key in self._dkim_keys:
            return self._dkim_keys[key]
        return dkim.dnsplug.get_txt(name, timeout=timeout)

    def _is_bounce_address(self, address: str) -> bool:
        address = address.lower()
        return address.startswith(self._bounce_prefix) and address.endswith(self._bounce_domain)


def _dedup_key(raw: bytes, mail: ParsedMail | None, key: str | None = None) -> str:
    """The report's dedup key from the whole mail, also where only its start was read (an untrusted large
    mail): then its Message-ID and body are taken from the raw bytes, without reading the MIME."""
    if len(raw) <= UNTRUSTED_READ:
        return key or dedup_key("mail", *mail.identity())  # type: ignore[union-attr]
    headers = _HEADERS.parsebytes(raw, headersonly=True)
    whole = ParsedMail(raw=raw, message_id=str(headers.get("message-id", "")).strip(),
                       headers={name.lower(): str(value) for name, value in headers.items()})
    return dedup_key("mail", *whole.identity())


def _within(domain: str, parent: str) -> bool:
    return domain == parent or domain.endswith("." + parent)


class StatusHandler:
    """The SMTP side of status mail: what a listener that takes status mail does with its status recipients.

    Asked by the intake's handler (gateway/outbound/intake.py) for every
    recipient on such a listener: a status address is taken here (within
    `[status] max_recipients`, never beside a fax), and at DATA the mail is
    understood, correlated and stored before the 250, within the client's
    `[status] max_messages_per_minute`. `limits` is the intake's quota keeper
    and `log_refusal` its one way of logging a refusal.
    """

    def __init__(self, status: StatusMail, writer: Writer, *, limits: Any,
                 log_refusal: Callable[..., None]) -> None:
        self.status = status
        self.writer = writer
        self.limits = limits
        self.log_refusal = log_refusal

    def takes(self, address: str) -> bool:
        return self.status.is_status_address(address)

    def take_recipient(self, envelope: Any, address: str) -> Refusal | None:
        limit = self.status.settings.status.max_recipients
        if envelope.fax_recipients:
            return refuse(replies.MIXED_KINDS, "mixed")
        if len(envelope.status_recipients) >= limit:
            return refuse(replies.TOO_MANY_RECIPIENTS, "recipients", limit=limit)
        envelope.rcpt_tos.append(address)
        envelope.status_recipients.append(address)
        return None

    async def receive(self, server: Any, session: Any, envelope: Any) -> str:
        """Mail to a status address: parsed, correlated and stored before the 250, never faxed."""
        client = session.peer[0] if session.peer else "?"
        refusal = self.limits.take_status_message(client)
        if refusal is not None:
            self.log_refusal(session, refusal, stage="data", sender=envelope.mail_from or "")
            return str(refusal.reply)
        try:
            outcome, verdict = await receive(self.status, self.writer, envelope.content, channel=Channel.SMTP,
                                             envelope_rcpts=tuple(envelope.status_recipients), client=client)
        except StoreFull:
            return str(replies.STORE_FULL)
        except StoreError as exc:
            log.error("store write failed: %s", exc)
            return str(replies.STORE_FAILED)
        server.junk_commands = server.errors = 0  # an accepted message: an MX's RSET between mails is no junk
        return str(status_reply(outcome, verdict))


def status_reply(outcome: Outcome, verdict: Verdict) -> Reply:
    if verdict.kind == "unrecognised":
        return replies.STATUS_KEPT
    return replies.fill(replies.STATUS_APPLIED, outcome=outcome.kind,
                        for_job=f" for {outcome.job_code}" if outcome.job_code else "")


async def receive(status: StatusMail, writer: Writer, raw: bytes, *, channel: Channel,
                  envelope_rcpts: tuple[str, ...] = (), client: str = "") -> tuple[Outcome, Verdict]:
    """Understand one status mail and apply it in the store (committed when this returns)."""
    return await status.batches.submit(_Mail(writer, raw, channel, envelope_rcpts, client))


@dataclass(frozen=True, slots=True)
class _Mail:
    writer: Writer
    raw: bytes
    channel: Channel
    envelope_rcpts: tuple[str, ...]
    client: str


class _Batches(Gathered[_Mail, "tuple[Outcome, Verdict]"]):
    """Status mails understood in a worker thread a batch at a time, then stored in one writer call per batch.

    Reading happens in a worker thread because anyone may send status mail
    and a hostile one takes long to parse. Handing each mail to a thread and
    back costs more than reading a typical status mail (the GIL goes back and
    forth between the loop, the workers and the store writer each time), so
    the mails waiting when a reader starts are read in one thread call (at
    most BATCH_MAILS, about BATCH_BYTES). Up to READERS batches are read at
    once, so a mail that takes long holds up only its own batch. There is no
    background task: a reader runs while mails wait and ends when none do.
    """

    limit = READERS

    def __init__(self, status: StatusMail) -> None:
        super().__init__()
        self.status = status

    async def _process(self, batch: list[tuple[_Mail, asyncio.Future[tuple[Outcome, Verdict]]]]) -> None:
        await self._read_batch(batch)

    async def _read_batch(self, batch: list[tuple[_Mail, asyncio.Future[tuple[Outcome, Verdict]]]]) -> None:
        try:
            verdicts = await asyncio.to_thread(self._understand, [mail for mail, _future in batch])
        except Exception as exc:  # the thread could not run it at all
            for _mail, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        stored = await self._store([mail for mail, _future in batch], verdicts)
        for (_mail, future), verdict, outcome in zip(batch, verdicts, stored, strict=True):
            if future.done():
                continue  # the client went away
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result((outcome, verdict))  # type: ignore[arg-type]

    def _take(self) -> list[tuple[_Mail, asyncio.Future[tuple[Outcome, Verdict]]]]:
        """The next batch: waiting mails for the same writer, within the batch limits."""
        batch = [self._waiting.popleft()]
        size = len(batch[0][0].raw)
        while self._waiting and len(batch) < BATCH_MAILS and size < BATCH_BYTES:
            mail, future = self._waiting[0]
            if mail.writer is not batch[0][0].writer:
                break
            if future.done():  # cancelled while waiting
                self._waiting.popleft()
                continue
            size += len(mail.raw)
            batch.append(self._waiting.popleft())
        return batch

    def _understand(self, mails: list[_Mail]) -> list[Verdict | Exception]:
        """In a worker thread: each mail's verdict, or what reading it raised."""
        results: list[Verdict | Exception] = []
        for mail in mails:
            try:
                results.append(self.status.understand(mail.raw, channel=mail.channel,
                                                      envelope_rcpts=mail.envelope_rcpts, client=mail.client))
            except Exception as exc:  # understand() is not meant to raise; if it does, it is this mail's error
                results.append(exc)
        return results

    async def _store(self, mails: list[_Mail], verdicts: list[Verdict | Exception]) -> list[Outcome | BaseException]:
        """Each mail's outcome, or the exception that is its own.

        The batch goes to the writer as one call (one savepoint: each further
        one costs SQLite a copy of every page the mail changes). Should it
        fail, nothing of it stays, and each mail is stored again in a writer
        call of its own, so that a failure is only that mail's, as if the
        batch had never been tried.
        """
        outcomes: list[Outcome] | None = None
        if not any(isinstance(verdict, Exception) for verdict in verdicts):
            try:
                outcomes = await mails[0].writer.run(_store_all, verdicts, iso(utcnow()), self.status.policy)
            except Exception:  # noqa: BLE001 - each mail is tried alone next, and gets its own error
                outcomes = None
        if outcomes is not None:
            for mail, verdict, outcome in zip(mails, verdicts, outcomes, strict=True):
                try:  # stored already: logging or counting it must not take the reply away
                    _recorded(self.status, verdict, outcome, mail.client)  # type: ignore[arg-type]
                except Exception:
                    log.exception("recording a stored status mail failed")
            return list(outcomes)
        return await asyncio.gather(*(self._store_one(mail, verdict) for mail, verdict in zip(mails, verdicts)),
                                    return_exceptions=True)

    async def _store_one(self, mail: _Mail, verdict: Verdict | Exception) -> Outcome:
        if isinstance(verdict, Exception):
            raise verdict
        return await apply_verdict(self.status, mail.writer, verdict, client=mail.client)


async def apply_verdict(status: StatusMail, writer: Writer, verdict: Verdict, *, client: str = "") -> Outcome:
    """Store an understood status mail: applied through correlation, or kept unrecognised."""
    outcome = await writer.run(_store, verdict, iso(utcnow()), status.policy)
    _recorded(status, verdict, outcome, client)
    return outcome


def _store(conn: sqlite3.Connection, verdict: Verdict, now: str, policy: CorrelationPolicy) -> Outcome:
    if verdict.kind == "unrecognised":
        return keep_unrecognised(conn, verdict.report, now)
    return apply_report(conn, verdict.report, now, policy)


def _store_all(conn: sqlite3.Connection, verdicts: list[Verdict], now: str, policy: CorrelationPolicy) -> list[Outcome]:
    """A batch of status mails in one writer call (see _Batches._store)."""
    return [_store(conn, verdict, now, policy) for verdict in verdicts]


def _recorded(status: StatusMail, verdict: Verdict, outcome: Outcome, client: str) -> None:
    """A stored status mail's metrics and log line."""
    report = verdict.report
    if status.metrics is not None:
        status.metrics.report(report.channel.value, outcome.kind)
    log_event(log, "status-report", channel=report.channel.value, client=client, kind=verdict.kind,
              rule=report.rule, result=report.result, code=outcome.job_code, outcome=outcome.kind,
              trust=report.trust.name.lower())
