"""Settings: one TOML file, read once, validated, passed explicitly.

Every key with its default is declared below (like Postfix's smtpd.c header).
An error names the key, the bad value (never for secrets) and what is
expected. Secrets may be given inline, as `{ env = "NAME" }` or as
`{ file = "/path" }`; they are held as `SecretStr` and print masked.

With no config file at all, `sandbox_settings()` gives the sandbox set-up:
the gateway forwards to the built-in GreenFax stand-in and its store lives
under ./var/.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.units import format_duration, format_size, parse_duration, parse_size

SECRET_KEYS = ("password", "token", "secret")


def is_secret_key(name: str) -> bool:
    """Whether a settings key holds a secret (its value is never printed); an endpoint's URL is not one."""
    return any(word in name for word in SECRET_KEYS) and not name.endswith("_url")
DEFAULT_SANDBOX_SENDER = "faxgw@sandbox.localhost"
DEFAULT_SANDBOX_RETURN_PATH = "fax-bounce@sandbox.localhost"

# --- value types -----------------------------------------------------------

def parse_host_port(value: Any) -> tuple[str, int]:
    if isinstance(value, tuple):
        return value
    text = str(value)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ValueError("expected \"HOST:PORT\", e.g. \"127.0.0.1:2525\" or \"[::1]:2525\"")
    host = match[1] or match[3]
    port = int(match[2] or match[4])
    if not 0 <= port <= 65535:
        raise ValueError("expected a port from 0 to 65535")
    return host, port


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError("expected a network in CIDR form, e.g. \"192.168.1.0/24\"") from None


def _secret(value: Any, info: ValidationInfo) -> SecretStr | None:
    """Resolve `"inline"`, `{ env = "NAME" }` or `{ file = "PATH" }` to a SecretStr.

    A relative file is taken from the config file's directory, like every
    other path in the config (`validate()` passes it as context "base").
    """
    if value is None or isinstance(value, SecretStr):
        return value
    if isinstance(value, str):
        return SecretStr(value)
    if isinstance(value, dict) and set(value) == {"env"}:
        name = str(value["env"])
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return SecretStr(os.environ[name])
    if isinstance(value, dict) and set(value) == {"file"}:
        path = Path(str(value["file"]))
        if not path.is_absolute() and info.context and "base" in info.context:
            path = info.context["base"] / path
        try:
            return SecretStr(path.read_text(encoding="utf-8").rstrip("\r\n"))
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            # The decoder's message quotes a byte of the secret: never show it.
            raise ValueError(f"secret file {path} is not UTF-8 text") from None
    raise ValueError("expected a string, { env = \"NAME\" } or { file = \"/path\" }")


class StoredSecret:
    """A secret the gateway itself may replace (a rotated OAuth2 refresh token), with where it lives.

    Given as `{ file = "PATH" }`, it is read when needed, not at load time
    (the file may not exist before `faxgw oauth login`), and `store()`
    rewrites that file; given inline or as `{ env = ... }`, a new value can
    be kept in memory only.
    """

    def __init__(self, *, value: SecretStr | None = None, file: Path | None = None) -> None:
        self._value = value
        self.file = file

    def read(self) -> str | None:
        """The current value; None when its file does not exist yet."""
        if self.file is None:
            return self._value.get_secret_value() if self._value else None
        try:
            return self.file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {self.file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"secret file {self.file} is not UTF-8 text") from None

    def store(self, value: str) -> bool:
        """Keep a new value: rewrite the file atomically with mode 0600 (False: no file, kept in memory only)."""
        if self.file is None:
            self._value = SecretStr(value)
            return False
        import tempfile

        directory = self.file.parent
        fd, temporary = tempfile.mkstemp(prefix=f".{self.file.name}.", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, value.encode() + b"\n")
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(temporary, self.file)
            directory_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            Path(temporary).unlink(missing_ok=True)
            raise
        return True

    def __repr__(self) -> str:
        return f"StoredSecret(file={self.file})" if self.file else "StoredSecret(********)"


def _stored_secret(value: Any, info: ValidationInfo) -> StoredSecret | None:
    if value is None or isinstance(value, StoredSecret):
        return value
    if isinstance(value, dict) and set(value) == {"file"}:
        path = Path(str(value["file"]))
        if not path.is_absolute() and info.context and "base" in info.context:
            path = info.context["base"] / path
        return StoredSecret(file=path)
    return StoredSecret(value=_secret(value, info))


def _address(value: str) -> str:
    if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.?[^@\s<>]*", value):
        raise ValueError("expected an email address such as fax@example.org")
    return value


def _argon2_hash(value: str) -> str:
    if not value.startswith("$argon2"):
        raise ValueError(
            "expected a password hash made by `faxgw passwd USER`; plaintext passwords are refused"
        )
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HostPort = Annotated[tuple[str, int], BeforeValidator(parse_host_port)]
Network = Annotated[Any, BeforeValidator(_network)]
Secret = Annotated[SecretStr | None, BeforeValidator(_secret)]
# Shown as "********" wherever settings are printed; only the gateway reads or stores it.
Replaceable = Annotated[StoredSecret | None, BeforeValidator(_stored_secret),
                        PlainSerializer(lambda v: "********" if v is not None else None)]
