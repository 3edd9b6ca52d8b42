"""Outlook's winmail.dat (TNEF): the documents inside it, read safely with tnefparse.

Outlook in "Rich Text" mode wraps a mail's attachments in one part,
`winmail.dat` (application/ms-tnef), that only Outlook can read. Forwarded
as it is, GreenFax sees no document and the fax goes out blank. This module
reads the documents out of such a part; winmail.unwrap_tnef() puts them back
into the message as ordinary MIME attachments, the one body rewrite the
gateway allows (DESIGN.md, "Job states").

Where the unwrap happens: in the forwarder, at send time (forward.py,
`_prepare`, next to the header rewrite), with an event in the job's history
("winmail.dat unwrapped: 2 documents"). The intake runs the very same
unwrap before its 250, only to decide: what cannot be unwrapped (a damaged
winmail.dat, or one with no document in it) is refused with a reply that
tells the user how to set Outlook right, and the documents found inside are
judged by the content policy like any other attachment. Why there:

- the store keeps the bytes the client sent, as acknowledged, like every
  other message: an operator who asks what a program really sent sees it,
  and a better unwrap in a later release applies to faxes still queued;
- every change to what goes upstream is made in one place, `_prepare`, and
  recorded by the runner that sends it, in the job's own history;
- the intake stays thin: one extra check, no second message body and no
  extra store plumbing between its decision and its 250.
The cost is a second unwrap at send time (milliseconds, and only for the
rare Rich Text mail); should it fail there after all (a library upgrade
between intake and send), the job is held for an operator, never sent blank.

Damaged input: tnefparse trusts the counts in the file: a 30-byte
winmail.dat whose property count says 4 billion keeps it busy for hours, and
a multi-valued one fills memory, while the intake waits on the event loop.
`documents()` therefore first walks the whole structure the way tnefparse
will, with every count and length checked against the bytes really there
and the number of objects capped, and only then hands it to tnefparse.
Checksums are not enforced, as tnefparse does not enforce them: files with
a wrong checksum over intact data exist (among tnefparse's own samples),
and a stream that lacks only its last checksum is read too.
"""

from __future__ import annotations

import logging
import mimetypes
import re
import struct
from dataclasses import dataclass

import tnefparse

from gateway.errors import TnefError
from gateway import replies
from gateway.models import MessageFacts, Refusal

# tnefparse logs every oddity of a damaged file (at WARNING and ERROR); the
# gateway reports what matters in its own words.
logging.getLogger("tnefparse").setLevel(logging.CRITICAL)

TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
TNEF_NAME = "winmail.dat"
SIGNATURE = 0x223E9F78
MAX_NESTING = 4  # Outlook items attached to Outlook items
MAX_ITEMS = 50_000  # attributes, properties and values in one winmail.dat (Outlook writes hundreds)
DEFECT_PREFIX = "tnef-"  # MessageFacts.defects entry: "tnef-damaged", "tnef-empty", "tnef-layout"

# TNEF attribute ids (MS-OXTNEF 2.1.3.1) that tnefparse decodes as MAPI property lists.
_ATT_MAPI_PROPS = 0x9003
_ATT_RECIP_TABLE = 0x9004
_ATT_ATTACHMENT = 0x9005
_ATT_REND_DATA = 0x9002  # attAttachRendData: starts an attachment
_LEVEL_ATTACHMENT = 0x02
# MAPI properties of an attachment (MS-OXPROPS).
_PR_ATTACH_DATA_OBJ = 0x3701
_PR_ATTACH_METHOD = 0x3705
_PR_ATTACH_LONG_FILENAME = 0x3707
_PR_ATTACH_MIME_TAG = 0x370E
_PR_ATTACHMENT_HIDDEN = 0x7FFE
_ATTACH_EMBEDDED_MSG = 5
_ATTACH_OLE = 6  # an object drawn in the Rich Text body, not a file
_IMESSAGE_SIG = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"
# MAPI property types: fixed sizes, and the ones stored as counted values.
_FIXED = {0x0002: 2, 0x000B: 2, 0x0003: 4, 0x0004: 4, 0x000A: 4, 0x0005: 8, 0x0007: 8, 0x0006: 8,
          0x0014: 8, 0x0040: 8, 0x0048: 16}
_COUNTED = frozenset({0x001E, 0x001F, 0x000D, 0x0102, 0x0000})
_MULTI_VALUE = 0x1000

# File types the standard library's table lacks (it is read without the system's files, so the
# answer is the same on every machine); anything unknown is application/octet-stream, which
# the content policy judges by the file name's extension.
_EXTRA_TYPES = {
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".rtf": "application/rtf",
}
_TYPES = mimetypes.MimeTypes()
_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")

