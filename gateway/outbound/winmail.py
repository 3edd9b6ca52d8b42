"""Outlook's winmail.dat spliced out: each such part replaced by the documents inside it.

GreenFax cannot fax a winmail.dat (see tnef.py for why, and where this
runs). `unwrap_tnef()` splices bytes: every other part stays byte for byte
as the client sent it, and the byte ranges of the parts are found the way
the email package parses them (mimeparse.body_parts).
"""

from __future__ import annotations

import email
import email.policy
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message, MIMEPart

from gateway.errors import TnefError
from gateway.outbound import tnef
from gateway.outbound.mimeparse import (
    body_parts,
    body_start,
    decoded,
    header_fields,
    inline_budget,
    parse,
    quick_entity,
    split,
)

MAX_DEPTH = 100  # MIME nesting followed when looking for winmail.dat parts
# Header fields of an entity that become a multipart when its winmail.dat body is unwrapped.
_CONTENT_FIELDS = frozenset({b"content-type", b"content-transfer-encoding", b"content-disposition"})


@dataclass(frozen=True, slots=True)
class Unwrapped:
    """A message whose winmail.dat parts were replaced by the documents inside them."""

    raw: bytes
    documents: int  # how many documents came out of the winmail.dat parts

    @property
    def note(self) -> str:
        """The job event that records the rewrite (no file names: DESIGN.md, "Privacy")."""
        return f"winmail.dat unwrapped: {self.documents} document{'s' if self.documents != 1 else ''}"


@dataclass(frozen=True, slots=True)
class _Span:
    """Where one MIME entity's bytes are in the message, and the boundary of the multipart around it."""

    part: Message
    start: int
    end: int
    boundary: bytes | None  # None: the entity is a message's root, not a body part


def is_winmail(part: Message) -> bool:
    return not part.is_multipart() and tnef.is_tnef(part.get_content_type(), decoded(part.get_filename() or ""))


def unwrap_tnef(raw: bytes, message: Message | None = None) -> Unwrapped | None:
    """The message with every winmail.dat part replaced by its documents; None if it has none.

    Raises TnefError when one cannot be unwrapped: damaged, holding no
    document, or in a MIME layout whose bytes cannot be matched to its parts.
    `message` is `raw` as already parsed (compat32), if the caller has it.
    """
    if message is None:
        message = parse(raw)
    if not any(is_winmail(part) for part in message.walk()):
        return None
    try:
        targets = [span for span in _spans(raw, message, 0, len(raw), None, 0) if is_winmail(span.part)]
    except RecursionError as exc:
        raise TnefError("layout", "MIME nested too deep") from exc
    if not targets:
        return None
    count = 0
    # From the end backwards, so the offsets of the parts before stay right.
    for span in reversed(targets):
        original = email.message_from_bytes(raw[span.start:span.end], policy=email.policy.compat32)
        if original.get_payload() != span.part.get_payload():
            raise TnefError("layout", "the winmail.dat part cannot be located in the message")
        payload = span.part.get_payload(decode=True)
        documents = tnef.documents(payload if isinstance(payload, bytes) else b"")
        if not documents:
            raise TnefError("empty", "the winmail.dat holds no document")
        raw = raw[:span.start] + _replacement(raw[span.start:span.end], span, documents) + raw[span.end:]
        count += len(documents)
    rewritten = email.message_from_bytes(raw, policy=email.policy.compat32)
    if any(is_winmail(part) for part in rewritten.walk()):
        raise TnefError("layout", "a winmail.dat inside the winmail.dat")
    return Unwrapped(raw=raw, documents=count)


def _spans(raw: bytes, part: Message, start: int, end: int, boundary: bytes | None, depth: int) -> Iterator[_Span]:
    """Every entity of the message with its byte range, found the way the email package parses it."""
    yield _Span(part, start, end, boundary)
    if not part.is_multipart():
        return
    if depth >= MAX_DEPTH:
        raise TnefError("layout", "MIME nested too deep")
    body = body_start(raw, start, end)
    children = part.get_payload()
    if part.get_content_maintype() == "multipart":
        inner = (part.get_boundary() or "").encode("ascii", "surrogateescape")
        ranges, _closed = body_parts(raw, body, end, inner)
        if not inner or len(ranges) != len(children):
            raise TnefError("layout", "the MIME parts cannot be matched to the message's bytes")
        for child, (child_start, child_end) in zip(children, ranges, strict=True):
            yield from _spans(raw, child, child_start, child_end, inner, depth + 1)
    elif part.get_content_type() != "message/delivery-status" and len(children) == 1:
        # message/rfc822 and the like: the body is one whole message.
        yield from _spans(raw, children[0], body, end, None, depth + 1)


def _replacement(entity: bytes, span: _Span, documents: list[tnef.Document]) -> bytes:
    """The bytes that take a winmail.dat entity's place: its documents as ordinary attachments.

    In a multipart they become sibling parts; as the root of a message the
    entity becomes a multipart/mixed of them, its other header fields kept.
    """
    parts = [_document_part(document) for document in documents]
    if span.boundary is not None:
        return (b"\r\n--" + span.boundary + b"\r\n").join(parts)
    block, _body = split(entity)
    kept = [field for name, field in header_fields(block) if name not in _CONTENT_FIELDS]
    # "_" is not in the base64 alphabet, so no line of a document can look like this boundary.
    boundary = b"=_faxgw_" + secrets.token_hex(12).encode()
    head = b"".join(kept) + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n'
    if not any(name == b"mime-version" for name, _field in header_fields(block)) and span.start == 0:
        head += b"MIME-Version: 1.0\r\n"
    separator = b"--" + boundary + b"\r\n"
    return head + b"\r\n" + separator + (b"\r\n" + separator).join(parts) + b"\r\n--" + boundary + b"--\r\n"


def _document_part(document: tnef.Document) -> bytes:
    """One document as a base64 attachment part, without the line end that ends it."""
    part = MIMEPart(policy=email.policy.SMTP)
    maintype, _, subtype = document.content_type.partition("/")
    part.set_content(document.data, maintype, subtype, disposition="attachment", filename=document.filename,
                     params={"name": document.filename})
    for name in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition"):  # the usual order
        value = part[name]
        del part[name]
        part[name] = value
    data = part.as_bytes(policy=email.policy.SMTP)
    return data[:-2] if data.endswith(b"\r\n") else data


def without_winmail(raw: bytes) -> bool:
    """True when the quick parse, within mime.inspect_inline()'s budget, reads the message and finds no winmail.dat.

    The forwarder then builds the copy it sends on the event loop; anything
    else (a winmail.dat to unwrap, MIME the email package must read) it
    builds in a worker thread.
    """
    try:
        message = quick_entity(raw, 0, len(raw), 0, inline_budget())
    except Exception:
        return False
    return not any(is_winmail(part) for part in message.walk())
