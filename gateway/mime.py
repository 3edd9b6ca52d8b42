"""What a fax email contains, and the header rewrite for forwarding.

`inspect()` reads a message once for the policy (sender, subject, the
documents attached) and never raises. `rewrite_headers()` builds the copy
sent upstream: a new header block in front of the original body bytes,
which are never touched (DESIGN.md, "Sender identity").
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.header import decode_header, make_header
from email.message import Message

from gateway.models import Attachment, MessageFacts

# Headers the forwarded copy does not carry over: the addressing is replaced,
# and a signature over the changed headers would only fail verification.
DROPPED_HEADERS = frozenset(
    {b"from", b"to", b"cc", b"bcc", b"reply-to", b"subject", b"message-id", b"return-path",
     b"dkim-signature", b"sender", b"resent-to", b"resent-cc", b"resent-bcc"}
)
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def split(raw: bytes) -> tuple[bytes, bytes]:
    """Split a message into its header block (ending in CRLF) and body (from the blank line on)."""
    if raw.startswith(b"\r\n"):
        return b"", raw
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw if raw.endswith(b"\r\n") else raw + b"\r\n", b""
    return raw[: end + 2], raw[end + 2 :]


def header_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """The header block as (lower-case name, raw field bytes incl. folded lines and CRLF)."""
    fields: list[tuple[bytes, bytes]] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
            continue
        match = _FIELD_NAME.match(line)
        fields.append((match[1].lower() if match else b"", line))
    return fields


def field_value(raw_field: bytes) -> bytes:
    """The value of a raw header field, without its name and final CRLF."""
    return raw_field.split(b":", 1)[1].strip(b" \t").rstrip(b"\r\n")


def decoded(value: str) -> str:
    """An RFC 2047 header value as text; never raises."""
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        return value


def inspect(raw: bytes, *, allowed_inline_types: frozenset[str] = frozenset()) -> MessageFacts:
    """Read the facts policy needs; broken MIME gives defects, never an exception."""
    block, _body = split(raw)
    needs_smtputf8 = not block.isascii()
    needs_8bitmime = not raw.isascii()
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        header_from = email.utils.parseaddr(decoded(str(message.get("From", ""))))[1]
        subject = decoded(str(message.get("Subject", "")))
        attachments = tuple(_documents(message))
        defects = tuple(type(defect).__name__ for part in message.walk() for defect in part.defects)
    except Exception as exc:  # the stdlib parser is robust, but a fax must not be lost to a bug
        return MessageFacts(needs_8bitmime=needs_8bitmime, needs_smtputf8=needs_smtputf8,
                            defects=(f"unparseable: {type(exc).__name__}",))
    return MessageFacts(
        header_from=header_from, subject=subject, attachments=attachments,
        needs_8bitmime=needs_8bitmime, needs_smtputf8=needs_smtputf8, defects=defects,
    )


def _documents(message: Message) -> list[Attachment]:
    """The parts that are documents to fax, as opposed to the body text and inline images."""
    documents = []
    # Only the parts inside a multipart/related can be shown by its HTML body;
    # a part after it (a sibling, not a child) is judged like any other.
    in_related = {
        id(inner) for part in message.walk() if part.get_content_type() == "multipart/related"
        for inner in part.walk()
    }
    for part in message.walk():
        if part.is_multipart():
            continue
        content_type = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = decoded(part.get_filename() or "")
        if disposition != "attachment" and not filename:
            if content_type in ("text/plain", "text/html") or part is message:
                continue  # the body: GreenFax may make a cover page of it
        if disposition != "attachment" and part.get("Content-ID") and id(part) in in_related:
            continue  # an image the HTML body shows, not a document
        payload = part.get_payload(decode=False)
        size = len(payload) if isinstance(payload, (str, bytes)) else 0
        documents.append(Attachment(content_type=content_type, filename=filename, size=size))
    return documents


def rewrite_headers(
    raw: bytes, *, code: str, to_address: str, account_sender: str, received: str,
    message_id: str, subject_tag: str | None, code_header: str | None, date: str,
) -> bytes:
    """The message as forwarded upstream: new header block, original body bytes.

    From becomes the account's registered sender and the original From moves
    to Reply-To; To is the one fax address; Cc and Bcc are dropped; the job
    code goes where the rules place it.
    """
    block, body = split(raw)
    kept: list[bytes] = []
    original_from = b""
    subject = b""
    has_date = False
    for name, field in header_fields(block):
        if name == b"from":
            original_from = field_value(field)
        elif name == b"subject":
            subject = field_value(field)
        elif name == b"date":
            has_date = True
        if name in DROPPED_HEADERS or (code_header and name == code_header.lower().encode()):
            continue
        kept.append(field)
    head = [
        f"Received: {received}\r\n".encode(),
        f"From: {account_sender}\r\n".encode(),
        f"To: {to_address}\r\n".encode(),
    ]
    if original_from:
        head.append(b"Reply-To: " + original_from + b"\r\n")
    if subject_tag:
        tag = subject_tag.encode()
        head.append(b"Subject: " + (tag + b" " + subject if subject else tag) + b"\r\n")
    elif subject:
        head.append(b"Subject: " + subject + b"\r\n")
    if code_header:
        head.append(f"{code_header}: {code}\r\n".encode())
    head.append(f"Message-ID: {message_id}\r\n".encode())
    if not has_date:
        head.append(f"Date: {date}\r\n".encode())
    if not body:
        body = b"\r\n"
    return b"".join(head) + b"".join(kept) + body
