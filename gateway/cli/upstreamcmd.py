"""`faxgw check-upstream`, `oauth login`, `oauth test`: is the upstream set up, and the OAuth2 sign-in.

`check-upstream` walks the session the forwarder opens (token, connect,
EHLO, STARTTLS, AUTH) and then the envelope of a fax (MAIL, RCPT, the real
return path), ends with RSET and QUIT, and never sends DATA (probe.py).
`oauth test` stops after AUTH. `oauth login` runs the device code flow and
stores the refresh token where the config keeps it. None of them prints a
token, a secret or a refresh token: only lifetimes and replies.
"""

from __future__ import annotations

import secrets
import sys
from typing import TYPE_CHECKING

import click

from gateway.errors import GatewayError

if TYPE_CHECKING:
    import asyncio

    from gateway.cli.main import Context
    from gateway.config import Settings
    from gateway.outbound.oauth import TokenSource
    from gateway.outbound.probe import Step


def _configured(settings: Settings, command: str) -> None:
    if settings.sandbox_mode:
        raise GatewayError(f"{command}: the config has no [upstream] host (this is the sandbox set-up); give"
                           " --config with your upstream")


def _tokens(settings: Settings, command: str) -> TokenSource:
    from gateway.outbound.oauth import TokenSource

    _configured(settings, command)
    if settings.upstream.oauth is None:
        raise GatewayError(f"{command}: [upstream] auth is \"password\"; it needs auth = \"xoauth2\" and an"
                           " [upstream.oauth] section")
    return TokenSource(settings.upstream.oauth)


def _print_steps(steps: list[Step]) -> None:
    width = max(len(step.name) for step in steps)
    for step in steps:
        click.echo(f"  {'ok' if step.ok else 'FAIL':<5} {step.name:<{width}}  {step.reply}")
        if step.cause:
            click.echo(f"  {'':<5} {'':<{width}}  cause: {step.cause}")


def _run_probe(settings: Settings, tokens: TokenSource | None, *, envelope: bool, number: str) -> bool:
    import asyncio

    from gateway.outbound.probe import Probe
    from gateway.outbound.upstream import endpoint_for

    endpoint = endpoint_for(settings, tokens)
    up = settings.upstream
    auth = f"auth {up.auth} as {up.mailbox}" if up.mailbox else "no auth"
    click.echo(f"upstream {endpoint.describe()}, {auth}")
    probe = Probe(endpoint)

    async def run() -> None:
        try:
            if envelope:
                await probe.run(sender=up.account_sender, recipient=f"{number}@{up.domain}",
                                return_path=up.return_path_for("FXCHECK0", secrets.token_hex(8)))
            else:
                await probe.run()
        finally:
            if tokens is not None:
                await tokens.close()

    asyncio.run(run())
    _print_steps(probe.steps)
    return probe.passed


@click.command("check-upstream")
@click.option("--number", default=None, metavar="DIGITS",
              help="Fax number for the RCPT test (default: a fictional +1 212 555 0100); nothing is sent.")
@click.pass_obj
def check_upstream(obj: Context, number: str | None) -> None:
    """Check the upstream without sending: connect, STARTTLS, AUTH, MAIL, RCPT, RSET, QUIT.

    Each step prints the server's reply, and for the refusals users meet most
    (STARTTLS required, AUTH disabled, From/sender not allowed, relay denied)
    what it means and what to do. Exit code 0 only when every step passed.

    \b
    Example:
      faxgw --config /etc/faxgw/faxgw.toml check-upstream
    """
    from gateway.outbound.oauth import TokenSource
    from gateway.outbound.probe import TEST_NUMBER

    settings = obj.settings
    _configured(settings, "check-upstream")
    up = settings.upstream
    tokens = TokenSource(up.oauth) if up.oauth is not None else None
    if _run_probe(settings, tokens, envelope=True, number=(number or TEST_NUMBER).lstrip("+")):
        click.echo("every step passed; nothing was sent")
        return
    click.echo("check-upstream: a step failed (see above); nothing was sent", err=True)
    sys.exit(1)


