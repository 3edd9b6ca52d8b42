"""`faxgw unmatched`, `match`, `rules test`: the status reports no job claimed, and the rules that read them.

`unmatched` lists from the store read-only; `match` links a report to a job
by hand through gateway.status.correlate (recorded as an event); `rules test`
reads mail files with the status-mail rules exactly as the service would,
touching no store. Errors are raised, and become one line in
gateway.cli.main.main.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from gateway import store
from gateway.cli.table import REPORT_COLUMNS, table

if TYPE_CHECKING:
    from gateway.cli.main import Context
    from gateway.status.inbound import StatusMail

# The fields of a recognised report that `faxgw rules test` shows.
RULE_TEST_FIELDS = ("result", "reason", "fax_number", "pages", "duration", "cost", "reference_id", "job_code",
                    "reported_at", "reported_at_raw")


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Also reports no rule recognised and contradicting ones.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000), help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def unmatched(obj: Context, show_all: bool, limit: int, as_json: bool) -> None:
    """Status reports that matched no job, newest first (link one with `faxgw match`).

    \b
    Examples:
      faxgw unmatched
      faxgw unmatched --all --json
    """


    outcomes = ("unmatched", "unrecognised", "contradicting", "flagged") if show_all else ("unmatched",)
    rows = store.list_reports(obj.read_store(), outcomes=outcomes, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(table(rows, REPORT_COLUMNS))


@click.command()
@click.argument("report_id", type=int)
@click.argument("code")
@click.pass_obj
def match(obj: Context, report_id: int, code: str) -> None:
    """Link an unmatched status report to a job by hand, and apply it (recorded as an event).

    \b
    Example:
      faxgw match 42 FX7K3M9Q
    """
    from gateway.status.correlate import CorrelationPolicy, match_by_hand

    outcome = match_by_hand(obj.change_store(), report_id, code.upper(), store.iso(store.utcnow()),
                            CorrelationPolicy.from_settings(obj.settings))
    click.echo(f"report {report_id}: {outcome}")


@click.group()
def rules() -> None:
    """Status-mail rules (rules/status/*.toml and [status] rule_files).

    \b
    Example:
      faxgw rules test status-mail.eml
    """


@rules.command("test")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per file.")
@click.pass_obj
def rules_test(obj: Context, files: tuple[str, ...], as_json: bool) -> None:
    """Show, for each mail file, every rule that recognised it, what each found, and which was used and why.

    Trust is shown as for mail read from a file or an IMAP mailbox: only a
    DKIM signature can make it trusted. Exits 1 when a file is recognised by no rule.

    \b
    Example:
      faxgw rules test status-mail.eml
    """
    from gateway.rules import RulesInForce
    from gateway.status.inbound import StatusMail
    from gateway.status.mailrules import load_rules

    settings = obj.settings
    status = StatusMail(settings, RulesInForce(mail=load_rules(settings.status.rule_files)))
    results = [_test_file(status, name) for name in files]
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            _print_rule_test(result)
    if any(result["kind"] == "unrecognised" for result in results):
        sys.exit(1)


def _test_file(status: StatusMail, name: str) -> dict[str, Any]:
    """What the rules make of one mail file: the verdict, the report's fields, its trust, each rule tried."""
    from gateway.models import Channel, Trust
    from gateway.status.mailparse import parse_mail

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
    return {
        "file": name, "kind": verdict.kind, "explanation": verdict.explanation, "fields": fields,
        "trust": {"trusted": trusted, "checks": checks},
        "rules": [{"name": a.rule.name, "recognised": a.extraction is not None, "used": a.why.startswith("used"),
                   "why": a.why, "found": a.extraction.values if a.extraction else {}} for a in attempts],
    }


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
