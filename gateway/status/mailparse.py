"""mail-parser behind one function that can never raise.

mail-parser raises on some broken mails (a missing MIME close boundary, see
FIELD-NOTES); Python's email parser reads them, and as a last resort the raw
bytes are read as text. A status mail is never lost to a parse error.

A plain mail (ASCII only, no encoded words, simple addresses, text parts
only, no defects: what a status service sends) is read by `quick_reading()`, which
gives exactly the ParsedMail mail-parser's reading gives (tests/test_mailparse.py
compares the two on the shared corpus and on generated mails) without
mail-parser's forensic work (Received and Date analysis, attachment
extraction, its mail dictionaries), which is most of its cost.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import email.utils
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from email.message import Message

import mailparser
from bs4 import BeautifulSoup

from gateway.outbound import mimeparse

# mail-parser logs "Email content ... not handled" for many ordinary parts.
logging.getLogger("mailparser").setLevel(logging.ERROR)
log = logging.getLogger("faxgw.status")


@dataclass(frozen=True, slots=True)
class ParsedMail:
    raw: bytes
    from_addr: str = ""
    to_addrs: tuple[str, ...] = ()
    subject: str = ""
    message_id: str = ""
    text: str = ""  # the plain-text bodies
    html_text: str = ""  # the HTML bodies turned into text, one cell or block per line
    content_type: str = ""
    parser: str = "mail-parser"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        """The body from its empty line on, with CRLF line endings whatever the mail had.

        SMTP gives CRLF; a file or a mailbox may give LF or CR, and the same
        mail must have the same body however it came.
        """
        raw = self.raw
        if raw.count(b"\n") != raw.count(b"\r\n") or raw.count(b"\r") != raw.count(b"\r\n"):
            raw = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
        return mimeparse.split(raw)[1]

    def identity(self) -> tuple[str | None, bytes]:
        """What makes a copy of this mail the same mail (report.dedup_key): its Message-ID and body.

        Trace headers differ between the copy received by SMTP and the one
        read by IMAP, so they do not count. A mail without a Message-ID is
        known by its From, To, Date and Subject as well: two different mails
        with the same short body (or none) are not one report.
        """
        if self.message_id:
            return self.message_id, self.body
        fields = "\n".join(name + ": " + " ".join(self.headers.get(name, "").split())
                           for name in ("from", "to", "date", "subject"))
        return None, fields.encode("utf-8", "surrogateescape") + b"\n" + self.body

    @property
    def any_text(self) -> str:
        return "\n".join(part for part in (self.subject, self.text, self.html_text) if part)


def html_to_text(html: str) -> str:
    """Visible text of an HTML body, one block or table cell per line."""
    try:
        soup = BeautifulSoup(html, "html.parser")
        for hidden in soup(["script", "style", "head"]):
            hidden.decompose()
        return soup.get_text("\n", strip=True)
    except Exception:  # bs4 is lenient; this is a last guard for a status mail
        return html


def _lines(text: str) -> str:
    """Text with "\\n" line ends, whatever the mail had (CRLF, or a classic Mac's CR): rules match by line."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode(payload: bytes, charset: str | None) -> str:
    """A part's text; an unknown charset label ("UFT-8" is in the corpus) is read as UTF-8, not a failure."""
    try:
        return payload.decode(charset or "utf-8", "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def parse_mail(raw: bytes) -> ParsedMail:
    """Parse any bytes into a ParsedMail; never raises."""
    try:
        quick = quick_reading(raw)
    except Exception as exc:  # the quick reading only declines; a surprise here must not lose the mail
        log.debug("the quick reading failed (%s); using mail-parser", type(exc).__name__)
        quick = None
    if quick is not None:
        return quick
    try:
        return with_mailparser(raw)
    except Exception as exc:
        log.debug("mail-parser failed (%s); using the email package", type(exc).__name__)
    try:
        return _with_email(raw)
    except Exception as exc:
        log.debug("the email package failed (%s); reading raw text", type(exc).__name__)
    return ParsedMail(raw=raw, text=_lines(raw.decode("utf-8", "replace")), parser="raw")


def with_mailparser(raw: bytes) -> ParsedMail:
    parsed = mailparser.parse_from_bytes(raw)
    headers = {str(k).lower(): str(v) for k, v in (parsed.headers or {}).items()}
    from_addr = parsed.from_[0][1] if parsed.from_ else ""
    to_addrs = tuple(address for _name, address in (parsed.to or []) if address)
    return ParsedMail(
        raw=raw, from_addr=from_addr.lower(), to_addrs=to_addrs, subject=_first(parsed.subject),
        message_id=_first(parsed.message_id).strip(), text=_lines("\n".join(parsed.text_plain or [])),
        html_text=_lines("\n".join(html_to_text(part) for part in parsed.text_html or [])),
        content_type=headers.get("content-type", "").split(";")[0].strip().lower(), headers=headers,
    )


# The headers mail-parser reads as address lists (mailparser.const.ADDRESSES_HEADERS).
_ADDRESS_HEADERS = frozenset({"bcc", "cc", "delivered-to", "from", "reply-to", "to"})
_ADDRESS = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_MAILBOX = re.compile(rf"(?:([A-Za-z0-9]+(?: [A-Za-z0-9]+)*) <({_ADDRESS})>|<({_ADDRESS})>|({_ADDRESS}))")


def quick_reading(raw: bytes) -> ParsedMail | None:
    """mail-parser's reading of a plain mail, or None when the mail is anything but plain."""
    if not raw.isascii():
        return None
    message = _message(raw)
    fields: dict[str, list[str]] = {}
    for name, value in message.items():
        if not isinstance(value, str) or "=?" in value:
            return None  # encoded words (RFC 2047): mail-parser decodes them in its own way
        fields.setdefault(name.lower(), []).append(value)
    values: dict[str, object] = {}
    for name, found in fields.items():
        if name in _ADDRESS_HEADERS:
            addresses = _simple_addresses(found[0])  # mail-parser reads the first occurrence only
            if addresses is None:
                return None
            values[name] = addresses
        else:
            values[name] = found[0].strip() if len(found) == 1 else [value.strip() for value in found]
    texts = _quick_texts(message)
    if texts is None:
        return None
    plain, html = texts
    from_list = values.get("from") or []
    headers = {name: str(value) for name, value in values.items()}
    return ParsedMail(
        raw=raw, from_addr=from_list[0][1].lower() if from_list else "",  # type: ignore[index]
        to_addrs=tuple(address for _name, address in values.get("to") or []),  # type: ignore[union-attr]
        subject=_first(values.get("subject", "")), message_id=_first(values.get("message-id", "")).strip(),
        text=_lines("\n".join(plain)), html_text=_lines("\n".join(html_to_text(part) for part in html)),
        content_type=headers.get("content-type", "").split(";")[0].strip().lower(), parser="quick", headers=headers,
    )


def _message(raw: bytes) -> Message:
    """The email package's reading of an ASCII mail, by a shorter way when it is not multipart.

    For a single part with CRLF line ends in its header block, the email
    package's body is the text after the first empty line, as it is: only the
    header block is parsed, and the body set alone. Anything else (multipart,
    message/*, other line ends, a header block it finds a defect in) is
    parsed whole.
    """
    end = raw.find(b"\r\n\r\n")
    head = raw[:end + 4]
    if end > 0 and head.count(b"\r") == head.count(b"\n") == head.count(b"\r\n"):
        message = _HEADER_PARSER.parsebytes(head)
        if not message.defects and not message.get_payload() \
                and message.get_content_maintype() not in ("multipart", "message"):
            message.set_payload(raw[end + 4:].decode("ascii"))
            return message
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _simple_addresses(value: str) -> list[tuple[str, str]] | None:
    """A list of plain mailboxes ("Name <a@b.example>", "<a@b.example>", "a@b.example") as mail-parser
    gives them; None for anything else (quotes, comments, groups, folding...)."""
    if not value.strip(" \t"):
        return []
    addresses = []
    for item in value.split(","):
        match = _MAILBOX.fullmatch(item.strip(" \t"))
        if match is None:
            return None
        name, angled, bracketed, bare = match.groups()
        addresses.append((name or "", angled or bracketed or bare))
    return addresses


def _quick_texts(message: Message) -> tuple[list[str], list[str]] | None:
    """The text/plain and text/html bodies, as mail-parser decodes them; None for any other kind of part."""
    plain: list[str] = []
    html: list[str] = []
    for part in message.walk():
        names = {name.lower() for name in part}
        if part.defects or "content-disposition" in names or "content-id" in names:
            return None  # what mail-parser may take for an attachment
        content_type = part.get_content_type()
        if part.is_multipart():
            if not content_type.startswith("multipart/"):
                return None  # message/rfc822 and the like
            continue
        if content_type not in ("text/plain", "text/html"):
            return None
        # Without a Content-Disposition, only a "name" parameter of the Content-Type gives a file name.
        if "name" in str(part.get("content-type", "")).lower() and part.get_filename() is not None:
            return None
        text = _quick_text(part, names)
        if text is None:
            return None
        if text:
            (plain if content_type == "text/plain" else html).append(text)
    return plain, html


def _quick_text(part: Message, names: set[str]) -> str | None:
    """One body part's text: mail-parser keeps 7bit/8bit text as it is and decodes the rest by its
    charset, NFC-normalised; None when the charset cannot decode it (mail-parser then guesses)."""
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower() \
        if "content-transfer-encoding" in names else ""
    if encoding in ("", "7bit", "8bit"):
        return part.get_payload()
    payload = part.get_payload(decode=True)
    if not payload:
        return ""
    try:
        text = payload.decode(part.get_content_charset("utf-8"))
        text.encode("utf-8")
    except (LookupError, UnicodeError):
        return None
    return unicodedata.normalize("NFC", text)


def _first(value: object) -> str:
    """A header mail-parser read: a list when the mail repeats the field (two Subjects); the first counts."""
    if isinstance(value, list):
        value = next((item for item in value if item), "")
    return str(value or "")


def _with_email(raw: bytes) -> ParsedMail:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    texts, htmls = [], []
    for part in message.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        payload = part.get_payload(decode=True) or b""
        text = _decode(payload, part.get_content_charset())
        if part.get_content_type() == "text/plain":
            texts.append(text)
        elif part.get_content_type() == "text/html":
            htmls.append(html_to_text(text))
    headers = {k.lower(): mimeparse.decoded(str(v)) for k, v in message.items()}
    return ParsedMail(
        raw=raw, from_addr=email.utils.parseaddr(headers.get("from", ""))[1].lower(),
        to_addrs=tuple(a for _n, a in email.utils.getaddresses([headers.get("to", "")]) if a),
        subject=headers.get("subject", ""), message_id=headers.get("message-id", "").strip(),
        text=_lines("\n".join(texts)), html_text=_lines("\n".join(htmls)), content_type=message.get_content_type(),
        parser="email", headers=headers,
    )