Address = Annotated[str, AfterValidator(_address)]
PasswordHash = Annotated[str, AfterValidator(_argon2_hash)]


def check_zone(value: str) -> str:
    """An IANA time zone name, or a ValueError saying what is expected."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone such as \"America/New_York\"") from None
    return value


def in_networks(address: str, networks: list[Any]) -> bool:
    """Whether an IP address (IPv6 scope and IPv4-mapped forms allowed) lies in one of `networks`."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def address_listed(address: str, entries: list[str]) -> bool:
    """Whether a mail address is one of `entries`: exact addresses, "@domain" entries, or "*" for any
    (compared without regard to case)."""
    lowered = address.lower()
    domain = "@" + lowered.rpartition("@")[2]
    return any(entry == "*" or entry.lower() in (lowered, domain) for entry in entries)


def client_key(address: str) -> str:
    """What one client is, for limits: an IPv4 address, or an IPv6 /64 (which one subscriber usually holds whole)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    return _is_loopback(urlsplit(url).hostname or "")


def _refuse_cleartext(section: str, host: str, allowed: bool, what: str) -> None:
    """A secret over an unencrypted connection beyond loopback is refused unless the section says allow_insecure."""
    if not allowed and not _is_loopback(host):
        raise ValueError(
            f"{section}.tls = \"none\" would send {what} in clear to {host}; use TLS, or set"
            f" {section}.allow_insecure = true if the network between is really private"
        )


def _is_private(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or ip.is_private


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --- sections --------------------------------------------------------------


class SmtpSettings(Section):
    """The intake listeners and who may send faxes through them."""

    listen: list[HostPort] = ["127.0.0.1:2525"]
    listen_tls: list[HostPort] = []  # implicit TLS (SMTPS) listeners
    plaintext_auth: list[HostPort] = []  # listeners of `listen` that allow AUTH without TLS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    hostname: str = Field(default_factory=socket.getfqdn)
    max_message_size: Size = 20 * 2**20
    max_recipients: int = Field(default=50, ge=1)
    line_length_limit: Size = 65536  # longer lines are refused; see README "Long lines"
    bare_lf: Literal["refuse", "normalize"] = "refuse"
    allowed_networks: list[Network] = ["127.0.0.0/8", "::1/128"]
    allowed_senders: list[str] = []  # "user@example.org" or "@example.org"; empty = anyone allowed
    users: dict[str, PasswordHash] = {}
    timeout: Duration = 300
    # A message's top-level header block: at most this many lines and bytes (552 5.3.4 over either), so that
    # a message of header lines cannot make parsing it take memory out of proportion to its size.
    max_header_lines: int = Field(default=1000, ge=10)
    max_header_size: Size = 256 * 1024
    # NOOP, RSET, VRFY and HELP without a message accepted in between (Postfix's smtpd_junk_command_limit),
    # and a session's whole life: over either the client gets 421 and the connection is closed.
    max_junk_commands: int = Field(default=100, ge=1)
    max_session_time: Duration = 3600
    # Refusals (4xx/5xx) in a session without an accepted message: past the soft limit each is answered a
    # second later, at the hard limit the session ends with 421 (Postfix's smtpd_soft/hard_error_limit).
    soft_error_limit: int = Field(default=10, ge=1)
    hard_error_limit: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SmtpSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("smtp.tls_cert and smtp.tls_key must be given together")
        if self.listen_tls and not self.tls_cert:
            raise ValueError("smtp.listen_tls needs smtp.tls_cert and smtp.tls_key")
        for host, port in self.plaintext_auth:
            if (host, port) not in self.listen:
                raise ValueError(f"smtp.plaintext_auth: {host}:{port} is not one of smtp.listen")
            if not _is_private(host):
                raise ValueError(
                    f"smtp.plaintext_auth: {host}:{port} is not a loopback or private address;"
                    " AUTH without TLS is allowed only there"
                )
        return self


class StoreSettings(Section):
    path: Path = Path("var/faxgw.sqlite3")
    # A cap on the store's size (e.g. "2GiB"); past it the gateway answers 452 as on a full disk. None = no cap.
    max_size: Size | None = None


MICROSOFT_LOGIN = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
# Per provider: token URL, device-code URL, and the scope by grant (README, "Microsoft 365 and Google").
OAUTH_PROVIDERS: dict[str, dict[str, Any]] = {
    "microsoft": {
        "token_url": MICROSOFT_LOGIN + "/token",
        "device_url": MICROSOFT_LOGIN + "/devicecode",
        "authorize_url": MICROSOFT_LOGIN + "/authorize",
        "scope": {"client_credentials": "https://outlook.office365.com/.default",
                  "refresh_token": "https://outlook.office.com/SMTP.Send offline_access"},
    },
    "google": {
        "token_url": "https://oauth2.googleapis.com/token",
        "device_url": "https://oauth2.googleapis.com/device/code",
        "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "scope": {"refresh_token": "https://mail.google.com/", "jwt_bearer": "https://mail.google.com/"},
    },
    "generic": {"scope": {}},
}


# Upstreams that stop taking passwords for SMTP AUTH: check-config says what instead.
PASSWORDLESS_HOSTS = {
    "smtp.office365.com": "Microsoft 365 disables password (basic) authentication for SMTP AUTH from the end of"
                          " 2026: set auth = \"xoauth2\" (deploy/OPERATIONS.md, \"Microsoft 365\")",
    "smtp.gmail.com": "Google takes a password only as an app password with 2-step verification: prefer"
                      " auth = \"xoauth2\" (deploy/OPERATIONS.md, \"Google Workspace\")",
}


class OAuthSettings(Section):
    """How the gateway gets the access token it gives the upstream with AUTH XOAUTH2 ([upstream] auth = "xoauth2").

    Unset keys take the provider's values (token_url, device_url, scope, grant),
    so a Microsoft 365 set-up needs only tenant, client_id, client_secret and user.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, arbitrary_types_allowed=True)

    provider: Literal["microsoft", "google", "generic"] = "generic"
    grant: Literal["client_credentials", "refresh_token", "jwt_bearer"] | None = None
    tenant: str | None = None  # Microsoft: the directory (tenant) ID or a verified domain
    token_url: str | None = None
    device_url: str | None = None  # `faxgw oauth login`: the device authorization endpoint
    authorize_url: str | None = None  # `faxgw oauth login --browser`: the authorization endpoint
    client_id: str | None = None
    client_secret: Secret = None
    scope: str | None = None
    refresh_token: Replaceable = None  # { file = ... } is rewritten when the provider rotates it
    service_account_file: Path | None = None  # Google: the service account's JSON key
    user: str | None = None  # the mailbox the gateway sends as (default: [upstream] username)
    timeout: Duration = 15  # for one token request: a slower answer is a temporary failure
    ca_file: Path | None = None  # extra CA to trust for the token endpoint (a private OAuth server)

    @model_validator(mode="before")
    @classmethod
    def _provider_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        known = OAUTH_PROVIDERS.get(str(data.get("provider", "generic")))
        if known is None:
            return data  # the Literal check names the allowed providers
        if data.get("grant") is None:
            if data.get("service_account_file"):
                data["grant"] = "jwt_bearer"
            elif data.get("refresh_token") is not None or data.get("provider") == "google":
                data["grant"] = "refresh_token"
            else:
                data["grant"] = "client_credentials"
        tenant = str(data.get("tenant") or "")
        for key in ("token_url", "device_url", "authorize_url"):
            if data.get(key) is None and key in known and (tenant or "{tenant}" not in known[key]):
                data[key] = known[key].format(tenant=tenant)
        if data.get("scope") is None and data["grant"] in known["scope"]:
            data["scope"] = known["scope"][data["grant"]]
        return data

    @model_validator(mode="after")
    def _check(self) -> OAuthSettings:
        if self.provider == "microsoft" and not self.tenant and self.token_url is None:
            raise ValueError("tenant is required for provider = \"microsoft\" (the directory"
                             " (tenant) ID from Entra ID, or the tenant's domain)")
        if self.token_url is None and not (self.grant == "jwt_bearer" and self.service_account_file):
            raise ValueError("token_url is required for provider = \"generic\"")
        if self.token_url is not None:
            _check_endpoint_url("token_url", self.token_url)
        for key in ("device_url", "authorize_url"):
            if getattr(self, key) is not None:
                _check_endpoint_url(key, getattr(self, key))
        if self.grant == "jwt_bearer":
            if self.service_account_file is None:
                raise ValueError("service_account_file is required for grant = \"jwt_bearer\""
                                 " (the service account's JSON key)")
        elif not self.client_id:
            raise ValueError(f"client_id is required for grant = \"{self.grant}\"")
        if self.grant == "client_credentials" and self.client_secret is None:
            raise ValueError("client_secret is required for grant = \"client_credentials\"")
        if self.grant == "refresh_token" and self.refresh_token is None:
            raise ValueError("refresh_token is required for grant = \"refresh_token\"; give it as"
                             " { file = \"/var/lib/faxgw/refresh-token\" } and run `faxgw oauth login` to fill it")
        return self