@dataclass(frozen=True, slots=True)
class Document:
    """One file from inside a winmail.dat."""

    filename: str
    content_type: str
    data: bytes


def is_tnef(content_type: str, filename: str) -> bool:
    """A winmail.dat part, by its type or (from clients that send it as octet-stream) its name."""
    return content_type.lower() in TNEF_TYPES or filename.strip().lower() == TNEF_NAME


def refusal(facts: MessageFacts) -> Refusal | None:
    """The refusal for a message whose winmail.dat mime.inspect() could not unwrap, if any."""
    for defect in facts.defects:
        if defect.startswith(DEFECT_PREFIX):
            return Refusal(replies.WINMAIL_REFUSED.get(defect.removeprefix(DEFECT_PREFIX),
                                                       replies.WINMAIL_REFUSED["damaged"]), "tnef")
    return None


def documents(data: bytes) -> list[Document]:
    """The documents in a winmail.dat, in order; raises TnefError("damaged") for one that cannot be read.

    Left out: inline images of the Rich Text body (hidden attachments),
    objects drawn in the body (OLE) and empty files. An attached Outlook
    item is listed as an application/vnd.ms-outlook document, which the
    content policy then refuses by name.
    """
    try:
        _Walk().stream(data, depth=0)
        parsed = tnefparse.TNEF(data)
        found = [_document(attachment, parsed.codepage, index)
                 for index, attachment in enumerate(parsed.attachments, start=1)]
    except TnefError:
        raise
    except Exception as exc:  # tnefparse raises whatever its reads hit on a damaged file
        raise TnefError("damaged", f"cannot read the winmail.dat ({type(exc).__name__})") from exc
    return [document for document in found if document is not None]


def _document(attachment: tnefparse.tnef.TNEFAttachment, codepage: str | None, index: int) -> Document | None:
    props = {prop.name: prop for prop in attachment.mapi_attrs}
    method = props[_PR_ATTACH_METHOD].data if _PR_ATTACH_METHOD in props else None
    hidden = _PR_ATTACHMENT_HIDDEN in props and props[_PR_ATTACHMENT_HIDDEN].data is True
    if hidden or method == _ATTACH_OLE or not attachment.data:
        return None
    name = _filename(attachment, props, codepage) or f"attachment-{index}"
    if method == _ATTACH_EMBEDDED_MSG or hasattr(attachment, "embed"):
        return Document(name, "application/vnd.ms-outlook", attachment.data)
    tag = str(props[_PR_ATTACH_MIME_TAG].data).strip().lower() if _PR_ATTACH_MIME_TAG in props else ""
    if not _MIME_TYPE.match(tag) or tag in TNEF_TYPES or tag.startswith(("multipart/", "message/")):
        suffix = "." + name.rpartition(".")[2].lower() if "." in name else ""
        tag = _EXTRA_TYPES.get(suffix) or _TYPES.guess_type("x" + suffix)[0] or "application/octet-stream"
    return Document(name, tag, attachment.data)


def _filename(attachment: tnefparse.tnef.TNEFAttachment, props: dict, codepage: str | None) -> str:
    """The long file name, else the short one; only its last path component, without control characters."""
    if _PR_ATTACH_LONG_FILENAME in props:
        name = str(props[_PR_ATTACH_LONG_FILENAME].data)
    else:
        raw = attachment._name  # tnefparse's `name` decodes as UTF-8, which an Outlook 8.3 name is not
        name = raw.decode(codepage or "cp1252", "replace") if isinstance(raw, bytes) else str(raw)
    name = re.split(r"[/\\]", name.replace("\x00", ""))[-1]
    return re.sub(r"[\x00-\x1f\x7f]", "", name).strip(" .")[:200]


# --- the structure check ------------------------------------------------------------------


def _u16(data: bytes, offset: int) -> int:
    return struct.unpack_from("<H", data, offset)[0]


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _damaged(detail: str) -> TnefError:
    return TnefError("damaged", f"the winmail.dat is damaged ({detail})")


def _padded(length: int) -> int:
    return length + (-length % 4)


