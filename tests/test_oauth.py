"""Upstream OAuth2 (AUTH XOAUTH2) against real peers on loopback.

The token server and the XOAUTH2-only upstream are in peers/oauth.py: a
real HTTP token endpoint and a real SMTP server that accepts a bearer token
only while the token server says it is valid. The gateway runs in-process
(`gateway` fixture); the CLI commands run as the `faxgw` program.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import ssl
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
import trustme
from conftest import ACCOUNT_SENDER, RETURN_PATH, codes_in, fax_message, send
from peers.oauth import CLIENT_ID, CLIENT_SECRET, MAILBOX, TokenServer, XOAuth2Handler, start_xoauth2_upstream

pytestmark = pytest.mark.timeout(90)


class Upstream:
    """The XOAUTH2 upstream with its token server, both on free loopback ports."""

    def __init__(self, tokens: TokenServer) -> None:
        self.tokens = tokens
        self.handler = XOAuth2Handler(tokens, account_sender=ACCOUNT_SENDER)
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        await self.tokens.start()
        self.server = await start_xoauth2_upstream(self.handler)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await self.tokens.stop()


@pytest.fixture
async def upstream():
    up = Upstream(TokenServer())
    await up.start()
    yield up
    await up.stop()


def client_credentials(up: Upstream, **extra: Any) -> dict[str, Any]:
    """[upstream] overrides: Microsoft's app-only grant, its token URL pointed at the test server."""
    return {"auth": "xoauth2", "idle_close": 0.3, "oauth": {
        "provider": "microsoft", "tenant": "office.example", "token_url": up.tokens.url,
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "user": MAILBOX, **extra}}


def refresh_grant(up: Upstream, token_file: Path, **extra: Any) -> dict[str, Any]:
    return {"auth": "xoauth2", "idle_close": 0.3, "oauth": {
        "provider": "generic", "grant": "refresh_token", "token_url": up.tokens.url,
        "device_url": up.tokens.device_url, "client_id": CLIENT_ID, "scope": "smtp.send offline_access",
        "refresh_token": {"file": str(token_file)}, "user": MAILBOX, **extra}}


async def health(gw) -> tuple[int, dict[str, Any]]:
    host, port = gw.service.web.addresses["http"][0]
    async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/healthz") as response:
        return response.status, await response.json()


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


# --- forwarding -----------------------------------------------------------------------


async def test_a_fax_goes_with_a_token_fetched_before_it_was_needed(gateway, upstream):
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    await wait_for(lambda: upstream.tokens.requests["client_credentials"] == 1)  # at start, before any fax
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    assert [fax.code for fax in upstream.handler.faxes] == [code]
    assert upstream.handler.logins == [MAILBOX]
    assert upstream.tokens.requests["client_credentials"] == 1
    status, report = await health(gw)
    assert status == 200 and report["oauth"]["token_valid_for"] > 3500
    assert report["oauth"]["sending_stopped"] is False and report["oauth"]["provider"] == "microsoft"


async def test_a_token_expired_at_the_upstream_is_renewed_once_for_a_burst_of_16(gateway, upstream):
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    first = [codes_in((await gw.send()).message)[0] for _ in range(16)]
    for code in first:
        await gw.wait_state(code, "submitted")
    assert upstream.tokens.requests["client_credentials"] == 1

    upstream.tokens.expire_all()  # the upstream now refuses the token the gateway still thinks valid
    await asyncio.sleep(0.6)  # idle connections close (idle_close = 0.3 s): the next ones AUTH again
    replies = await asyncio.gather(*(send(gw.port, fax_message()) for _ in range(16)))
    burst = [codes_in(reply.message)[0] for reply in replies]
    for code in burst:
        await gw.wait_state(code, "submitted")
    assert upstream.handler.refusals >= 1  # connections saw the stale token refused...
    assert upstream.tokens.requests["client_credentials"] == 2  # ...and one request renewed it for all
    assert len(upstream.handler.faxes) == 32


