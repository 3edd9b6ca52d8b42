"""Distinct copies of a pool of messages, so that a soak sends every message only once.

Building 100,000 PDFs up front would take minutes of CPU and gigabytes at
200 KB, so soak.py builds a pool with workload.build_pool and sends copy n
of pool entry n mod pool. Copy n carries n in its ids and in its PDF's
trailer /ID, so the sink tells losses and duplicates apart per message and
the duplicate guard's digest of the document differs per copy.
"""

from __future__ import annotations

import base64
import email
import email.policy
import io
from typing import Any

from .workload import Message


class Template:
    """One message of throughput.build_pool, from which any number of distinct copies are made.

    Copy n differs from every other copy in two places:
    - the head (header and text part): the pool message's id becomes
      "<id>-<n>" everywhere, so X-Bench-Id, Message-ID, Subject, the file
      name and the text are unique;
    - the PDF: the last 12 hex digits of the first trailer /ID become n.
      That field has a fixed width, so the PDF's xref offsets stay right and
      it stays valid. Only the one or two 57-byte base64 lines that hold the
      field are encoded again; the rest of the wire bytes are reused. So the
      decoded document, and any digest of it (the duplicate guard's), differs
      per copy too.
    """

    ID_MARK = b"/ID [<"
    LINE = 57  # bytes per base64 line (base64.encodebytes: 76 characters + CRLF on the wire)

    def __init__(self, message: Message) -> None:
        wire = message.wire
        self.message = message
        marker = b'.pdf"\r\n\r\n'
        start = wire.index(marker) + len(marker)  # the PDF's base64 lines start here
        end = wire.index(b"--", start)  # base64 has no "-": the closing boundary
        encoded = wire[start:end]
        pdf = base64.b64decode(encoded)
        if base64.encodebytes(pdf).replace(b"\n", b"\r\n") != encoded:
            raise ValueError("the PDF attachment is not laid out as base64.encodebytes writes it")
        at = pdf.rindex(self.ID_MARK) + len(self.ID_MARK)
        if pdf[at + 32: at + 33] != b">":
            raise ValueError("the PDF trailer /ID is not 32 hex digits")
        self.pdf = pdf
        self.field_at = at + 20  # 12 hex digits: room for 16**12 copies
        first, last = self.field_at // self.LINE, (self.field_at + 11) // self.LINE
        self.piece = (first * self.LINE, min(len(pdf), (last + 1) * self.LINE))  # PDF bytes re-encoded
        piece_wire = len(base64.encodebytes(pdf[self.piece[0]:self.piece[1]]).replace(b"\n", b"\r\n"))
        self.head = wire[:start]
        self.before = wire[start: start + first * 78]
        self.after = wire[start + first * 78 + piece_wire:]
        self.ident = message.ident.encode()

    def copy(self, n: int) -> Message:
        ident = b"%s-%07d" % (self.ident, n)
        head = self.head.replace(self.ident, ident)
        piece = bytearray(self.pdf[self.piece[0]:self.piece[1]])
        offset = self.field_at - self.piece[0]
        piece[offset: offset + 12] = b"%012x" % n
        lines = b"".join(base64.b64encode(piece[i: i + self.LINE]) + b"\r\n"
                         for i in range(0, len(piece), self.LINE))
        wire = head + self.before + lines + self.after
        return Message(ident=ident.decode(), rcpt=self.message.rcpt, wire=wire,
                          size=self.message.size + len(head) - len(self.head))


def copy_number(bench_id: str) -> int | None:
    """n from a copy's X-Bench-Id ("<pool id>-<n>")."""
    tail = bench_id.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def check_copies(templates: list[Template]) -> dict[str, Any]:
    """The copies are what they claim: valid MIME with a readable PDF whose bytes differ per copy."""
    import hashlib

    from pypdf import PdfReader

    copies = [templates[0].copy(n) for n in (0, 1, 123456)] + [templates[-1].copy(7)]
    digests, ids, pages = set(), set(), []
    for message in copies:
        raw = message.wire[:-3].replace(b"\r\n..", b"\r\n.")
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        parts = [p for p in parsed.walk() if p.get_content_type() == "application/pdf"]
        assert len(parts) == 1, "no PDF attachment in a copy"
        pdf = parts[0].get_payload(decode=True)
        pages.append(len(PdfReader(io.BytesIO(pdf), strict=True).pages))
        n = copy_number(message.ident)
        assert n is not None and b"%012x> <" % n in pdf, "the PDF trailer /ID does not carry the copy number"
        assert parsed["X-Bench-Id"] == message.ident, "X-Bench-Id not rewritten"
        digests.add(hashlib.sha256(pdf).hexdigest())
        ids.add(parsed["Message-ID"])
    assert len(digests) == len(copies) and len(ids) == len(copies), "copies are not all distinct"
    return {"copies_checked": len(copies), "pages": pages}
