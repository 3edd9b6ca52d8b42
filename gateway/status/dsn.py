"""Bounces of forwarded faxes: delivery status notifications (RFC 3464) into status reports.

A bounce comes back to the return path, which carries the job code and the
job's secret (`fax-bounce+FX7K3M9Q.<secret>@...`), so it names its job
without guessing. Both are also looked for in the returned headers (our
Message-ID carries them too; the subject tag has the code alone). Anyone can
send a DSN, so a bounce is only taken as ours when it presents the job's
secret (gateway/status/correlate.py checks it); without it, it is kept for
review. Only `Action: failed` changes a job; delays and relays are informational.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message

from gateway.status.mailparse import ParsedMail
from gateway.status.report import dedup_key
from gateway.models import Channel, Result, StatusReport, Trust

CODE = re.compile(r"\b(FX[0-9A-Z]{6})\b")
# The return path's subaddress: the job code, and after a dot the job's secret (older jobs had none).
RETURN_CODE = re.compile(r"\+(FX[0-9A-Z]{6})(?:\.([a-z2-7]{16}))?@", re.IGNORECASE)
# Our Message-ID, <CODE.SECRET.ATTEMPT@host>, or a subject tag [CODE], among the returned headers.
RETURNED_CODE = re.compile(r"^(?:Message-ID:\s*<(FX[0-9A-Z]{6})\.([a-z2-7]{16})\b|Subject:.*?\[(FX[0-9A-Z]{6})\])",
                           re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Bounce:
    action: str  # failed, delayed, delivered, relayed, expanded
    status: str  # e.g. 5.1.1
    diagnostic: str
    recipient: str
    job_code: str | None
    job_secret: str | None = None  # as the bounce presents it; correlation compares it with the job's


# A part header, at the start of a line (CRLF, LF or a classic Mac's CR), maybe folded.
_DELIVERY_STATUS_PART = re.compile(rb"(?:\A|[\r\n])content-type:[ \t]*(?:[\r\n]+[ \t]+)?message/delivery-status\b",
                                   re.IGNORECASE)


def is_dsn(mail: ParsedMail) -> bool:
    """A delivery status notification, or something that holds one.

    Besides multipart/report (RFC 3462), MTAs and filters send the
    message/delivery-status part in a multipart/mixed (McAfee, OpenSMTPD),
    forget the report-type, or wrap the whole report (Domino): any mail with
    a message/delivery-status part is read as a DSN, and parse_bounce()
    decides whether it has a per-recipient block.
    """
    if mail.content_type == "multipart/report" and "delivery-status" in mail.headers.get("content-type", "").lower():
        return True
    # The pattern tries every line start; most mail has no "delivery-status" anywhere (ASCII case, as the pattern's).
    return b"delivery-status" in mail.raw.lower() and _DELIVERY_STATUS_PART.search(mail.raw) is not None


def parse_bounce(mail: ParsedMail, envelope_rcpts: tuple[str, ...] = ()) -> Bounce | None:
    """The first per-recipient block of a DSN, with the job code it concerns; None if not a DSN.

    Real MTAs bend RFC 3464 (see the corpus under ../shared/corpus/bounces):
    the per-recipient fields may sit in the per-message block (no blank line
    between them), a Diagnostic-Code may go on over lines that are not
    folded, and a report may carry more than one message/delivery-status
    part, the first of them free text. So the fields are read leniently, and
    the recipient block is the first block, in any delivery-status part, that
    has an Action (or else a Status).
    """
    try:
        message = email.message_from_bytes(mail.raw, policy=email.policy.compat32)
        blocks = [block for part in message.walk() if part.get_content_type() == "message/delivery-status"
                  for block in _blocks(part)]
    except Exception:
        return None
    first = next((b for b in blocks if b.get("action")), None) or next((b for b in blocks if b.get("status")), None)
    if first is None:
        return None
    code, secret = _job_code(message, mail, envelope_rcpts)
    return Bounce(
        action=first.get("action", "").split()[0].lower() if first.get("action", "").split() else "",
        status=first.get("status", "").split()[0] if first.get("status", "").split() else "",
        diagnostic=" ".join(first.get("diagnostic-code", "").split()),
        recipient=first.get("final-recipient", first.get("original-recipient", "")).split(";")[-1].strip(" <>"),
        job_code=code, job_secret=secret,
    )


_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)")


def _blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of one message/delivery-status part, read leniently (names lower-case)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        # The email package has split the part into blocks already; a line that is
        # not a field ended a block's fields and the rest of the block became its body.
        texts = []
        for block in payload:
            if not isinstance(block, Message):
                continue
            lines = [f"{name}: {value}" for name, value in block.items()]
            body = block.get_payload()
            if isinstance(body, str) and body.strip():
                lines.append(body)
            texts.append("\n".join(lines))
        text = "\n\n".join(texts)
    else:
        raw = part.get_payload(decode=True)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload or "")
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        field = None if line[0] in " \t" else _FIELD.fullmatch(line.rstrip())
        if field is not None:
            last = field[1].lower()
            if last in current:  # a field again: the next block began without a blank line
                blocks.append(current)
                current = {}
            current[last] = field[2].strip()
        elif last is not None:  # a folded line, or one an MTA forgot to indent
            current[last] = f"{current[last]} {line.strip()}".strip()
    if current:
        blocks.append(current)
    return blocks


def _job_code(message: Message, mail: ParsedMail, envelope_rcpts: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(code, secret) where the bounce names them: the return path it was sent to, else the returned headers.

    A code with its secret wins over a code alone, wherever each is found.
    """
    found: tuple[str | None, str | None] = (None, None)
    for address in (*envelope_rcpts, *mail.to_addrs, mail.headers.get("delivered-to", ""),
                    mail.headers.get("x-original-to", "")):
        match = RETURN_CODE.search(address or "")
        if match and match[2]:
            return match[1].upper(), match[2].lower()
        if match and found[0] is None:
            found = (match[1].upper(), None)
    for part in message.walk():
        if part.get_content_type() in ("text/rfc822-headers", "message/rfc822"):
            payload = part.get_payload(decode=False)
            text = payload if isinstance(payload, str) else "".join(str(p) for p in payload or [])
            for match in RETURNED_CODE.finditer(text):
                if match[1]:
                    return match[1].upper(), match[2].lower()
                if found[0] is None:
                    found = (match[3].upper(), None)
    return found


def bounce_report(mail: ParsedMail, bounce: Bounce) -> StatusReport:
    """A failed bounce fails its job; anything else is informational (result None)."""
    failed = bounce.action == "failed"
    detail = " ".join(part for part in (bounce.action, bounce.status, bounce.diagnostic) if part)
    return StatusReport(
        channel=Channel.BOUNCE, trust=Trust.UNTRUSTED, raw=mail.raw.decode("utf-8", "replace"),
        result=Result.FAILED if failed else None, result_text=detail, reason="bounced" if failed else None,
        job_code=bounce.job_code, job_secret=bounce.job_secret, dedup_key=dedup_key("mail", *mail.identity()), rule="dsn",
        notes=() if failed else (f"informational DSN: {detail}",),
    )