async def test_a_token_due_for_renewal_is_renewed_in_the_background(gateway, upstream):
    upstream.tokens.expires_in = 2  # due after 1.5 s (the last quarter of its lifetime)
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    await wait_for(lambda: upstream.tokens.requests["client_credentials"] >= 3, timeout=8)
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    assert upstream.handler.refusals == 0  # no send ever met an expired token


async def test_a_rotated_refresh_token_is_stored_and_survives_a_restart(gateway, upstream, tmp_path):
    upstream.tokens.rotate = True
    token_file = tmp_path / "refresh-token"
    first_token = upstream.tokens.new_refresh_token()
    token_file.write_text(first_token + "\n")
    settings = refresh_grant(upstream, token_file)
    gw = await gateway(upstream_port=upstream.port, upstream=settings)
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    rotated = token_file.read_text().strip()
    assert rotated != first_token and rotated in upstream.tokens.refresh_tokens
    assert first_token not in upstream.tokens.refresh_tokens  # the old one no longer works
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    await gw.service.stop()

    again = await gateway(upstream_port=upstream.port, upstream=settings)  # a restart: reads the rotated one
    (code,) = codes_in((await again.send()).message)
    await again.wait_state(code, "submitted")
    assert upstream.tokens.requests["refresh_token"] == 2


async def test_a_service_account_signs_its_assertion_for_the_mailbox(gateway, upstream, tmp_path):
    key = upstream.tokens.service_account_key(tmp_path / "service-account.json")
    gw = await gateway(upstream_port=upstream.port, upstream={"auth": "xoauth2", "oauth": {
        "provider": "google", "service_account_file": str(key), "token_url": upstream.tokens.url, "user": MAILBOX}})
    assert gw.settings.upstream.oauth.grant == "jwt_bearer"
    assert gw.settings.upstream.oauth.scope == "https://mail.google.com/"
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    assert upstream.tokens.subjects == [MAILBOX]


# --- failures -------------------------------------------------------------------------


@pytest.mark.parametrize("mode, words", [("down", "answered HTTP 503"), ("slow", "did not answer within 0.5s")])
async def test_a_token_endpoint_down_or_slow_defers_then_the_fax_goes(gateway, upstream, mode, words):
    upstream.tokens.mode, upstream.tokens.delay = mode, 5.0
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream, timeout=0.5))
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert words in job["last_result"] and upstream.tokens.url in job["last_result"]
    status, report = await health(gw)
    assert status == 503
    assert any(words in line and line.startswith("upstream:") for line in report["failing"])

    upstream.tokens.mode = "ok"
    await gw.wait_state(code, "submitted", timeout=20)
    assert [e["state"] for e in gw.job(code)["events"]].count("rejected") == 0


async def test_invalid_grant_stops_sending_says_what_to_do_and_resumes_after_login(gateway, upstream, tmp_path):
    token_file = tmp_path / "refresh-token"
    token_file.write_text("rt-revoked-long-ago\n")
    gw = await gateway(upstream_port=upstream.port, upstream=refresh_grant(upstream, token_file))
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert "invalid_grant" in job["last_result"] and "run `faxgw oauth login`" in job["last_result"]
    asked = upstream.tokens.requests["refresh_token"]
    await asyncio.sleep(1.5)  # many retry periods (retry_initial 0.2 s): nobody asks again, nothing is claimed
    assert upstream.tokens.requests["refresh_token"] == asked
    job = gw.job(code)
    assert job["state"] == "deferred" and job["attempts"] == 1
    status, report = await health(gw)
    assert status == 503 and report["oauth"]["sending_stopped"] is True
    assert any("faxgw oauth login" in line for line in report["failing"])

    token_file.write_text(upstream.tokens.new_refresh_token() + "\n")  # what `faxgw oauth login` does
    await gw.wait_state(code, "submitted", timeout=15)


