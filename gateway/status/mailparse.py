"""mail-parser behind one function that can never raise.

mail-parser raises on some broken mails (a missing MIME close boundary, see
FIELD-NOTES); Python's email parser reads them, and as a last resort the raw
bytes are read as text. A status mail is never lost to a parse error.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import logging
import re
from dataclasses import dataclass, field

import mailparser
from bs4 import BeautifulSoup

from gateway import mime

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
        return mime.split(raw)[1]

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
        return _with_mailparser(raw)
    except Exception as exc:
        log.debug("mail-parser failed (%s); using the email package", type(exc).__name__)
    try:
        return _with_email(raw)
    except Exception as exc:
        log.debug("the email package failed (%s); reading raw text", type(exc).__name__)
    return ParsedMail(raw=raw, text=_lines(raw.decode("utf-8", "replace")), parser="raw")


def _with_mailparser(raw: bytes) -> ParsedMail:
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
    headers = {k.lower(): mime.decoded(str(v)) for k, v in message.items()}
    return ParsedMail(
        raw=raw, from_addr=email.utils.parseaddr(headers.get("from", ""))[1].lower(),
        to_addrs=tuple(a for _n, a in email.utils.getaddresses([headers.get("to", "")]) if a),
        subject=headers.get("subject", ""), message_id=headers.get("message-id", "").strip(),
        text=_lines("\n".join(texts)), html_text=_lines("\n".join(htmls)), content_type=message.get_content_type(),
        parser="email", headers=headers,
    )
