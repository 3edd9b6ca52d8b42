"""The first page of a fax's first document as a small PNG, for the console's job page.

PDF pages are rendered by PDFium (pypdfium2: the renderer Chromium uses,
in a wheel, no system packages); TIFF and other images by Pillow, first
frame. Rendering takes tens of milliseconds and memory: the console runs it
in a worker thread and keeps the last few in memory (never on disk: they
are patient data). A message purged after the retention period has none.
"""

from __future__ import annotations

import io
from collections import OrderedDict

from gateway.outbound.mime import document_parts
from gateway.outbound.mimeparse import parse

WIDTH = 360  # pixels
MAX_PIXELS = 40_000_000  # a page image larger than this (a decompression bomb) is not rendered
CACHED = 64


def first_page_png(raw: bytes, width: int = WIDTH) -> bytes | None:
    """The first page as PNG, or None when the message has no document this can render."""
    if not raw:
        return None
    for part in document_parts(parse(raw)):
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            continue
        kind = part.get_content_type()
        name = (part.get_filename() or "").lower()
        try:
            if kind == "application/pdf" or name.endswith(".pdf"):
                return _pdf(payload, width)
            if kind.startswith("image/") or name.endswith((".tif", ".tiff", ".png", ".jpg", ".jpeg")):
                return _image(payload, width)
        except Exception:  # a damaged document: no thumbnail, the page says so
            return None
    return None


def _pdf(payload: bytes, width: int) -> bytes:
    import pypdfium2

    document = pypdfium2.PdfDocument(payload)
    try:
        page = document[0]
        scale = width / max(page.get_width(), 1)
        image = page.render(scale=scale).to_pil()
        return _png(image)
    finally:
        document.close()


def _image(payload: bytes, width: int) -> bytes:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with Image.open(io.BytesIO(payload)) as image:
        image.seek(0)
        frame = image.convert("L") if image.mode not in ("RGB", "L") else image.copy()
    frame.thumbnail((width, width * 2))
    return _png(frame)


def _png(image) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


class Thumbnails:
    """The last CACHED thumbnails, by job code."""

    def __init__(self) -> None:
        self._kept: OrderedDict[str, bytes | None] = OrderedDict()

    def get(self, code: str) -> tuple[bool, bytes | None]:
        if code in self._kept:
            self._kept.move_to_end(code)
            return True, self._kept[code]
        return False, None

    def put(self, code: str, png: bytes | None) -> None:
        self._kept[code] = png
        while len(self._kept) > CACHED:
            self._kept.popitem(last=False)

    def forget(self, code: str) -> None:
        self._kept.pop(code, None)
