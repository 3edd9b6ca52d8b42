"""Upstream: one reusable aiosmtplib connection, its replies mapped to what they mean for a fax.

- 2xx to the data: accepted.
- 4xx anywhere, or a network error before the message was sent: UpstreamTemporary.
- 5xx to RCPT or to the data: UpstreamRejected (this fax, for good).
- 5xx to EHLO/AUTH/MAIL, or any TLS failure: UpstreamSetupError (the
  gateway's own set-up; the fax is fine and waits).
- connection lost or timed out after the message was sent and before the
  reply: UpstreamUnknown (the upstream may have it).
- a message needing 8BITMIME or SMTPUTF8 the upstream lacks: UpstreamLacksExtension.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError

from gateway.errors import (
    UpstreamLacksExtension,
    UpstreamRejected,
    UpstreamSetupError,
    UpstreamTemporary,
    UpstreamUnknown,
)



@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the upstream."""

    host: str
    port: int
    tls: str  # "none", "starttls" or "implicit"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    helo_name: str | None = None
    connect_timeout: float = 30
    timeout: float = 120

    def describe(self) -> str:
        return f"{self.host}:{self.port} (tls={self.tls})"


_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\s+(.*)", re.DOTALL)


def _reply(code: int, message: str) -> dict[str, object]:
    """An upstream reply as UpstreamError's fields: basic code, enhanced code (if given) and text."""
    match = _ENHANCED.fullmatch(message.strip())
    if match:
        return {"code": code, "enhanced": match[1], "text": match[2]}
    return {"code": code, "enhanced": None, "text": message.strip()}


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class UpstreamConnection:
    """A connection kept open between jobs; reopened when lost."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._smtp: aiosmtplib.SMTP | None = None

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            try:
                await smtp.quit(timeout=5)
            except Exception:
                smtp.close()

    def abort(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def _open(self) -> aiosmtplib.SMTP:
        ep = self.endpoint
        context = None
        if ep.tls != "none":
            context = ssl.create_default_context(cafile=ep.ca_file)
        smtp = aiosmtplib.SMTP(
            hostname=ep.host, port=ep.port, use_tls=ep.tls == "implicit", start_tls=False,
            tls_context=context, timeout=ep.connect_timeout, local_hostname=ep.helo_name,
        )
        try:
            await smtp.connect()
            if smtp.last_ehlo_response is None:
                await smtp.ehlo()
            if ep.tls == "starttls":
                if not smtp.supports_extension("starttls"):
                    raise UpstreamSetupError(f"{ep.describe()} does not offer STARTTLS, which tls = \"starttls\" requires")
                await smtp.starttls(tls_context=context)
                await smtp.ehlo()
            if ep.username:
                await smtp.login(ep.username, ep.password or "")
        except UpstreamSetupError:
            smtp.close()
            raise
        except SMTPResponseException as exc:
            smtp.close()
            if exc.code >= 500:
                raise UpstreamSetupError(f"{ep.describe()} refused the session set-up", **_reply(exc.code, exc.message)) from exc
            raise UpstreamTemporary(f"{ep.describe()} answered {exc.code} during set-up", **_reply(exc.code, exc.message)) from exc
        except Exception as exc:
            smtp.close()
            if _tls_failure(exc):
                raise UpstreamSetupError(f"TLS with {ep.describe()} failed: {exc}") from exc
            raise UpstreamTemporary(f"cannot reach {ep.describe()}: {exc or type(exc).__name__}") from exc
        smtp.timeout = ep.timeout
        return smtp

    async def ready(self) -> None:
        """Open the session (connect, EHLO, STARTTLS, AUTH) unless it is open already."""
        if not self.connected:
            self.abort()
            self._smtp = await self._open()

    async def send(self, *, sender: str, recipient: str, message: bytes,
                   needs_8bitmime: bool, smtputf8: bool) -> str:
        """Send one message to one recipient; return the upstream's reply to the data."""
        await self.ready()
        smtp = self._smtp
        assert smtp is not None
        options = []
        if smtputf8:
            if not smtp.supports_extension("smtputf8"):
                raise UpstreamLacksExtension("the message needs SMTPUTF8, which the upstream does not offer")
            options.append("SMTPUTF8")
        if needs_8bitmime:
            if not smtp.supports_extension("8bitmime"):
                raise UpstreamLacksExtension("the message needs 8BITMIME, which the upstream does not offer")
            options.append("BODY=8BITMIME")
        try:
            await self._envelope(smtp, sender, recipient, options, smtputf8)
            response = await smtp.execute_command(b"DATA")
        except (SMTPServerDisconnected, SMTPTimeoutError, ConnectionError, OSError) as exc:
            self.abort()
            raise UpstreamTemporary(f"connection lost before the message was sent: {exc}") from exc
        if response.code != 354:
            await self._reset(smtp)
            self._raise_for_data(response.code, response.message)
        return await self._transfer(smtp, message)

    async def _envelope(self, smtp: aiosmtplib.SMTP, sender: str, recipient: str,
                        options: list[str], smtputf8: bool) -> None:
        encoding = "utf-8" if smtputf8 else "ascii"
        try:
            await smtp.mail(sender, options=options, encoding=encoding)
        except SMTPResponseException as exc:
            await self._reset(smtp)
            if exc.code >= 500:
                # Not naming the sender: it carries the job's secret (the VERP address).
                raise UpstreamSetupError("upstream refused the envelope sender (the return path)",
                                         **_reply(exc.code, exc.message)) from exc
            raise UpstreamTemporary("upstream deferred the sender", **_reply(exc.code, exc.message)) from exc
        try:
            await smtp.rcpt(recipient, encoding=encoding)
        except SMTPResponseException as exc:
            await self._reset(smtp)
            if exc.code >= 500:
                raise UpstreamRejected(f"upstream refused <{recipient}>", **_reply(exc.code, exc.message)) from exc
            raise UpstreamTemporary(f"upstream deferred <{recipient}>", **_reply(exc.code, exc.message)) from exc

    async def _transfer(self, smtp: aiosmtplib.SMTP, message: bytes) -> str:
        """Send the message bytes and the final dot; from here on a lost reply means `unknown`."""
        # Dot-stuffing (RFC 5321 4.5.2); bytes.replace is ten times faster than a regex here.
        payload = (b"." if message.startswith(b".") else b"") + message.replace(b"\r\n.", b"\r\n..")
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        protocol = smtp.protocol
        try:
            assert protocol is not None
            protocol.write(payload)
            # Let the body reach the socket before the final dot: a server that
            # drops the connection mid-DATA is then seen here, while the fax is
            # certainly not accepted (deferred), not after the dot (unknown).
            async with asyncio.timeout(self.endpoint.timeout):
                await protocol._drain_helper()
            await asyncio.sleep(0)
            if protocol.transport is None or protocol.transport.is_closing():
                raise SMTPServerDisconnected("connection lost during DATA")
            protocol.write(b".\r\n")
        except (SMTPServerDisconnected, AssertionError, ConnectionError, OSError, TimeoutError) as exc:
            self.abort()
            raise UpstreamTemporary("connection lost before the end of the message was sent") from exc
        try:
            response = await protocol.read_response(timeout=self.endpoint.timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError, ConnectionError, OSError) as exc:
            self.abort()
            raise UpstreamUnknown(f"no reply after the message was sent ({exc or type(exc).__name__})") from exc
        if response.code != 250:
            await self._reset(smtp)
            self._raise_for_data(response.code, response.message)
        return f"{response.code} {response.message}"

    @staticmethod
    def _raise_for_data(code: int, message: str) -> None:
        if code >= 500:
            raise UpstreamRejected("upstream refused the message", **_reply(code, message))
        raise UpstreamTemporary("upstream deferred the message", **_reply(code, message))

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        """RSET after a refused transaction, so the connection can be reused."""
        try:
            await smtp.rset()
        except Exception:
            self.abort()
