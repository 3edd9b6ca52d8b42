"""Intake: the fax listeners' handler. Thin: asks policy, hands the message to the store, replies.

The protocol itself is gateway/outbound/smtpserver.py (aiosmtpd, adjusted).
`Intake` is the handler: one decision per SMTP command, and the 250 to DATA
only after the store has committed the message and its jobs. The abuse and
cost controls it applies at each step (connections, AUTH, rates, daily
quotas, duplicates, holds) are gateway.outbound.quotas'; the DATA commit goes through
`store.limits.admit_message`, which applies the daily quotas, the duplicate
guard and the hold rules in the same transaction as the insert.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from gateway import replies
from gateway.outbound import mime
from gateway.errors import StoreError, StoreFull
from gateway.outbound.quotas import LIMIT_NAMES, IntakeLimits, Party
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.models import NULL_SENDER, FaxNumber, NewMessage, Recipient, Refusal
from gateway.outbound.passwords import PasswordChecker
from gateway.outbound.policy import SUBJECT_MAILBOX, Policy, shown
from gateway.replies import refuse
from gateway.status.inbound import StatusHandler, StatusMail
from gateway.store import Writer, iso, utcnow
from gateway.store import Admitted, Duplicate, admit_message

log = logging.getLogger("faxgw.intake")

MAX_USER_NAME = 256  # octets: a longer AUTH user name is refused unchecked


class Intake:
    """The aiosmtpd handler: policy and limits per command, store on DATA, one log line per transaction."""

    def __init__(self, *, policy: Policy, writer: Writer, sandbox: bool,
                 on_queued: Callable[[], None], passwords: PasswordChecker, status: StatusMail,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.policy = policy
        self.writer = writer
        self.sandbox = sandbox
        self.on_queued = on_queued
        self.passwords = passwords
        self.clock = clock
        self.max_recipients = policy.settings.smtp.max_recipients
        self.limits = IntakeLimits(policy.settings, policy, writer=writer, clock=clock)
        # Status recipients, on the listeners that take status mail, are the status side's.
        self.status = StatusHandler(status, writer, limits=self.limits, log_refusal=self.log_refusal)
        self._metrics: Metrics | None = None

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        if metrics is not None:
            # Every limit in force shows in the metrics from the start, at 0.
            for name in self.limits.enabled():
                metrics.limit_refusals.labels(name)

    # --- hooks ------------------------------------------------------------------

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not server.role.fax:  # AUTH is of no use where no fax is taken (IntakeSMTP.smtp_AUTH)
            responses = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        if self.sandbox:  # the greeting line says what the banner says
            responses = [f"{responses[0]} {replies.SANDBOX_NOTE}", *responses[1:]]
        # aiosmtpd processes pipelined commands in order but does not say so.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        refusal = self._fax_sender_refusal(session, address)
        envelope.fax_refusal = refusal
        # On a listener that takes status mail, anyone may send to the status
        # addresses (GreenFax's servers, bounces from <>), so whether this
        # sender may fax is decided per recipient.
        if refusal is not None and not server.role.status:
            self.log_refusal(session, refusal, stage="mail", sender=shown(address))
            return str(refusal.reply)
        envelope.mail_from = address or NULL_SENDER
        envelope.mail_options.extend(options)
        envelope.fax_recipients = []
        envelope.status_recipients = []
        envelope.started = time.monotonic()
        return str(replies.SENDER_OK)

    def _fax_sender_refusal(self, session: Session, address: str) -> Refusal | None:
        client = session.peer[0] if session.peer else "?"
        refusal = self.policy.check_client(client, authenticated=session.authenticated)
        if refusal is None and not address:
            refusal = refuse(replies.NULL_SENDER_NO_FAX, "sender")
        if refusal is None:
            refusal = self.policy.check_sender(address)
        if refusal is None:
            refusal = self.limits.check_rate(*self._parties(session, address))
        return refusal

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        """One recipient: a status address on a status listener (gateway.status.inbound), else a fax number
        by the rules after the checks of RCPT_CHECKS, or a refusal."""
        refusal = self._as_written(address, getattr(session, "raw_rcpt", ""))
        if refusal is None and server.role.status and self.status.takes(address):
            refusal = self.status.take_recipient(envelope, address)
            if refusal is None:
                return str(replies.STATUS_RECIPIENT_OK)
        for check in RCPT_CHECKS:
            if refusal is not None:
                break
            refusal = check(self, server, envelope, address)
        if refusal is None:
            result = self.policy.classify_recipient(address)
            if isinstance(result, Refusal):
                refusal = result
            else:
                refusal = await self.limits.check_daily(*self._parties(session, envelope.mail_from),
                                                        len(envelope.fax_recipients) + 1)
                if refusal is None:
                    return self._take_recipient(envelope, result, options)
        self.log_refusal(session, refusal, stage="rcpt", sender=shown(envelope.mail_from or ""),
                         recipient=shown(address))
        return str(refusal.reply)

    def _as_written(self, address: str, raw_arg: str) -> Refusal | None:
        """The address must be written exactly as the one the rules judge.

        aiosmtpd hands over the address with quotes, comments and a source
        route already removed (and takes `<addr` without its `>`), so a form
        that is not written exactly as the address judged is refused with 553
        5.1.3, never accepted as its cleaned-up reading (README, "No open
        relay"). An argument that cannot be read at all is refused the same way.
        """
        written = _address_as_written(raw_arg)
        if written == address:
            return None
        return refuse(replies.ADDRESS_AS_WRITTEN, "address-syntax", address=shown(written or address),
                      domain=self.policy.settings.upstream.domain)

    def _listener_takes_faxes(self, server: SMTP, envelope: Envelope, address: str) -> Refusal | None:
        """A status-only listener takes nothing else, from anyone."""
        return None if server.role.fax else refuse(replies.STATUS_ONLY_LISTENER, "relay", address=shown(address))

    def _sender_may_fax(self, server: SMTP, envelope: Envelope, address: str) -> Refusal | None:
        """The client and sender checked at MAIL (decided here where a listener also takes status mail)."""
        return envelope.fax_refusal

    def _not_mixed(self, server: SMTP, envelope: Envelope, address: str) -> Refusal | None:
        """Faxes and status mail do not share one message."""
        return refuse(replies.MIXED_KINDS, "mixed") if envelope.status_recipients else None

    def _within_recipient_limit(self, server: SMTP, envelope: Envelope, address: str) -> Refusal | None:
        """[smtp] max_recipients faxes per message."""
        if len(envelope.fax_recipients) < self.max_recipients:
            return None
        return refuse(replies.TOO_MANY_RECIPIENTS, "recipients", limit=self.max_recipients)

    def _take_recipient(self, envelope: Envelope, recipient: Recipient, options: list[str]) -> str:
        envelope.rcpt_tos.append(recipient.address)
        envelope.rcpt_options.extend(options)
        envelope.fax_recipients.append(recipient)
        number = recipient.number.e164
        return str(replies.recipient_ok("(number from the subject)" if number == SUBJECT_MAILBOX else number))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.content
        if envelope.status_recipients:
            return await self.status.receive(server, session, envelope)
        mail_from = mime.storable(envelope.mail_from)  # aiosmtpd keeps 8-bit bytes as surrogates
        client, sender = self._parties(session, mail_from)
        # An ordinary fax is read here; anything else in a worker thread: a hostile
        # message (MIME nested thousands deep) takes a second to parse and must
        # not stall every other session.
        facts = mime.inspect_inline(raw) or await asyncio.to_thread(mime.inspect, raw)
        # Every message submitted counts towards the per-minute limits, whatever becomes of it.
        refusal = self.limits.take_message(client, sender)
        refusal = refusal or mime.refusal(facts) or self.policy.check_content(facts)
        billing = self.policy.billing(raw, facts) if refusal is None else None
        if isinstance(billing, Refusal):
            refusal, billing = billing, None
        recipients: list[Recipient] = []
        for recipient in envelope.fax_recipients:
            if refusal is not None:
                break
            if recipient.number.e164 == SUBJECT_MAILBOX:
                number = self.policy.number_from_subject(facts.subject, recipient.address)
                if isinstance(number, Refusal):
                    refusal = number
                    break
                recipient = Recipient(recipient.address, FaxNumber(number.e164))
            recipients.append(recipient)
        if refusal is not None:
            self.log_refusal(session, refusal, stage="data", sender=shown(envelope.mail_from))
            return str(refusal.reply)
        message = NewMessage(
            raw=raw, mail_from=mail_from, client=client.key, helo=mime.storable(session.host_name or ""),
            auth_user=_login(session), header_from=facts.header_from,
            smtputf8=envelope.smtp_utf8 or facts.needs_smtputf8, needs_8bitmime=facts.needs_8bitmime,
            recipients=recipients, billing_code=billing,
        )
        now = self.clock()
        admission = await self.limits.admission(raw, recipients, client, sender, now)
        try:
            outcome = await self.writer.run(admit_message, message, iso(now), admission)
        except StoreFull:
            log.error("store full: message from %s not accepted", session.peer[0])
            return str(replies.STORE_FULL)
        except StoreError as exc:
            log.error("store write failed: %s", exc)
            return str(replies.STORE_FAILED)
        if isinstance(outcome, Admitted):
            self.limits.admitted(admission, len(recipients))
            server.junk_commands = server.errors = 0  # as Postfix: counted between accepted messages
            return self._accepted(session, envelope, message, outcome)
        if isinstance(outcome, Duplicate):
            refusal = self.limits.duplicate_refusal(outcome)
        else:
            refusal = self.limits.daily_refusal(client if outcome.scope == "client" else sender, outcome)
        self.log_refusal(session, refusal, stage="data", sender=shown(envelope.mail_from))
        return str(refusal.reply)

    def _accepted(self, session: Session, envelope: Envelope, message: NewMessage, outcome: Admitted) -> str:
        codes = outcome.codes
        self.on_queued()
        if self.metrics is not None:
            self.metrics.accepted.inc()
            for reasons in outcome.held.values():
                for reason in reasons:
                    self.metrics.held.labels(reason.rule).inc()
        held = {code: [reason.short for reason in reasons] for code, reasons in outcome.held.items()}
        reply = replies.queued(codes, sandbox=self.sandbox, held=held)
        log_event(log, "accepted", client=message.client, user=message.auth_user, codes=" ".join(codes),
                  held=" ".join(held), numbers=" ".join(r.number.e164 for r in message.recipients),
                  size=len(message.raw), reply=str(reply),
                  ms=round((time.monotonic() - getattr(envelope, "started", time.monotonic())) * 1000, 1))
        return str(reply)

    def _parties(self, session: Session, mail_from: str) -> tuple[Party, Party]:
        """The client address and the sender (the AUTH user, else the envelope sender) limits count for."""
        client = session.peer[0] if session.peer else "?"
        return Party.client(client), Party.sender(_login(session), mail_from)

    # --- AUTH -------------------------------------------------------------------

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd's (synchronous) authenticator: keeps the credentials for `finish_auth`, answers nothing."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        session.pending_login = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)

    async def finish_auth(self, session: Session, mechanism: str, auth_data: LoginPassword) -> tuple[str, str | None]:
        """Check the password off the event loop; the reply, and the user if the session is now logged in.

        A wrong password is counted (metrics, and a log line with the user
        name, never the password) and answered after the longer of the
        client's and the user's delays; a user name takes only a few logins
        at a time (limits.AuthThrottle), so parallel connections do not
        multiply the guesses.
        """
        client = session.peer[0] if session.peer else "?"
        user = auth_data.login.decode("utf-8", "replace")
        if len(auth_data.login) > MAX_USER_NAME:
            # No user has such a name: refused without a password check, and never kept as a throttle key.
            self.log_refusal(session, Refusal(replies.AUTH_INVALID, "auth-user-name"), stage="auth",
                             user=shown(user[:64]) + "...")
            return str(replies.AUTH_INVALID), None
        if not self.limits.auth.begin(user):
            self.log_refusal(session, Refusal(replies.AUTH_BUSY, "auth-concurrent"), stage="auth", user=shown(user))
            return str(replies.AUTH_BUSY), None
        try:
            valid = await self.passwords.check(user, auth_data.password)
        finally:
            # The slot bounds guesses being checked at once, not the wait below: held through the wait, two
            # guessing connections would lock the real user out.
            self.limits.auth.end(user)
        if not valid:
            failures, delay = self.limits.auth.failed(client, user)
            if self.metrics is not None:
                self.metrics.auth_failures.labels(mechanism).inc()
            log_event(log, "auth", level=logging.WARNING, client=client, user=shown(user), mechanism=mechanism,
                      result="failed", failures=failures, delay=f"{delay:g}s")
            await asyncio.sleep(delay)
            return str(replies.AUTH_INVALID), None
        refusal = self.limits.open_session(user)
        if refusal is not None:
            self.log_refusal(session, refusal, stage="auth", user=shown(user))
            return str(refusal.reply), None
        session.authenticated = True
        session.auth_data = auth_data
        session.login_data = auth_data.login
        log_event(log, "auth", client=client, user=shown(user), mechanism=mechanism, result="ok")
        return str(replies.AUTH_OK), user

    def log_refusal(self, session: Session | None, refusal: Refusal, *, stage: str, **fields: str) -> None:
        """Every refusal, at every stage, the same way: one `event=refused` line with its stage and check, counted."""
        reply = refusal.reply
        # The reply to a refused attachment names its file, and logs never
        # carry file names (DESIGN.md, "Privacy"): log its codes only.
        text = f"{reply.code} {reply.enhanced}" if refusal.check == "content-type" else str(reply)
        if self.metrics is not None:
            self.metrics.refused.labels(refusal.check).inc()
            if refusal.check in LIMIT_NAMES:
                self.metrics.limit_refusals.labels(refusal.check).inc()
        client = session.peer[0] if session is not None and session.peer else "?"
        log_event(log, "refused", client=client, stage=stage, check=refusal.check, reply=text, **fields)


def _address_as_written(raw_arg: str) -> str | None:
    """The address in a raw `TO:` argument as the client wrote it, or None if there is none.

    That is the text between < and >, or, without both brackets (which
    aiosmtpd accepts too), the text up to the first space.
    """
    match = re.match(r"(?i)TO:\s*(?:<(.*)>|(\S+))(?:\s.*)?$", raw_arg.strip())
    if match is None:
        return None
    return match[1] if match[1] is not None else match[2]


def _login(session: Session) -> str | None:
    auth = session.auth_data
    return auth.login.decode("utf-8", "replace") if isinstance(auth, LoginPassword) else None




# A fax recipient's checks at RCPT, in order, before the rules read the number (policy.classify_recipient)
# and the daily quotas count it; the first refusal is the reply.
RCPT_CHECKS = (Intake._listener_takes_faxes, Intake._sender_may_fax, Intake._not_mixed,
               Intake._within_recipient_limit)
