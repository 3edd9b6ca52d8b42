"""The SMTP protocol side of the listeners: aiosmtpd's SMTP class, adjusted where an administrator expects more.

A fork of parts of aiosmtpd's `SMTP` (smtp.py), mirroring aiosmtpd
AIOSMTPD_MIRRORED: every override here copies or extends the method of that
version (tests/test_intake.py checks the installed version is that one, so
an upgrade makes someone read this file again). What it adds:
- the null sender `MAIL FROM:<>` (aiosmtpd refuses it);
- PIPELINING advertised (aiosmtpd processes pipelined commands but does not
  say so), SIZE checked at MAIL (552 5.3.4), an unbalanced sender refused;
- DATA read in large blocks instead of line by line, keeping aiosmtpd's
  protections (size limit, dot-unstuffing, CRLF.CRLF as the only end of
  data), naming bare LF/CR, over-long lines and oversized headers in replies;
- the raw RCPT argument kept (aiosmtpd cleans addresses before the handler
  sees them); VRFY without echoing an unreadable address;
- connections and AUTH sessions counted (gateway/outbound/quotas.py), AUTH
  passwords checked off the event loop, no AUTH on a status-only listener;
- per session: junk commands, errors and lifetime limited.

The decisions are the handler's (gateway/outbound/intake.py): this module
only speaks the protocol and refuses what aiosmtpd would have let through.
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
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, SMTP, syntax

from gateway import replies
from gateway.models import NULL_SENDER, Refusal
from gateway.replies import refuse
from gateway.units import span

if TYPE_CHECKING:
    from gateway.outbound.intake import Intake

log = logging.getLogger("faxgw.intake")
AIOSMTPD_MIRRORED = "1.4.6"
END_OF_DATA = b"\r\n.\r\n"
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
            await self.push(str(replies.NESTED_MAIL))
            return
        options = match[1].upper().split()
        status = await self._call_handler_hook("MAIL", "", options)
        if status is MISSING:
            self.envelope.mail_from = NULL_SENDER
            self.envelope.mail_options.extend(options)
            status = str(replies.MAIL_OK)
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
            refusal = refuse(replies.TOO_MANY_ERRORS, "error-limit", limit=self.hard_errors)
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
            return refuse(replies.SESSION_TOO_LONG, "session-time", limit=span(self.lifetime))
        if command in JUNK_COMMANDS:
            self.junk_commands += 1
            if self.junk_commands > self.junk_limit:
                return refuse(replies.TOO_MANY_JUNK, "junk-commands", limit=self.junk_limit)
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
            await self.push(str(replies.VRFY_UNREADABLE))
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
            await self.push(str(replies.NEED_RCPT))
            return
        if arg:
            await self.push(str(replies.DATA_SYNTAX))
            return
        await self.push(str(replies.START_DATA))
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
        # One copy of the message, the CRLF that ends its last line kept (a slice of the
        # bytearray would be a second one); replace() gives it back itself when no line was stuffed.
        start = 3 if buffer.startswith(b"\r\n.") else 2  # dot-unstuffing (RFC 5321 4.5.2) of the first line
        with memoryview(buffer) as view:
            data = bytes(view[start : end + 2])
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
        if has_long_line(data, self.data_line_limit):
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


def has_long_line(data: bytes, limit: int) -> bool:
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