def _check_endpoint_url(key: str, url: str) -> None:
    """An OAuth2 endpoint is https; plain http only on loopback (a local token server)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname or ""):
        return
    raise ValueError(f"{key} = {url!r}: expected an https:// URL (http:// only to loopback)")


class UpstreamSettings(Section):
    """Where faxes are forwarded, and as whom (DESIGN.md, "Sender identity")."""

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    ca_file: Path | None = None  # extra CA to trust (a private upstream)
    auth: Literal["password", "xoauth2"] = "password"  # xoauth2: Microsoft 365, Google Workspace ([upstream.oauth])
    username: str | None = None
    password: Secret = None
    oauth: OAuthSettings | None = None
    allow_insecure: bool = False  # let the password cross in clear to a host beyond loopback (tls = "none")
    domain: str = "greenfax.com"
    account_sender: Address | None = None
    return_path: Address | None = None
    helo_name: str | None = None
    connect_timeout: Duration = 30
    timeout: Duration = 120
    # Parallel upstream connections, opened only while there is mail to send. Each waits on the
    # upstream's reply to the data: with 8, a burst from 8 clients left a 2-core gateway forwarding
    # slower than it accepted; with 16 it keeps pace (bench/README.md). Postfix allows 20. Lower it
    # for an upstream that limits connections per client (a 421 there defers the job, no harm done).
    concurrency: int = Field(default=16, ge=1, le=64)
    retry_initial: Duration = 60
    retry_max: Duration = 1800
    max_queue_lifetime: Duration = 2 * 86400
    idle_close: Duration = 30

    @property
    def effective_port(self) -> int:
        return self.port or {"none": 25, "starttls": 587, "implicit": 465}[self.tls]

    @model_validator(mode="before")
    @classmethod
    def _oauth_user(cls, data: Any) -> Any:
        """The XOAUTH2 mailbox defaults to [upstream] username (the service-account grant signs it as subject)."""
        if isinstance(data, dict) and isinstance(data.get("oauth"), dict) and data.get("username"):
            data = {**data, "oauth": {"user": data["username"], **data["oauth"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> UpstreamSettings:
        if self.host and self.password is not None and self.tls == "none":
            _refuse_cleartext("upstream", self.host, self.allow_insecure, "the password")
        if self.auth == "xoauth2":
            if self.oauth is None:
                raise ValueError("upstream.auth = \"xoauth2\" needs an [upstream.oauth] section (provider,"
                                 " client_id, ...: see deploy/OPERATIONS.md, \"Microsoft 365 and Google\")")
            if not self.oauth.user:
                raise ValueError("upstream.oauth.user is required: the mailbox the gateway sends as")
            if self.password is not None:
                raise ValueError("upstream.password and upstream.auth = \"xoauth2\" cannot be used together:"
                                 " remove the password")
            if self.host and self.tls == "none":
                _refuse_cleartext("upstream", self.host, self.allow_insecure, "the access token")
        elif self.oauth is not None:
            raise ValueError("[upstream.oauth] is set but upstream.auth = \"password\": set auth = \"xoauth2\""
                             " to use it, or remove the section")
        return self

    @property
    def mailbox(self) -> str | None:
        """Whom the gateway authenticates as (XOAUTH2's user=, or the password login's name)."""
        if self.auth == "xoauth2" and self.oauth is not None:
            return self.oauth.user
        return self.username

    def return_path_for(self, code: str, secret: str | None = None) -> str:
        """The envelope sender of one job: the job code and its secret as a subaddress of return_path."""
        assert self.return_path
        local, _, domain = self.return_path.rpartition("@")
        return f"{local}+{code}{'.' + secret if secret else ''}@{domain}"


class SandboxSettings(Section):
    enabled: bool = False
    listen: list[HostPort] = ["127.0.0.1:2526"]
    username: str | None = None
    password: Secret = None
    # How the sandbox returns its status email: by SMTP to the gateway's status
    # listener, appended to the [status.imap] mailbox, or not at all.
    status_mail: Literal["smtp", "imap", "none"] = "smtp"
    status_delay: Duration = 0.2
    notify: bool = True  # call the gateway's Notify URL after each fax, as GreenFax does
    # Serve the XML feed (GreenFax's rules, a shorter interval) and let the gateway
    # poll it, unless [feed] url is set.
    feed: bool = True
    feed_listen: HostPort = "127.0.0.1:2527"
    feed_min_interval: Duration = 25


class ImapSettings(Section):
    """The account sender's mailbox, where GreenFax's status emails land."""

    host: str | None = None  # None: no IMAP
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    ca_file: Path | None = None
    username: str | None = None
    password: Secret = None
    allow_insecure: bool = False  # let the password cross in clear to a host beyond loopback (tls = "none")
    # Anyone can mail the account sender's mailbox, so its mail is trusted only by a DKIM signature, like
    # status mail by SMTP; true: every mail in it comes from GreenFax (an address only GreenFax writes to).
    trusted: bool = False
    mailbox: str = "INBOX"
    processed_folder: str = "GreenFax-Processed"  # applied status mails move here; "" = flag them instead
    idle_refresh: Duration = 540  # re-issue IDLE at least this often (routers drop idle connections)
    poll_interval: Duration = 60  # fallback when the server has no IDLE
    timeout: Duration = 30

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == "implicit" else 143)

    @model_validator(mode="after")
    def _check(self) -> ImapSettings:
        if self.host and self.tls == "none":
            _refuse_cleartext("status.imap", self.host, self.allow_insecure, "the password")
        return self


class StatusSettings(Section):
    """Status emails: the inbound SMTP status listener, trust, rules, correlation."""

    listen: list[HostPort] = []  # listeners that accept status mail from any client
    addresses: list[str] = []  # more status addresses besides upstream.account_sender and return_path
    # Status mail counts as trusted (may match a job by number and time window) only with a From domain of
    # trusted_sender_domains AND every check turned on below, at least one: a From domain alone is forgeable.
    trusted_sender_domains: list[str] = ["greenfax.com"]
    require_dkim: bool = True  # a valid DKIM signature of a trusted domain, aligned with the From domain
    # GreenFax's own sending addresses only: not your MX, which relays anyone's forged "From: ...@greenfax.com".
    trusted_networks: list[Network] = []
    dkim_keys: dict[str, str] = {}  # pinned "selector._domainkey.domain" -> "v=DKIM1; k=rsa; p=..."
    # The status listener faces the internet: its own limits (the fax listener's are for known clients).
    max_message_size: Size = 2 * 2**20  # raise it if GreenFax returns your documents with its status mail
    max_recipients: int = Field(default=10, ge=1)
    max_connections: int = Field(default=100, ge=1)  # on status-only listeners, from all clients together
    max_connections_per_client: int = Field(default=10, ge=0)  # on status-only listeners (an IPv6 /64 is one client)
    max_messages_per_minute: int = Field(default=60, ge=0)  # status mails per client address; 0 = no limit
    # Of status mail that is untrusted or that no rule recognises, only this much is kept for review.
    review_excerpt: Annotated[int, BeforeValidator(lambda v: 0 if v in (0, "0") else parse_size(v))] = 16 * 1024
    rule_files: list[Path] = []  # the operator's status-mail rules, after the shipped ones
    match_window: Duration = 3 * 86400
    imap: ImapSettings = Field(default_factory=ImapSettings)


class HttpSettings(Section):
    """The gateway's HTTP listener: JSON API, health check, metrics (and Notify unless it has its own)."""

    listen: list[HostPort] = ["127.0.0.1:8025"]
    tls_cert: Path | None = None
    tls_key: Path | None = None
    api_token: Secret = None  # bearer token for /api/*: always required when set; required beyond loopback
    # Each HTTP listener (and the Notify ones) holds at most this many connections, and one client
    # address at most max_connections_per_client of them; over either, a new connection is closed at once.
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_client: int = Field(default=16, ge=1)
    header_timeout: Duration = 10  # a request's line and headers must arrive within this time
    idle_timeout: Duration = 15  # a keep-alive connection with no request for this long is closed

    @model_validator(mode="after")
    def _check(self) -> HttpSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("http.tls_cert and http.tls_key must be given together")
        return self

    @property
    def loopback_only(self) -> bool:
        return all(_is_loopback(host) for host, _port in self.listen)


