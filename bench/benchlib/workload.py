"""The workload: real MIME fax emails, each a text body and a base64 PDF of noise images.

A page is a 1728-pixel-wide 1-bit noise image, like a scanned page, with a
line of text naming the document; no two messages are the same. The pool
is built before a measurement starts, so building it never counts in the
timing. Messages are kept dot-stuffed, as they go on the wire after DATA.
"""

from __future__ import annotations

import base64
import random
import re
import time
from dataclasses import dataclass
from typing import Any

ACCOUNT_SENDER = "faxes@office.example"
RETURN_PATH = "fax-bounce@gw.office.example"
ENVELOPE_SENDER = "erp@legacy.example"

SIZES = {"2k": 2_000, "200k": 200_000}

FAX_WIDTH = 1728  # pixels per line of a standard-resolution fax page
ROW_BYTES = FAX_WIDTH // 8  # one line of a 1-bit image


class _PdfObjects:
    """The numbered objects of a PDF being built (1-based, as PDF numbers them)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def add(self, body: bytes) -> int:
        self.bodies.append(body)
        return len(self.bodies)

    def set(self, number: int, body: bytes) -> None:
        self.bodies[number - 1] = body


def _add_page(objects: _PdfObjects, rng: random.Random, *, parent: int, font: int, rows: int, text: bytes) -> int:
    """One page: a `rows`-line noise image (none for 0) above a line of text; returns the page's object."""
    resources = b"/Font << /F1 %d 0 R >>" % font
    draw = b""
    if rows:
        data = rng.randbytes(rows * ROW_BYTES)
        image = objects.add(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray"
                            b" /BitsPerComponent 1 /Length %d >>\nstream\n%s\nendstream"
                            % (FAX_WIDTH, rows, len(data), data))
        resources += b" /XObject << /Im1 %d 0 R >>" % image
        height = 612 * rows / FAX_WIDTH
        draw = b"q 612 0 0 %.2f 0 %.2f cm /Im1 Do Q\n" % (height, 792 - 80 - height)
    stream = draw + b"BT /F1 11 Tf 72 760 Td " + text + b" ET\n"
    content = objects.add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    return objects.add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Resources << %s >>"
                       b" /Contents %d 0 R >>" % (parent, resources, content))


