"""What a fax email contains, and the rewrites for forwarding.

`inspect()` reads a message once for the policy (sender, subject, the
documents attached) and never raises. `rewrite_headers()` builds the copy
sent upstream: a new header block in front of the original body bytes,
which are never touched (DESIGN.md, "Sender identity"), with one exception:
`unwrap_tnef()` replaces each Outlook winmail.dat part by the documents
inside it (see tnef.py for why, and where it runs). It splices bytes: every
other part stays byte for byte as the client sent it. `refusal()` names what
made a message unreadable (MIME too deep, a winmail.dat that cannot be
unwrapped) before the content policy would misname it.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import email.utils
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message, MIMEPart

from gateway.outbound import tnef
from gateway.models import Attachment, MessageFacts, Refusal, Reply

# Headers the forwarded copy does not carry over: the addressing is replaced,
# and a signature over the changed headers would only fail verification.
DROPPED_HEADERS = frozenset(
    {b"from", b"to", b"cc", b"bcc", b"reply-to", b"subject", b"message-id", b"return-path",
     b"dkim-signature", b"sender", b"resent-to", b"resent-cc", b"resent-bcc"}
)
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
# Header fields of an entity that become a multipart when its winmail.dat body is unwrapped.
_CONTENT_FIELDS = frozenset({b"content-type", b"content-transfer-encoding", b"content-disposition"})
MAX_DEPTH = 100  # MIME nesting followed when looking for winmail.dat parts
# The tail of a multipart delimiter line after "--boundary" (RFC 2046 5.1.1): "--" if it is the last one,
# optional white space, a line end (or the end of the entity).
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\r|\n|\Z)")
FAST_DEPTH = 20  # MIME nesting inspect() reads by its quick path; deeper goes to the email package
INLINE_HEADER_BYTES = 32 * 1024  # inspect_inline(): header bytes of all parts together...
INLINE_PARTS = 64  # ...and parts it reads on the event loop...
INLINE_DELIMITERS = 256  # ...and lines starting like a delimiter it looks at


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


def storable(text: str) -> str:
    """Text as it can be stored and logged; SQLite takes no surrogates.

    The email package and aiosmtpd keep bytes that are not UTF-8 (a Latin-1
    HELO name or sender) as surrogate escapes; they become U+FFFD.
    """
    if text.isascii():
        return text
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        data = text.encode("utf-8", "replace")
    return data.decode("utf-8", "replace")


def decoded(value: str) -> str:
    """An RFC 2047 header value as text; never raises."""
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        return value


UNREADABLE = Reply(554, "5.6.0", "The message cannot be read as MIME ({problem}); attach the documents to a"
                                 " plain message")
UNPARSEABLE = "unparseable: "  # MessageFacts.defects entry when the email package gave up


def refusal(facts: MessageFacts) -> Refusal | None:
    """The refusal for a message that could not be read as the forwarder will send it, if any.

    A message the email package cannot parse (MIME nested a thousand
    levels deep) would otherwise be refused as having nothing to fax, and a
    winmail.dat that cannot be unwrapped as a type that cannot be faxed:
    both replies would name the wrong problem. (These are content checks,
    asked before Policy.check_content.)
    """
    for defect in facts.defects:
        if defect.startswith(UNPARSEABLE):
            problem = "its parts are nested too deep" if defect.endswith("RecursionError") else "it is malformed"
            return Refusal(Reply(UNREADABLE.code, UNREADABLE.enhanced, UNREADABLE.text.format(problem=problem)),
                           "mime")
    return tnef.refusal(facts)


def inspect(raw: bytes, *, quick: bool = True) -> MessageFacts:
    """Read the facts policy needs; broken MIME gives defects, never an exception.

    The documents of a winmail.dat count as the message's attachments, as
    the forwarder will send them; one that cannot be unwrapped stays listed
    as it is, with a "tnef-..." defect (tnef.refusal() turns it into a reply).
    `quick=False` always parses with the email package (tests compare the two).
    Can take a second on hostile MIME: the intake calls it in a worker thread
    unless inspect_inline() already answered.
    """
    try:
        message = parse(raw) if quick else email.message_from_bytes(raw, policy=email.policy.compat32)
        return _facts(raw, message)
    except Exception as exc:  # the stdlib parser is robust, but a fax must not be lost to a bug
        block, _body = split(raw)
        return MessageFacts(needs_8bitmime=not raw.isascii(), needs_smtputf8=not block.isascii(),
                            defects=(f"{UNPARSEABLE}{type(exc).__name__}",))


def inspect_inline(raw: bytes) -> MessageFacts | None:
    """inspect()'s facts when they take well under a millisecond to read, else None.

    That is when the quick parse reads the message within a small budget of
    header bytes and parts, and it has no winmail.dat to unwrap: the
    ordinary fax, read on the event loop without a hop to a worker thread
    (which cost more than the reading itself).
    """
    try:
        message = _quick_entity(raw, 0, len(raw), 0, _inline_budget())
        if any(_is_tnef(part) for part in message.walk()):
            return None
        return _facts(raw, message)
    except Exception:
        return None


def without_winmail(raw: bytes) -> bool:
    """True when the quick parse, within inspect_inline()'s budget, reads the message and finds no winmail.dat.

    The forwarder then builds the copy it sends on the event loop; anything
    else (a winmail.dat to unwrap, MIME the email package must read) it
    builds in a worker thread.
    """
    try:
        message = _quick_entity(raw, 0, len(raw), 0, _inline_budget())
    except Exception:
        return False
    return not any(_is_tnef(part) for part in message.walk())


def _facts(raw: bytes, message: Message) -> MessageFacts:
    block, _body = split(raw)
    header_from = storable(email.utils.parseaddr(decoded(str(message.get("From", ""))))[1])
    subject = storable(decoded(str(message.get("Subject", ""))))
    attachments = tuple(_documents(message))
    defects = tuple(type(defect).__name__ for part in message.walk() for defect in part.defects)
    if any(_is_tnef(part) for part in message.walk()):
        try:
            unwrapped = unwrap_tnef(raw, message)
            if unwrapped is None:  # a part the byte ranges cannot be matched to
                raise tnef.TnefError("layout", "the winmail.dat part cannot be located in the message")
        except tnef.TnefError as exc:
            defects += (tnef.DEFECT_PREFIX + exc.kind,)
        else:
            rewritten = email.message_from_bytes(unwrapped.raw, policy=email.policy.compat32)
            attachments = tuple(_documents(rewritten))
    return MessageFacts(
        header_from=header_from, subject=subject, attachments=attachments,
        needs_8bitmime=not raw.isascii(), needs_smtputf8=not block.isascii(), defects=defects,
    )


def parse(raw: bytes) -> Message:
    """The message as email.message_from_bytes (compat32) reads it, without reading every body line.

    The email package feeds a message through its parser line by line: 4 ms
    for a 200 KB attachment (2,700 base64 lines), the largest cost of taking
    a fax. The quick path parses only the header blocks and finds the parts
    of a multipart by its delimiter lines, as the email package does (see
    _body_parts); a leaf's body becomes its payload unread. Anything the
    quick path would have to interpret (defects, a missing delimiter,
    message/* parts, digests, deep nesting) is left to the email package,
    so both give the same tree (tests compare them on the corpus and on
    generated hostile MIME).
    """
    try:
        return _quick_entity(raw, 0, len(raw), 0)
    except Exception:  # _Unusual, or a header the email package itself would stumble over
        return email.message_from_bytes(raw, policy=email.policy.compat32)


class _Unusual(Exception):
    """A message whose structure the quick parse leaves to the email package."""


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


@dataclass(slots=True)
class _Budget:
    """What inspect_inline() lets the quick parse do on the event loop: header bytes, parts, delimiter lines."""

    header_bytes: int
    parts: int
    delimiters: int

    def spend(self, header_bytes: int) -> None:
        self.header_bytes -= header_bytes
        self.parts -= 1
        if self.header_bytes < 0 or self.parts < 0:
            raise _Unusual

    def delimiter(self) -> None:
        """One line that starts like a delimiter: a body full of them is hostile, read in a worker thread."""
        self.delimiters -= 1
        if self.delimiters < 0:
            raise _Unusual


def _inline_budget() -> _Budget:
    return _Budget(INLINE_HEADER_BYTES, INLINE_PARTS, INLINE_DELIMITERS)


def _quick_entity(raw: bytes, start: int, end: int, depth: int, budget: _Budget | None = None) -> Message:
    if depth > FAST_DEPTH:
        raise _Unusual
    body = _body_start(raw, start, end)
    if budget is not None:
        budget.spend(body - start)
    part = _HEADER_PARSER.parsebytes(raw[start:body])
    if part.defects or part.get_payload():  # e.g. a body line where a header should be
        raise _Unusual
    maintype = part.get_content_maintype()
    if maintype == "multipart":
        boundary = part.get_boundary()
        encoding = part.get("content-transfer-encoding", "8bit").lower()
        if (not boundary or not boundary.isascii() or part.get_content_subtype() == "digest"
                or encoding not in ("7bit", "8bit", "binary")):
            raise _Unusual  # the email package notes a defect, or reads the parts differently
        ranges, closed = _body_parts(raw, body, end, boundary.encode("ascii"), budget)
        if not ranges or not closed:
            raise _Unusual
        part.set_payload([_quick_entity(raw, child_start, child_end, depth + 1, budget)
                          for child_start, child_end in ranges])
    elif maintype == "message":
        raise _Unusual
    else:
        part.set_payload(raw[body:end].decode("ascii", "surrogateescape"))
    return part


def document_parts(message: Message) -> Iterator[Message]:
    """The parts that are documents to fax, as opposed to the body text and inline images."""
    # Only the parts inside a multipart/related can be shown by its HTML body;
    # a part after it (a sibling, not a child) is judged like any other.
    in_related = {
        id(inner) for part in message.walk() if part.get_content_type() == "multipart/related"
        for inner in part.walk()
    }
    for part in message.walk():
        if part.is_multipart():
            continue
        disposition = (part.get_content_disposition() or "").lower()
        body = part.get_content_type() in ("text/plain", "text/html") or part is message
        if body and disposition != "attachment" and not decoded(part.get_filename() or ""):
            continue  # the body: GreenFax may make a cover page of it
        if disposition != "attachment" and part.get("Content-ID") and id(part) in in_related:
            continue  # an image the HTML body shows, not a document
        yield part


def _documents(message: Message) -> list[Attachment]:
    documents = []
    for part in document_parts(message):
        content_type = part.get_content_type()
        filename = decoded(part.get_filename() or "")
        payload = part.get_payload(decode=False)
        size = len(payload) if isinstance(payload, (str, bytes)) else 0
        documents.append(Attachment(content_type=content_type, filename=filename, size=size))
    return documents


# --- winmail.dat --------------------------------------------------------------------------


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


def _is_tnef(part: Message) -> bool:
    return not part.is_multipart() and tnef.is_tnef(part.get_content_type(), decoded(part.get_filename() or ""))


def unwrap_tnef(raw: bytes, message: Message | None = None) -> Unwrapped | None:
    """The message with every winmail.dat part replaced by its documents; None if it has none.

    Raises tnef.TnefError when one cannot be unwrapped: damaged, holding no
    document, or in a MIME layout whose bytes cannot be matched to its parts.
    `message` is `raw` as already parsed (compat32), if the caller has it.
    """
    if message is None:
        message = parse(raw)
    if not any(_is_tnef(part) for part in message.walk()):
        return None
    try:
        targets = [span for span in _spans(raw, message, 0, len(raw), None, 0) if _is_tnef(span.part)]
    except RecursionError as exc:
        raise tnef.TnefError("layout", "MIME nested too deep") from exc
    if not targets:
        return None
    count = 0
    # From the end backwards, so the offsets of the parts before stay right.
    for span in reversed(targets):
        original = email.message_from_bytes(raw[span.start:span.end], policy=email.policy.compat32)
        if original.get_payload() != span.part.get_payload():
            raise tnef.TnefError("layout", "the winmail.dat part cannot be located in the message")
        payload = span.part.get_payload(decode=True)
        documents = tnef.documents(payload if isinstance(payload, bytes) else b"")
        if not documents:
            raise tnef.TnefError("empty", "the winmail.dat holds no document")
        raw = raw[:span.start] + _replacement(raw[span.start:span.end], span, documents) + raw[span.end:]
        count += len(documents)
    rewritten = email.message_from_bytes(raw, policy=email.policy.compat32)
    if any(_is_tnef(part) for part in rewritten.walk()):
        raise tnef.TnefError("layout", "a winmail.dat inside the winmail.dat")
    return Unwrapped(raw=raw, documents=count)


def _spans(raw: bytes, part: Message, start: int, end: int, boundary: bytes | None, depth: int) -> Iterator[_Span]:
    """Every entity of the message with its byte range, found the way the email package parses it."""
    yield _Span(part, start, end, boundary)
    if not part.is_multipart():
        return
    if depth >= MAX_DEPTH:
        raise tnef.TnefError("layout", "MIME nested too deep")
    body = _body_start(raw, start, end)
    children = part.get_payload()
    if part.get_content_maintype() == "multipart":
        inner = (part.get_boundary() or "").encode("ascii", "surrogateescape")
        ranges, _closed = _body_parts(raw, body, end, inner)
        if not inner or len(ranges) != len(children):
            raise tnef.TnefError("layout", "the MIME parts cannot be matched to the message's bytes")
        for child, (child_start, child_end) in zip(children, ranges, strict=True):
            yield from _spans(raw, child, child_start, child_end, inner, depth + 1)
    elif part.get_content_type() != "message/delivery-status" and len(children) == 1:
        # message/rfc822 and the like: the body is one whole message.
        yield from _spans(raw, children[0], body, end, None, depth + 1)


def _body_start(raw: bytes, start: int, end: int) -> int:
    """Where the body of the entity raw[start:end] begins (after its empty line)."""
    if raw.startswith(b"\r\n", start):
        return start + 2
    blank = raw.find(b"\r\n\r\n", start, end)
    return end if blank < 0 else blank + 4


def _body_parts(raw: bytes, start: int, end: int, boundary: bytes,
                budget: _Budget | None = None) -> tuple[list[tuple[int, int]], bool]:
    """The byte ranges of a multipart body's parts, read as Python's email parser reads them (RFC 2046 5.1.1),
    and whether the closing delimiter came.

    A delimiter line is "--boundary", then "--" for the last one, then
    optional white space; the line end before it belongs to the delimiter.
    Delimiter lines right after one another make no empty part. A part
    after which no closing delimiter comes runs to the end, less its last
    line end.
    """
    if not boundary:
        return [], False
    ranges: list[tuple[int, int]] = []
    part_start: int | None = None
    for line_start, line_end, closing in _delimiters(raw, start, end, b"--" + boundary, budget):
        if part_start is not None and line_start == part_start:
            part_start = line_end  # a repeated delimiter line
            continue
        if part_start is not None:
            ranges.append((part_start, line_start - _line_end_before(raw, line_start)))
        if closing:
            return ranges, True
        part_start = line_end
    if part_start is not None:
        ranges.append((part_start, max(part_start, end - _line_end_before(raw, end))))
    return ranges, False


def _delimiters(raw: bytes, start: int, end: int, marker: bytes,
                budget: _Budget | None = None) -> Iterator[tuple[int, int, bool]]:
    """Each delimiter line in raw[start:end]: its start, its end (after its line end), and if it is the last.

    A delimiter starts a line (at the start of the message or after a LF,
    like a multi-line regex's ^). Found with bytes.find of LF + marker, so
    only line starts are looked at: a regex that anchored each try at a
    line start took 1.6 ms on a 200 KB message.
    """
    position = start
    while True:
        if position == 0 and raw.startswith(marker):
            found = 0
        else:
            hit = raw.find(b"\n" + marker, max(position - 1, 0), end)
            if hit < 0:
                return
            found = hit + 1
        if budget is not None:
            budget.delimiter()
        tail = _DELIMITER_TAIL.match(raw, found + len(marker), end)
        if tail is not None:
            yield found, tail.end(), tail[1] is not None
            position = tail.end()
        else:
            position = found + 1


def _line_end_before(raw: bytes, position: int) -> int:
    """The length of the line end that ends right before `position` (0, 1 or 2)."""
    if raw[max(0, position - 2):position] == b"\r\n":
        return 2
    return 1 if raw[position - 1:position] in (b"\r", b"\n") and position > 0 else 0


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


# --- forwarding ---------------------------------------------------------------------------


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