class WebSettings(Section):
    """The web console on the [http] listener: the fax log in a browser for the people who run the faxes."""

    enabled: bool = False
    session_idle: Duration = 1800  # a session unused this long ends (the next page asks to log in)
    session_max: Duration = 12 * 3600  # and any session after this long
    # SSO in front: a reverse proxy at one of these addresses may name the logged-in user in
    # proxy_user_header (a user of `faxgw web-user add`). From any other address the header is ignored.
    trusted_proxies: list[Network] = []
    proxy_user_header: str = "X-Remote-User"
    refresh: Duration = 3  # the newest page of the job list reloads its rows this often


class NotifySettings(Section):
    """GreenFax's HTTP Notify calls: GET /greenfax/notify/<token>."""

    token: list[Secret] | Secret = None  # one token, or a list while rotating
    listen: list[HostPort] = []  # its own listeners (it faces the internet); empty = the [http] ones
    allowed_networks: list[Network] = []  # empty = any source
    trusted: bool = False  # reports count as trusted (number+window matching) only when this is true

    @property
    def tokens(self) -> list[str]:
        values = self.token if isinstance(self.token, list) else [self.token]
        return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]


class GreenfaxSettings(Section):
    """Facts of the GreenFax account."""

    timezone: str = "America/New_York"  # the zone of the XML feed's dates
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")  # of the account: how `faxgw show` writes costs

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return check_zone(value)


