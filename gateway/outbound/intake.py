"""Intake: the aiosmtpd side. Thin: asks policy, hands the message to the store, replies.

`IntakeSMTP` adjusts aiosmtpd where a mail administrator would expect more:
it advertises PIPELINING, answers an oversized SIZE with 552 5.3.4, keeps
the raw RCPT argument (aiosmtpd cleans addresses before the handler sees
them) and reads DATA in large blocks instead of line by line, keeping
aiosmtpd's protections (size limit, dot-unstuffing, CRLF.CRLF as the only
end of data) and naming bare LF/CR and over-long lines in its replies.

`Intake` is the handler: one decision per SMTP command, and the 250 to DATA
only after the store has committed the message and its jobs. The abuse and
cost controls it applies at each step (connections, AUTH, rates, daily
quotas, duplicates, holds) are gateway.outbound.quotas'; the DATA commit goes through
`store.limits.admit_message`, which applies the daily quotas, the duplicate
guard and the hold rules in the same transaction as the insert.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from gateway import replies
from gateway.outbound import mime
from gateway.errors import StoreError, StoreFull
from gateway.outbound.quotas import LIMIT_NAMES, IntakeLimits, Party, span
from gateway.logs import log_event
from gateway.metrics import Metrics
from gateway.models import NULL_SENDER, Channel, FaxNumber, NewMessage, Recipient, Refusal, Reply
from gateway.outbound.passwords import PasswordChecker
from gateway.outbound.policy import SUBJECT_MAILBOX, Policy, shown
from gateway.replies import refuse
from gateway.status.inbound import StatusMail, receive, status_reply
from gateway.store import Writer, iso, utcnow
from gateway.store import Admitted, Duplicate, admit_message

log = logging.getLogger("faxgw.intake")

END_OF_DATA = b"\r\n.\r\n"
MAX_USER_NAME = 256  # octets: a longer AUTH user name is refused unchecked
ERROR_DELAY = 1.0  # seconds each refusal past [smtp] soft_error_limit waits
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "VRFY", "HELP"})  # as Postfix counts them (ETRN: not offered)
READ_LIMIT = 64 * 1024  # the stream reader's limit: the largest piece read at once


@dataclass(frozen=True)
class Role:
    """What a listener takes: faxes (from allowed clients or users), status mail (from anyone), or both."""

    fax: bool = True
    status: bool = False


class NullSenderSMTP(SMTP):
    """aiosmtpd's SMTP taking the null sender `MAIL FROM:<>`, which it refuses as a syntax error.

    Bounces and notices travel with the null sender. The handler sees it as
    "" and the envelope keeps NULL_SENDER ("<>"), because aiosmtpd takes an
    empty mail_from to mean "no MAIL command yet".
    """

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        match = re.match(r"(?i)FROM:\s*<>\s*(.*)$", (arg or "").strip())
        if match is None:
            await super().smtp_MAIL(arg)
            return
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        assert self.envelope is not None
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        options = match[1].upper().split()
        status = await self._call_handler_hook("MAIL", "", options)
        if status is MISSING:
            self.envelope.mail_from = NULL_SENDER
            self.envelope.mail_options.extend(options)
            status = "250 OK"
        await self.push(status)


class IntakeSMTP(NullSenderSMTP):
    """aiosmtpd's SMTP with the gateway's DATA reader and a few stricter replies.

    It also counts each client's concurrent connections and each AUTH
    user's sessions (gateway.outbound.quotas: 421 over a limit), and has AUTH
    passwords checked off the event loop, a wrong one answered after a delay.
    """

    line_length_limit = READ_LIMIT  # command lines are still held to 512 octets by aiosmtpd

    def __init__(self, handler: Intake, *, line_limit: int, bare_lf: str, role: Role, header_lines: int,
                 header_size: int, junk_limit: int, lifetime: float, status_size: int, soft_errors: int,
                 hard_errors: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.data_line_limit = line_limit
        self.bare_lf = bare_lf
        self.role = role
        self.intake = handler
        self.header_lines = header_lines
        self.header_size = header_size
        self.junk_limit = junk_limit
        self.lifetime = lifetime
        self.status_size = status_size
        self.started = time.monotonic()
        self.junk_commands = 0
        self.errors = 0  # refusals since the last accepted message
        self.soft_errors, self.hard_errors = soft_errors, hard_errors
        # Every command passes the session guard first (aiosmtpd looks its methods up in this table).
        self._smtp_methods = {name: self._guarded(name, method) for name, method in self._smtp_methods.items()}
        self.connect_refusal: Refusal | None = None
        self.counted_client: str | None = None  # counted in the client's concurrent connections
        self.counted_user: str | None = None  # counted in the AUTH user's concurrent sessions

    # --- concurrent connections and sessions ---

    def connection_made(self, transport: Any) -> None:
        starttls = self._original_transport is not None
        super().connection_made(transport)
        if starttls:
            # A new session after STARTTLS: a login made before it no longer counts (RFC 3207 4.2).
            self._release_session()
            return
        assert self.session is not None
        client = self.session.peer[0] if self.session.peer else "?"
        # The greeting task starts at the loop's next turn, after this is set.
        self.connect_refusal = self.intake.limits.open_connection(client, status_only=not self.role.fax)
        if self.connect_refusal is None:
            self.counted_client = client
        self.started = time.monotonic()
        self.junk_commands = 0

    async def _handle_client(self) -> None:
        if self.connect_refusal is None:
            await super()._handle_client()
            return
        # Over the client's connection limit: 421 instead of the greeting (RFC 5321 3.1).
        self.intake.log_refusal(self.session, self.connect_refusal, stage="connect")
        await self.push(str(self.connect_refusal.reply))
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self.counted_client is not None:
            self.intake.limits.close_connection(self.counted_client, status_only=not self.role.fax)
            self.counted_client = None
        self._release_session()

    def _release_session(self) -> None:
        if self.counted_user is not None:
            self.intake.limits.close_session(self.counted_user)
            self.counted_user = None

    # --- errors, junk commands and the session's lifetime ---

    async def push(self, status: str | bytes) -> None:
        """Every reply; a refusal counts towards the session's error limits (Postfix's smtpd_*_error_limit).

        Past the soft limit each refusal is answered ERROR_DELAY later (a
        client that keeps guessing slows to a crawl); at the hard limit the
        session ends with 421. An accepted message starts the count again.
        """
        if self.transport is None or self.transport.is_closing():
            return
        await super().push(status)  # type: ignore[arg-type]  # an AUTH challenge is bytes
        if isinstance(status, bytes) or status[:1] not in "45" or status.startswith("421"):
            return
        self.errors += 1
        if self.errors >= self.hard_errors:
            refusal = Refusal(Reply(421, "4.7.0", replies.TOO_MANY_ERRORS.text.format(limit=self.hard_errors)),
                              "error-limit")
            self.intake.log_refusal(self.session, refusal, stage="session")
            await super().push(str(refusal.reply))
            self.transport.close()
        elif self.errors > self.soft_errors:
            await asyncio.sleep(ERROR_DELAY)

    def _guarded(self, command: str, method: Callable[[str | None], Any]) -> Callable[[str | None], Any]:
        """`method` behind the checks every command passes: the session's age, and junk commands.

        A client could otherwise hold a connection for ever with a NOOP now
        and then. QUIT always passes.
        """

        @functools.wraps(method)
        async def guarded(arg: str | None) -> None:
            if command != "QUIT":
                refusal = self._session_refusal(command)
                if refusal is not None:
                    self.intake.log_refusal(self.session, refusal, stage=command.lower())
                    await self.push(str(refusal.reply))
                    assert self.transport is not None
                    self.transport.close()
                    return
            await method(arg)

        return guarded

    def _session_refusal(self, command: str) -> Refusal | None:
        if time.monotonic() - self.started > self.lifetime:
            return Refusal(Reply(421, "4.4.2", replies.SESSION_TOO_LONG.text.format(limit=span(self.lifetime))),
                           "session-time")
        if command in JUNK_COMMANDS:
            self.junk_commands += 1
            if self.junk_commands > self.junk_limit:
                return Refusal(Reply(421, "4.7.0", replies.TOO_MANY_JUNK.text.format(limit=self.junk_limit)),
                               "junk-commands")
        return None

    # --- AUTH ---

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        """aiosmtpd's AUTH, with the password checked here instead of in its synchronous authenticator.

        aiosmtpd reads the exchange, refuses AUTH without TLS (538) unless
        the listener is marked plaintext_auth, and calls `Intake.authenticate`,
        which only keeps the credentials. They are then checked off the event
        loop, and a wrong password is answered after the client's growing
        delay (an asyncio sleep: other sessions go on meanwhile).
        """
        assert self.session is not None
        if not self.role.fax:
            # A status-only listener takes mail from anyone and never faxes: no AUTH to guess at there.
            await self._refuse(Refusal(replies.AUTH_NOT_HERE, "auth-not-offered"), "auth")
            return
        self.session.pending_login = None
        await super().smtp_AUTH(arg)
        pending = self.session.pending_login
        if pending is None:
            return
        self.session.pending_login = None
        reply, user = await self.intake.finish_auth(self.session, *pending)
        await self.push(reply)
        if user is not None:
            self.counted_user = user
        elif reply.startswith("421"):
            assert self.transport is not None
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """A bug in a hook must not show internals to the client or lose the session."""
        log.exception("internal error in SMTP session with %s", self.session.peer if self.session else "?")
        return str(replies.INTERNAL_ERROR)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing (the same email-package parser and local-part limit), two fixes on top.

        aiosmtpd's own version defines a typing class on every call, a tenth
        of a millisecond per MAIL and RCPT. And the parser raises IndexError
        on "<" or "<@" alone (MAIL FROM:<, RCPT TO:<): a malformed address,
        answered with 553 5.1.3 like any other.
        """
        if not arg:
            return "", ""
        try:
            parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
            address, rest = parse(arg)
        except (HeaderParseError, IndexError):
            return None, None
        addr: str = address.addr_spec
        localpart, _at, _domain = addr.rpartition("@")
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # Each check pushes its own reply: a client that pipelines must get
        # exactly one reply per command, so aiosmtpd must not check again.
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        refusal = self._mail_refusal(arg or "")
        if refusal is not None:
            await self._refuse(refusal, "mail")
            return
        await super().smtp_MAIL(arg)

    def _mail_refusal(self, arg: str) -> Refusal | None:
        """What aiosmtpd would let through at MAIL: an unbalanced <, or a SIZE over the limit."""
        written = re.match(r"(?i)FROM:\s*(\S*)", arg.strip())
        address = written[1] if written else ""
        if address.startswith("<") != (">" in address):
            return refuse(replies.BAD_SENDER_SYNTAX, "sender-syntax")
        match = re.search(r"\sSIZE=(\d+)", " " + arg, re.IGNORECASE)
        if match and self.data_size_limit and int(match[1]) > self.data_size_limit:
            return refuse(replies.SIZE_DECLARED_TOO_BIG, "size", size=match[1], limit=self.data_size_limit)
        return None

    async def _refuse(self, refusal: Refusal, stage: str) -> None:
        """A refusal the protocol layer gives itself: logged and counted like every other, then sent."""
        self.intake.log_refusal(self.session, refusal, stage=stage)
        await self.push(str(refusal.reply))

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        """aiosmtpd's VRFY, without echoing an unreadable address (8-bit bytes that are not UTF-8 crash its reply)."""
        if arg and self._getaddr(arg)[0] is None:
            await self.push("502 5.5.2 Could not VRFY that address")
            return
        await super().smtp_VRFY(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.session is not None
        self.session.raw_rcpt = arg or ""
        await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, problem = await self._read_data()
        if problem is None:
            content, problem = self._check_lines(content)
        if problem is not None:
            self._set_post_data_state()
            await self._refuse(problem, "data")
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self) -> tuple[bytes, Refusal | None]:
        """Read up to CRLF.CRLF in large pieces; an oversized message is read to its end and dropped."""
        limit = self._data_limit()
        # The CRLF that ended the DATA command counts as the line end before
        # the first line, so an empty message (".") is found like any other end.
        buffer = bytearray(b"\r\n")
        scan_from = 0
        dropped = 0
        while (end := buffer.find(END_OF_DATA, scan_from)) < 0:
            # Up to ".\r" of the end may be here unrecognised, so the message is
            # certainly too big only when more than limit + 2 octets came in
            # (the buffer also holds the 2 octets put in front).
            if limit and len(buffer) + dropped > limit + 4:
                keep = buffer[-4:]
                dropped += len(buffer) - len(keep)
                buffer = bytearray(keep)
            scan_from = max(0, len(buffer) - 4)
            chunk = await self._reader.read(READ_LIMIT)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            buffer += chunk
        self._unread(bytes(buffer[end + len(END_OF_DATA):]))
        # The message is the `end` octets up to its last CRLF (RFC 1870 counts
        # that CRLF, but not the "." line).
        if dropped or (limit and end > limit):
            return b"", refuse(replies.DATA_TOO_BIG, "size", limit=limit)
        data = bytes(buffer[2 : end + 2])  # keep the CRLF that ends the last line
        # Dot-unstuffing (RFC 5321 4.5.2): a leading dot on any line is removed.
        if data.startswith(b"."):
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n"), None

    def _data_limit(self) -> int:
        """This transaction's size limit: status mail has its own, smaller one."""
        if getattr(self.envelope, "status_recipients", None):
            return self.status_size
        return self.data_size_limit or 0

    def _unread(self, pipelined: bytes) -> None:
        """Give back commands a client pipelined after the end of data.

        asyncio's StreamReader has no unread(); its buffer is a bytearray read
        from the front, so the bytes go back there (tested in test_intake).
        """
        if pipelined:
            self._reader._buffer[0:0] = pipelined  # type: ignore[attr-defined]

    def _check_lines(self, data: bytes) -> tuple[bytes, Refusal | None]:
        """Bare LF, bare CR, over-long lines and a missing header get a reply naming the real problem."""
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf:
            if self.bare_lf != "normalize":
                return data, refuse(replies.BARE_LF, "bare-lf")
            # A bare LF is taken as a line end, so the line after it was
            # dot-stuffed by the client like any other (Python's smtplib does so).
            data = re.sub(rb"(?<!\r)\n\.", b"\n", data)
            data = re.sub(rb"\r?\n", b"\r\n", data)
            crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf:
            return data, refuse(replies.BARE_CR, "bare-cr")
        if _has_long_line(data, self.data_line_limit):
            return data, refuse(replies.LINE_TOO_LONG, "line-length", limit=self.data_line_limit)
        if not data or data.startswith(b"\r\n"):
            # Nothing, or a body without a header: not a message to fax, even
            # where the rules let a body alone become a fax.
            return data, refuse(replies.NO_HEADERS, "no-header")
        return data, self._check_header(data)

    def _check_header(self, data: bytes) -> Refusal | None:
        """A header block over its limits is refused before anything parses it."""
        end = data.find(b"\r\n\r\n")
        size = end + 2 if end >= 0 else len(data)
        if size > self.header_size:
            return refuse(replies.HEADER_TOO_BIG, "header-size", limit=f"{self.header_size} bytes")
        if data.count(b"\r\n", 0, size) > self.header_lines:
            return refuse(replies.HEADER_TOO_BIG, "header-size", limit=f"{self.header_lines} lines")
        return None


