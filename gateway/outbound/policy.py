"""Policy: pure decisions on who may send, which recipients are faxes, what may be faxed.

Each check is small and named; a refusal carries its exact SMTP reply.
No I/O here: intake.py asks, this module answers from the settings and the
addressing rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


from gateway import replies
from gateway.outbound.billing import billing_code
from gateway.replies import refuse
from gateway.config import Settings, address_listed, in_networks
from gateway.models import Attachment, FaxNumber, MessageFacts, Recipient, Refusal
from gateway.numbers import NotANumber, read_number, region_of
from gateway.rules import AddressingRules, RulesInForce

# The separators people write in numbers; the subject pattern of the rules admits the same.
_NUMBER_CHARS = re.compile(r"^\+?[0-9()./\-]+$")
SUBJECT_MAILBOX = "subject-mailbox"  # marker: the number comes from the subject at DATA time


def shown(text: str) -> str:
    """Text from a client as a reply may echo it: printable ASCII, anything else as \\uXXXX.

    aiosmtpd hands over undecodable octets as lone surrogates, which cannot
    be written back to the client at all.
    """
    return "".join(c if c.isascii() and c.isprintable() else f"\\u{ord(c):04x}" for c in text)


@dataclass(frozen=True)
class Policy:
    settings: Settings
    in_force: RulesInForce

    @property
    def rules(self) -> AddressingRules:
        """The addressing rules in force (a reload replaces them)."""
        return self.in_force.addressing

    # --- who may send ---------------------------------------------------------

    def check_client(self, client_ip: str, *, authenticated: bool) -> Refusal | None:
        """Clients from the allowed networks, or authenticated users, may send faxes."""
        if authenticated or in_networks(client_ip, self.settings.smtp.allowed_networks):
            return None
        return refuse(replies.CLIENT_NOT_ALLOWED, "client", client=client_ip)

    def check_sender(self, sender: str) -> Refusal | None:
        """The optional sender allowlist: exact addresses or "@domain" entries."""
        allowed = self.settings.smtp.allowed_senders
        if not allowed or address_listed(sender, allowed):
            return None
        return refuse(replies.SENDER_NOT_ALLOWED, "sender", sender=shown(sender))

    # --- recipients -------------------------------------------------------------

    def classify_recipient(self, address: str) -> Recipient | Refusal:
        """A fax recipient with its number, or the refusal that says why not.

        The rules accept exactly `<number>@<domain>` for the upstream domain
        and the local fax domains (compared without regard to ASCII case),
        and the subject mailbox. Fax addresses are ASCII: anything else is
        refused before a domain is compared, so no Unicode case folding can
        make another address look like a fax address. What RFC 5321 (4.1.2)
        does not allow is refused rather than read kindly: a domain with a
        trailing dot, a local part with a leading, trailing or doubled dot,
        spaces or brackets (not part of an unquoted local part).
        Whatever is accepted, the forwarder sends to `<digits of the E.164
        number>@<upstream domain>` only.
        """
        if not address.isascii() or not address.isprintable():
            return refuse(replies.BAD_ADDRESS, "address-syntax", address=shown(address),
                          problem="fax addresses are ASCII (digits, optionally + - . /, then @ and the domain)")
        local, at, domain = address.rpartition("@")
        mailbox = self.rules.recipients.subject_mailbox
        if mailbox and address.lower() == mailbox.lower():
            return Recipient(address, FaxNumber(SUBJECT_MAILBOX))
        upstream_domain = self.settings.upstream.domain.lower()
        if at and domain.endswith("."):
            return refuse(replies.BAD_ADDRESS, "address-syntax", address=address,
                          problem="a domain does not end with a dot in SMTP")
        if not at or domain.lower() not in (upstream_domain, *self.rules.recipients.local_fax_domains):
            return refuse(replies.NOT_A_FAX_RECIPIENT, "relay", address=address, domain=upstream_domain)
        if local.startswith(".") or local.endswith(".") or ".." in local:
            return refuse(replies.BAD_ADDRESS, "address-syntax", address=address,
                          problem="a local part neither begins nor ends with a dot, nor has two in a row")
        if local[:1] in "-/" or local[-1:] in "-/+" or re.search(r"[-./+]{2}", local):
            # Separators go between digits, as people write them: "-12125551234" is no way of writing a number.
            return refuse(replies.BAD_ADDRESS, "address-syntax", address=address,
                          problem="a fax number begins with + or a digit and ends with a digit, with one"
                                  " separator (- . /) at most between digits")
        if re.search(r"[\s()]", local):
            # People write numbers with spaces and brackets (the subject rule
            # takes them), but in an address they are not part of it at all.
            return refuse(replies.BAD_ADDRESS, "address-syntax", address=address,
                          problem="a fax address has no spaces or brackets (digits, optionally with + - . /)")
        # GreenFax reads its own addresses as country code + number; our local
        # fax domains take numbers as people write them, in the default region.
        international = domain.lower() == upstream_domain
        number = self.parse_number(local, international=international, address=address)
        if isinstance(number, Refusal):
            return number
        return Recipient(address, number)

    def parse_number(self, text: str, *, international: bool, address: str) -> FaxNumber | Refusal:
        """Validate and normalise one fax number to E.164 (gateway/numbers.py)."""
        rules = self.rules.numbers
        compact = text.replace(" ", "")
        if not compact or not _NUMBER_CHARS.match(compact) or not compact.isascii():
            problem = "the local part must be a fax number (digits, optionally + - . / ( ))"
            return refuse(replies.BAD_NUMBER, "number-syntax", address=address, problem=problem)
        digits = re.sub(r"[()./\-]", "", compact)
        if international and not digits.startswith("+"):
            digits = "+" + digits
        number = read_number(digits, rules.default_region)
        if isinstance(number, NotANumber):
            if number.reason is not None:
                problem = f"not a fax number ({number.reason})"
            else:
                hint = " (write the country code first, e.g. 12125550123)" if international else ""
                problem = f"{digits} is not a valid phone number{hint}"
            return refuse(replies.BAD_NUMBER, "number-invalid", address=address, problem=problem)
        e164 = number.e164
        if number.country_code in rules.refused_country_codes:
            return refuse(replies.NUMBER_REFUSED, "number-satellite", address=address,
                          problem=f"{e164} is a satellite or non-geographic number; faxes to it are refused")
        if number.kind in rules.refused_types:
            label = number.kind.lower().replace("_", "-")
            return refuse(replies.NUMBER_REFUSED, "number-type", address=address,
                          problem=f"{e164} is a {label} number; faxes to it are refused")
        if number.region != rules.default_region and not rules.allow_international:
            return refuse(replies.NUMBER_REFUSED, "number-international", address=address,
                          problem=f"{e164} is international ({number.region}); international faxes are not"
                                  " allowed here")
        return FaxNumber(e164)

    def foreign_region(self, number: FaxNumber) -> str | None:
        """The region of a number outside the default region (an international fax), else None."""
        region = region_of(number.e164)
        return None if region == self.rules.numbers.default_region else region

    def number_from_subject(self, subject: str, address: str) -> FaxNumber | Refusal:
        match = re.search(self.rules.recipients.subject_number_pattern, subject)
        if not match:
            return refuse(replies.NO_NUMBER_IN_SUBJECT, "subject-number", address=address)
        return self.parse_number(match[1], international=False, address=address)

    # --- content ------------------------------------------------------------------

    def check_content(self, facts: MessageFacts) -> Refusal | None:
        """Every attachment must be faxable, and there must be something to fax."""
        for attachment in facts.attachments:
            if not self._faxable(attachment):
                name = attachment.filename or "(unnamed)"
                return refuse(replies.TYPE_NOT_FAXABLE, "content-type",
                              name=name, content_type=attachment.content_type)
        if not facts.attachments and not self.rules.content.allow_body_only:
            return refuse(replies.NOTHING_TO_FAX, "content-empty")
        return None

    def billing(self, raw: bytes, facts: MessageFacts) -> str | Refusal | None:
        """The fax's billing code; a Refusal when the rules require one and it has none."""
        content = self.rules.content
        code = billing_code(raw, facts.subject, content)
        if code is None and content.require_billing_code:
            return refuse(replies.BILLING_CODE_REQUIRED, "billing-code", header=content.billing_header)
        return code

    def _faxable(self, attachment: Attachment) -> bool:
        content = self.rules.content
        if attachment.content_type in content.allowed_types:
            return True
        if attachment.content_type in ("application/octet-stream", "application/x-octet-stream"):
            extension = attachment.filename.rpartition(".")[2].lower()
            return "." in attachment.filename and extension in content.allowed_extensions
        return False