class _Walk:
    """One walk over a TNEF stream as tnefparse will read it, raising TnefError where it would overrun.

    Every count is checked against the bytes really there, and the number
    of attributes, properties and values against MAX_ITEMS: tnefparse makes
    an object of each, and a stream of millions of tiny ones (a few MB)
    would fill memory, while a real winmail.dat has hundreds.
    """

    def __init__(self) -> None:
        self.items = 0

    def _count(self, items: int = 1) -> None:
        self.items += items
        if self.items > MAX_ITEMS:
            raise _damaged(f"more than {MAX_ITEMS} attributes and properties")

    def stream(self, data: bytes, *, depth: int) -> None:
        if depth > MAX_NESTING:
            raise _damaged("Outlook items nested too deep")
        if len(data) < 6 or _u32(data, 0) != SIGNATURE:
            raise _damaged("no TNEF signature")
        offset = 6
        # Each attachment (from its attAttachRendData on) ends with its attAttachment, the MAPI
        # properties, as Outlook writes it: one without them was cut off.
        attachment_open = False
        while offset + 12 < len(data):  # tnefparse's own loop condition
            self._count()
            level, name, length = data[offset], _u16(data, offset + 1), _u32(data, offset + 5)
            end = offset + 9 + length
            if end > len(data):
                raise _damaged(f"attribute {name:#06x} cut off")
            # Without its checksum (a stream cut two bytes short, as some are) tnefparse reads
            # the value two bytes short; it is checked as tnefparse will read it.
            value = data[offset + 9:min(end, len(data) - 2)]
            if level == _LEVEL_ATTACHMENT:
                if name == _ATT_REND_DATA:
                    if attachment_open:
                        raise _damaged("an attachment without its properties")
                    attachment_open = True
                elif name == _ATT_ATTACHMENT:
                    attachment_open = False
                    self.properties(value, 0, depth=depth)
            elif name == _ATT_MAPI_PROPS:
                self.properties(value, 0, depth=depth)
            elif name == _ATT_RECIP_TABLE:
                rows, position = _u32(value, 0), 4
                if rows > (len(value) - 4) // 4:
                    raise _damaged("recipient count")
                for _ in range(rows):
                    position = self.properties(value, position, depth=depth)
            offset = end + 2
        # Up to 12 bytes after the last attribute are left unread by tnefparse: a line end or
        # padding (real files end in a stray "\n"), or the start of an attribute cut off. A stream
        # cut between two attachments cannot be told from a whole one: TNEF has no overall length.
        if attachment_open or data[offset:].strip(b"\r\n\t \x00"):
            raise _damaged("cut off at the end")

    def properties(self, data: bytes, offset: int, *, depth: int) -> int:
        """One MAPI property list (MS-OXTNEF 2.1.3.4) from `offset`; where it ends."""
        count = _u32(data, offset)
        offset += 4
        if count > (len(data) - offset) // 4:  # every property takes at least four bytes
            raise _damaged("property count")
        for _ in range(count):
            kind, name = _u16(data, offset), _u16(data, offset + 2)
            offset += 4
            if name >= 0x8000:  # a named property: GUID, then an id or a padded UTF-16 name
                named_by_string = _u32(data, offset + 16)
                offset += 20
                offset += 4 + (_padded(_u32(data, offset)) if named_by_string else 0)
            multi = None  # tnefparse: the value count of a multi-valued property
            if kind & _MULTI_VALUE:
                kind ^= _MULTI_VALUE
                multi = _u32(data, offset)
                offset += 4
                if multi > len(data) - offset:
                    raise _damaged("value count")
            self._count(multi or 1)
            for _ in range(multi or 1):
                if kind in _FIXED:
                    offset += _FIXED[kind]
                elif kind in _COUNTED:
                    offset = self.values(data, offset, multi=bool(multi), embedded=name == _PR_ATTACH_DATA_OBJ,
                                         depth=depth)
                else:
                    return offset  # tnefparse stops reading the list at an unknown type
                if offset > len(data):
                    raise _damaged("property cut off")
            if (multi or 1) % 2 and kind in (0x0002, 0x000B):
                offset += 2
        return offset

    def values(self, data: bytes, offset: int, *, multi: bool, embedded: bool, depth: int) -> int:
        """Strings and binary values: a count (unless multi-valued), then length-prefixed, padded items.

        An attached Outlook item (PR_ATTACH_DATA_OBJ) is a TNEF stream of
        its own, which tnefparse reads too: it is walked the same way.
        """
        items = 1
        if not multi:
            items = _u32(data, offset)
            offset += 4
            if items > (len(data) - offset) // 4:
                raise _damaged("item count")
            self._count(items)
        parts = []
        for _ in range(items):
            length = _padded(_u32(data, offset))
            offset += 4
            if offset + length > len(data):
                raise _damaged("value cut off")
            if embedded:
                parts.append(data[offset:offset + length].rstrip(b"\x00"))
            offset += length
        value = b"".join(parts)
        if value.startswith(_IMESSAGE_SIG):
            self.stream(value[len(_IMESSAGE_SIG):], depth=depth + 1)
        return offset