class Intake:
    """The aiosmtpd handler: policy and limits per command, store on DATA, one log line per transaction."""

    def __init__(self, *, policy: Policy, writer: Writer, sandbox: bool,
                 on_queued: Callable[[], None], passwords: PasswordChecker, status: StatusMail,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.policy = policy
        self.status = status
        self.writer = writer
        self.sandbox = sandbox
        self.on_queued = on_queued
        self.passwords = passwords
        self.clock = clock
        self.max_recipients = policy.settings.smtp.max_recipients
        self.limits = IntakeLimits(policy.settings, policy, writer=writer, clock=clock)
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
            refusal = Refusal(Reply(550, "5.7.1", "The null sender <> cannot send faxes"), "sender")
        if refusal is None:
            refusal = self.policy.check_sender(address)
        if refusal is None:
            refusal = self.limits.check_rate(*self._parties(session, address))
        return refusal

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        """One recipient: a fax number by the rules, a status address on a status listener, or a refusal.

        Decided against the command as the client wrote it: aiosmtpd hands
        over the address with quotes, comments and a source route already
        removed (and takes `<addr` without its `>`), so a form that is not
        written exactly as the address the rules judge is refused with 553
        5.1.3, never accepted as its cleaned-up reading (README, "No open
        relay"). An argument that cannot be read at all is refused the same way.
        """
        written = _address_as_written(getattr(session, "raw_rcpt", ""))
        if written != address:
            refusal = Refusal(Reply(553, "5.1.3", replies.ADDRESS_AS_WRITTEN.text.format(
                address=shown(written if written is not None else address),
                domain=self.policy.settings.upstream.domain)), "address-syntax")
        elif server.role.status and self.status.is_status_address(address):
            limit = self.policy.settings.status.max_recipients
            if envelope.fax_recipients:
                refusal = Refusal(replies.MIXED_KINDS, "mixed")
            elif len(envelope.status_recipients) >= limit:
                refusal = Refusal(Reply(452, "4.5.3", replies.TOO_MANY_RECIPIENTS.text.format(limit=limit)),
                                  "recipients")
            else:
                envelope.rcpt_tos.append(address)
                envelope.status_recipients.append(address)
                return str(replies.STATUS_RECIPIENT_OK)
        elif not server.role.fax:
            refusal = Refusal(Reply(550, "5.7.1", f"<{shown(address)}> is not a status address; this listener"
                                    " takes status mail only"), "relay")
        elif envelope.fax_refusal is not None:
            refusal = envelope.fax_refusal
        elif envelope.status_recipients:
            refusal = Refusal(replies.MIXED_KINDS, "mixed")
        elif len(envelope.fax_recipients) >= self.max_recipients:
            refusal = Refusal(Reply(452, "4.5.3", replies.TOO_MANY_RECIPIENTS.text.format(
                limit=self.max_recipients)), "recipients")
        else:
            result = self.policy.classify_recipient(address)
            if isinstance(result, Recipient):
                refusal = await self.limits.check_daily(*self._parties(session, envelope.mail_from),
                                                        len(envelope.fax_recipients) + 1)
                if refusal is None:
                    return self._take_recipient(envelope, result, options)
            else:
                refusal = result
        self.log_refusal(session, refusal, stage="rcpt", sender=shown(envelope.mail_from or ""),
                         recipient=shown(address))
        return str(refusal.reply)

    def _take_recipient(self, envelope: Envelope, recipient: Recipient, options: list[str]) -> str:
        envelope.rcpt_tos.append(recipient.address)
        envelope.rcpt_options.extend(options)
        envelope.fax_recipients.append(recipient)
        number = recipient.number.e164
        return str(replies.recipient_ok("(number from the subject)" if number == SUBJECT_MAILBOX else number))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.content
        if envelope.status_recipients:
            return await self._status_mail(server, session, envelope, raw)
        mail_from = mime.storable(envelope.mail_from)  # aiosmtpd keeps 8-bit bytes as surrogates
        client, sender = self._parties(session, mail_from)
        # An ordinary fax is read here; anything else in a worker thread: a hostile
        # message (MIME nested thousands deep) takes a second to parse and must
        # not stall every other session.
        facts = mime.inspect_inline(raw) or await asyncio.to_thread(mime.inspect, raw)
        # Every message submitted counts towards the per-minute limits, whatever becomes of it.
        refusal = self.limits.take_message(client, sender)
        refusal = refusal or mime.refusal(facts) or self.policy.check_content(facts)
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
            recipients=recipients,
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

    async def _status_mail(self, server: IntakeSMTP, session: Session, envelope: Envelope, raw: bytes) -> str:
        """Mail to a status address: parsed, correlated and stored before the 250, never faxed."""
        refusal = self.limits.take_status_message(session.peer[0] if session.peer else "?")
        if refusal is not None:
            self.log_refusal(session, refusal, stage="data", sender=shown(envelope.mail_from or ""))
            return str(refusal.reply)
        try:
            outcome, verdict = await receive(self.status, self.writer, raw, channel=Channel.SMTP,
                                             envelope_rcpts=tuple(envelope.status_recipients), client=session.peer[0])
        except StoreFull:
            return str(replies.STORE_FULL)
        except StoreError as exc:
            log.error("store write failed: %s", exc)
            return str(replies.STORE_FAILED)
        server.junk_commands = server.errors = 0  # an accepted message: an MX's RSET between mails is no junk
        return str(status_reply(outcome, verdict))

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


def _has_long_line(data: bytes, limit: int) -> bool:
    """Whether a line of CRLF-ended `data` has more than `limit` octets before its CRLF.

    Each step looks at the next limit + 2 octets: if no line ends in them,
    the line starting there is too long; else the next line to look at
    starts after the last line end among them. So a 200 KB attachment of
    76-octet lines takes 200 steps, not 2,700 (or a split into 2,700 copies).
    """
    start, size = 0, len(data)
    while size - start > limit:
        newline = data.rfind(b"\n", start, start + limit + 2)
        if newline < 0:
            return True
        start = newline + 1
    return False


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


def smtp_factory(intake: Intake, *, settings_smtp: Any, tls_context: ssl.SSLContext | None,
                 implicit_tls: bool, plaintext_auth: bool, role: Role) -> Callable[[], IntakeSMTP]:
    """A protocol factory for one listener."""
    status_size = intake.policy.settings.status.max_message_size

    def factory() -> IntakeSMTP:
        return IntakeSMTP(
            intake,
            line_limit=settings_smtp.line_length_limit,
            bare_lf=settings_smtp.bare_lf,
            role=role,
            header_lines=settings_smtp.max_header_lines,
            header_size=settings_smtp.max_header_size,
            junk_limit=settings_smtp.max_junk_commands,
            lifetime=settings_smtp.max_session_time,
            status_size=status_size,
            soft_errors=settings_smtp.soft_error_limit,
            hard_errors=settings_smtp.hard_error_limit,
            # A status-only listener advertises (and checks at MAIL) the status mail's own size limit.
            data_size_limit=settings_smtp.max_message_size if role.fax else status_size,
            enable_SMTPUTF8=True,
            hostname=settings_smtp.hostname,
            ident=f"greenfax-gateway ({replies.SANDBOX_NOTE})" if intake.sandbox else "greenfax-gateway",
            tls_context=None if implicit_tls else tls_context,
            timeout=settings_smtp.timeout,
            # On an implicit-TLS listener the whole session is encrypted, so
            # AUTH needs no STARTTLS first (aiosmtpd would refuse it otherwise).
            auth_require_tls=not (implicit_tls or plaintext_auth),
            authenticator=intake.authenticate,
        )

    return factory