def _serialize(objects: _PdfObjects, rng: random.Random, *, catalog: int, info: int) -> bytes:
    """The file: header, objects, cross-reference table and a trailer with a random /ID."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects.bodies, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    count = len(objects.bodies) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % count
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    doc_id = rng.randbytes(16).hex().encode()
    out += (b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R /ID [<%s> <%s>] >>\nstartxref\n%d\n%%%%EOF\n"
            % (count, catalog, info, doc_id, doc_id, xref))
    return bytes(out)


def make_pdf(rng: random.Random, ident: str, image_rows: list[int]) -> bytes:
    """A valid PDF: one page per entry of image_rows, each a 1-bit 1728-wide noise image
    (like a scanned page; 0 rows = text only) plus a line of text naming the document."""
    objects = _PdfObjects()
    catalog = objects.add(b"")  # filled in below
    pages = objects.add(b"")
    font = objects.add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = [_add_page(objects, rng, parent=pages, font=font, rows=rows,
                      text=f"({ident} page {number} of {len(image_rows)}) Tj".encode())
            for number, rows in enumerate(image_rows, start=1)]
    info = objects.add(b"<< /Title (Invoice %s) /Author (ERP export) /Producer (greenfax-gateway bench)"
                       b" /CreationDate (D:%s) >>" % (ident.encode(), time.strftime("%Y%m%d%H%M%S").encode()))
    objects.set(catalog, b"<< /Type /Catalog /Pages %d 0 R >>" % pages)
    objects.set(pages, b"<< /Type /Pages /Kids [%s] /Count %d >>"
                % (b" ".join(b"%d 0 R" % k for k in kids), len(kids)))
    return _serialize(objects, rng, catalog=catalog, info=info)


def make_message(seq: int, ident: str, image_rows: list[int], rng: random.Random) -> tuple[str, bytes]:
    """A fax email as a legacy ERP sends it (CRLF, text body + base64 PDF); returns (recipient, bytes)."""
    number = f"1212555{100 + seq % 100:04d}"  # +1 212 555 01xx: valid-looking, no sandbox fault/outcome code
    pdf = make_pdf(rng, ident, image_rows)
    boundary = f"===============bench{rng.getrandbits(64):016x}=="
    encoded = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    text = (f"Dear customer,\r\n\r\nplease find invoice {ident} attached ({len(image_rows)} page(s)).\r\n"
            f"Amount due: {rng.randint(10, 99999) / 100:.2f} EUR.\r\n\r\n-- \r\nAccounts department\r\n")
    head = (
        f"From: Accounts <{ACCOUNT_SENDER}>\r\n"
        f"To: {number}@greenfax.com\r\n"
        f"Subject: Invoice {ident}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <{ident}.{seq}@erp.legacy.example>\r\n"
        f"X-Bench-Id: {ident}\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        f"\r\n"
        f"--{boundary}\r\n"
        f'Content-Type: text/plain; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: 7bit\r\n"
        f"\r\n{text}\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: application/pdf\r\n"
        f"Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="invoice-{ident}.pdf"\r\n'
        f"\r\n"
    ).encode()
    return f"{number}@greenfax.com", head + encoded + f"--{boundary}--\r\n".encode()


@dataclass
class Message:
    ident: str
    rcpt: str
    wire: bytes  # dot-stuffed, ends with CRLF.CRLF: what goes on the wire after DATA
    size: int  # the message's own size


def build_pool(label: str, target: int, count: int, nonce: str) -> list[Message]:
    """`count` different messages of about `target` bytes (deterministic per nonce and index)."""
    base_rng = random.Random(f"{nonce}-{label}")
    _rcpt, empty = make_message(0, f"{label}-{nonce}-00000", [0], random.Random(0))
    # base64 turns 57 bytes into 78 on the wire (76 + CRLF); each image row adds ~ROW_BYTES + a little.
    room = max(0, target - len(empty)) * 57 / 78
    rows_total = max(0, int(room / ROW_BYTES))
    pool = []
    for seq in range(count):
        rng = random.Random(base_rng.getrandbits(64))
        pages = 1 if rows_total < 64 else 1 + seq % 3
        rows = [rows_total // pages + (1 if i < rows_total % pages else 0) for i in range(pages)]
        ident = f"{label}-{nonce}-{seq:05d}"
        rcpt, raw = make_message(seq, ident, rows, rng)
        stuffed = re.sub(rb"(?m)^\.", b"..", raw)
        pool.append(Message(ident=ident, rcpt=rcpt, wire=stuffed + b".\r\n", size=len(raw)))
    return pool


def pool_figures(pool: list[Message]) -> dict[str, int]:
    """Mean, smallest and largest message of a pool, in bytes."""
    return {"mean_bytes": round(sum(m.size for m in pool) / len(pool)),
            "min_bytes": min(m.size for m in pool), "max_bytes": max(m.size for m in pool)}


def check_pool(pool: list[Message]) -> dict[str, Any]:
    """Make sure the workload is what it claims: a parseable MIME mail with a real PDF."""
    import email
    import email.policy
    import io

    from pypdf import PdfReader

    sample = pool[0]
    raw = sample.wire[:-3].replace(b"\r\n..", b"\r\n.")
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    parts = [p for p in message.walk() if p.get_content_type() == "application/pdf"]
    assert len(parts) == 1, "no PDF attachment in the generated message"
    pdf = parts[0].get_payload(decode=True)
    reader = PdfReader(io.BytesIO(pdf))
    assert len({m.wire for m in pool[:50]}) == min(len(pool), 50), "generated messages are not all different"
    return {"pages": len(reader.pages), "pdf_bytes": len(pdf), "title": str(reader.metadata.title)}
