"""Status-mail rules: recognise a status email and extract its fields, by declarative rules.

GreenFax does not document its status email, so the wording lives in
rules/status/*.toml (and the operator's own files), not in code. A rule says
how to recognise a status mail (sender and subject patterns) and where each
field is (a pattern with one group, searched in the subject, the plain-text
body and/or the HTML body turned into text), and maps result texts to
delivered/failed and a reason. The first rule that recognises a mail wins.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.config import check_zone
from gateway.errors import ConfigError
from gateway.status.mailparse import ParsedMail
from gateway.status.report import REASONS, Channel, Result, StatusReport, Trust, dedup_key, parse_time

Source = Literal["subject", "text", "html"]
FIELDS = ("job_code", "fax_number", "result", "pages", "duration", "cost", "reference_id", "time")


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression {value!r}: {exc}") from None
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldRule(_Model):
    pattern: str
    sources: list[Source] = ["text", "html"]
    formats: list[str] = []  # for `time`: strptime formats tried in order

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        _regex(value)
        if re.compile(value).groups < 1:
            raise ValueError(f"the pattern {value!r} needs one capturing group")
        return value


class ResultRule(_Model):
    match: str  # a pattern for the whole result text, case-insensitive
    result: Result
    reason: str | None = None

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        return _regex(value)

    @field_validator("reason")
    @classmethod
    def _known_reason(cls, value: str | None) -> str | None:
        if value is not None and value not in REASONS:
            raise ValueError(f"reason {value!r} is not one of {', '.join(REASONS)}")
        return value


class MailRule(_Model):
    name: str
    description: str = ""
    senders: list[str] = []  # patterns for the From address; empty = any sender
    subject: str | None = None  # pattern the subject must match
    timezone: str = "UTC"  # for times written without a zone
    fields: dict[str, FieldRule]
    results: list[ResultRule] = Field(min_length=1)

    @field_validator("senders")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        return [_regex(v) for v in value]

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return _regex(value) if value is not None else None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return check_zone(value)

    @field_validator("fields")
    @classmethod
    def _field_names(cls, value: dict[str, FieldRule]) -> dict[str, FieldRule]:
        unknown = set(value) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}")
        if "result" not in value:
            raise ValueError("a rule must extract `result`")
        return value

    def recognises(self, mail: ParsedMail) -> bool:
        if self.senders and not any(re.search(p, mail.from_addr, re.IGNORECASE) for p in self.senders):
            return False
        return self.subject is None or re.search(self.subject, mail.subject, re.IGNORECASE) is not None


@dataclass(frozen=True)
class Extraction:
    """What one rule found in one mail (for reports and `faxgw rules test`)."""

    rule: MailRule
    values: dict[str, str]  # field -> the text the pattern captured
    report: StatusReport


@dataclass(frozen=True, slots=True)
class Compiled:
    """One rule with its patterns compiled, once per rule set, so that reading a mail compiles nothing."""

    rule: MailRule
    senders: tuple[re.Pattern[str], ...]
    subject: re.Pattern[str] | None
    fields: tuple[tuple[str, re.Pattern[str], tuple[Source, ...]], ...]
    results: tuple[tuple[re.Pattern[str], Result, str | None], ...]
    time_formats: list[str]
    zone: ZoneInfo

    @classmethod
    def of(cls, rule: MailRule) -> Compiled:
        return cls(
            rule=rule, senders=tuple(re.compile(p, re.IGNORECASE) for p in rule.senders),
            subject=re.compile(rule.subject, re.IGNORECASE) if rule.subject is not None else None,
            fields=tuple((name, re.compile(f.pattern, re.IGNORECASE | re.MULTILINE), tuple(f.sources))
                         for name, f in rule.fields.items()),
            results=tuple((re.compile(r.match, re.IGNORECASE), r.result, r.reason) for r in rule.results),
            time_formats=rule.fields["time"].formats if "time" in rule.fields else [], zone=ZoneInfo(rule.timezone),
        )

    def recognises(self, mail: ParsedMail) -> bool:
        """MailRule.recognises(), with the compiled patterns."""
        if self.senders and not any(p.search(mail.from_addr) for p in self.senders):
            return False
        return self.subject is None or self.subject.search(mail.subject) is not None


class MailRules:
    """The loaded rule set, in order."""

    def __init__(self, rules: list[MailRule]) -> None:
        self.rules = rules
        self._compiled = [Compiled.of(rule) for rule in rules]

    def match(self, mail: ParsedMail) -> MailRule | None:
        compiled = self._match(mail)
        return compiled.rule if compiled is not None else None

    def _match(self, mail: ParsedMail) -> Compiled | None:
        return next((compiled for compiled in self._compiled if compiled.recognises(mail)), None)

    def extract(self, mail: ParsedMail, *, channel: Channel, trust: Trust) -> Extraction | None:
        compiled = self._match(mail)
        if compiled is None:
            return None
        return extract(compiled, mail, channel=channel, trust=trust)

    def explain(self, mail: ParsedMail) -> list[str]:
        """Why no rule recognised the mail, one line per rule."""
        lines = []
        for rule in self.rules:
            if rule.senders and not any(re.search(p, mail.from_addr, re.IGNORECASE) for p in rule.senders):
                lines.append(f"{rule.name}: sender {mail.from_addr or '(none)'!r} matches none of {rule.senders}")
            elif rule.subject is not None:
                lines.append(f"{rule.name}: subject {mail.subject!r} does not match {rule.subject!r}")
        return lines


def extract(compiled: Compiled, mail: ParsedMail, *, channel: Channel, trust: Trust) -> Extraction:
    rule = compiled.rule
    texts = {"subject": mail.subject, "text": mail.text, "html": mail.html_text}
    values: dict[str, str] = {}
    for name, pattern, sources in compiled.fields:
        for source in sources:
            found = pattern.search(texts[source])
            if found and found[1] is not None:
                values[name] = found[1].strip()
                break
    result, reason = _result(compiled, values.get("result"))
    reported_at = parse_time(values.get("time"), compiled.time_formats, compiled.zone)
    report = StatusReport(
        channel=channel, trust=trust, raw=mail.raw.decode("utf-8", "replace"), result=result,
        result_text=values.get("result"), reason=reason, fax_number=normalise_number(values.get("fax_number")),
        pages=_int(values.get("pages")), duration=_seconds(values.get("duration")), cost=values.get("cost"),
        reference_id=values.get("reference_id"), job_code=(values.get("job_code") or "").upper() or None,
        reported_at=reported_at, reported_at_raw=values.get("time"),
        dedup_key=dedup_key("mail", *mail.identity()), rule=rule.name,
    )
    return Extraction(rule, values, report)


def _result(compiled: Compiled, text: str | None) -> tuple[Result | None, str | None]:
    if text is None:
        return None, None
    for pattern, result, reason in compiled.results:
        if pattern.fullmatch(text.strip()):
            return result, reason
    return None, None


@lru_cache(maxsize=4096)
def normalise_number(text: str | None) -> str | None:
    """GreenFax writes numbers with their country code; store them in E.164.

    Cached: the same numbers come back in every channel's report (and, in an
    office, fax after fax), and phonenumbers takes a while over each.
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