class FeedSettings(Section):
    """The XML data feed poller (GreenFax: at most one request per 20 minutes, ranges of at most 90 days)."""

    url: str | None = None  # e.g. https://www.greenfax.com/api/xml/outbound.php; None = no polling
    accountid: str | None = None
    password: Secret = None
    allow_insecure: bool = False  # let an http:// URL beyond loopback carry the account password
    min_interval: Duration = 21 * 60
    interval: Duration = 30 * 60  # how often to poll (never below min_interval)
    ca_file: Path | None = None
    timeout: Duration = 60
    backfill_days: int = Field(default=2, ge=1, le=3650)  # how far back the first poll looks

    @model_validator(mode="after")
    def _check(self) -> FeedSettings:
        if self.url and self.url.lower().startswith("http://") and self.password is not None:
            from urllib.parse import urlsplit

            _refuse_cleartext("feed", urlsplit(self.url).hostname or "", self.allow_insecure,
                              "the account password (url is http://)")
        if self.url and self.min_interval < 20 * 60 and not _is_loopback_url(self.url):
            raise ValueError(
                "feed.min_interval below 20 minutes breaks GreenFax's rule; it is accepted only for a"
                " loopback feed URL (the sandbox)"
            )
        return self


class ReconcileSettings(Section):
    after: Duration = 2 * 3600  # a submitted job without a result this long is looked up in the feed
    resend_unknown: bool = False  # resend `unknown` jobs the feed does not show (costs a second fax)


class RetentionSettings(Section):
    """How long message bodies and raw status mails are kept (DESIGN.md, "Privacy"); job history stays."""

    enabled: bool = True  # the service purges every `interval`; `faxgw purge` works either way
    period: Duration = 30 * 86400  # bodies of jobs final this long, and status reports this old, are purged
    interval: Duration = 3600
    batch: int = Field(default=100, ge=1, le=10000)  # rows per write transaction: intake never waits long

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if value < 1:
            raise ValueError("expected an interval of at least 1s")
        return value


