"""`faxgw serve`, `sandbox`, `check-config`, `passwd`: running the gateway or the stand-in, and setting them up.

`serve` hands over to gateway.service (the composition root); `sandbox` runs
only the GreenFax stand-in (gateway.sandbox); `check-config` prints the
settings and rules as they are in force; `passwd` makes a hash for
[smtp.users]. Each imports asyncio and the stages inside itself, so that the
other commands start quickly. Errors are raised, and become one line in
gateway.cli.main.main.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from gateway import config as config_module
from gateway import logs

if TYPE_CHECKING:
    from gateway.cli.main import Context


@click.command()
@click.pass_obj
def serve(obj: Context) -> None:
    """Run the gateway: intake, store and forwarder (and the sandbox when enabled).

    With no config this is the sandbox: the gateway listens on 127.0.0.1:2525
    and forwards to the built-in GreenFax stand-in; nothing is faxed.

    With [service] workers above one (the default: one per core) it
    supervises that many worker processes on the same listeners and store.

    \b
    Examples:
      faxgw serve
      faxgw --config /etc/faxgw/faxgw.toml serve
    """
    import asyncio

    from gateway.ops import workers

    settings = obj.settings
    logs.setup(settings.log.level)
    if settings.workers == 1:
        from gateway.service import Service

        asyncio.run(Service(settings).run_until_signalled())
        return
    directory = workers.metrics_dir()  # before the gateway's modules import prometheus_client
    from gateway.service import Service, prepare_store

    Service(settings)  # as each worker will: a broken rule file or template stops here, before the store exists
    def worker_main(worker: workers.Worker) -> int:
        logs.setup(settings.log.level, tag=worker.tag)
        asyncio.run(Service(settings, worker=worker).run_until_signalled())
        return 0

    sys.exit(workers.run_pool(settings, prepare=lambda: prepare_store(settings), worker_main=worker_main,
                              metrics_dir=directory))


@click.command()
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on (default: [sandbox] listen).")
@click.option("--fail-auth", metavar="REPLY", help="Answer every AUTH with this reply, e.g. \"535 5.7.8 No\".")
@click.option("--fail-rcpt", metavar="REPLY", help="Answer every RCPT with this reply.")
@click.option("--fail-data", metavar="REPLY", help="Answer every message with this reply.")
@click.option("--drop-after-data", is_flag=True, help="Close the connection after the data, before replying.")
@click.pass_obj
def sandbox(obj: Context, listen: str | None, fail_auth: str | None, fail_rcpt: str | None,
            fail_data: str | None, drop_after_data: bool) -> None:
    """Run only the GreenFax stand-in (SMTP), for tests and trials.

    It accepts <number>@greenfax.com from the account sender only. Outcome by
    the number's last four digits: 0000 busy, 0001 no answer, 0002 invalid
    number, 0003 refused by the service, anything else delivered. Faults:
    0450/0550 refuse RCPT (4xx/5xx), 0451/0554 refuse the data, 0999 drops the
    connection after the data.

    \b
    Example:
      faxgw sandbox --listen 127.0.0.1:2526 --fail-data "451 4.3.0 Try later"
    """
    from gateway.rules import RulesInForce, load_addressing
    from gateway.sandbox import sandbox_handler, start_sandbox

    settings = obj.settings if obj.config_path else config_module.sandbox_settings()
    logs.setup(settings.log.level)
    host, port = config_module.parse_host_port(listen) if listen else settings.sandbox.listen[0]
    handler = sandbox_handler(settings, RulesInForce(load_addressing(settings.addressing)))
    handler.faults.auth, handler.faults.rcpt, handler.faults.data = fail_auth, fail_rcpt, fail_data
    handler.faults.drop_after_data = drop_after_data

    async def run() -> None:
        server = await start_sandbox(handler, host, port)
        address = server.sockets[0].getsockname()
        click.echo(f"faxgw sandbox: GreenFax stand-in on {address[0]}:{address[1]}, "
                   f"accepting mail from <{handler.account_sender}>; nothing is faxed", err=True)
        async with server:
            await server.serve_forever()

    import asyncio

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


@click.command("check-config")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON (durations in seconds).")
@click.pass_obj
def check_config(obj: Context, as_json: bool) -> None:
    """Validate the config (and rules) and print the effective settings, secrets masked.

    The settings are printed as the config file would write them (TOML), the
    addressing rules in force after them; warnings go to standard error.

    \b
    Example:
      faxgw --config /etc/faxgw/faxgw.toml check-config
    """
    import tomli_w

    from gateway.rules import load_addressing
    from gateway.status.mailrules import load_rules

    settings = obj.settings
    rules = load_addressing(settings.addressing)
    status_rules = [rule.name for rule in load_rules(settings.status.rule_files).rules]
    click.echo(f"# {settings.source}: OK" + (" (SANDBOX)" if settings.sandbox_mode else ""))
    if as_json:
        data = config_module.effective(settings)
        data["status_rules"] = status_rules
        data["addressing"] = rules.model_dump(mode="json")
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(config_module.render(settings))
        click.echo(f"# status-mail rules, in the order they are tried: {', '.join(status_rules)}")
        click.echo("# addressing rules in force (rules/addressing.toml with the config's [addressing] overrides):")
        click.echo(tomli_w.dumps({"addressing": rules.model_dump(mode="json")}).rstrip("\n"))
    for warning in config_module.warnings(settings):
        click.echo(f"faxgw: warning: {warning}", err=True)


@click.command()
@click.argument("user")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the password from standard input.")
def passwd(user: str, from_stdin: bool) -> None:
    """Print a password hash for USER to paste into [smtp.users].

    \b
    Example:
      faxgw passwd scanner
    """
    from gateway.outbound.passwords import hash_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"Password for {user}", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        raise click.UsageError("the password must have at least 8 characters")
    click.echo(f"[smtp.users]\n{json.dumps(user)} = {json.dumps(hash_password(password))}")
