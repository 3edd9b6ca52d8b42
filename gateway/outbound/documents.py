"""The documents of a fax email: their pages and a digest of their content.

Pages are counted with pypdf (PDF) and Pillow (TIFF); any other or
unreadable document counts as one page, and a fax of a text body alone as
one. The quotas count pages this way, and so does the sandbox, in place of
GreenFax. The digest, for the duplicate guard, hashes each document's
decoded bytes (so a resend with new MIME boundaries or another transfer
encoding has the same digest) in a sorted list, ignoring names; a fax with
no document hashes its text body instead. The documents inside a
winmail.dat count, as the forwarder sends them.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import io
from dataclasses import dataclass
from email.message import Message

from PIL import Image
from pypdf import PdfReader

from gateway.outbound import winmail
from gateway.outbound.mime import document_parts


@dataclass(frozen=True)
class DocumentFacts:
    pages: int | None = None  # pages of the documents, None when not counted
    digest: str | None = None  # hash of the decoded documents, None when not made


def document_facts(raw: bytes, *, pages: bool, digest: bool) -> DocumentFacts:
    """Pages and digest of a fax email's documents, each only when asked for; never raises."""
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        unwrapped = winmail.unwrap_tnef(raw, message)
        if unwrapped is not None:
            message = email.message_from_bytes(unwrapped.raw, policy=email.policy.compat32)
        documents = [(part, part.get_payload(decode=True) or b"") for part in document_parts(message)]
    except Exception:  # noqa: BLE001 - a fax must never be lost to the page counter
        return DocumentFacts(1 if pages else None, None)
    count = _count(documents) if pages else None
    return DocumentFacts(count, _digest(message, [payload for _part, payload in documents]) if digest else None)


def count_pages(message: Message) -> int:
    """The pages of a parsed message's documents (at least one)."""
    return _count([(part, part.get_payload(decode=True) or b"") for part in document_parts(message)])


def _count(documents: list[tuple[Message, bytes]]) -> int:
    return max(1, sum(_pages(part, payload) for part, payload in documents))


def _pages(part: Message, payload: bytes) -> int:
    name = (part.get_filename() or "").lower()
    kind = part.get_content_type()
    try:
        if kind == "application/pdf" or name.endswith(".pdf"):
            return max(1, len(PdfReader(io.BytesIO(payload)).pages))
        if kind == "image/tiff" or name.endswith((".tif", ".tiff")):
            with Image.open(io.BytesIO(payload)) as image:
                return max(1, getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 - unreadable, encrypted, truncated: still a page for GreenFax
        return 1
    return 1


def _digest(message: Message, documents: list[bytes]) -> str:
    if documents:
        hashes = sorted(hashlib.sha256(payload).hexdigest() for payload in documents)
        return hashlib.sha256(("documents\n" + "\n".join(hashes)).encode()).hexdigest()
    body = hashlib.sha256(b"body\n")
    for part in message.walk():
        if part.get_content_type() in ("text/plain", "text/html"):
            text = part.get_payload(decode=True) or b""
            body.update(b"\n".join(line.rstrip() for line in text.splitlines()).strip() + b"\n")
    return body.hexdigest()
