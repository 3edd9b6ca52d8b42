"""gateway/numbers.py: numbers as status channels write them and as people write them, in E.164."""

from __future__ import annotations

import random
import re
import string

import phonenumbers
import pytest

from gateway.numbers import Number, NotANumber, normalise_number, read_number


@pytest.mark.parametrize(("written", "e164"), [
    ("12125551234", "+12125551234"),
    ("+1 (212) 555-1234", "+12125551234"),
    ("0012125551234", "+12125551234"),  # an international 00
    ("4402079460958", "+442079460958"),  # the national 0 after the country code goes
    ("+44 20 7946 0958", "+442079460958"),
    ("99912345", "+99912345"),  # no country code phonenumbers knows: kept as written
    ("1", "+1"),
    ("", None), (None, None), ("no digits", None),
])
def test_a_number_as_a_status_channel_writes_it(written, e164):
    assert normalise_number(written) == e164


def test_a_number_as_a_person_writes_it_is_read_in_the_region():
    assert read_number("(212) 555-0123", "US") == Number("+12125550123", 1, "US", "FIXED_LINE_OR_MOBILE")
    assert read_number("+44 20 7946 0958", "US") == Number("+442079460958", 44, "GB", "FIXED_LINE")
    assert read_number("020 7946 0958", "GB").e164 == "+442079460958"
    assert read_number("+800 1234 5678", "US").region == "001"  # non-geographic


@pytest.mark.parametrize(("written", "message", "reason"), [
    ("fax", "'fax': expected a fax number such as \"+1 212 555 0123\" or 12125550123", "not written as a number"),
    ("(-)", "'(-)': expected a fax number such as \"+1 212 555 0123\" or 12125550123",
     "The string supplied did not seem to be a phone number."),
    ("+999 123", "'+999 123': expected a fax number such as \"+1 212 555 0123\" or 12125550123",
     "Could not interpret numbers after plus-sign."),
    ("123", "'123' is not a valid phone number", None),
])
def test_what_is_not_a_valid_number_says_why(written, message, reason):
    assert read_number(written, "US") == NotANumber(message, reason)


def phonenumbers_reading(text: str) -> str | None:
    digits = re.sub(r"[^0-9]", "", text)
    if not digits:
        return None
    try:
        parsed = phonenumbers.parse("+" + digits.removeprefix("00"))
    except phonenumbers.NumberParseException:
        return "+" + digits
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def test_numbers_are_normalised_as_phonenumbers_does_it():
    rnd = random.Random(4711)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    cases = ["12125551234", "+44 20 7946 0958", "4402079460958", "0012125551234", "1", "0", "(212) 555-1234"]
    for _ in range(20000):
        national = "".join(rnd.choice(string.digits) for _ in range(rnd.randint(0, 16)))
        cases.append(str(rnd.choice(codes)) + rnd.choice(["", "0", "1", "00"]) + national)
        cases.append("".join(rnd.choice(string.digits) for _ in range(rnd.randint(1, 20))))
    for case in cases:
        normalise_number.cache_clear()
        assert normalise_number(case) == phonenumbers_reading(case), case