@click.group()
def oauth() -> None:
    """OAuth2 for the upstream ([upstream] auth = "xoauth2"): sign in, test.

    \b
    Examples:
      faxgw --config /etc/faxgw/faxgw.toml oauth login
      faxgw --config /etc/faxgw/faxgw.toml oauth test
    """


@oauth.command("test")
@click.pass_obj
def oauth_test(obj: Context) -> None:
    """Get an access token and run EHLO, STARTTLS and AUTH XOAUTH2 with it; nothing is sent.

    Prints the token's lifetime, never the token. Exit code 0 only when AUTH passed.

    \b
    Example:
      faxgw --config /etc/faxgw/faxgw.toml oauth test
    """
    settings = obj.settings
    tokens = _tokens(settings, "oauth test")
    if _run_probe(settings, tokens, envelope=False, number=""):
        click.echo("the upstream accepted the token")
        return
    click.echo("oauth test: a step failed (see above)", err=True)
    sys.exit(1)


@oauth.command("login")
@click.option("--browser", "flow", flag_value="browser",
              help="Sign in in a browser (authorization code with PKCE); the default for Google.")
@click.option("--device", "flow", flag_value="device",
              help="Sign in with a code on any device (device code flow); the default otherwise.")
@click.option("--port", default=0, type=click.IntRange(0, 65535), metavar="PORT",
              help="Loopback port for the browser's redirect (default: any free one).")
@click.pass_obj
def oauth_login(obj: Context, flow: str | None, port: int) -> None:
    """Sign in once as the mailbox and store the refresh token.

    For grant = "refresh_token" (Microsoft's delegated SMTP.Send, a Google
    mailbox, any OAuth2 provider). The device code flow prints a web address
    and a code: open it on any device, sign in as the mailbox, enter the code.
    Google does not offer its mail scope to that flow, so for Google the
    command prints an address to open in a browser instead, and waits for the
    browser to come back to 127.0.0.1 (or for the address it ends on, pasted).
    The refresh token goes to the file of upstream.oauth.refresh_token (mode
    0600); a running gateway uses it from its next token request.

    \b
    Example:
      sudo -u faxgw faxgw --config /etc/faxgw/faxgw.toml oauth login
    """
    import asyncio

    settings = obj.settings
    tokens = _tokens(settings, "oauth login")
    oauth_settings = settings.upstream.oauth
    assert oauth_settings is not None
    if oauth_settings.grant != "refresh_token":
        raise GatewayError(f"oauth login: grant = \"{oauth_settings.grant}\" needs no sign-in; `faxgw oauth test`"
                           " checks it")
    stored = oauth_settings.refresh_token
    if stored is None or stored.file is None:
        raise GatewayError("oauth login: upstream.oauth.refresh_token must be { file = \"PATH\" } so that the"
                           " refresh token can be stored")
    flow = flow or ("browser" if oauth_settings.provider == "google" else "device")

    async def run() -> str:
        try:
            if flow == "device":
                return await tokens.device_login(click.echo)
            return await tokens.browser_login(click.echo, _pasted_address(), port=port)
        finally:
            await tokens.close()

    click.echo(f"signing in {oauth_settings.user} with {oauth_settings.provider} ({flow} flow)")
    where = asyncio.run(run())
    click.echo(f"signed in; the refresh token is stored in {where} (mode 0600)")


def _pasted_address() -> asyncio.Future[str]:
    """The first line of standard input that holds an address (a daemon thread reads it; EOF: never)."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        for line in sys.stdin:
            if "://" in line:
                try:
                    loop.call_soon_threadsafe(lambda: future.done() or future.set_result(line))
                except RuntimeError:  # the sign-in ended already (the browser came back)
                    pass
                return

    threading.Thread(target=read, name="paste", daemon=True).start()
    return future
