"""The `faxgw` command: the only place where errors become messages and exit codes.

Every command takes the config from `--config PATH` or FAXGW_CONFIG; with
neither, the sandbox set-up applies (store under ./var/).
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from typing import Any

import click

from gateway import config as config_module
from gateway import logs, store
from gateway.cli.admin import backup, purge, restore
from gateway.cli.feedcmd import feed
from gateway.config import Settings
from gateway.errors import FilterError, GatewayError
from gateway.models import JobState
from gateway.units import age

STATES = [state.value for state in JobState]


class Context:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = config_module.load(self.config_path)
        return self._settings

    def read_store(self) -> sqlite3.Connection:
        return store.connect(self.settings.store.path, readonly=True)


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", envvar="FAXGW_CONFIG", metavar="PATH",
              type=click.Path(dir_okay=False), help="Config file (default: $FAXGW_CONFIG; none = sandbox).")
@click.version_option(package_name="greenfax-gateway")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """greenfax-gateway: a local SMTP smarthost that forwards fax emails to GreenFax.

    \b
    Examples:
      faxgw serve                      # the sandbox: try it without an account
      faxgw --config /etc/faxgw/faxgw.toml serve
      faxgw status --state deferred
    """
    ctx.obj = Context(config_path)


# --- running -------------------------------------------------------------------------


@cli.command()
@pass_context
def serve(obj: Context) -> None:
    """Run the gateway: intake, store and forwarder (and the sandbox when enabled).

    With no config this is the sandbox: the gateway listens on 127.0.0.1:2525
    and forwards to the built-in GreenFax stand-in; nothing is faxed.

    \b
    Examples:
      faxgw serve
      faxgw --config /etc/faxgw/faxgw.toml serve
    """
    from gateway.service import Service

    settings = obj.settings
    logs.setup(settings.log.level)
    import asyncio

    asyncio.run(Service(settings).run_until_signalled())


@cli.command()
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on (default: [sandbox] listen).")
@click.option("--fail-auth", metavar="REPLY", help="Answer every AUTH with this reply, e.g. \"535 5.7.8 No\".")
@click.option("--fail-rcpt", metavar="REPLY", help="Answer every RCPT with this reply.")
@click.option("--fail-data", metavar="REPLY", help="Answer every message with this reply.")
@click.option("--drop-after-data", is_flag=True, help="Close the connection after the data, before replying.")
@pass_context
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
    from gateway.rules import load_addressing
    from gateway.sandbox import SandboxHandler, start_sandbox

    settings = obj.settings if obj.config_path else config_module.sandbox_settings()
    logs.setup(settings.log.level)
    host, port = config_module.parse_host_port(listen) if listen else settings.sandbox.listen[0]
    rules = load_addressing(settings.addressing)
    sb = settings.sandbox
    handler = SandboxHandler(
        domain=settings.upstream.domain,
        account_sender=settings.upstream.account_sender or config_module.DEFAULT_SANDBOX_SENDER,
        code_pattern=rules.tag_pattern(),
        code_header=rules.jobcode.header if rules.jobcode.placement == "header" else None,
        credentials=(sb.username, sb.password.get_secret_value()) if sb.username and sb.password else None,
    )
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


@cli.command("check-config")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON (durations in seconds).")
@pass_context
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


@cli.command()
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


# --- status ------------------------------------------------------------------------------


def _age(created_at: str) -> str:
    return age((store.utcnow() - store.parse_iso(created_at)).total_seconds())


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _key, title in columns]]
    for row in rows:
        cells.append([str(row.get(key) if row.get(key) is not None else "-") for key, _title in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in cells)


def _banner(conn: sqlite3.Connection) -> str | None:
    try:
        mode = store.get_meta(conn, "mode")
    except sqlite3.Error:
        return None
    return "SANDBOX: these jobs went to the built-in stand-in; nothing was faxed" if mode == "sandbox" else None


@cli.command()
@click.option("--state", "states", multiple=True, type=click.Choice(STATES), help="Only jobs in this state (repeatable).")
@click.option("--number", help="Only jobs to this fax number (any common notation).")
@click.option("--sender", help="Only jobs whose sender contains this text.")
@click.option("--since", help="Only jobs created since: a duration (\"2h\", \"3d\") or a date (\"2026-11-20\").")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000), help="At most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@pass_context
def status(obj: Context, states: tuple[str, ...], number: str | None, sender: str | None,
           since: str | None, limit: int, as_json: bool) -> None:
    """Recent jobs, newest first.

    \b
    Examples:
      faxgw status
      faxgw status --state deferred --state unknown
      faxgw status --number "+1 212 555 0123" --since 2d --json
    """
    from gateway.jobfilter import FilterError, parse_filter

    # The addressing rules only say how to read --number; without it they are not even loaded.
    region = _default_region(obj.settings) if number else "US"
    try:
        query = parse_filter(states=states, number=number, sender=sender, since=since, limit=limit, region=region)
    except FilterError as exc:
        raise click.BadParameter(exc.message, param_hint=f"'--{exc.parameter}'") from None
    conn = obj.read_store()
    jobs = store.list_jobs(conn, **query.as_query())
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    banner = _banner(conn)
    if banner:
        click.echo(banner)
    for job in jobs:
        job["age"] = _age(job["created_at"])
    click.echo(_table(jobs, [("code", "CODE"), ("number", "NUMBER"), ("sender", "SENDER"), ("state", "STATE"),
                             ("age", "AGE"), ("last_result", "LAST RESULT")]))


def _when(stored: str | None) -> str | None:
    """A stored time for people: "2026-11-27 01:02:03 UTC", with the fraction of a second only where it has one
    (a report's time is to the second; the gateway's own times to the microsecond)."""
    if not stored:
        return stored
    moment = store.parse_iso(stored)
    fraction = f".{moment.microsecond:06d}" if moment.microsecond else ""
    return f"{moment:%Y-%m-%d %H:%M:%S}{fraction} UTC"


def _cost(cost: str | None, currency: str) -> str | None:
    """A cost with its currency: GreenFax writes "0.20" (the account's currency), sometimes "$0.20"."""
    if not cost:
        return None
    return f"{cost} {currency}" if re.fullmatch(r"\d+(?:\.\d+)?", cost.strip()) else cost


def _default_region(settings: Settings) -> str:
    from gateway.rules import load_addressing

    return load_addressing(settings.addressing).numbers.default_region


@cli.command()
@click.argument("code")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def show(obj: Context, code: str, as_json: bool) -> None:
    """A job and its full history.

    \b
    Example:
      faxgw show FX7K3M9Q
    """
    from gateway.store import reports as reports_db

    conn = obj.read_store()
    job = store.get_job(conn, code)
    job["reports"] = reports_db.reports_for_job(conn, code)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    shown = {**job, "duration": f"{job['duration']} s" if job.get("duration") is not None else None,
             "cost": _cost(job.get("cost"), obj.settings.greenfax.currency)}
    for key in ("created_at", "updated_at", "next_attempt_at", "reported_at"):
        shown[key] = _when(job.get(key))
    for key in ("code", "number", "recipient", "sender", "state", "reason", "attempts", "created_at",
                "updated_at", "next_attempt_at", "last_result", "upstream_reply", "reference_id", "pages",
                "duration", "cost", "reported_at"):
        if shown.get(key) not in (None, ""):
            click.echo(f"{key + ':':16} {shown[key]}")
    if job.get("flagged"):
        click.echo(f"{'flagged:':16} yes: a report contradicted this job or was impossible; see the events")
    click.echo("")
    events = [{**event, "at": _when(event["at"])} for event in job["events"]]
    click.echo(_table(events, [("at", "TIME"), ("source", "SOURCE"), ("state", "STATE"), ("detail", "DETAIL")]))
    if job["reports"]:
        click.echo("\nStatus reports received:")
        click.echo(_table(job["reports"], REPORT_TABLE))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def queue(obj: Context, as_json: bool) -> None:
    """Jobs waiting (queued, deferred, sending, held, unknown), with their next attempt.

    \b
    Example:
      faxgw queue
    """
    jobs = store.waiting_jobs(obj.read_store())
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    for job in jobs:
        job["age"] = _age(job["created_at"])
    click.echo(_table(jobs, [("code", "CODE"), ("number", "NUMBER"), ("state", "STATE"), ("attempts", "TRIES"),
                             ("next_attempt_at", "NEXT ATTEMPT"), ("age", "AGE"), ("last_result", "LAST RESULT")]))


def _operator_command(action: str, summary: str, example: str) -> None:
    @cli.command(action, help=f"{summary}\n\n\b\nExample:\n  faxgw {action} {example}")
    @click.argument("code")
    @pass_context
    def command(obj: Context, code: str) -> None:
        conn = store.connect(obj.settings.store.path) if obj.settings.store.path.exists() else obj.read_store()
        state = store.operator_action(conn, code, action, store.iso(store.utcnow()))
        click.echo(f"{code.upper()}: {state.value}")


_operator_command("retry", "Send a deferred, unknown, expired or rejected job again, now.", "FX7K3M9Q")
_operator_command("cancel", "Cancel a job that has not been sent (queued, deferred, held or unknown).", "FX7K3M9Q")
_operator_command("release", "Release a held job so it is sent.", "FX7K3M9Q")


# --- status reports ----------------------------------------------------------------------

REPORT_TABLE = [("id", "ID"), ("received_at", "RECEIVED"), ("channel", "CHANNEL"), ("outcome", "OUTCOME"),
                ("result", "RESULT"), ("reason", "REASON"), ("number", "NUMBER"), ("job_code", "CODE"),
                ("note", "NOTE")]


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Also reports no rule recognised and contradicting ones.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000), help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_context
def unmatched(obj: Context, show_all: bool, limit: int, as_json: bool) -> None:
    """Status reports that matched no job, newest first (link one with `faxgw match`).

    \b
    Examples:
      faxgw unmatched
      faxgw unmatched --all --json
    """
    from gateway.store import reports as reports_db

    outcomes = ("unmatched", "unrecognised", "contradicting", "flagged") if show_all else ("unmatched",)
    rows = reports_db.list_reports(obj.read_store(), outcomes=outcomes, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table(rows, REPORT_TABLE))


