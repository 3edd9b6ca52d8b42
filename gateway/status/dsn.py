"""Bounces of forwarded faxes: delivery status notifications (RFC 3464) into status reports.

A bounce comes back to the return path, which carries the job code
(`fax-bounce+FX7K3M9Q@...`), so it names its job without guessing. The code
is also looked for in the returned headers (our Message-ID and subject tag).
Only `Action: failed` changes a job; delays and relays are informational.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

from gateway.status.mailparse import ParsedMail
from gateway.status.report import Channel, Result, StatusReport, dedup_key

CODE = re.compile(r"\b(FX[0-9A-Z]{6})\b")
RETURN_CODE = re.compile(r"\+(FX[0-9A-Z]{6})@", re.IGNORECASE)


@dataclass(frozen=True)
class Bounce:
    action: str  # failed, delayed, delivered, relayed, expanded
    status: str  # e.g. 5.1.1
    diagnostic: str
    recipient: str
    job_code: str | None


def is_dsn(mail: ParsedMail) -> bool:
    return mail.content_type == "multipart/report" and "delivery-status" in mail.headers.get("content-type", "").lower()


def parse_bounce(mail: ParsedMail, envelope_rcpts: tuple[str, ...] = ()) -> Bounce | None:
    """The first per-recipient block of a DSN, with the job code it concerns; None if not a DSN."""
    try:
        message = email.message_from_bytes(mail.raw, policy=email.policy.compat32)
    except Exception:
        return None
    status_part = next((p for p in message.walk() if p.get_content_type() == "message/delivery-status"), None)
    if status_part is None:
        return None
    blocks = status_part.get_payload()
    recipients = [b for b in blocks[1:] if isinstance(b, Message)] if isinstance(blocks, list) else []
    if not recipients:
        return None
    first = recipients[0]
    return Bounce(
        action=str(first.get("Action", "")).strip().lower(),
        status=str(first.get("Status", "")).strip(),
        diagnostic=" ".join(str(first.get("Diagnostic-Code", "")).split()),
        recipient=str(first.get("Final-Recipient", "")).split(";")[-1].strip(),
        job_code=_job_code(message, mail, envelope_rcpts),
    )


def _job_code(message: Message, mail: ParsedMail, envelope_rcpts: tuple[str, ...]) -> str | None:
    """Where the code is: the return path it was sent to, else the returned message's headers."""
    for address in (*envelope_rcpts, *mail.to_addrs, mail.headers.get("delivered-to", ""),
                    mail.headers.get("x-original-to", "")):
        match = RETURN_CODE.search(address or "")
        if match:
            return match[1].upper()
    for part in message.walk():
        if part.get_content_type() in ("text/rfc822-headers", "message/rfc822"):
            payload = part.get_payload(decode=False)
            text = payload if isinstance(payload, str) else "".join(str(p) for p in payload or [])
            found = re.search(r"^(?:Message-ID:\s*<|Subject:.*?\[)(FX[0-9A-Z]{6})", text, re.IGNORECASE | re.MULTILINE)
            if found:
                return found[1].upper()
    return None


def bounce_report(mail: ParsedMail, bounce: Bounce) -> StatusReport:
    """A failed bounce fails its job; anything else is informational (result None)."""
    failed = bounce.action == "failed"
    detail = f"{bounce.action} {bounce.status} {bounce.diagnostic}".strip()
    return StatusReport(
        channel=Channel.BOUNCE, trusted=False, raw=mail.raw.decode("utf-8", "replace"),
        result=Result.FAILED if failed else None, result_text=detail, reason="bounced" if failed else None,
        job_code=bounce.job_code, dedup_key=dedup_key("mail", mail.message_id, mail.body), rule="dsn",
        notes=() if failed else (f"informational DSN: {detail}",),
    )
