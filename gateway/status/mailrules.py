"""Status-mail rules: recognise a status email and extract its fields, by declarative rules.

GreenFax does not document its status email, so the wording lives in
rules/status/*.toml (and the operator's own files), not in code. A rule says
how to recognise a status mail (sender and subject patterns) and where each
field is (a pattern searched in one or more sources: the subject, the plain-
text body, the HTML body turned into text, a header of the mail, or a header
of the original message it returns), and maps result texts (and, where the
mail writes the reason apart, reason texts) to delivered/failed and a reason.
Every pattern is case-insensitive; field patterns are multi-line (^ and $
match at each line). A field takes the pattern's one capturing group, or the
group named `value` where it has more.

Rules are tried in order (the shipped ones, then the operator's): the first
that recognises a mail AND extracts every field it requires (`required`,
by default `result`) is used; one that recognises it but extracts too little
lets the next rule try, so that a broad rule cannot swallow a layout a later
rule reads completely.
"""

from __future__ import annotations

import email
import email.policy
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.outbound import mimeparse
from gateway.config import check_zone
from gateway.errors import ConfigError
from gateway.numbers import normalise_number
from gateway.status.mailparse import ParsedMail
from gateway.status.report import dedup_key, parse_time
from gateway.models import REASONS, Channel, Result, StatusReport, Trust

FIELDS = ("job_code", "fax_number", "result", "reason", "pages", "duration", "cost", "reference_id", "time")
BODY_SOURCES = ("subject", "text", "html")
ORIGINAL_SOURCES = ("original.subject", "original.message_id", "original.to", "original.from")
SOURCES_HELP = ("subject, text, html, original.subject, original.message_id, original.to, original.from,"
                " or header.<Name>")


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
    sources: list[str] = ["text", "html"]
    formats: list[str] = []  # for `time`: strptime formats tried in order

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        _regex(value)
        compiled = re.compile(value)
        if compiled.groups < 1:
            raise ValueError(f"the pattern {value!r} needs one capturing group")
        if compiled.groups > 1 and "value" not in compiled.groupindex:
            raise ValueError(f"the pattern {value!r} has {compiled.groups} capturing groups: keep one, make the"
                             " others (?:...), or name the one to take (?P<value>...)")
        return value

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        for source in value:
            if source not in BODY_SOURCES + ORIGINAL_SOURCES and not re.fullmatch(r"header\.[!-9;-~]+", source):
                raise ValueError(f"unknown source {source!r}; expected {SOURCES_HELP}")
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
        return _known_reason(value)


class ReasonRule(_Model):
    match: str  # a pattern for the whole text of the `reason` field, case-insensitive
    reason: str

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        return _regex(value)

    @field_validator("reason")
    @classmethod
    def _known_reason(cls, value: str) -> str:
        return _known_reason(value) or value


def _known_reason(value: str | None) -> str | None:
    if value is not None and value not in REASONS:
        raise ValueError(f"reason {value!r} is not one of {', '.join(REASONS)}")
    return value


class MailRule(_Model):
    name: str
    description: str = ""
    senders: list[str] = []  # patterns for the From address; empty = any sender
    subject: str | None = None  # pattern the subject must match
    timezone: str = "UTC"  # for times written without a zone
    required: list[str] = ["result"]  # fields the rule must find, else the next rule tries
    fields: dict[str, FieldRule]
    results: list[ResultRule] = Field(min_length=1)
    reasons: list[ReasonRule] = []  # for a reason written apart from the result (the `reason` field)

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

    @model_validator(mode="after")
    def _required_fields(self) -> MailRule:
        missing = [name for name in self.required if name not in self.fields]
        if missing:
            raise ValueError(f"required: {', '.join(missing)} is not among the rule's fields")
        if self.reasons and "reason" not in self.fields:
            raise ValueError("reasons: the rule has no `reason` field for them to read")
        return self


@dataclass(frozen=True)
class Extraction:
    """What one rule found in one mail (for reports and `faxgw rules test`)."""

    rule: MailRule
    values: dict[str, str]  # field -> the text the pattern captured
    report: StatusReport

    @property
    def missing(self) -> list[str]:
        """The required fields the rule did not find: with any, the next rule tries."""
        return [name for name in self.rule.required if name not in self.values]


@dataclass(frozen=True)
class Attempt:
    """One rule against one mail, for `faxgw rules test`: whether it recognised it, what it found, why."""

    rule: MailRule
    extraction: Extraction | None  # None: not recognised
    why: str


@dataclass(frozen=True, slots=True)
class Compiled:
    """One rule with its patterns compiled, once per rule set, so that reading a mail compiles nothing."""

    rule: MailRule
    senders: tuple[re.Pattern[str], ...]
    subject: re.Pattern[str] | None
    fields: tuple[tuple[str, re.Pattern[str], tuple[str, ...]], ...]
    results: tuple[tuple[re.Pattern[str], Result, str | None], ...]
    reasons: tuple[tuple[re.Pattern[str], str], ...]
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
            reasons=tuple((re.compile(r.match, re.IGNORECASE), r.reason) for r in rule.reasons),
            time_formats=rule.fields["time"].formats if "time" in rule.fields else [], zone=ZoneInfo(rule.timezone),
        )

    def recognises(self, mail: ParsedMail) -> bool:
        return self.refusal(mail) is None

    def refusal(self, mail: ParsedMail) -> str | None:
        """Why the rule does not recognise the mail, or None when it does."""
        if self.senders and not any(p.search(mail.from_addr) for p in self.senders):
            return f"sender {mail.from_addr or '(none)'!r} matches none of {self.rule.senders}"
        if self.subject is not None and self.subject.search(mail.subject) is None:
            return f"subject {mail.subject!r} does not match {self.rule.subject!r}"
        return None


