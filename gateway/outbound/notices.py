"""Notices to the original sender: a delivery status notification when a fax ends badly.

When a job reaches a final state the config names (failed, rejected,
expired; delivered only if asked), the sender of the fax email gets a
standard DSN (multipart/report, RFC 3464): a readable text, the
machine-readable delivery-status, and the original message's headers only
(text/rfc822-headers, never the document). A sender listed in
`[notifications] confirm_success` gets, for a delivered fax, a short text
with the transmission report attached instead (the PDF of the console's
job page, with the first page's thumbnail: the sender's own document).
Both are sent with a null envelope sender, so they can never cause a
bounce loop, and never to a null sender.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from functools import partial
from typing import Any

from gateway.outbound import mimeparse
from gateway.config import Settings, address_listed
from gateway.errors import StoreError, UpstreamRejected
from gateway.logs import log_event
from gateway.models import NULL_SENDER
from gateway.store import Writer, iso
from gateway.outbound.thumbnail import first_page_png
from gateway.outbound.transmission import transmission_report
from gateway.outbound.upstream import Endpoint, UpstreamConnection
from gateway.runner import Runner
from gateway.units import backoff
from gateway import store

log = logging.getLogger("faxgw.notices")
POLL_INTERVAL = 2.0
GIVE_UP_AFTER = 8  # attempts, about a day with the backoff below

STATUS_CODES = {"delivered": ("delivered", "2.0.0"), "failed": ("failed", "5.0.0"),
                "rejected": ("failed", "5.7.1"), "expired": ("failed", "4.4.7")}


def build_notice(job: dict[str, Any], *, hostname: str, from_address: str) -> bytes:
    """The DSN for one job, as bytes with CRLF line endings."""
    action, status = STATUS_CODES.get(job["state"], ("failed", "5.0.0"))
    reason = f" ({job['reason'].replace('_', ' ')})" if job.get("reason") else ""
    pages = f"\nPages sent: {job['pages']}" if job.get("pages") is not None else ""
    verb = "was delivered" if action == "delivered" else f"could not be delivered: {job['state']}{reason}"
    text = (
        f"Your fax to {job['number']} {verb}.\n\n"
        f"Fax number: {job['number']}\nJob code: {job['code']}\nResult: {job['state']}{reason}{pages}\n"
        f"Details: {job.get('last_result') or '-'}\n\n"
        f"Ask your administrator about job {job['code']} (faxgw show {job['code']}).\n"
    )
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = from_address
    report["To"] = job["mail_from"]
    report["Subject"] = f"Fax to {job['number']} {'delivered' if action == 'delivered' else 'failed'} [{job['code']}]"
    report["Date"] = email.utils.formatdate()
    report["Message-ID"] = email.utils.make_msgid(f"notice.{job['code']}", hostname)
    report["Auto-Submitted"] = "auto-replied"
    report.attach(_text(text, "plain"))
    per_message, per_recipient = Message(), Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Fax-Job-Code"] = job["code"]
    per_recipient["Original-Recipient"] = f"rfc822; {job['recipient']}"
    per_recipient["Final-Recipient"] = f"rfc822; {job['recipient']}"
    per_recipient["Action"] = action
    per_recipient["Status"] = status
    per_recipient["Diagnostic-Code"] = f"X-GreenFax; {job['state']}{reason}"
    delivery_status = Message()
    delivery_status["Content-Type"] = "message/delivery-status"
    delivery_status.set_payload([per_message, per_recipient])
    report.attach(delivery_status)
    headers = mimeparse.split(job["raw"])[0].decode("utf-8", "replace")
    report.attach(_text(headers, "rfc822-headers"))
    return report.as_bytes(policy=email.policy.SMTP)


def build_confirmation(job: dict[str, Any], report: bytes, *, to: str, hostname: str, from_address: str) -> bytes:
    """The message that tells a sender their fax was delivered, with the transmission report (PDF) attached."""
    pages = f", {job['pages']} page{'s' if job['pages'] != 1 else ''}" if job.get("pages") is not None else ""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = from_address
    message["To"] = to
    message["Subject"] = f"Fax to {job['number']} delivered [{job['code']}]"
    message["Date"] = email.utils.formatdate()
    message["Message-ID"] = email.utils.make_msgid(f"report.{job['code']}", hostname)
    message["Auto-Submitted"] = "auto-replied"
    message["X-Fax-Job-Code"] = job["code"]
    message.set_content(
        f"Your fax to {job['number']} was delivered{pages}.\n\n"
        f"Job code: {job['code']}\nReported: {job.get('reported_at') or job['updated_at']}\n"
        f"GreenFax reference: {job.get('reference_id') or '-'}\n\n"
        f"The transmission report is attached (fax-{job['code']}.pdf).\n")
    message.add_attachment(report, maintype="application", subtype="pdf", filename=f"fax-{job['code']}.pdf")
    return message.as_bytes()


def _text(text: str, subtype: str) -> MIMEText:
    """A text part readable as it is (7bit) when it is ASCII, as most notices and headers are."""
    return MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")


class Notifier(Runner):
    """Runner: sends queued notices through the relay; retries with backoff; one bad notice never stops it.

    A notice sent whose outcome the store would not take (a full disk) is
    kept here and recorded first in the next round, so it is neither lost
    nor sent twice.
    """

    name = "notifier"
    idle = POLL_INTERVAL
    expected = (StoreError,)  # a full disk: logged without a traceback, tried again

    def __init__(self, settings: Settings, writer: Writer, endpoint: Endpoint, *,
                 clock: Callable[[], datetime]) -> None:
        super().__init__(clock=clock)
        self.settings = settings
        self.writer = writer
        relay = settings.notifications.relay
        self.endpoint = endpoint if relay is None else Endpoint(host=relay[0], port=relay[1], tls="none")
        self.hostname = settings.smtp.hostname
        self.from_address = settings.notifications.from_address or f"MAILER-DAEMON@{self.hostname}"
        self.confirm_success = settings.notifications.confirm_success
        self.connection = UpstreamConnection(self.endpoint)
        self._unrecorded: list[tuple[int, str, dict[str, Any]]] = []  # (notice id, state, fields) to write

    async def prepare(self) -> None:
        await self.writer.run(store.requeue_interrupted_notifications)

    async def step(self) -> float | None:
        while self._unrecorded:
            notice_id, state, fields = self._unrecorded[0]
            await self.writer.run(partial(store.finish_notification, **fields), notice_id, iso(self.clock()), state)
            self._unrecorded.pop(0)
        notices = await self.writer.run(store.claim_notifications, iso(self.clock()), 8)
        for notice in notices:
            await self._send(self.connection, notice)
        if notices:
            return 0
        await self.connection.close()
        return None

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self.connection.abort()

    async def _finish(self, notice_id: int, state: str, **fields: Any) -> None:
        """Record a notice's outcome; if the store refuses, keep it for the next round (which raises now)."""
        try:
            await self.writer.run(partial(store.finish_notification, **fields), notice_id, iso(self.clock()), state)
        except Exception:
            self._unrecorded.append((notice_id, state, fields))
            raise

    async def _send(self, connection: UpstreamConnection, notice: dict[str, Any]) -> None:
        if notice["mail_from"] in ("", NULL_SENDER):
            await self._finish(notice["id"], "skipped", error="the fax had a null sender")
            return
        confirming = notice["state"] == "delivered" and address_listed(notice["mail_from"], self.confirm_success)
        try:
            if confirming:
                message = await self._confirmation(notice)
            else:
                message = build_notice(notice, hostname=self.hostname, from_address=self.from_address)
            await connection.send(sender="", recipient=notice["mail_from"], message=message,
                                  needs_8bitmime=False, smtputf8=not notice["mail_from"].isascii())
        except Exception as exc:  # any failure: retry later, or give up after a day
            error = getattr(exc, "reply", None) or str(exc) or type(exc).__name__
            final = notice["attempts"] >= GIVE_UP_AFTER or isinstance(exc, UpstreamRejected)
            retry_at = None if final else iso(self.clock() + timedelta(
                seconds=backoff(notice["attempts"] + 1, 60, 86400)))  # 2, 4, 8... minutes
            await self._finish(notice["id"], "failed" if final else "pending", error=error, next_attempt_at=retry_at)
            log_event(log, "notice", level=logging.WARNING, code=notice["code"], to=notice["mail_from"],
                      result="given up" if final else "retry", problem=error)
            return
        await self._finish(notice["id"], "sent", what="transmission report" if confirming else "DSN")
        log_event(log, "notice", code=notice["code"], to=notice["mail_from"], state=notice["state"],
                  kind="report" if confirming else "dsn", result="sent")

    async def _confirmation(self, notice: dict[str, Any]) -> bytes:
        """The delivery confirmation with its transmission report, rendered off the event loop."""
        job = dict(await self.writer.run(store.get_job, notice["code"]))
        thumbnail = await asyncio.to_thread(first_page_png, notice["raw"])
        report = await asyncio.to_thread(transmission_report, job, thumbnail=thumbnail,
                                         currency=self.settings.greenfax.currency, hostname=self.hostname)
        return build_confirmation(job, report, to=notice["mail_from"], hostname=self.hostname,
                                  from_address=self.from_address)