async def test_a_burst_against_a_token_endpoint_that_is_down_makes_no_request_storm(gateway, upstream):
    upstream.tokens.mode = "down"
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    replies = await asyncio.gather(*(send(gw.port, fax_message()) for _ in range(16)))
    for code in (codes_in(reply.message)[0] for reply in replies):
        await gw.wait_state(code, "deferred")
    # 16 connections wanted a token: the failed answer stands for all of them for a few seconds.
    assert upstream.tokens.requests["client_credentials"] <= 2


async def test_a_rotated_refresh_token_its_file_cannot_take_is_used_from_memory(gateway, upstream, tmp_path,
                                                                              monkeypatch):
    # The tests run as root, for whom no file mode refuses a write: a refusing filesystem is stood in for here.
    from gateway.config import StoredSecret

    def refuse(self, value):
        raise PermissionError(13, "Permission denied")

    upstream.tokens.rotate = True
    token_file = tmp_path / "refresh-token"
    first = upstream.tokens.new_refresh_token()
    token_file.write_text(first)
    gw = await gateway(upstream_port=upstream.port, upstream=refresh_grant(upstream, token_file))
    monkeypatch.setattr(StoredSecret, "store", refuse)
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    await wait_for(lambda: first not in upstream.tokens.refresh_tokens)  # rotated at the server...
    assert token_file.read_text() == first  # ...and not in the file
    upstream.tokens.expire_all()  # the next connection needs a new token: from the rotated refresh token
    await asyncio.sleep(0.6)
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    assert upstream.tokens.requests["refresh_token"] >= 2


async def test_a_refused_service_account_resumes_when_its_key_file_is_replaced(gateway, upstream, tmp_path):
    key = tmp_path / "service-account.json"
    upstream.tokens.service_account_key(key)
    upstream.tokens.service_account_key(tmp_path / "other.json")  # the server now knows only the other key
    gw = await gateway(upstream_port=upstream.port, upstream={"auth": "xoauth2", "oauth": {
        "provider": "google", "service_account_file": str(key), "token_url": upstream.tokens.url, "user": MAILBOX}})
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert "invalid_grant" in job["last_result"] and "domain-wide delegation" in job["last_result"]
    assert gw.service.tokens.refused is not None
    (tmp_path / "other.json").replace(key)  # the admin put the right key in place: no restart
    await gw.wait_state(code, "submitted", timeout=15)


async def test_refused_credentials_are_tried_again_after_a_while(gateway, upstream, monkeypatch):
    from gateway.outbound import oauth

    monkeypatch.setattr(oauth, "RECHECK_REFUSED", 1.0)  # 15 minutes in production
    upstream.tokens.mode = "invalid_client"
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert "client secrets expire" in job["last_result"]
    upstream.tokens.mode = "ok"  # e.g. an admin consent that took effect late
    await gw.wait_state(code, "submitted", timeout=20)


async def test_microsoft_5_7_139_names_the_tenant_setting(gateway, upstream):
    upstream.handler.auth_reply = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
                                   " for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.")
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert job["upstream_reply"].startswith("535 5.7.139")
    assert "SMTP AUTH is disabled for the tenant or the mailbox" in job["last_result"]
    assert "Set-CASMailbox" in gw.service.forwarder.last_setup_failure
    assert upstream.tokens.requests["client_credentials"] == 1  # no token changes a tenant setting


@pytest.mark.parametrize("reply, cause", [
    ("534 5.7.9 Application-specific password required. For more information, go to"
     " https://support.google.com/mail/?p=InvalidSecondFactor", "Google needs an app password"),
    ("535 5.7.8 Username and Password not accepted. For more information, go to"
     " https://support.google.com/mail/?p=BadCredentials", "Google refused the credentials"),
    ("535 5.7.3 Authentication unsuccessful", "SMTP.SendAsApp permission"),
], ids=["google-534-5.7.9", "google-535-5.7.8", "microsoft-535-5.7.3"])
async def test_each_providers_auth_refusal_names_its_cause_and_waits(gateway, upstream, reply, cause):
    upstream.handler.auth_reply = reply
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert cause in job["last_result"] and job["upstream_reply"].startswith(reply[:len("535 5.7.8")])
    upstream.handler.auth_reply = None  # the admin fixed the account: the same job goes, nothing rejected
    await gw.wait_state(code, "submitted")
    assert "rejected" not in [e["state"] for e in gw.job(code)["events"]]


