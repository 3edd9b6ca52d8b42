"""Rules: loads rules/*.toml into typed tables, merged with the config's overrides.

No other I/O and no decisions here: policy.py applies the tables. A broken
rules file is a ConfigError naming the file, the key and the problem.
"""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway import numbers
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.status.mailrules import MailRules

RULES_PACKAGE = "gateway.shipped_rules"


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecipientRules(_Table):
    local_fax_domains: list[str] = []
    subject_mailbox: str = ""
    subject_number_pattern: str = r"(\+?[0-9][0-9 ()./-]{4,24}[0-9])"

    @field_validator("subject_number_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            if re.compile(value).groups < 1:
                raise ValueError("the pattern needs one capturing group for the number")
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("local_fax_domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [domain.lower().rstrip(".") for domain in value]


class NumberRules(_Table):
    default_region: str = "US"
    allow_international: bool = False
    refused_types: list[str] = []
    refused_country_codes: list[int] = []

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        if value.upper() not in numbers.REGIONS:
            raise ValueError("expected an ISO 3166 region code known to phonenumbers, e.g. \"US\" or \"DE\"")
        return value.upper()

    @field_validator("refused_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in numbers.KINDS:
                raise ValueError(f"{name!r} is not a phonenumbers number type (e.g. PREMIUM_RATE)")
        return value


class ContentRules(_Table):
    allowed_types: list[str] = []
    allowed_extensions: list[str] = []
    allow_body_only: bool = False
    billing_pattern: str = r"\[billing:\s*([A-Za-z0-9][A-Za-z0-9._/-]{0,39})\s*\]"
    billing_header: str = "X-Fax-Billing-Code"
    require_billing_code: bool = False

    @field_validator("billing_pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if pattern.groups != 1:
            raise ValueError("the pattern needs exactly one group: the billing code")
        return value

    @property
    def billing(self) -> re.Pattern[str]:
        return re.compile(self.billing_pattern, re.IGNORECASE)


class JobCodeRules(_Table):
    placement: Literal["subject", "header"] = "subject"
    subject_tag: str = "[{code}]"
    header: str = "X-GreenFax-Job-Code"

    @field_validator("subject_tag")
    @classmethod
    def _has_code(cls, value: str) -> str:
        if "{code}" not in value:
            raise ValueError("the tag must contain {code}")
        return value


class AddressingRules(_Table):
    recipients: RecipientRules = Field(default_factory=RecipientRules)
    numbers: NumberRules = Field(default_factory=NumberRules)
    content: ContentRules = Field(default_factory=ContentRules)
    jobcode: JobCodeRules = Field(default_factory=JobCodeRules)

    def tag_pattern(self) -> re.Pattern[str]:
        """A pattern that finds the job code where the rules placed it (used by the sandbox)."""
        before, _, after = self.jobcode.subject_tag.partition("{code}")
        return re.compile(re.escape(before) + r"(FX[0-9A-Z]{6})" + re.escape(after))


def load_addressing(overrides: dict[str, Any] | None = None) -> AddressingRules:
    """The shipped rules/addressing.toml with the config's [addressing] overrides on top."""
    name = "addressing.toml"
    try:
        shipped = tomllib.loads(resources.files(RULES_PACKAGE).joinpath(name).read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"rules/{name}: cannot load: {exc}") from None
    merged = _merge(shipped, overrides or {})
    try:
        return AddressingRules.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(f"rules/{name} (with [addressing] overrides): {problems}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class RulesInForce:
    """The rules the running gateway decides by: one object, given to every stage at construction.

    `addressing` (rules/addressing.toml with the config's [addressing]
    overrides) and `mail` (the status-mail rules) are read at each use; a
    reload (SIGHUP) replaces both as a whole with `replace()`, so a check
    sees the old rules or the new ones, never a mix (checks run on the event
    loop, one at a time). Left out, either is the shipped default.
    """

    def __init__(self, addressing: AddressingRules | None = None, mail: MailRules | None = None) -> None:
        self.replace(addressing if addressing is not None else load_addressing(), mail)

    @classmethod
    def load(cls, settings: Settings) -> RulesInForce:
        """The rules the settings name; a broken file is a ConfigError."""
        from gateway.status.mailrules import load_rules

        return cls(load_addressing(settings.addressing), load_rules(settings.status.rule_files))

    def replace(self, addressing: AddressingRules, mail: MailRules | None) -> None:
        self.addressing = addressing
        self.tag_pattern = addressing.tag_pattern()
        self._mail = mail

    @property
    def mail(self) -> MailRules:
        if self._mail is None:
            from gateway.status.mailrules import load_rules

            self._mail = load_rules()
        return self._mail

    @property
    def code_header(self) -> str | None:
        """The header the job code travels in, when the rules place it in a header."""
        jobcode = self.addressing.jobcode
        return jobcode.header if jobcode.placement == "header" else None
