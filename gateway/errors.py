"""One exception root for the gateway.

Temporary versus permanent is a type, not a flag: callers catch the kind they
can act on. Only the CLI and the SMTP edge turn these into text for people.
"""


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration (or a rules file) is invalid; the message says where and why."""


class StoreError(GatewayError):
    """The status store cannot be used."""


class StoreLocked(StoreError):
    """Another `faxgw serve` already holds the store."""


class StoreFull(StoreError):
    """The store's disk (or its size limit) is full: the write was not committed."""


class UnknownJob(GatewayError):
    """No job has the given code."""


class InvalidTransition(GatewayError):
    """An operator action does not apply to the job's current state."""


class UpstreamError(GatewayError):
    """A forward attempt did not end with the upstream's acceptance."""

    def __init__(self, message: str, *, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply or message


class UpstreamTemporary(UpstreamError):
    """Try again later: 4xx reply or a network error before the data was sent."""


class UpstreamRejected(UpstreamError):
    """The upstream refused this fax for good (5xx to RCPT or to the data)."""


class UpstreamSetupError(UpstreamError):
    """The gateway's own upstream set-up is wrong (EHLO/AUTH/MAIL refused, TLS failure).

    The fax is fine; every job waits until an operator fixes the set-up.
    """


class UpstreamUnknown(UpstreamError):
    """The connection was lost after the message was sent and before the reply."""


class UpstreamLacksExtension(UpstreamError):
    """The message needs 8BITMIME or SMTPUTF8 and the upstream does not offer it."""
