"""OAuth2 peers on loopback: a token server and an upstream that takes AUTH XOAUTH2 only.

`TokenServer` is a real HTTP server (aiohttp) speaking a token endpoint's
JSON (RFC 6749 5.1/5.2) for the four grants the gateway uses: client
credentials, refresh token (rotated on every use when `rotate` is set, the
old one then refused, as Microsoft and Google may do), JWT bearer (the
assertion's RS256 signature checked against the service account's public
key with `cryptography`, not with the library the gateway uses), and the
device code flow (RFC 8628, pending until `approve()`). It counts every
request by grant, and can be made down (HTTP 503), slow, or refusing.

`XOAuth2Upstream` is the sandbox (it records the faxes) offering AUTH
XOAUTH2 only; it accepts a bearer token only while the token server says
it is valid (issued and not expired), and answers like Gmail otherwise (a
334 challenge with a JSON error, then 535). `auth_reply` makes it answer
every AUTH with a fixed reply, such as Microsoft's 535 5.7.139.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.rules import RulesInForce
from gateway.sandbox.greenfax import SandboxHandler, SandboxSMTP

CLIENT_ID = "faxgw-test-client"
CLIENT_SECRET = "client-secret-9f8e7d6c5b4a"
MAILBOX = "fax@office.example"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class TokenServer:
    expires_in: int = 3600
    rotate: bool = False
    mode: str = "ok"  # "ok", "down" (503), "slow" (no answer for `delay`), or an OAuth2 error code to answer
    delay: float = 30.0
    issued: dict[str, float] = field(default_factory=dict)  # access token -> expiry (time.monotonic())
    refresh_tokens: set[str] = field(default_factory=set)
    requests: Counter = field(default_factory=Counter)  # by grant_type (and "device" for /devicecode)
    public_key: Any = None  # the service account's, for jwt_bearer
    subjects: list[str] = field(default_factory=list)  # the `sub` of accepted assertions
    devices: dict[str, bool] = field(default_factory=dict)  # device_code -> approved
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)  # authorization code -> (challenge, redirect)
    deny: bool = False  # the user declines at the authorization endpoint
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def authorize_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/authorize"

    @property
    def device_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/devicecode"

    def new_refresh_token(self) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens.add(token)
        return token

    def valid(self, access_token: str) -> bool:
        expiry = self.issued.get(access_token)
        return expiry is not None and time.monotonic() < expiry

    def expire_all(self) -> None:
        """Every access token issued so far stops working (as when the provider revokes them)."""
        for token in self.issued:
            self.issued[token] = 0.0

    def approve(self) -> None:
        for code in self.devices:
            self.devices[code] = True

    def service_account_key(self, path: Path) -> Path:
        """Write a service account JSON key as Google issues them; the server keeps its public half."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = key.public_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path.write_text(json.dumps({
            "type": "service_account", "project_id": "faxgw-test", "private_key_id": "key-1", "private_key": pem,
            "client_email": "faxgw@faxgw-test.iam.gserviceaccount.com", "client_id": "1234567890",
            "token_uri": self.url,
        }))
        return path

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/devicecode", self._device)
        app.router.add_get("/authorize", self._authorize)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the endpoints ---------------------------------------------------------------

    @staticmethod
    def _error(error: str, description: str, status: int = 400) -> web.Response:
        return web.json_response({"error": error, "error_description": description}, status=status)

    def _issue(self, *, refresh: str | None = None) -> web.Response:
        access = "at-" + secrets.token_urlsafe(32)
        self.issued[access] = time.monotonic() + self.expires_in
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": self.expires_in}
        if refresh is not None:
            body["refresh_token"] = refresh
        return web.json_response(body)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        self.requests[grant] += 1
        if self.mode == "down":
            return web.Response(status=503, text="<html>Service Unavailable</html>", content_type="text/html")
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode not in ("ok", "slow"):
            return self._error(self.mode, f"AADSTS-TEST: {self.mode} (test token server)")
        if grant == "client_credentials":
            if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
                return self._error("invalid_client", "AADSTS7000215: Invalid client secret provided.", 401)
            return self._issue()
        if grant == "refresh_token":
            token = str(form.get("refresh_token", ""))
            if form.get("client_id") != CLIENT_ID or token not in self.refresh_tokens:
                return self._error("invalid_grant", "AADSTS70008: The refresh token has expired or was revoked.")
            if self.rotate:
                self.refresh_tokens.discard(token)
                return self._issue(refresh=self.new_refresh_token())
            return self._issue()
        if grant == JWT_BEARER:
            claims = self._verified(str(form.get("assertion", "")))
            if claims is None:
                return self._error("invalid_grant", "Invalid JWT Signature.")
            if claims.get("scope") != "https://mail.google.com/" or claims.get("aud") != self.url:
                return self._error("invalid_scope", "scope or audience not allowed")
            if not claims.get("exp", 0) > time.time() >= claims.get("iat", 0) - 5:
                return self._error("invalid_grant", "Invalid JWT: Token must be a short-lived token")
            self.subjects.append(str(claims.get("sub")))
            return self._issue()
        if grant == DEVICE_CODE:
            code = str(form.get("device_code", ""))
            if code not in self.devices:
                return self._error("expired_token", "the device code expired")
            if not self.devices[code]:
                return self._error("authorization_pending", "the user has not signed in yet")
            del self.devices[code]
            return self._issue(refresh=self.new_refresh_token())
        if grant == "authorization_code":
            code = str(form.get("code", ""))
            challenge, redirect = self.codes.pop(code, ("", ""))
            verifier = str(form.get("code_verifier", ""))
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if not challenge or digest != challenge or form.get("redirect_uri") != redirect:
                return self._error("invalid_grant", "code, code_verifier or redirect_uri do not match")
            return self._issue(refresh=self.new_refresh_token())
        return self._error("unsupported_grant_type", f"grant {grant!r} is not supported here")

    async def _authorize(self, request: web.Request) -> web.Response:
        """The user's browser here: signs in at once (or declines), then goes back to the loopback redirect."""
        query = request.query
        self.requests["authorize"] += 1
        redirect = query.get("redirect_uri", "")
        if query.get("client_id") != CLIENT_ID or not redirect.startswith("http://127.0.0.1:") \
                or query.get("code_challenge_method") != "S256" or query.get("response_type") != "code":
            return web.Response(status=400, text="bad authorization request")
        if self.deny:
            raise web.HTTPFound(f"{redirect}?error=access_denied&state={query.get('state', '')}")
        code = secrets.token_urlsafe(16)
        self.codes[code] = (query.get("code_challenge", ""), redirect)
        raise web.HTTPFound(f"{redirect}?code={code}&state={query.get('state', '')}")

    async def _device(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests["device"] += 1
        if form.get("client_id") != CLIENT_ID:
            return self._error("invalid_client", "unknown client")
        code = secrets.token_urlsafe(16)
        self.devices[code] = False
        return web.json_response({
            "device_code": code, "user_code": "FAXG-W123", "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": 900, "interval": 1,
            "message": "To sign in, use a web browser to open https://microsoft.com/devicelogin and enter FAXG-W123",
        })

    def _verified(self, assertion: str) -> dict[str, Any] | None:
        """The claims of an RS256 JWT signed by the service account's key, else None."""
        def unb64(part: str) -> bytes:
            return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

        try:
            header, payload, signature = assertion.split(".")
            if json.loads(unb64(header)).get("alg") != "RS256":
                return None
            self.public_key.verify(unb64(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(),
                                   hashes.SHA256())
            return json.loads(unb64(payload))
        except Exception:
            return None


class XOAuth2Handler(SandboxHandler):
    """The sandbox's upstream, authenticating with XOAUTH2 bearer tokens the token server issued."""

    def __init__(self, tokens: TokenServer, *, account_sender: str) -> None:
        super().__init__(domain="greenfax.com", account_sender=account_sender, rules=RulesInForce(),
                         credentials=(MAILBOX, "(bearer tokens only)"))
        self.tokens = tokens
        self.auth_reply: str | None = None
        self.logins: list[str] = []  # users that authenticated
        self.refusals = 0

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if self.auth_reply:
            return AuthResult(success=False, handled=False, message=self.auth_reply)
        try:
            if len(args) > 1:  # the initial response, on the AUTH line
                raw = base64.b64decode(args[1], validate=True)
            else:
                answer = await server.challenge_auth("", encode_to_b64=False)
                if not isinstance(answer, bytes):
                    return AuthResult(success=False, handled=True)  # aiosmtpd has answered already
                raw = answer
            fields = dict(part.split("=", 1) for part in raw.decode().split("\x01") if part)
        except ValueError:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode the XOAUTH2 response")
        user, bearer = fields.get("user", ""), fields.get("auth", "")
        if user == MAILBOX and bearer.startswith("Bearer ") and self.tokens.valid(bearer[len("Bearer "):]):
            self.logins.append(user)
            return AuthResult(success=True, handled=False, auth_data=user)
        self.refusals += 1
        # As Gmail does: the error as a base64 JSON challenge, then 535 once the client answers it.
        error = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer",
                                             "scope": "https://mail.google.com/"}).encode())
        await server.challenge_auth(error, encode_to_b64=False)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted (test upstream)")


async def start_xoauth2_upstream(handler: XOAuth2Handler, *, tls_context: Any = None) -> asyncio.Server:
    """Listen on a free loopback port; AUTH offers XOAUTH2 only (LOGIN and PLAIN excluded)."""
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SandboxSMTP(handler, hostname="smtp.upstream.test", ident="XOAUTH2 test upstream",
                           tls_context=tls_context, auth_require_tls=False, require_starttls=False,
                           auth_exclude_mechanism=["LOGIN", "PLAIN"], data_size_limit=64 * 2**20)

    return await loop.create_server(factory, host="127.0.0.1", port=0)