@cli.command()
@click.argument("report_id", type=int)
@click.argument("code")
@pass_context
def match(obj: Context, report_id: int, code: str) -> None:
    """Link an unmatched status report to a job by hand, and apply it (recorded as an event).

    \b
    Example:
      faxgw match 42 FX7K3M9Q
    """
    from gateway.status.correlate import CorrelationPolicy, match_by_hand

    conn = store.connect(obj.settings.store.path) if obj.settings.store.path.exists() else obj.read_store()
    outcome = match_by_hand(conn, report_id, code.upper(), store.iso(store.utcnow()),
                            CorrelationPolicy.from_settings(obj.settings))
    click.echo(f"report {report_id}: {outcome}")


@cli.group()
def rules() -> None:
    """Status-mail rules (rules/status/*.toml and [status] rule_files).

    \b
    Example:
      faxgw rules test status-mail.eml
    """


@rules.command("test")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per file.")
@pass_context
def rules_test(obj: Context, files: tuple[str, ...], as_json: bool) -> None:
    """Show, for each mail file, every rule that recognised it, what each found, and which was used and why.

    Trust is shown as for mail read from a file or an IMAP mailbox: only a
    DKIM signature can make it trusted. Exits 1 when a file is recognised by no rule.

    \b
    Example:
      faxgw rules test status-mail.eml
    """
    from gateway.status.inbound import StatusMail
    from gateway.status.mailparse import parse_mail
    from gateway.status.mailrules import load_rules
    from gateway.models import Channel, Trust

    settings = obj.settings
    status = StatusMail(settings, load_rules(settings.status.rule_files))
    results = []
    for name in files:
        with open(name, "rb") as fh:
            raw = fh.read()
        mail = parse_mail(raw)
        verdict = status.understand(raw, channel=Channel.SMTP)
        trusted, checks = status.trust_checks(raw)
        report = verdict.report
        fields = {key: getattr(report, key) for key in RULE_TEST_FIELDS} if verdict.kind != "unrecognised" else {}
        if "reported_at" in fields and fields["reported_at"] is not None:
            fields["reported_at"] = str(fields["reported_at"])
        attempts = status.rules.attempts(mail, channel=Channel.SMTP, trust=Trust.UNTRUSTED)
        results.append({
            "file": name, "kind": verdict.kind, "explanation": verdict.explanation, "fields": fields,
            "trust": {"trusted": trusted, "checks": checks},
            "rules": [{"name": a.rule.name, "recognised": a.extraction is not None, "used": a.why.startswith("used"),
                       "why": a.why, "found": a.extraction.values if a.extraction else {}} for a in attempts],
        })
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            _print_rule_test(result)
    if any(result["kind"] == "unrecognised" for result in results):
        sys.exit(1)


