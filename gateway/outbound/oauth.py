"""OAuth2 access tokens for AUTH XOAUTH2 (Microsoft 365, Google Workspace, any OAuth2 server).

One `TokenSource` per gateway serves every upstream connection. It asks the
token endpoint (authlib's OAuth2 client over httpx2) with the configured
grant: client credentials, a refresh token, or a JWT bearer assertion signed
with a Google service account's key. The token is kept in memory and
renewed shortly before it expires, by one request however many connections
wait for it (a lock, checked again inside). `TokenKeeper` renews it in the
background, so a send rarely waits.

Failures have two kinds (errors.py): the endpoint is down, slow or answers
garbage (`TokenUnavailable`: jobs wait, the next attempt asks again), or it
refuses the credentials (`TokenRefused`: asking again cannot help, so the
source asks no more until the credentials change; the message says what
the operator must do). A refresh token the provider rotates is stored where
the config keeps it (`refresh_token = { file = ... }`, rewritten
atomically), so a restart still works.

No token, refresh token, secret or assertion ever reaches a log line, an
error message or the store: only their lifetimes and the grant are shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gateway.config import OAuthSettings
from gateway.errors import ConfigError, GatewayError, TokenRefused, TokenUnavailable
from gateway.logs import log_event
from gateway.runner import Runner

log = logging.getLogger("faxgw.oauth")

REFRESH_BEFORE = 300.0  # seconds before expiry a token is renewed (at most a quarter of its lifetime)
DEFAULT_LIFETIME = 3600.0  # a token response without expires_in
JWT_LIFETIME = 3600  # the assertion's validity (Google's maximum)
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
# OAuth2 error codes (RFC 6749 5.2) that a retry with the same request may cure.
TEMPORARY_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
DESCRIPTION_LIMIT = 300  # characters of the server's error_description kept in messages
RETRY_AFTER_FAILURE = 5.0  # seconds a failed request's answer stands for every caller, before asking again
RECHECK_REFUSED = 900.0  # refused credentials are tried again after this (a delegation applied late, a clock fixed)
MAX_LIFETIME = 86400.0  # a longer expires_in is taken as this


def _seconds(value: Any, default: float) -> float:
    """A number of seconds from a provider's JSON (a number or a numeric string); `default` otherwise."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if math.isfinite(seconds) and seconds > 0 else default


@dataclass(frozen=True)
class Token:
    value: str
    obtained: float  # time.monotonic()
    lifetime: float  # seconds

    @property
    def expires(self) -> float:
        return self.obtained + self.lifetime

    def due(self, now: float) -> bool:
        """Time to renew it: within REFRESH_BEFORE of expiry, or the last quarter of a short lifetime."""
        return now >= self.expires - min(REFRESH_BEFORE, self.lifetime / 4)

    def expired(self, now: float) -> bool:
        return now >= self.expires


def what_to_do(settings: OAuthSettings, error: str) -> str:
    """The operator's next step for an OAuth2 error code, by grant and provider."""
    grant, provider = settings.grant, settings.provider
    if error == "missing_refresh_token":
        return "no refresh token yet: run `faxgw oauth login`"
    if error == "invalid_grant" and grant == "refresh_token":
        return "the refresh token expired or was revoked: run `faxgw oauth login`"
    if error == "invalid_grant" and grant == "jwt_bearer":
        return ("the service account's assertion was refused: check that the Google Workspace admin console"
                " grants domain-wide delegation to its client ID for scope https://mail.google.com/, that"
                " upstream.oauth.user is a mailbox of the domain, and that this machine's clock is right")
    if error in ("invalid_client", "unauthorized_client") and provider == "microsoft":
        return ("Entra ID refused the app: check client_id and client_secret (client secrets expire: create a"
                " new one under Certificates & secrets) and that the app may use this grant")
    if error in ("invalid_client", "unauthorized_client"):
        return "the token endpoint refused the client: check upstream.oauth.client_id and client_secret"
    if error == "access_denied":
        return "the sign-in was declined: run `faxgw oauth login` again and accept the app's request"
    if error == "expired_token":
        return "the sign-in code expired before it was used: run `faxgw oauth login` again"
    if error == "invalid_scope":
        return f"the scope {settings.scope!r} was refused: check upstream.oauth.scope and the app's permissions"
    return "check the [upstream.oauth] settings against the provider's app registration"