async def test_sendasdenied_after_the_data_waits_for_the_operator_instead_of_rejecting(gateway, upstream):
    upstream.handler.faults.data = ("554 5.2.252 SendAsDenied; fax@office.example not allowed to send as"
                                    " faxes@office.example; STOREDRV.Submission.Exception:SendAsDeniedException")
    gw = await gateway(upstream_port=upstream.port, upstream=client_credentials(upstream))
    (code,) = codes_in((await gw.send()).message)
    job = await gw.wait_state(code, "deferred")
    assert "may not send as upstream.account_sender" in job["last_result"]
    upstream.handler.faults.data = None  # the admin granted Send As
    await gw.wait_state(code, "submitted")


# --- secrets --------------------------------------------------------------------------


async def test_no_secret_or_token_in_any_log_line_the_store_or_health(gateway, upstream, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    upstream.tokens.rotate = True
    token_file = tmp_path / "refresh-token"
    initial = upstream.tokens.new_refresh_token()
    token_file.write_text(initial)
    gw = await gateway(upstream_port=upstream.port, upstream=refresh_grant(
        upstream, token_file, client_secret=CLIENT_SECRET))
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    upstream.tokens.expire_all()
    await asyncio.sleep(0.6)
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    _status, report = await health(gw)
    await gw.service.stop()

    secrets_seen = [CLIENT_SECRET, initial, *upstream.tokens.issued, *upstream.tokens.refresh_tokens]
    assert len(upstream.tokens.issued) >= 2
    # ...nor the XOAUTH2 string that carries a token, base64-encoded on the wire.
    secrets_seen += [base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {token}\x01\x01".encode()).decode()
                     for token in upstream.tokens.issued]
    store_bytes = b"".join(p.read_bytes() for p in gw.store_path.parent.iterdir() if p.is_file())
    for secret in secrets_seen:
        assert secret not in caplog.text
        assert secret not in str(report)
        assert secret.encode() not in store_bytes


# --- the commands ---------------------------------------------------------------------


def write_config(tmp_path: Path, up: Upstream, upstream: dict[str, Any], name: str = "faxgw.toml") -> Path:
    data = {
        "smtp": {"listen": ["127.0.0.1:0"], "hostname": "gw.test"},
        "store": {"path": str(tmp_path / "store" / "faxgw.sqlite3")},
        "upstream": {"host": "127.0.0.1", "port": up.port, "tls": "none", "account_sender": ACCOUNT_SENDER,
                     "return_path": RETURN_PATH, "connect_timeout": 3, "timeout": 5, **upstream},
    }
    path = tmp_path / name
    path.write_text(tomli_w.dumps(data))
    return path


async def faxgw(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run the faxgw program (this loop keeps serving the peers meanwhile); its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--config", str(config), *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    out, _ = await asyncio.wait_for(process.communicate(stdin), 60)
    return process.returncode or 0, out.decode()


async def test_check_upstream_passes_every_step_and_sends_nothing(upstream, tmp_path):
    config = write_config(tmp_path, upstream, client_credentials(upstream))
    code, out = await faxgw(config, "check-upstream")
    assert code == 0, out
    for step in ("token", "connect", "ehlo", "auth XOAUTH2 as fax@office.example", f"mail from <{ACCOUNT_SENDER}>",
                 "rcpt to <12125550100@greenfax.com>", "(the return path)", "rset", "quit"):
        assert step in out
    assert "FAIL" not in out and "every step passed" in out
    assert upstream.handler.faxes == []


async def test_check_upstream_over_starttls_with_a_private_ca(tmp_path):
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(ca_file)
    up = Upstream(TokenServer())
    await up.tokens.start()
    up.server = await start_xoauth2_upstream(up.handler, tls_context=server_context)
    try:
        config = write_config(tmp_path, up, {**client_credentials(up), "tls": "starttls", "ca_file": str(ca_file)})
        code, out = await faxgw(config, "check-upstream")
        assert code == 0, out
        assert "ok    starttls" in out and "auth XOAUTH2" in out
    finally:
        await up.stop()


async def test_check_upstream_with_a_password_against_the_sandbox(sandbox, tmp_path):
    sandbox.handler.credentials = ("gw", "sandbox-pass-77")
    up = Upstream(TokenServer())
    up.server = sandbox.server
    config = write_config(tmp_path, up, {"username": "gw", "password": "sandbox-pass-77"})
    code, out = await faxgw(config, "check-upstream")
    assert code == 0, out
    assert "auth LOGIN as gw" in out and "sandbox-pass-77" not in out and sandbox.faxes == []


@pytest.mark.parametrize("fault, reply, step, cause", [
    ("mail", "530 5.7.0 Must issue a STARTTLS command first", "mail", "requires STARTTLS"),
    ("mail", "550 5.7.60 SMTP; Client does not have permissions to send as this sender", "mail", "SendAsDenied"),
    ("auth", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
     "auth", "SMTP AUTH is disabled"),
    ("rcpt", "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain", "rcpt", "will not relay"),
    ("mail", "553 5.7.1 Sender address rejected: not owned by user fax@office.example", "mail",
     "does not let this login send as"),
])
async def test_check_upstream_names_the_cause_of_each_common_refusal(upstream, tmp_path, fault, reply, step, cause):
    if fault == "auth":
        upstream.handler.auth_reply = reply
    else:
        setattr(upstream.handler.faults, fault, reply)
    config = write_config(tmp_path, upstream, client_credentials(upstream))
    code, out = await faxgw(config, "check-upstream")
    assert code == 1, out
    failed = [line for line in out.splitlines() if line.lstrip().startswith("FAIL")]
    assert len(failed) == 1 and failed[0].split()[1] == step and reply.split()[0] in failed[0]
    assert "cause: " in out and cause in out
    assert CLIENT_SECRET not in out and not any(t in out for t in upstream.tokens.issued)


async def test_check_upstream_says_when_the_token_endpoint_refuses(upstream, tmp_path):
    config = write_config(tmp_path, upstream, client_credentials(upstream, client_secret="a-wrong-secret-123"))
    code, out = await faxgw(config, "check-upstream")
    assert code == 1
    assert "FAIL  token" in out and "invalid_client" in out and "client secrets expire" in out
    assert "a-wrong-secret-123" not in out


async def test_oauth_test_gets_a_token_and_authenticates_without_sending(upstream, tmp_path):
    config = write_config(tmp_path, upstream, client_credentials(upstream))
    code, out = await faxgw(config, "oauth", "test")
    assert code == 0, out
    assert "valid for 3" in out and "235" in out and "the upstream accepted the token" in out
    assert "mail from" not in out and upstream.handler.logins == [MAILBOX] and upstream.handler.faxes == []
    assert not any(token in out for token in upstream.tokens.issued)


async def test_oauth_login_runs_the_device_flow_and_stores_the_refresh_token(upstream, tmp_path):
    token_file = tmp_path / "secrets" / "refresh-token"
    token_file.parent.mkdir()
    config = write_config(tmp_path, upstream, refresh_grant(upstream, token_file))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--config", str(config), "oauth", "login",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    shown = []
    while not any("FAXG-W123" in line for line in shown):  # the code the user enters in the browser
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line, f"login ended early: {shown}"
        shown.append(line)
    assert any("https://microsoft.com/devicelogin" in line for line in shown)
    await asyncio.sleep(1.5)  # the command polls meanwhile: "authorization_pending"
    upstream.tokens.approve()  # the user signed in
    rest, _ = await asyncio.wait_for(process.communicate(), 30)
    out = "".join(shown) + rest.decode()
    assert process.returncode == 0, out
    stored = token_file.read_text().strip()
    assert stored in upstream.tokens.refresh_tokens and stored not in out
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert upstream.tokens.requests["device"] == 1 and upstream.tokens.requests[
        "urn:ietf:params:oauth:grant-type:device_code"] >= 2

    code, out = await faxgw(config, "oauth", "test")  # the stored token works
    assert code == 0, out


async def start_browser_login(config: Path, *args: str) -> tuple[asyncio.subprocess.Process, str, list[str]]:
    """`faxgw oauth login --browser`, read until it shows the authorization address; the process and it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--config", str(config), "oauth", "login", "--browser", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    shown: list[str] = []
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line, f"login ended early: {shown}"
        shown.append(line)
        if "/authorize?" in line:
            return process, line.strip(), shown


@pytest.mark.parametrize("how", ["redirect", "pasted"])
async def test_oauth_login_in_a_browser_with_pkce_stores_the_refresh_token(upstream, tmp_path, how):
    token_file = tmp_path / "refresh-token"
    config = write_config(tmp_path, upstream, refresh_grant(upstream, token_file,
                                                            authorize_url=upstream.tokens.authorize_url))
    process, url, shown = await start_browser_login(config)
    assert "code_challenge=" in url and "login_hint=fax%40office.example" in url
    async with aiohttp.ClientSession() as browser:
        if how == "redirect":  # the browser runs on this machine: it follows the redirect to the command
            async with browser.get(url) as page:
                assert page.status == 200 and "signed in" in await page.text()
            rest, _ = await asyncio.wait_for(process.communicate(), 30)
        else:  # on another machine: the address it ends on is pasted into the command
            async with browser.get(url, allow_redirects=False) as page:
                landing = page.headers["Location"]
            rest, _ = await asyncio.wait_for(process.communicate(landing.encode() + b"\n"), 30)
    out = "".join(shown) + rest.decode()
    assert process.returncode == 0, out
    stored = token_file.read_text().strip()
    assert stored in upstream.tokens.refresh_tokens and stored not in out
    assert upstream.tokens.requests["authorization_code"] == 1


async def test_oauth_login_in_a_browser_on_a_busy_port_says_so_in_one_line(upstream, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, upstream, refresh_grant(upstream, tmp_path / "refresh-token",
                                                                authorize_url=upstream.tokens.authorize_url))
        code, out = await faxgw(config, "oauth", "login", "--browser", "--port", str(port))
    assert code == 1 and "Traceback" not in out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "choose another --port" in out


async def test_oauth_login_in_a_browser_says_when_the_user_declined(upstream, tmp_path):
    upstream.tokens.deny = True
    config = write_config(tmp_path, upstream, refresh_grant(upstream, tmp_path / "refresh-token",
                                                            authorize_url=upstream.tokens.authorize_url))
    process, url, shown = await start_browser_login(config)
    async with aiohttp.ClientSession() as browser, browser.get(url) as page:
        assert page.status == 200
    rest, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert "access_denied" in rest.decode() and "declined" in rest.decode()
    assert not (tmp_path / "refresh-token").exists()


async def test_check_config_masks_the_oauth_secrets(upstream, tmp_path):
    token_file = tmp_path / "refresh-token"
    token_file.write_text("rt-must-not-show-7f3a\n")
    config = write_config(tmp_path, upstream, refresh_grant(upstream, token_file, client_secret=CLIENT_SECRET))
    code, out = await faxgw(config, "check-config")
    assert code == 0, out
    assert "[upstream.oauth]" in out and upstream.tokens.url in out
    assert CLIENT_SECRET not in out and "rt-must-not-show-7f3a" not in out
