"""Billing codes: the cost allocation code of a fax, from its subject tag or a header.

GFI FaxMaker users write `::b=CODE` in the subject, eFax and Concord users a
per-user code; ours is the rules' `billing_pattern` in the subject (default
`[billing: CODE]`, removed from the subject forwarded to GreenFax) or the
`billing_header` (default `X-Fax-Billing-Code`). The code is stored per job,
shown by the console and summed in its cost report.
"""

from __future__ import annotations

import re

from gateway.outbound.mimeparse import decoded, field_value, header_fields, split
from gateway.rules import ContentRules

MAX_LENGTH = 40


def billing_code(raw: bytes, subject: str, rules: ContentRules) -> str | None:
    """The code from the subject tag, else from the header; None when the fax has none."""
    match = rules.billing.search(subject)
    if match:
        return match[1][:MAX_LENGTH]
    wanted = rules.billing_header.lower().encode()
    block, _body = split(raw)
    for name, field in header_fields(block):
        if name == wanted:
            value = decoded(field_value(field).decode("utf-8", "replace")).strip()
            if value and value.isprintable():
                return value[:MAX_LENGTH]
    return None


def without_tag(subject: bytes, rules: ContentRules) -> bytes:
    """The subject as forwarded: the billing tag taken out (only where it is written plainly, not encoded)."""
    pattern = re.compile(rules.billing_pattern.encode(), re.IGNORECASE)
    stripped = pattern.sub(b"", subject)
    return b" ".join(stripped.split()) if stripped != subject else subject
