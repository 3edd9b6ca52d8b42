"""What a fax email contains: the facts the policy decides by, read once and never raising.

`inspect()` reads the sender, subject and documents attached (the documents
of a winmail.dat count as the forwarder will send them: winmail.py);
`inspect_inline()` does it on the event loop when the quick parse
(mimeparse.py) reads the message within a small budget. `refusal()` names
what made a message unreadable (MIME too deep, a winmail.dat that cannot be
unwrapped) before the content policy would misname it. `document_parts()`
says which parts are documents to fax (documents.py counts their pages).
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from collections.abc import Iterator
from email.message import Message

from gateway import replies
from gateway.errors import TnefError
from gateway.models import Attachment, MessageFacts, Refusal
from gateway.outbound import tnef
from gateway.outbound.mimeparse import decoded, inline_budget, parse, quick_entity, split
from gateway.outbound.winmail import is_winmail, unwrap_tnef


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
            return replies.refuse(replies.MIME_UNREADABLE, "mime", problem=problem)
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
        message = quick_entity(raw, 0, len(raw), 0, inline_budget())
        if any(is_winmail(part) for part in message.walk()):
            return None
        return _facts(raw, message)
    except Exception:
        return None


def _facts(raw: bytes, message: Message) -> MessageFacts:
    block, _body = split(raw)
    header_from = storable(email.utils.parseaddr(decoded(str(message.get("From", ""))))[1])
    subject = storable(decoded(str(message.get("Subject", ""))))
    attachments = tuple(_documents(message))
    defects = tuple(type(defect).__name__ for part in message.walk() for defect in part.defects)
    if any(is_winmail(part) for part in message.walk()):
        try:
            unwrapped = unwrap_tnef(raw, message)
            if unwrapped is None:  # a part the byte ranges cannot be matched to
                raise TnefError("layout", "the winmail.dat part cannot be located in the message")
        except TnefError as exc:
            defects += (tnef.DEFECT_PREFIX + exc.kind,)
        else:
            rewritten = email.message_from_bytes(unwrapped.raw, policy=email.policy.compat32)
            attachments = tuple(_documents(rewritten))
    return MessageFacts(
        header_from=header_from, subject=subject, attachments=attachments,
        needs_8bitmime=not raw.isascii(), needs_smtputf8=not block.isascii(), defects=defects,
    )


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
