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
        return mime.split(self.raw)[1]

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
    return ParsedMail(raw=raw, text=raw.decode("utf-8", "replace"), parser="raw")


def _with_mailparser(raw: bytes) -> ParsedMail:
    parsed = mailparser.parse_from_bytes(raw)
    headers = {str(k).lower(): str(v) for k, v in (parsed.headers or {}).items()}
    from_addr = parsed.from_[0][1] if parsed.from_ else ""
    to_addrs = tuple(address for _name, address in (parsed.to or []) if address)
    return ParsedMail(
        raw=raw, from_addr=from_addr.lower(), to_addrs=to_addrs, subject=parsed.subject or "",
        message_id=(parsed.message_id or "").strip(), text="\n".join(parsed.text_plain or []),
        html_text="\n".join(html_to_text(part) for part in parsed.text_html or []),
        content_type=headers.get("content-type", "").split(";")[0].strip().lower(), headers=headers,
    )


def _with_email(raw: bytes) -> ParsedMail:
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    texts, htmls = [], []
    for part in message.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        payload = part.get_payload(decode=True) or b""
        text = payload.decode(part.get_content_charset() or "utf-8", "replace")
        if part.get_content_type() == "text/plain":
            texts.append(text)
        elif part.get_content_type() == "text/html":
            htmls.append(html_to_text(text))
    headers = {k.lower(): mime.decoded(str(v)) for k, v in message.items()}
    return ParsedMail(
        raw=raw, from_addr=email.utils.parseaddr(headers.get("from", ""))[1].lower(),
        to_addrs=tuple(a for _n, a in email.utils.getaddresses([headers.get("to", "")]) if a),
        subject=headers.get("subject", ""), message_id=headers.get("message-id", "").strip(),
        text="\n".join(texts), html_text="\n".join(htmls), content_type=message.get_content_type(),
        parser="email", headers=headers,
    )
