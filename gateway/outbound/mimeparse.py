"""MIME read from its bytes: header blocks and fields, RFC 2047 values, and the quick parse.

`parse()` gives the tree email.message_from_bytes (compat32) gives, reading
only the header blocks and finding the parts of a multipart by their
delimiter lines; a leaf's body becomes its payload unread (tests compare the
two trees on the corpus and on generated hostile MIME). The helpers for raw
header blocks (`split`, `header_fields`, `field_value`) are shared by the
facts (mime.py), the winmail.dat splice (winmail.py) and the forwarder's
header rewrite.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
# The tail of a multipart delimiter line after "--boundary" (RFC 2046 5.1.1): "--" if it is the last one,
# optional white space, a line end (or the end of the entity).
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:\r\n|\r|\n|\Z)")
FAST_DEPTH = 20  # MIME nesting the quick parse reads; deeper goes to the email package
INLINE_HEADER_BYTES = 32 * 1024  # inline_budget(): header bytes of all parts together...
INLINE_PARTS = 64  # ...and parts read on the event loop...
INLINE_DELIMITERS = 256  # ...and lines starting like a delimiter looked at


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


def parse(raw: bytes) -> Message:
    """The message as email.message_from_bytes (compat32) reads it, without reading every body line.

    The email package feeds a message through its parser line by line: 4 ms
    for a 200 KB attachment (2,700 base64 lines), the largest cost of taking
    a fax. The quick path parses only the header blocks and finds the parts
    of a multipart by its delimiter lines, as the email package does (see
    body_parts); a leaf's body becomes its payload unread. Anything the
    quick path would have to interpret (defects, a missing delimiter,
    message/* parts, digests, deep nesting) is left to the email package,
    so both give the same tree (tests compare them on the corpus and on
    generated hostile MIME).
    """
    try:
        return quick_entity(raw, 0, len(raw), 0)
    except Exception:  # Unusual, or a header the email package itself would stumble over
        return email.message_from_bytes(raw, policy=email.policy.compat32)


class Unusual(Exception):
    """A message whose structure the quick parse leaves to the email package."""


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


@dataclass(slots=True)
class Budget:
    """What mime.inspect_inline() lets the quick parse do on the event loop: header bytes, parts, delimiter lines."""

    header_bytes: int
    parts: int
    delimiters: int

    def spend(self, header_bytes: int) -> None:
        self.header_bytes -= header_bytes
        self.parts -= 1
        if self.header_bytes < 0 or self.parts < 0:
            raise Unusual

    def delimiter(self) -> None:
        """One line that starts like a delimiter: a body full of them is hostile, read in a worker thread."""
        self.delimiters -= 1
        if self.delimiters < 0:
            raise Unusual


def inline_budget() -> Budget:
    return Budget(INLINE_HEADER_BYTES, INLINE_PARTS, INLINE_DELIMITERS)


def quick_entity(raw: bytes, start: int, end: int, depth: int, budget: Budget | None = None) -> Message:
    if depth > FAST_DEPTH:
        raise Unusual
    body = body_start(raw, start, end)
    if budget is not None:
        budget.spend(body - start)
    part = _HEADER_PARSER.parsebytes(raw[start:body])
    if part.defects or part.get_payload():  # e.g. a body line where a header should be
        raise Unusual
    maintype = part.get_content_maintype()
    if maintype == "multipart":
        boundary = part.get_boundary()
        encoding = part.get("content-transfer-encoding", "8bit").lower()
        if (not boundary or not boundary.isascii() or part.get_content_subtype() == "digest"
                or encoding not in ("7bit", "8bit", "binary")):
            raise Unusual  # the email package notes a defect, or reads the parts differently
        ranges, closed = body_parts(raw, body, end, boundary.encode("ascii"), budget)
        if not ranges or not closed:
            raise Unusual
        part.set_payload([quick_entity(raw, child_start, child_end, depth + 1, budget)
                          for child_start, child_end in ranges])
    elif maintype == "message":
        raise Unusual
    else:
        part.set_payload(raw[body:end].decode("ascii", "surrogateescape"))
    return part


def body_start(raw: bytes, start: int, end: int) -> int:
    """Where the body of the entity raw[start:end] begins (after its empty line)."""
    if raw.startswith(b"\r\n", start):
        return start + 2
    blank = raw.find(b"\r\n\r\n", start, end)
    return end if blank < 0 else blank + 4


def body_parts(raw: bytes, start: int, end: int, boundary: bytes,
                budget: Budget | None = None) -> tuple[list[tuple[int, int]], bool]:
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
    for line_start, line_end, closing in delimiters(raw, start, end, b"--" + boundary, budget):
        if part_start is not None and line_start == part_start:
            part_start = line_end  # a repeated delimiter line
            continue
        if part_start is not None:
            ranges.append((part_start, line_start - line_end_before(raw, line_start)))
        if closing:
            return ranges, True
        part_start = line_end
    if part_start is not None:
        ranges.append((part_start, max(part_start, end - line_end_before(raw, end))))
    return ranges, False


def delimiters(raw: bytes, start: int, end: int, marker: bytes,
                budget: Budget | None = None) -> Iterator[tuple[int, int, bool]]:
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


def line_end_before(raw: bytes, position: int) -> int:
    """The length of the line end that ends right before `position` (0, 1 or 2)."""
    if raw[max(0, position - 2):position] == b"\r\n":
        return 2
    return 1 if raw[position - 1:position] in (b"\r", b"\n") and position > 0 else 0
