"""`faxgw status`, `show`, `queue`, `retry`, `cancel`, `release`: the jobs in the store, read and changed by hand.

The reading commands open the store read-only, so they work while `faxgw
serve` runs; the operator actions go through gateway.store's
`operator_action`, which says which state a job may leave. Tables are printed
by gateway/cli/table.py; errors are raised, and become one line in
gateway.cli.main.main.
"""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING

import click

from gateway import store
from gateway.cli.table import REPORT_COLUMNS, age_of, cost, table, when
from gateway.models import JobState

if TYPE_CHECKING:
    from gateway.cli.main import Context
    from gateway.config import Settings

STATES = [state.value for state in JobState]

# The fields `faxgw show` prints, in this order, when the job has them.
SHOW_FIELDS = ("code", "number", "recipient", "sender", "state", "reason", "attempts", "created_at", "updated_at",
               "next_attempt_at", "last_result", "upstream_reply", "reference_id", "pages", "duration", "cost",
               "reported_at", "billing_code")


@click.command()
@click.option("--state", "states", multiple=True, type=click.Choice(STATES), help="Only jobs in this state (repeatable).")
@click.option("--number", help="Only jobs to this fax number (any common notation).")
@click.option("--sender", help="Only jobs whose sender contains this text.")
@click.option("--since", help="Only jobs created since: a duration (\"2h\", \"3d\") or a date (\"2026-11-20\").")
@click.option("--text", help="Only jobs with this code, GreenFax reference id, billing code or number, or whose"
                             " sender contains it.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100000), help="At most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_obj
def status(obj: Context, states: tuple[str, ...], number: str | None, sender: str | None,
           since: str | None, text: str | None, limit: int, as_json: bool) -> None:
    """Recent jobs, newest first.

    \b
    Examples:
      faxgw status
      faxgw status --state deferred --state unknown
      faxgw status --number "+1 212 555 0123" --since 2d --json
      faxgw status --text 10999998
    """
    from gateway.jobfilter import FilterError, parse_filter

    # The addressing rules only say how to read --number; without it they are not even loaded.
    region = _default_region(obj.settings) if number or text else "US"
    try:
        query = parse_filter(states=states, number=number, sender=sender, since=since, text=text, limit=limit,
                             region=region)
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
        job["age"] = age_of(job["created_at"])
    click.echo(table(jobs, [("code", "CODE"), ("number", "NUMBER"), ("sender", "SENDER"), ("state", "STATE"),
                            ("age", "AGE"), ("last_result", "LAST RESULT")]))


def _default_region(settings: Settings) -> str:
    from gateway.rules import load_addressing

    return load_addressing(settings.addressing).numbers.default_region


def _banner(conn: sqlite3.Connection) -> str | None:
    try:
        mode = store.get_meta(conn, "mode")
    except sqlite3.Error:
        return None
    return "SANDBOX: these jobs went to the built-in stand-in; nothing was faxed" if mode == "sandbox" else None


@click.command()
@click.argument("code")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show(obj: Context, code: str, as_json: bool) -> None:
    """A job and its full history.

    \b
    Example:
      faxgw show FX7K3M9Q
    """


    conn = obj.read_store()
    job = store.get_job(conn, code)
    job["reports"] = store.reports_for_job(conn, code)
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    shown = {**job, "duration": f"{job['duration']} s" if job.get("duration") is not None else None,
             "cost": cost(job.get("cost"), obj.settings.greenfax.currency)}
    for key in ("created_at", "updated_at", "next_attempt_at", "reported_at"):
        shown[key] = when(job.get(key))
    for key in SHOW_FIELDS:
        if shown.get(key) not in (None, ""):
            click.echo(f"{key + ':':16} {shown[key]}")
    if job.get("flagged"):
        click.echo(f"{'flagged:':16} yes: a report contradicted this job or was impossible; see the events")
    click.echo("")
    events = [{**event, "at": when(event["at"])} for event in job["events"]]
    click.echo(table(events, [("at", "TIME"), ("source", "SOURCE"), ("state", "STATE"), ("detail", "DETAIL")]))
    if job["reports"]:
        click.echo("\nStatus reports received:")
        click.echo(table(job["reports"], REPORT_COLUMNS))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
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
        job["age"] = age_of(job["created_at"])
    click.echo(table(jobs, [("code", "CODE"), ("number", "NUMBER"), ("state", "STATE"), ("attempts", "TRIES"),
                            ("next_attempt_at", "NEXT ATTEMPT"), ("age", "AGE"), ("last_result", "LAST RESULT")]))


def _operator_command(action: str, summary: str, example: str) -> click.Command:
    """`faxgw ACTION CODE`: one operator action on one job (the store says whether the job's state allows it)."""

    @click.command(action, help=f"{summary}\n\n\b\nExample:\n  faxgw {action} {example}")
    @click.argument("code")
    @click.pass_obj
    def command(obj: Context, code: str) -> None:
        state = store.operator_action(obj.change_store(), code, action, store.iso(store.utcnow()))
        click.echo(f"{code.upper()}: {state.value}")

    return command


retry = _operator_command("retry", "Send a deferred, unknown, expired or rejected job again, now.", "FX7K3M9Q")
cancel = _operator_command("cancel", "Cancel a job that has not been sent (queued, deferred, held or unknown).",
                           "FX7K3M9Q")
release = _operator_command("release", "Release a held job so it is sent.", "FX7K3M9Q")
