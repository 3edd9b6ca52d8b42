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


class MaintenanceError(StoreError):
    """A backup, restore or purge cannot be done; the message says why and what to do."""


class BadInput(GatewayError):
    """What a person or a caller gave is wrong; the message says what, and what is expected."""


class FilterError(BadInput):
    """A job-list filter (`faxgw status` option, `/api/jobs` parameter) is wrong; it names the parameter."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


class MissingParameters(BadInput):
    """A Notify call lacks what every report needs; the message names it."""


class TnefError(GatewayError):
    """A winmail.dat cannot be unwrapped; `kind` is "damaged", "empty" or "layout" (a key of replies.WINMAIL_REFUSED)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class FeedError(GatewayError):
    """The XML feed could not be polled; the message never holds the password."""


class FeedUnavailable(FeedError):
    """Network, timeout or an HTTP error answer: try again at the next allowed poll."""


class FeedRefused(FeedError):
    """The answer is not XML the gateway accepts (a DTD, entities, not well-formed)."""


class FeedPollRefused(GatewayError):
    """`faxgw feed poll` did not poll (too soon) or the poll failed; the message says when to try again."""


class UpstreamError(GatewayError):
    """A forward attempt did not end with the upstream's acceptance.

    `code`, `enhanced` and `text` are the upstream's reply where there was
    one (None for a network or TLS failure); `reply` is it as one line.
    """

    def __init__(self, message: str, *, code: int | None = None, enhanced: str | None = None,
                 text: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> str | None:
        if self.code is None:
            return None
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


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


class TokenUnavailable(UpstreamSetupError):
    """The OAuth2 token endpoint is down, slow or answered garbage: jobs wait, the next attempt asks again.

    `error` is the OAuth2 error code where the endpoint gave one (temporarily_unavailable, slow_down...).
    """

    def __init__(self, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.error = error


class TokenRefused(UpstreamSetupError):
    """The token endpoint refused the gateway's credentials (invalid_grant, invalid_client...).

    Asking again with the same credentials cannot help: sending stops until
    the operator acts (the message says how), e.g. `faxgw oauth login`.
    """

    def __init__(self, message: str, *, error: str) -> None:
        super().__init__(message)
        self.error = error
