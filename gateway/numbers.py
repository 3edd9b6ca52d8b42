"""Fax numbers: the gateway's one module around phonenumbers; numbers are kept in E.164.

A number reaches the gateway in one of two ways, and each has its reading:

- as a status channel writes it (GreenFax's status mails, Notify calls and
  feed rows): digits with the country code first, perhaps with separators
  or an international "00". `normalise_number()` gives it in E.164 and
  never refuses one: a report keeps whatever number it names, and
  correlation decides what it matches.
- as a person writes it (a `faxgw status --number` or `/api/jobs?number=`
  filter): any common notation, a national one read in a default region.
  `read_number()` gives the valid number (E.164, and what policy decides
  by: country code, region, kind) or a `NotANumber` whose message says why
  not, naming what was written.

Both are phonenumbers. `normalise_number()` knows one thing more: when
phonenumbers would give "+" and the digits back unchanged (most numbers),
which it can tell from the country code and that country's national prefix
alone; the full parse is left for the rest. bench/status.py measured the
feed below 5,000 rows/s without it; tests/test_numbers.py compares the two
readings on 40,000 generated numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache

import phonenumbers

# The notation people write numbers in: digits, a leading +, spaces, brackets and - . / between them.
_WRITTEN = re.compile(r"\+?[0-9 ()./-]+")
_NOT_DIGIT = re.compile(r"[^0-9]")
# What rule files may name: phonenumbers' regions and number kinds.
REGIONS = frozenset(phonenumbers.SUPPORTED_REGIONS)
KINDS = frozenset(name for name in vars(phonenumbers.PhoneNumberType) if name.isupper())
EXPECTED = "expected a fax number such as \"+1 212 555 0123\" or 12125550123"


@dataclass(frozen=True, slots=True)
class Number:
    """A valid number: its E.164 form and what policy decides by."""

    e164: str
    country_code: int
    region: str | None  # phonenumbers' region code ("US"; "001" non-geographic), None when it names none
    kind: str  # the name of its phonenumbers.PhoneNumberType: "FIXED_LINE", "MOBILE", "PREMIUM_RATE", ...


@dataclass(frozen=True, slots=True)
class NotANumber:
    """Why a written number is not a valid one."""

    message: str  # for a person, naming what was written: "'123' is not a valid phone number"
    reason: str | None = None  # phonenumbers' words when it cannot read the text at all; None: read, but not valid


@lru_cache(maxsize=4096)
def normalise_number(text: str | None) -> str | None:
    """A number as a status channel writes it (country code first), in E.164; None when it has no digits.

    What phonenumbers cannot read is kept as "+" and its digits. Cached: the
    same numbers come back in every channel's report (and, in an office, fax
    after fax).
    """
    if not text:
        return None
    digits = _NOT_DIGIT.sub("", text)
    if not digits:
        return None
    if _plainly_e164(digits):
        return "+" + digits
    try:
        parsed = phonenumbers.parse("+" + digits.removeprefix("00"))
    except phonenumbers.NumberParseException:
        return "+" + digits
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _plainly_e164(digits: str) -> bool:
    """Whether phonenumbers would give "+" + digits back, known without its full parse.

    It gives back something else only for a number it reads (a known country
    code, then a national number) whose national number starts with that
    country's national prefix (the 0 of +44 020...), which it removes. Any
    other number comes back as it is: unchanged when it is read, or as
    "+" + digits when it cannot be read at all. Numbers starting with 0 (or
    00) take the full parse.
    """
    if digits[0] == "0":
        return False
    for length in (1, 2, 3):  # phonenumbers tries the shortest country code first
        code = int(digits[:length])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            prefix = _national_prefix(code)
            return prefix is None or prefix.match(digits[length:]) is None
    return True  # no country code: phonenumbers cannot read it


@cache
def _national_prefix(code: int) -> re.Pattern[str] | None:
    """The pattern phonenumbers strips from the start of a national number of this country code, if any."""
    region = phonenumbers.region_code_for_country_code(code)
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    prefix = metadata.national_prefix_for_parsing if metadata is not None else None
    return re.compile(prefix) if prefix else None


def read_number(text: str, region: str) -> Number | NotANumber:
    """A number as a person writes it ("+1 212 555 0123", "(212) 555-0123" in region "US"), or why it is none."""
    if not _WRITTEN.fullmatch(text):
        return NotANumber(f"{text!r}: {EXPECTED}", "not written as a number")
    try:
        parsed = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        return NotANumber(f"{text!r}: {EXPECTED}", str(exc.args[0]) if exc.args else str(exc))
    if not phonenumbers.is_valid_number(parsed):
        return NotANumber(f"{text!r} is not a valid phone number")
    return Number(e164=phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164),
                  country_code=parsed.country_code, region=phonenumbers.region_code_for_number(parsed),
                  kind=phonenumbers.PhoneNumberType.to_string(phonenumbers.number_type(parsed)))


def region_of(e164: str) -> str | None:
    """The region of a number already in E.164 ("US"; "001" non-geographic), None when it names none."""
    return phonenumbers.region_code_for_number(phonenumbers.parse(e164))