class NotificationSettings(Section):
    """Delivery status notifications to the original sender of a fax."""

    enabled: bool = True
    on: list[Literal["delivered", "failed", "rejected", "expired"]] = ["failed", "rejected", "expired"]
    # Senders who get the transmission report (a PDF) when a fax is delivered: addresses, "@domain" entries,
    # or "*"; compared with the envelope sender, where the report goes.
    confirm_success: list[str] = []
    relay: HostPort | None = None  # where to send them; None = the gateway's upstream
    from_address: str = ""  # the From of the notification; default MAILER-DAEMON@<smtp.hostname>

    @field_validator("confirm_success")
    @classmethod
    def _senders(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry != "*" and "@" not in entry:
                raise ValueError(f"{entry!r}: expected an address (\"accounts@example.org\"), a domain"
                                 " (\"@example.org\") or \"*\" (every sender)")
        return value


class ClientLimits(Section):
    """Limits per client address (the connecting IP). 0 turns a limit off."""

    connections: int = Field(default=50, ge=0)  # concurrent connections; over it: 421 4.7.0 at connect
    messages_per_minute: int = Field(default=0, ge=0)  # messages submitted (DATA) in any 60 seconds
    faxes_per_day: int = Field(default=0, ge=0)  # fax jobs since local midnight ([greenfax] timezone)
    pages_per_day: int = Field(default=0, ge=0)  # pages of those jobs (PDF and TIFF pages counted)


class SenderLimits(Section):
    """Limits per sender: the AUTH user if the client logged in, else the envelope sender. 0 = off."""

    connections: int = Field(default=0, ge=0)  # concurrent sessions of one AUTH user; over it: 421 at AUTH
    messages_per_minute: int = Field(default=0, ge=0)
    faxes_per_day: int = Field(default=1000, ge=0)
    pages_per_day: int = Field(default=0, ge=0)


class LimitSettings(Section):
    """Abuse and cost controls at intake; over a limit the client gets a 4xx naming it and when it resets."""

    client: ClientLimits = Field(default_factory=ClientLimits)
    sender: SenderLimits = Field(default_factory=SenderLimits)
    # A wrong AUTH password is answered after this delay, doubled for each
    # further failure from the same client address, up to the maximum; the
    # count is forgotten after `auth_failure_memory` without a failure.
    auth_failure_delay: Duration = 1
    auth_failure_delay_max: Duration = 30
    auth_failure_memory: Duration = 15 * 60

    @model_validator(mode="after")
    def _check(self) -> LimitSettings:
        if self.auth_failure_delay_max < self.auth_failure_delay:
            raise ValueError("limits.auth_failure_delay_max must not be below limits.auth_failure_delay")
        return self


class DuplicateSettings(Section):
    """The same documents to the same number from the same sender again within `window`."""

    action: Literal["off", "refuse", "hold"] = "off"  # refuse: 550 naming the earlier job; hold: state held
    window: Duration = 3600

    @model_validator(mode="after")
    def _check(self) -> DuplicateSettings:
        if self.action != "off" and self.window <= 0:
            raise ValueError("duplicates.window must be above zero when duplicates.action is not \"off\"")
        return self


class HoldSettings(Section):
    """Faxes that wait in state `held` (with the reason) until an operator runs `faxgw release CODE`."""

    new_number: bool = False  # a number no earlier fax was sent (or is on its way) to
    international: bool = False  # a number outside addressing.numbers.default_region
    max_pages: int = Field(default=0, ge=0)  # more pages than this; 0 = off


def _cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ServiceSettings(Section):
    """How `faxgw serve` runs: its worker processes (gateway/ops/workers.py)."""

    # Worker processes, each with its own event loop: the intake and the forwarder run in every one, the
    # background singletons (feed poller, IMAP reader, retention, notices, checkpoints) in one of them.
    # Default: one per core. The sandbox runs in one process (its stand-in keeps its faxes in memory).
    workers: int = Field(default_factory=_cores, ge=1, le=64)


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(Section):
    """The whole configuration."""

    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    duplicates: DuplicateSettings = Field(default_factory=DuplicateSettings)
    hold: HoldSettings = Field(default_factory=HoldSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    greenfax: GreenfaxSettings = Field(default_factory=GreenfaxSettings)
    feed: FeedSettings = Field(default_factory=FeedSettings)
    reconcile: ReconcileSettings = Field(default_factory=ReconcileSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    addressing: dict[str, Any] = {}  # overrides of rules/addressing.toml, key by key
    source: str = "(built-in sandbox defaults)"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.sandbox.enabled:
            if self.upstream.host:
                raise ValueError(
                    "sandbox.enabled = true and upstream.host cannot be used together:"
                    " the sandbox is the upstream; remove one of them"
                )
        elif not self.upstream.host:
            raise ValueError("upstream.host is required (or set [sandbox] enabled = true)")
        elif not self.upstream.account_sender or not self.upstream.return_path:
            raise ValueError("upstream.account_sender and upstream.return_path are required")
        if self.web.enabled and not self.http.loopback_only and not self.http.tls_cert and not self.web.trusted_proxies:
            raise ValueError("web.enabled = true with [http] listening beyond loopback needs TLS (http.tls_cert and"
                             " http.tls_key) or a TLS-terminating proxy in web.trusted_proxies: the console's"
                             " passwords and session cookies must not cross the network in clear")
        if not self.http.loopback_only and self.http.api_token is None:
            raise ValueError("http.api_token is required when [http] listens beyond loopback (the API shows jobs)")
        return self

    @property
    def sandbox_mode(self) -> bool:
        return self.sandbox.enabled

    @property
    def workers(self) -> int:
        """The worker processes `faxgw serve` starts: [service] workers, one in sandbox mode."""
        return 1 if self.sandbox_mode else self.service.workers


# --- loading ---------------------------------------------------------------


def load(path: str | os.PathLike[str] | None) -> Settings:
    """Read and validate the config file; None means the built-in sandbox set-up."""
    if path is None:
        return sandbox_settings()
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return validate(data, source=str(path), base=path.resolve().parent)


def sandbox_settings(base: Path | None = None) -> Settings:
    """The set-up of `faxgw serve` with no config: sandbox upstream, store in ./var/."""
    return validate({"sandbox": {"enabled": True}}, source="(no config: sandbox)", base=base or Path.cwd())


def validate(data: dict[str, Any], *, source: str, base: Path) -> Settings:
    """Validate a decoded config; relative paths are taken from `base`."""
    data = dict(data)
    data["source"] = source
    if data.get("sandbox", {}).get("enabled"):
        upstream = dict(data.get("upstream", {}))
        upstream.setdefault("account_sender", DEFAULT_SANDBOX_SENDER)
        upstream.setdefault("return_path", DEFAULT_SANDBOX_RETURN_PATH)
        data["upstream"] = upstream
        # The sandbox returns status mail to the gateway's own listener, and
        # trusts its own sender, so a bare sandbox takes faxes to a final state.
        status = dict(data.get("status", {}))
        status.setdefault("listen", list(data.get("smtp", {}).get("listen", ["127.0.0.1:2525"])))
        status.setdefault("trusted_sender_domains", ["sandbox.greenfax.localhost"])
        # The sandbox does not sign its mail; it sends from this machine, or writes into the mailbox itself.
        status.setdefault("require_dkim", False)
        status.setdefault("trusted_networks", ["127.0.0.0/8", "::1/128"])
        status["imap"] = {"trusted": True, **status.get("imap", {})}
        data["status"] = status
        notify = dict(data.get("notify", {}))
        notify.setdefault("token", "sandbox-notify-token")
        data["notify"] = notify
        _sandbox_feed_defaults(data)
    try:
        settings = Settings.model_validate(data, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in exc.errors())) from None
    return _resolve_paths(settings, base)


SANDBOX_FEED_ACCOUNT = ("sandbox", "sandbox-feed-password")


def _sandbox_feed_defaults(data: dict[str, Any]) -> None:
    """In sandbox mode the gateway polls the sandbox's own feed, a little slower than the sandbox allows."""
    sandbox = data.get("sandbox", {})
    if not sandbox.get("feed", True) or "url" in data.get("feed", {}):
        return
    try:
        host, port = parse_host_port(sandbox.get("feed_listen", "127.0.0.1:2527"))
        minimum = parse_duration(sandbox.get("feed_min_interval", 25))
    except ValueError:
        return  # validation reports the bad value
    feed = dict(data.get("feed", {}))
    if port:  # port 0: the service fills in the port it gets
        feed["url"] = f"http://{host}:{port}/api/xml/outbound.php"
    feed.setdefault("accountid", SANDBOX_FEED_ACCOUNT[0])
    feed.setdefault("password", SANDBOX_FEED_ACCOUNT[1])
    # One interval, a little above the sandbox's own limit and not more often than a minute.
    feed.setdefault("interval", max(60, minimum + 5))
    feed.setdefault("min_interval", feed["interval"])
    data["feed"] = feed


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def absolute(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base / path

    store = settings.store.model_copy(update={"path": absolute(settings.store.path)})
    smtp = settings.smtp.model_copy(
        update={"tls_cert": absolute(settings.smtp.tls_cert), "tls_key": absolute(settings.smtp.tls_key)}
    )
    oauth = settings.upstream.oauth
    if oauth is not None:
        oauth = oauth.model_copy(update={"service_account_file": absolute(oauth.service_account_file),
                                         "ca_file": absolute(oauth.ca_file)})
    upstream = settings.upstream.model_copy(update={"ca_file": absolute(settings.upstream.ca_file), "oauth": oauth})
    imap = settings.status.imap.model_copy(update={"ca_file": absolute(settings.status.imap.ca_file)})
    status = settings.status.model_copy(
        update={"rule_files": [absolute(p) for p in settings.status.rule_files], "imap": imap}
    )
    http = settings.http.model_copy(
        update={"tls_cert": absolute(settings.http.tls_cert), "tls_key": absolute(settings.http.tls_key)}
    )
    feed = settings.feed.model_copy(update={"ca_file": absolute(settings.feed.ca_file)})
    return settings.model_copy(update={"store": store, "smtp": smtp, "upstream": upstream, "status": status,
                                       "http": http, "feed": feed})


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        known = _known_keys(error["loc"][:-1])
        expected = f"; expected one of: {', '.join(known)}" if known else ""
        return f"{key}: unknown key (check its spelling and section{expected})"
    if not key:
        return message
    # A whole section (a check across its keys) is not echoed: it may hold
    # secrets or password hashes, and the message names the keys concerned.
    secret = is_secret_key(key) or key.startswith("smtp.users")
    if secret or isinstance(error.get("input"), dict):
        return f"{key}: {message}"
    return f"{key} = {error.get('input')!r}: {message}"


def _known_keys(section: tuple[Any, ...]) -> list[str]:
    """The keys the config allows in a section (given as its location, () for the top level)."""
    model: type[BaseModel] = Settings
    for part in section:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return [name for name in model.model_fields if name != "source"]


def warnings(settings: Settings) -> list[str]:
    """What a valid config still leaves open, for `faxgw check-config` to say (each names its key)."""
    found = []
    if settings.http.api_token is None and not settings.sandbox_mode:
        found.append("http.api_token is not set: any local user can read the fax log (numbers, senders, job"
                     " codes) at /api/jobs; set one, and give it to the programs that read the API")
    up = settings.upstream
    oauth = up.oauth
    if oauth is not None and oauth.refresh_token is not None and oauth.refresh_token.file is not None \
            and not oauth.refresh_token.file.exists():
        found.append(f"upstream.oauth.refresh_token: {oauth.refresh_token.file} does not exist yet: run"
                     " `faxgw oauth login` to sign in and fill it (faxes wait until then)")
    if oauth is not None and oauth.service_account_file is not None and not oauth.service_account_file.is_file():
        found.append(f"upstream.oauth.service_account_file: {oauth.service_account_file} does not exist: download"
                     " the service account's JSON key there")
    if up.auth == "password" and up.password is not None and (up.host or "").lower() in PASSWORDLESS_HOSTS:
        found.append(f"upstream.auth = \"password\" with {up.host}: {PASSWORDLESS_HOSTS[up.host.lower()]}")
    status = settings.status
    if status.listen and not status.require_dkim and not status.trusted_networks:
        found.append("status.require_dkim = false and no status.trusted_networks: no status mail received by SMTP"
                     " is trusted, so it changes a job only as a bounce with the job's secret")
    return found


def format_host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render(settings: Settings) -> str:
    """The effective settings as the config file would write them (TOML), secrets masked, for check-config.

    Durations and sizes are written with their units, addresses as HOST:PORT;
    a key without a value is a comment.
    """
    import tomli_w

    out: list[str] = []
    _render_section(settings, [], out, tomli_w)
    return "\n".join(out).strip() + "\n"


def _render_section(section: BaseModel, path: list[str], out: list[str], tomli_w: Any) -> None:
    values: dict[str, Any] = {}
    unset: list[str] = []
    subsections: list[tuple[str, BaseModel]] = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if name == "source":
            continue
        if isinstance(value, BaseModel):
            subsections.append((name, value))
        elif name == "addressing":
            continue  # the overrides: check-config prints the effective rules after the settings
        elif value is None:
            unset.append(name)
        else:
            values[name] = _rendered(name, value, _formatters(field))
    if path:
        out.append(f"\n[{'.'.join(path)}]")
    out.extend(f"{_toml_key(key, tomli_w)} = {_toml_value(value, tomli_w)}" for key, value in values.items())
    out.extend(f"# {name} = (not set)" for name in unset)
    for name, sub in subsections:
        _render_section(sub, [*path, name], out, tomli_w)


def _toml_key(key: str, tomli_w: Any) -> str:
    return tomli_w.dumps({key: 0}).split(" = ", 1)[0]


def _toml_value(value: Any, tomli_w: Any) -> str:
    """One value in TOML, lists and tables inline (tomli-w writes scalars; it has no inline form for these)."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item, tomli_w) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k, tomli_w)} = {_toml_value(v, tomli_w)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    return tomli_w.dumps({"v": value}).split(" = ", 1)[1].rstrip("\n")


def _formatters(field: Any) -> set[Any]:
    """The BeforeValidator functions on a field's type, however deep (Annotated inside list or Optional)."""
    from typing import get_args

    found = {m.func for m in field.metadata if isinstance(m, BeforeValidator)}
    stack = [field.annotation]
    while stack:
        kind = stack.pop()
        found |= {m.func for m in getattr(kind, "__metadata__", ()) if isinstance(m, BeforeValidator)}
        stack.extend(get_args(kind))
    return found


def _rendered(name: str, value: Any, formatters: set[Any]) -> Any:
    if isinstance(value, list):
        return [_rendered(name, item, formatters) for item in value]
    if isinstance(value, dict):
        if name == "users":
            return {user: "(argon2 hash)" for user in value}
        return {key: _rendered(key, item, set()) for key, item in value.items()}
    if isinstance(value, SecretStr) or is_secret_key(name):
        return "********"
    if parse_duration in formatters:
        return format_duration(value)
    if parse_size in formatters:
        return format_size(value)
    if parse_host_port in formatters:
        return format_host_port(value)
    if isinstance(value, (Path, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


def effective(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets masked, for `faxgw check-config`."""
    data = settings.model_dump(mode="json")

    def mask(table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                mask(value)
            elif is_secret_key(key) and value:
                table[key] = "********"

    mask(data)
    data["smtp"]["users"] = {user: "(argon2 hash)" for user in data["smtp"]["users"]}
    return data