class TokenSource:
    """The access token for XOAUTH2: cached, renewed once for all, its failures classified."""

    def __init__(self, settings: OAuthSettings, *, on_request: Callable[[str], None] = lambda outcome: None) -> None:
        self.settings = settings
        self.on_request = on_request  # counts token requests by outcome (metrics)
        self._token: Token | None = None
        self._lock: asyncio.Lock | None = None
        self._client: Any = None  # authlib's AsyncOAuth2Client, made in the running loop
        self._asking: asyncio.Task[Token] | None = None  # the request in flight (close() lets it finish)
        self._failure: tuple[TokenUnavailable | TokenRefused, float] | None = None  # the last one, and when
        self._refused_mark: tuple[Any, ...] | None = None  # the credential files as they were when refused
        self._rotated: tuple[str, tuple[Any, ...]] | None = None  # a rotated refresh token its file did not take
        self.problem: str | None = None  # the last failure, cleared by the next token
        self.obtained_at: datetime | None = None
        self.requests = 0

    def describe(self) -> str:
        return f"{self.settings.provider} {self.settings.grant} at {self.settings.token_url}"

    # --- state ------------------------------------------------------------------------

    def _credentials_mark(self) -> tuple[Any, ...]:
        """The credential files as they are now (modified, changed): `faxgw oauth login`, a new key, a chmod."""
        def mark(path: Any) -> Any:
            try:
                found = path.stat()
            except (OSError, AttributeError):
                return None
            return found.st_mtime_ns, found.st_ctime_ns, found.st_size

        s = self.settings
        return mark(s.refresh_token.file if s.refresh_token else None), mark(s.service_account_file)

    @property
    def refused(self) -> TokenRefused | None:
        """The standing refusal, until a credential file changes or `recheck()` clears it."""
        if self._failure is None or not isinstance(self._failure[0], TokenRefused):
            return None
        if self._credentials_mark() != self._refused_mark:
            self._failure = None
            log_event(log, "oauth-credentials-changed", action="asking the token endpoint again")
            return None
        return self._failure[0]

    def recheck(self) -> None:
        """Let the next request try the refused credentials again (a delegation that took time to apply)."""
        if self.refused is not None:
            self._failure = None

    @property
    def refused_for(self) -> float:
        """Seconds the standing refusal has lasted (0: none)."""
        if self.refused is None or self._failure is None:
            return 0.0
        return time.monotonic() - self._failure[1]

    def valid_for(self) -> float | None:
        """Seconds the cached token is still valid (None: no token yet)."""
        if self._token is None:
            return None
        return max(0.0, self._token.expires - time.monotonic())

    def due_in(self) -> float:
        """Seconds until the cached token should be renewed (0: now)."""
        token = self._token
        if token is None:
            return 0.0
        return max(0.0, token.expires - min(REFRESH_BEFORE, token.lifetime / 4) - time.monotonic())

    # --- getting a token --------------------------------------------------------------

    async def token(self, *, strict: bool = False) -> str:
        """A valid access token; renewed first when due.

        A renewal that fails while the old token is still valid returns the
        old one (and keeps the problem for health), unless `strict`.
        """
        token = self._token
        if token is not None and not token.due(time.monotonic()):
            return token.value
        return await self._renew(stale=token, strict=strict)

    async def renew(self, stale: str) -> str:
        """The upstream refused `stale`: a new token, unless another connection renewed it meanwhile."""
        token = self._token
        return await self._renew(stale=token if token is not None and token.value == stale else None,
                                 strict=True, force=True)

    async def _renew(self, *, stale: Token | None, strict: bool, force: bool = False) -> str:
        """One request for every caller that waits: those that queued behind it take its outcome."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        asked_before = self.requests
        async with self._lock:
            now = time.monotonic()
            current = self._token
            if current is not None and not current.due(now) and (current is not stale or not force):
                return current.value  # valid, and not the token the upstream refused
            refused = self.refused  # None again once the credential files changed
            failure = self._failure
            if failure is not None and (refused is not None or self.requests != asked_before
                                        or now - failure[1] < RETRY_AFTER_FAILURE):
                return self._fallback(current, failure[0], strict)  # no new request: the same answer
            self._asking = asyncio.ensure_future(self._request())
            try:
                # Shielded: a caller cancelled at shutdown must not cut off a token the provider may rotate.
                self._token = await asyncio.shield(self._asking)
            except (TokenUnavailable, TokenRefused) as exc:
                self._failure = (exc, time.monotonic())
                self.problem = str(exc)
                return self._fallback(current, exc, strict)
            self._failure = None
            self.problem = None
            return self._token.value

    def _fallback(self, current: Token | None, failure: TokenUnavailable | TokenRefused, strict: bool) -> str:
        """After a failed renewal: the old token while it is valid (unless strict), else the failure."""
        if current is not None and not strict and not current.expired(time.monotonic()):
            log_event(log, "oauth-renewal-failed", level=logging.WARNING, problem=str(failure),
                      still_valid=f"{current.expires - time.monotonic():.0f}s")
            return current.value
        raise failure.with_traceback(None)  # raised again for every caller: keep its traceback from growing

    async def _request(self) -> Token:
        settings = self.settings
        started = time.monotonic()
        mark = self._credentials_mark()  # before the request: a login meanwhile is a change
        self.requests += 1
        try:
            answer = await self._ask()
        except TokenRefused as exc:
            self._refused_mark = mark
            self.on_request("refused")
            log_event(log, "oauth-refused", level=logging.ERROR, endpoint=settings.token_url, error=exc.error,
                      problem=str(exc), action=f"sending stops until the credentials change (asked again every"
                      f" {RECHECK_REFUSED / 60:.0f} minutes)")
            raise
        except TokenUnavailable:
            self.on_request("unavailable")
            raise
        access = answer.get("access_token")
        if not isinstance(access, str) or not access:
            self.on_request("unavailable")
            raise TokenUnavailable(f"the token endpoint {settings.token_url} answered without an access_token")
        lifetime = _seconds(answer.get("expires_in"), DEFAULT_LIFETIME)
        rotated = await self._keep_rotated(answer.get("refresh_token"))
        self.on_request("ok")
        self.obtained_at = datetime.now(UTC)
        log_event(log, "oauth-token", provider=settings.provider, grant=settings.grant,
                  expires_in=f"{lifetime:.0f}s", rotated=rotated, ms=round((time.monotonic() - started) * 1000, 1))
        return Token(access, started, min(max(lifetime, 1.0), MAX_LIFETIME))

    def _refresh_token(self) -> str | None:
        """The refresh token to use: a rotated one its file could not take, while the file is unchanged."""
        if self._rotated is not None:
            value, mark = self._rotated
            if mark == self._credentials_mark():
                return value
            self._rotated = None  # the file was replaced since (`faxgw oauth login`): it wins
        stored = self.settings.refresh_token
        assert stored is not None
        try:
            return stored.read()
        except ConfigError as exc:
            raise TokenRefused(f"{exc}: the gateway's user must be able to read it (run `faxgw oauth login` as"
                               " that user, e.g. with deploy/faxgw-cli)", error="refresh_token_file") from None

    async def _keep_rotated(self, new: Any) -> str | None:
        """Store a refresh token the provider replaced; say where it went (None: not rotated)."""
        stored = self.settings.refresh_token
        if stored is None or not isinstance(new, str) or not new or new == self._refresh_token():
            return None
        try:
            if await asyncio.to_thread(stored.store, new):  # fsyncs: not on the event loop
                self._rotated = None
                return "stored in its file"
        except OSError as exc:
            self._rotated = (new, self._credentials_mark())
            log_event(log, "oauth-rotated-not-stored", level=logging.ERROR, file=str(stored.file),
                      problem=exc.strerror, action="kept in memory: make the file and its directory writable by"
                      " the gateway, or the next restart needs `faxgw oauth login`")
            return "kept in memory only"
        log_event(log, "oauth-rotated-in-memory", level=logging.WARNING,
                  action="give upstream.oauth.refresh_token as { file = ... } so that a restart keeps it")
        return "kept in memory only"

    # --- the token endpoint ----------------------------------------------------------

    def client(self) -> Any:
        """authlib's OAuth2 client, one per source (it keeps the endpoint's connection)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self, **extra: Any) -> Any:
        from authlib.integrations.httpx_client import AsyncOAuth2Client

        s = self.settings
        verify: Any = True
        if s.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(s.ca_file))
        return AsyncOAuth2Client(
            client_id=s.client_id, client_secret=s.client_secret.get_secret_value() if s.client_secret else None,
            token_endpoint_auth_method="client_secret_post" if s.client_secret else "none",
            scope=s.scope, timeout=s.timeout, verify=verify, trust_env=False, **extra,
        )

    async def _ask(self) -> dict[str, Any]:
        s = self.settings
        client = self.client()
        if s.grant == "refresh_token":
            assert s.refresh_token is not None
            refresh_token = self._refresh_token()
            if not refresh_token:
                raise TokenRefused(what_to_do(s, "missing_refresh_token"), error="missing_refresh_token")
            return await self.call(client.refresh_token(s.token_url, refresh_token=refresh_token))
        if s.grant == "jwt_bearer":
            return await self.call(client.fetch_token(s.token_url or self._key()["token_uri"], grant_type=JWT_BEARER,
                                                      assertion=self.assertion()))
        return await self.call(client.fetch_token(s.token_url, grant_type="client_credentials"))

    async def call(self, request: Any, *, url: str | None = None) -> dict[str, Any]:
        """Await one request to the token endpoint (or `url`); its failures as TokenUnavailable or TokenRefused."""
        import httpx2
        from authlib.integrations.base_client import OAuthError

        url = url or self.settings.token_url
        try:
            async with asyncio.timeout(self.settings.timeout):
                return dict(await request)
        except OAuthError as exc:
            description = (exc.description or "")[:DESCRIPTION_LIMIT]
            said = f"{exc.error}{': ' + description if description else ''}"
            if exc.error in TEMPORARY_ERRORS:
                raise TokenUnavailable(f"the token endpoint {url} is not available now ({said})",
                                       error=exc.error) from None
            raise TokenRefused(f"the token endpoint refused the credentials ({said}): {what_to_do(self.settings, exc.error)}",
                               error=exc.error) from None
        except TimeoutError:
            raise TokenUnavailable(f"the token endpoint {url} did not answer within {self.settings.timeout:g}s") from None
        except httpx2.HTTPStatusError as exc:
            raise TokenUnavailable(f"the token endpoint {url} answered HTTP {exc.response.status_code}") from None
        except httpx2.HTTPError as exc:
            raise TokenUnavailable(f"cannot reach the token endpoint {url}: {exc or type(exc).__name__}") from None
        except ValueError:  # authlib: the answer is not a JSON object
            raise TokenUnavailable(f"the token endpoint {url} did not answer with a JSON token response") from None

    def _key(self) -> dict[str, Any]:
        """The Google service account's JSON key (read each time: it may be replaced)."""
        path = self.settings.service_account_file
        assert path is not None
        try:
            key = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenRefused(f"cannot read the service account key {path}: {getattr(exc, 'strerror', None) or 'not JSON'}",
                               error="service_account_file") from None
        if not isinstance(key, dict) or not all(isinstance(key.get(k), str) for k in ("client_email", "private_key")):
            raise TokenRefused(f"{path} is not a service account key (it needs client_email and private_key:"
                               " create a JSON key for the service account)", error="service_account_file")
        return key

    def assertion(self) -> str:
        """The signed JWT of the jwt_bearer grant: the service account as issuer, the mailbox as subject."""
        from authlib.oauth2.rfc7523 import JWTBearerGrant
        from joserfc.errors import JoseError
        from joserfc.jwk import RSAKey

        key = self._key()
        now = int(time.time())
        header = {"alg": "RS256", **({"kid": key["private_key_id"]} if key.get("private_key_id") else {})}
        try:
            signed = JWTBearerGrant.sign(
                RSAKey.import_key(key["private_key"]), issuer=key["client_email"], audience=self.settings.token_url or key["token_uri"],
                subject=self.settings.user, issued_at=now, expires_at=now + JWT_LIFETIME,
                claims={"scope": self.settings.scope}, header=header,
            )
        except (ValueError, TypeError, JoseError):
            raise TokenRefused(f"the private_key in {self.settings.service_account_file} cannot sign (not an RSA"
                               " key in PEM form)", error="service_account_file") from None
        return signed.decode() if isinstance(signed, bytes) else str(signed)

    async def device_login(self, show: Callable[[str], None], *, give_up_after: float = 900.0) -> str:
        """The device code flow (RFC 8628): show where to sign in, wait for it, store the refresh token.

        Returns where the refresh token went. Raises TokenRefused when the
        user declines, the code expires, or the answer has no refresh token.
        """
        s = self.settings
        if s.device_url is None:
            raise TokenRefused("upstream.oauth.device_url is not set: give the provider's device authorization"
                               " endpoint", error="device_url")
        client = self.client()
        data = {"client_id": s.client_id or "", "scope": s.scope or ""}
        if s.client_secret is not None:
            data["client_secret"] = s.client_secret.get_secret_value()
        grant = await self.call(self._device_request(client, s.device_url, data), url=s.device_url)
        device_code, interval = grant.get("device_code"), _seconds(grant.get("interval"), 5.0)
        if not isinstance(device_code, str) or not grant.get("user_code"):
            raise TokenUnavailable(f"{s.device_url} answered without a device_code and user_code")
        show(str(grant.get("message") or f"To sign in, open {grant.get('verification_uri')} in a browser and"
                                             f" enter the code {grant['user_code']}"))
        deadline = time.monotonic() + min(give_up_after, _seconds(grant.get("expires_in"), give_up_after))
        while True:
            await asyncio.sleep(interval)
            try:
                answer = await self.call(client.fetch_token(s.token_url, grant_type=DEVICE_CODE,
                                                            device_code=device_code))
                break
            except (TokenRefused, TokenUnavailable) as exc:
                if exc.error == "slow_down":
                    interval += 5
                elif isinstance(exc, TokenUnavailable):
                    pass  # the endpoint did not answer this time: the sign-in may still complete
                elif exc.error != "authorization_pending":
                    raise
            if time.monotonic() > deadline:
                raise TokenRefused("nobody signed in before the code expired: run `faxgw oauth login` again",
                                   error="expired_token")
        return self._keep_login(answer)

    def _keep_login(self, answer: dict[str, Any]) -> str:
        """Store the refresh token a sign-in gave; where it went."""
        s = self.settings
        refresh = answer.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            raise TokenRefused(f"the sign-in gave no refresh token: the scope {s.scope!r} needs offline_access"
                               " (Microsoft) or the app must ask for offline access", error="no_refresh_token")
        assert s.refresh_token is not None
        try:
            stored = s.refresh_token.store(refresh)
        except OSError as exc:
            raise GatewayError(f"cannot write the refresh token to {s.refresh_token.file}: {exc.strerror} (run"
                               " the command as the gateway's user; the file's directory must be writable)") from None
        if not stored:
            raise TokenRefused("upstream.oauth.refresh_token must be { file = \"PATH\" } for `faxgw oauth login` to"
                               " store the refresh token", error="refresh_token")
        self._failure = None
        return str(s.refresh_token.file)

    async def browser_login(self, show: Callable[[str], None], pasted: asyncio.Future[str], *,
                            port: int = 0, give_up_after: float = 900.0) -> str:
        """The authorization code flow with PKCE and a loopback redirect (RFC 8252), for Google's mail scope.

        Listens on 127.0.0.1 for the browser's redirect; a browser on
        another machine cannot reach it, so the address it ends on may be
        pasted instead (`pasted` resolves to it). Returns where the refresh
        token went.
        """
        from aiohttp import web
        from authlib.common.errors import AuthlibBaseError
        from authlib.common.security import generate_token

        s = self.settings
        if s.authorize_url is None:
            raise TokenRefused("upstream.oauth.authorize_url is not set: give the provider's authorization"
                               " endpoint", error="authorize_url")
        arrived: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def redirected(request: web.Request) -> web.Response:
            if not arrived.done():
                arrived.set_result(str(request.url))
            return web.Response(text="greenfax-gateway: signed in; you may close this page.\n")

        app = web.Application()
        app.router.add_get("/", redirected)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port)
            try:
                await site.start()
            except OSError as exc:
                raise GatewayError(f"cannot listen on 127.0.0.1:{port} for the browser's redirect: {exc.strerror};"
                                   " choose another --port") from None
            bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            redirect_uri = f"http://127.0.0.1:{bound}/"
            client = self._new_client(redirect_uri=redirect_uri, code_challenge_method="S256")
            verifier = generate_token(64)
            url, state = client.create_authorization_url(
                s.authorize_url, code_verifier=verifier, access_type="offline", prompt="consent",
                login_hint=s.user or "")
            show(f"Open this address in a browser, sign in as {s.user} and allow access:\n\n  {url}\n\n"
                 f"The browser then goes to {redirect_uri}. If it runs on another machine that page does not"
                 " load: copy the whole address from its address bar and paste it here.")
            done, _pending = await asyncio.wait({arrived, pasted}, timeout=give_up_after,
                                                return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TokenRefused("nobody signed in in time: run `faxgw oauth login` again", error="expired_token")
            response = next(iter(done)).result().strip()
            declined = parse_qs(urlsplit(response).query).get("error")
            if declined:
                raise TokenRefused(f"the sign-in did not complete ({declined[0]}): {what_to_do(s, declined[0])}",
                                   error=declined[0])
            try:
                answer = await self.call(client.fetch_token(s.token_url, authorization_response=response,
                                                            state=state, code_verifier=verifier))
            except AuthlibBaseError as exc:  # no code in the address, or another sign-in's state
                raise TokenRefused(f"the address is not this sign-in's answer ({exc.error}): run `faxgw oauth"
                                   " login` again and paste the address the browser ends on", error=str(exc.error)) from None
            finally:
                await client.aclose()
        finally:
            await runner.cleanup()
        return self._keep_login(answer)

    @staticmethod
    async def _device_request(client: Any, url: str, data: dict[str, str]) -> dict[str, Any]:
        """POST the device authorization request (authlib has no client call for it); errors as authlib's."""
        from authlib.integrations.base_client import OAuthError

        response = await client.request("POST", url, data=data, withhold_token=True)
        if response.status_code >= 500:
            response.raise_for_status()
        answer = response.json()  # a ValueError when it is not JSON: call() says so
        if not isinstance(answer, dict):
            raise ValueError("not a JSON object")
        if "error" in answer:
            raise OAuthError(error=str(answer["error"]), description=str(answer.get("error_description") or ""))
        return answer

    async def close(self) -> None:
        """Let a request in flight finish (a rotated refresh token must reach its file), then close."""
        asking, self._asking = self._asking, None
        if asking is not None and not asking.done():
            await asyncio.wait({asking}, timeout=self.settings.timeout)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class TokenKeeper(Runner):
    """Renews the token before it is due, so that no send waits for the token endpoint."""

    name = "oauth"
    expected = (TokenUnavailable, TokenRefused)
    error_event = "oauth-token-failed"
    logger = log
    retry_initial = 5.0
    retry_max = 300.0

    def __init__(self, tokens: TokenSource, *, clock: Callable[[], datetime]) -> None:
        super().__init__(clock=clock)
        self.tokens = tokens

    def where(self) -> dict[str, str]:
        return {"endpoint": str(self.tokens.settings.token_url)}

    def describe_error(self, exc: BaseException) -> str:
        return str(exc)  # the messages are the operator's: they name the endpoint and what to do

    async def step(self) -> float:
        if self.tokens.refused_for >= RECHECK_REFUSED:
            self.tokens.recheck()
        await self.tokens.token(strict=True)
        return max(1.0, self.tokens.due_in())