class MailRules:
    """The loaded rule set, in order."""

    def __init__(self, rules: list[MailRule]) -> None:
        self.rules = rules
        self._compiled = [Compiled.of(rule) for rule in rules]

    def extract(self, mail: ParsedMail, *, channel: Channel, trust: Trust) -> Extraction | None:
        """The first rule that recognises the mail and finds every field it requires; None if none does."""
        sources = _Sources(mail)
        for compiled in self._compiled:
            if compiled.recognises(mail):
                extraction = extract(compiled, mail, sources, channel=channel, trust=trust)
                if not extraction.missing:
                    return extraction
        return None

    def attempts(self, mail: ParsedMail, *, channel: Channel, trust: Trust) -> list[Attempt]:
        """Every rule against the mail, in order, and why each was or was not used (`faxgw rules test`)."""
        sources = _Sources(mail)
        found: list[Attempt] = []
        used = False
        for compiled in self._compiled:
            refusal = compiled.refusal(mail)
            if refusal is not None:
                found.append(Attempt(compiled.rule, None, f"not recognised: {refusal}"))
                continue
            extraction = extract(compiled, mail, sources, channel=channel, trust=trust)
            if extraction.missing:
                why = f"recognised, but found no {', '.join(extraction.missing)}: the next rule tries"
            elif used:
                why = "recognised and complete, but an earlier rule was used"
            else:
                why, used = "used: the first rule that recognised the mail and found every required field", True
            found.append(Attempt(compiled.rule, extraction, why))
        return found

    def explain(self, mail: ParsedMail) -> list[str]:
        """Why no rule was used, one line per rule."""
        return [f"{attempt.rule.name}: {attempt.why.removeprefix('not recognised: ')}"
                for attempt in self.attempts(mail, channel=Channel.SMTP, trust=Trust.UNTRUSTED)]


class _Sources:
    """The texts a rule's patterns search, each made once per mail and only when a rule asks for it."""

    def __init__(self, mail: ParsedMail) -> None:
        self.mail = mail
        self._original: dict[str, str] | None = None

    def text(self, source: str) -> str:
        mail = self.mail
        if source == "subject":
            return mail.subject
        if source == "text":
            return mail.text
        if source == "html":
            return mail.html_text
        if source.startswith("header."):
            return mail.headers.get(source.removeprefix("header.").lower(), "")
        if self._original is None:
            self._original = original_headers(mail.raw)
        return self._original.get(source.removeprefix("original.").replace("_", "-"), "")


def original_headers(raw: bytes) -> dict[str, str]:
    """The headers of the original message a status mail returns (a message/rfc822 or text/rfc822-headers
    part), names in lower case, encoded words decoded; empty when it returns none. Never raises."""
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        for part in message.walk():
            kind = part.get_content_type()
            if kind == "message/rfc822" and isinstance(part.get_payload(), list) and part.get_payload():
                original = part.get_payload()[0]
            elif kind == "text/rfc822-headers":
                payload = part.get_payload(decode=True) or b""
                original = email.message_from_bytes(payload, policy=email.policy.compat32)
            else:
                continue
            return {name.lower(): mimeparse.decoded(str(value)) for name, value in original.items()}
    except Exception:  # noqa: BLE001 - a status mail must never be lost to this
        pass
    return {}


def extract(compiled: Compiled, mail: ParsedMail, sources: _Sources | None = None, *, channel: Channel,
            trust: Trust) -> Extraction:
    rule = compiled.rule
    sources = sources or _Sources(mail)
    values: dict[str, str] = {}
    for name, pattern, places in compiled.fields:
        for source in places:
            found = pattern.search(sources.text(source))
            value = found and (found["value"] if "value" in pattern.groupindex else found[1])
            if value is not None and value is not False and value.strip():
                values[name] = value.strip()
                break
    result, reason = _result(compiled, values.get("result"))
    if result is Result.FAILED and "reason" in values:
        reason = _reason(compiled, values["reason"]) or reason
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


def _reason(compiled: Compiled, text: str) -> str | None:
    return next((reason for pattern, reason in compiled.reasons if pattern.fullmatch(text.strip())), None)


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
            problems = "; ".join(_problem(error) for error in exc.errors())
            raise ConfigError(f"{name}: rule {label}: {problems}") from None
    if set(data) - {"rule"}:
        raise ConfigError(f"{name}: unknown top-level key(s) {sorted(set(data) - {'rule'})}; rules go in [[rule]] tables")
    return parsed


def _problem(error: Any) -> str:
    """One validation error as "where: what"; an unknown key lists the keys allowed there."""
    where = ".".join(map(str, error["loc"])) or "rule"
    if error["type"] != "extra_forbidden":
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    model: type[BaseModel] = MailRule
    for part in error["loc"][:-1]:
        if part == "fields":
            model = FieldRule
        elif part == "results":
            model = ResultRule
        elif part == "reasons":
            model = ReasonRule
    return f"{where}: unknown key; allowed: {', '.join(model.model_fields)}"
