"""`faxgw feed`: the XML data feed poller by hand: poll now, its status, rows of faxes not ours.

`faxgw feed poll` runs in its own process, also while `faxgw serve` runs:
GreenFax's minimum interval is kept in the store, so a manual poll and the
service's poller never come closer than [feed] min_interval. Errors are one
line (gateway.cli.main.main turns GatewayError into `faxgw: error: ...`).

gateway/cli/main.py adds this group; its commands receive main.py's Context
as click's `obj`, and this module imports it for typing only, so either may
be imported first.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import click

from gateway import store
from gateway.cli.table import table
from gateway.config import Settings
from gateway.errors import ConfigError, FeedPollRefused, GatewayError

if TYPE_CHECKING:
    from gateway.cli.main import Context
    from gateway.status.feedstate import PollResult

# The feed's own modules are imported by the commands that use them: every faxgw command imports this one.


@click.group()
def feed() -> None:
    """The XML data feed: GreenFax's list of faxes, polled at most once per [feed] min_interval.

    \b
    Example:
      faxgw feed status
    """


@feed.command()
@click.pass_obj
def poll(obj: Context) -> None:
    """Poll the feed now if GreenFax's minimum interval allows it, else say exactly when it will.

    Exits non-zero when it did not poll or the poll failed.

    \b
    Example:
      faxgw --config /etc/faxgw/faxgw.toml feed poll
    """
    settings: Settings = obj.settings
    if not settings.feed.url:
        raise ConfigError(f"{settings.source}: feed.url is not set: there is no XML data feed to poll")
    if not settings.store.path.exists():
        raise GatewayError(f"{settings.store.path}: no store here yet (has `faxgw serve` run with this config?)")
    # The result line says what happened; log lines would repeat it on stderr.
    logging.getLogger("faxgw").addHandler(logging.NullHandler())
    logging.getLogger("faxgw").propagate = False
    import asyncio

    result = asyncio.run(_poll_once(settings))
    line = result.describe(store.utcnow())
    if not result.ok:
        raise FeedPollRefused(line)
    click.echo(line)


async def _poll_once(settings: Settings) -> PollResult:
    from gateway.status.correlate import CorrelationPolicy
    from gateway.status.feedpoll import FeedPoller

    writer = store.Writer(settings.store.path)
    writer.start()
    try:
        poller = FeedPoller(settings, writer, CorrelationPolicy.from_settings(settings))
        return await poller.poll_now(manual=True)
    finally:
        writer.close()


@feed.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """The last poll, its window, the rows it saw, and when the next poll is allowed.

    \b
    Example:
      faxgw feed status --json
    """
    from gateway.status.feedstate import FeedState, human_time

    settings: Settings = obj.settings
    conn = obj.read_store()
    state = FeedState.from_store(conn, settings.feed.min_interval)
    facts = {
        "url": settings.feed.url, "last_poll_at": _iso(state.last_poll_at), "last_window": state.last_window,
        "last_rows": state.last_rows, "last_outcomes": state.last_outcomes, "last_error": state.last_error,
        "last_error_at": _iso(state.last_error_at), "last_request_at": _iso(state.last_request_at),
        "next_allowed_at": _iso(state.next_allowed_at), "backfill_continues": state.backfill_continues,
        "unknown_jobs": state.unknown_jobs,
    }
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    now = store.utcnow()
    allowed = "now" if state.next_allowed_at is None or state.next_allowed_at <= now else (
        f"{human_time(state.next_allowed_at)} (in {round((state.next_allowed_at - now).total_seconds())} s)")
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(state.last_outcomes.items())) or "-"
    lines = [("feed", settings.feed.url or "(not configured: [feed] url)"),
             ("last poll", human_time(state.last_poll_at) if state.last_poll_at else "never"),
             ("window", state.last_window or "-"),
             ("rows seen", f"{state.last_rows if state.last_rows is not None else '-'} ({outcomes})"),
             ("last error", f"{state.last_error} ({human_time(state.last_error_at)})" if state.last_error else "-"),
             ("last request", human_time(state.last_request_at)),
             ("next poll", f"allowed {allowed}" if allowed == "now" else f"allowed at {allowed}")]
    if state.backfill_continues:
        lines.append(("backfill", "continues with the next poll"))
    if state.unknown_jobs:
        lines.append(("unknown jobs", f"{state.unknown_jobs}: see `faxgw status --state unknown`"))
    for key, value in lines:
        click.echo(f"{key + ':':14} {value}")


@feed.command()
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000), help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def foreign(obj: Context, limit: int, as_json: bool) -> None:
    """Feed rows of faxes not sent through this gateway (another sender, or no job matches), newest first.

    \b
    Example:
      faxgw feed foreign --limit 20
    """
    from gateway import store

    rows = store.foreign_rows(obj.read_store(), limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = [("id", "ID"), ("received_at", "RECEIVED"), ("reference_id", "JOB ID"), ("number", "NUMBER"),
               ("result_text", "STATUS"), ("reported_at", "TIME"), ("note", "NOTE")]
    click.echo(table(rows, columns))


def _iso(moment: Any) -> str | None:
    return store.iso(moment) if moment is not None else None