_NOT_DIGIT = re.compile(r"[^0-9]")


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


def _int(text: str | None) -> int | None:
    match = re.search(r"\d+", text or "")
    # Up to 18 digits: what the store's INTEGER holds (and int() refuses over 4,300).
    return int(match[0]) if match and len(match[0]) <= 18 else None


def _seconds(text: str | None) -> int | None:
    if not text:
        return None
    clock = re.fullmatch(r"\s*(\d{1,12}):(\d{2})(?::(\d{2}))?\s*", text)
    if clock:
        parts = [int(p) for p in clock.groups() if p is not None]
        return parts[0] * 60 + parts[1] if len(parts) == 2 else parts[0] * 3600 + parts[1] * 60 + parts[2]
    return _int(text)


# --- loading --------------------------------------------------------------------------


def load_rules(extra_files: list[Path] | None = None) -> MailRules:
    """Shipped rules/status/*.toml, then the operator's files; a rule of the same name replaces one."""
    rules: dict[str, MailRule] = {}
    shipped = resources.files("gateway.shipped_rules").joinpath("status")
    sources: list[tuple[str, str]] = sorted(
        (f"rules/status/{item.name}", item.read_text("utf-8")) for item in shipped.iterdir()
        if item.name.endswith(".toml")
    )
    for path in extra_files or []:
        try:
            sources.append((str(path), Path(path).read_text("utf-8")))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read status rules: {exc.strerror}") from None
    for name, text in sources:
        for rule in _parse_file(name, text):
            rules.pop(rule.name, None)
            rules[rule.name] = rule
    return MailRules(list(rules.values()))


def _parse_file(name: str, text: str) -> list[MailRule]:
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    parsed = []
    for index, entry in enumerate(data.get("rule", [])):
        label = entry.get("name", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
        try:
            parsed.append(MailRule.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'rule'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
            )
            raise ConfigError(f"{name}: rule {label}: {problems}") from None
    if set(data) - {"rule"}:
        raise ConfigError(f"{name}: unknown top-level key(s) {sorted(set(data) - {'rule'})}; rules go in [[rule]] tables")
    return parsed
