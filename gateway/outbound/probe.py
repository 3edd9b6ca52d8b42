"""Probe the upstream step by step without sending anything (`faxgw check-upstream`, `faxgw oauth test`).

token (XOAUTH2 only), connect, EHLO, STARTTLS, AUTH, then for
check-upstream `MAIL FROM:<account_sender>`, `RCPT TO:<test number>`, the
envelope sender the forwarder really uses, RSET and QUIT: no DATA is ever
sent. Each step keeps the server's reply and, where diagnose.py knows the
refusal, its cause in words. The probe stops at the first failing step.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponse, SMTPResponseException

from gateway.errors import UpstreamError
from gateway.outbound.diagnose import diagnose
from gateway.outbound.upstream import Endpoint, authenticate

TEST_NUMBER = "12125550100"  # fictional (+1 212 555 0100): RCPT only, never DATA


@dataclass
class Step:
    name: str
    ok: bool
    reply: str  # the server's reply, or what happened
    cause: str | None = None  # why it failed, and what to do


def _said(response: SMTPResponse | None) -> str:
    if response is None:
        return "(no reply)"
    first = response.message.splitlines()[0] if response.message else ""
    return f"{response.code} {first}".strip()


class Probe:
    """One probe session; `steps` holds what happened, in order."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.steps: list[Step] = []

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    def _ok(self, name: str, reply: str) -> None:
        self.steps.append(Step(name, True, reply))

    def _failed(self, name: str, exc: BaseException) -> None:
        if isinstance(exc, SMTPResponseException):
            found = diagnose(name.split()[0], exc.code, exc.message)
            self.steps.append(Step(name, False, f"{exc.code} {exc.message}", found.cause if found else None))
        elif isinstance(exc, UpstreamError):
            self.steps.append(Step(name, False, exc.reply or str(exc), str(exc) if exc.reply else None))
        elif isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
            self.steps.append(Step(name, False, f"TLS failed: {exc}",
                                   "check [upstream] tls (\"starttls\" for port 587, \"implicit\" for 465) and"
                                   " ca_file for a private CA"))
        else:
            self.steps.append(Step(name, False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                                   "check [upstream] host and port, and that this machine may reach them"))

    async def run(self, *, sender: str | None = None, recipient: str | None = None,
                  return_path: str | None = None) -> list[Step]:
        """The steps up to AUTH; with `sender` and `recipient`, the envelope too (then RSET, QUIT)."""
        ep = self.endpoint
        if ep.tokens is not None:
            try:
                await ep.tokens.token(strict=True)
            except UpstreamError as exc:
                self._failed("token", exc)
                return self.steps
            valid = ep.tokens.valid_for() or 0
            self._ok("token", f"{ep.tokens.describe()}: obtained, valid for {valid:.0f} s")
        context = ssl.create_default_context(cafile=ep.ca_file) if ep.tls != "none" else None
        smtp = aiosmtplib.SMTP(hostname=ep.host, port=ep.port, use_tls=ep.tls == "implicit", start_tls=False,
                               tls_context=context, timeout=ep.connect_timeout, local_hostname=ep.helo_name)
        try:
            await self._session(smtp, context, sender, recipient, return_path)
        finally:
            smtp.close()
        return self.steps

    async def _session(self, smtp: aiosmtplib.SMTP, context: ssl.SSLContext | None, sender: str | None,
                       recipient: str | None, return_path: str | None) -> None:
        ep = self.endpoint
        name = "connect"
        try:
            self._ok(name, _said(await smtp.connect()))
            name = "ehlo"
            self._ok(name, _said(await smtp.ehlo()))
            if ep.tls == "starttls":
                name = "starttls"
                if not smtp.supports_extension("starttls"):
                    self.steps.append(Step(name, False, "STARTTLS is not offered",
                                           "tls = \"starttls\" needs it: check host and port (587 for submission)"))
                    return
                reply = await smtp.starttls(tls_context=context)
                await smtp.ehlo()
                self._ok(name, _said(reply))
            name = "auth"
            if ep.mechanism is None:
                self._ok(name, "none configured (the upstream must relay for this machine's address)")
            else:
                self._ok(f"auth {ep.mechanism} as {ep.username}", _said(await authenticate(smtp, ep)))
            if sender is None or recipient is None:
                name = "quit"
                self._ok(name, _said(await smtp.quit()))
                return
            name = "mail"
            self._ok(f"{name} from <{sender}>", _said(await smtp.mail(sender)))
            name = "rcpt"
            self._ok(f"{name} to <{recipient}>", _said(await smtp.rcpt(recipient)))
            name = "rset"
            self._ok(name, _said(await smtp.rset()))
            if return_path is not None:
                name = "mail"
                self._ok(f"{name} from <{return_path}> (the return path)", _said(await smtp.mail(return_path)))
                name = "rset"
                self._ok(name, _said(await smtp.rset()))
            name = "quit"
            self._ok(name, _said(await smtp.quit()))
        except (SMTPException, UpstreamError, OSError) as exc:
            self._failed(name, exc)
