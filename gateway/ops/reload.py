"""SIGHUP: renewed TLS certificates and changed rules, taken in without closing a listener or a session.

What a reload takes in: the certificate and key files of [smtp] and [http]
(loaded into the listeners' own TLS contexts, so sessions already open keep
theirs and every new handshake gets the new one), the addressing rules
(rules/addressing.toml with the config's [addressing] overrides) and the
status-mail rules (rules/status/ and [status] rule_files). The config file
is read again for these; any other changed setting waits for a restart,
and the log says which.

Everything is loaded and checked before anything is applied: a broken rules
file, config or certificate is refused with a logged error, and the rules
and certificates in force stay in force.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway import config
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.rules import AddressingRules, load_addressing
from gateway.status.mailrules import MailRules, load_rules

TLS_KINDS = ("smtp", "http")


@dataclass(frozen=True)
class Reloadable:
    """Everything one reload applies, loaded and checked."""

    addressing: AddressingRules
    mail_rules: MailRules
    certificates: dict[str, tuple[Path, Path]]  # "smtp" / "http": the certificate and key files to load
    restart_needed: list[str]  # settings that changed but are taken in only by a restart


def load_reloadable(current: Settings, *, with_tls: set[str]) -> Reloadable:
    """Read the config file again (when there is one) and load what a reload applies; ConfigError if broken.

    `with_tls`: the kinds of listener that run with TLS now; a listener
    without TLS cannot take it up without a restart.
    """
    new = config.load(current.source) if Path(current.source).is_file() else current
    addressing = load_addressing(new.addressing)
    mail_rules = load_rules(new.status.rule_files)
    restart_needed = _changed(current, new)
    certificates = {}
    for kind in TLS_KINDS:
        section = getattr(new, kind)
        if kind in with_tls and section.tls_cert:
            check_certificate(kind, section.tls_cert, section.tls_key)
            certificates[kind] = (section.tls_cert, section.tls_key)
        elif (kind in with_tls) != bool(section.tls_cert):
            restart_needed.append(f"{kind}.tls_cert")
    return Reloadable(addressing, mail_rules, certificates, restart_needed)


def server_context(kind: str, cert: Path, key: Path | None) -> ssl.SSLContext:
    """A server TLS context with the pair loaded; an error names the [kind] keys and the file."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{kind}.tls_cert/{kind}.tls_key: cannot load {cert}: {exc}") from None
    return context


def check_certificate(kind: str, cert: Path, key: Path | None) -> None:
    """Load the pair into a context of its own, so a broken one never reaches a listener."""
    server_context(kind, cert, key)


def renew(contexts: list[ssl.SSLContext], kind: str, cert: Path, key: Path) -> None:
    """Load the (checked) pair into the listeners' contexts: the next handshake on each gets it."""
    for context in contexts:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:  # the files changed again since the check
            raise ConfigError(f"{kind}.tls_cert/{kind}.tls_key: cannot load {cert}: {exc}") from None


def _changed(current: Settings, new: Settings) -> list[str]:
    """Sections of the config that differ and are not taken in by a reload."""
    old_data, new_data = current.model_dump(exclude={"source"}), new.model_dump(exclude={"source"})
    for data in (old_data, new_data):
        data.pop("addressing")
        data["status"].pop("rule_files")
        for kind in TLS_KINDS:
            data[kind].pop("tls_cert")
            data[kind].pop("tls_key")
    return sorted(name for name in old_data if old_data[name] != new_data[name])