RULE_TEST_FIELDS = ("result", "reason", "fax_number", "pages", "duration", "cost", "reference_id", "job_code",
                    "reported_at", "reported_at_raw")


def _print_rule_test(result: dict[str, Any]) -> None:
    click.echo(f"{result['file']}: {result['kind']}: {result['explanation']}")
    for key, value in result["fields"].items():
        click.echo(f"  {key + ':':16} {value if value is not None else '-'}")
    trust = result["trust"]
    click.echo(f"  {'trust:':16} {'trusted' if trust['trusted'] else 'untrusted'} ({'; '.join(trust['checks'])})")
    click.echo("  rules tried, in order:")
    for rule in result["rules"]:
        click.echo(f"    {rule['name']}: {rule['why']}")
        if rule["found"]:
            click.echo("      found: " + ", ".join(f"{k}={v!r}" for k, v in rule["found"].items()))


cli.add_command(feed)
cli.add_command(backup)
cli.add_command(restore)
cli.add_command(purge)


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="faxgw")
    except click.exceptions.Abort:
        click.echo("faxgw: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # One line, like every other error, with where to find the usage.
        command = exc.ctx.command_path if exc.ctx else "faxgw"
        click.echo(f"{command}: error: {exc.format_message()} (see `{command} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GatewayError as exc:
        click.echo(f"faxgw: error: {exc}", err=True)
        sys.exit(1)
    except sqlite3.Error as exc:
        click.echo(f"faxgw: error: the store cannot be read: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
