"""`faxgw backup`, `faxgw restore`, `faxgw purge`: the store's safety by hand (gateway/ops/maintenance.py does the work).

`backup` and `purge` work while `faxgw serve` runs; `restore` refuses to.
Errors are one line (gateway.cli.main.main turns GatewayError into `faxgw:
error: ...`). gateway/cli/main.py adds these commands to the group; they
receive its Context as click's `obj`, and this module imports it for typing
only, so either may be imported first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gateway.cli.table import human_size
from gateway.units import format_duration

if TYPE_CHECKING:
    from gateway.cli.main import Context


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
@click.pass_obj
def backup(obj: Context, path: Path, force: bool) -> None:
    """Copy the store to PATH, consistently, also while `faxgw serve` runs.

    The copy is readable by its owner only (mode 0600). Put it back with
    `faxgw restore`: every job not finished in it is then held, since it may
    have been sent after the backup was taken.

    \b
    Example:
      faxgw --config /etc/faxgw/faxgw.toml backup /var/backups/faxgw/faxgw-2026-11-20.sqlite3
    """
    # Imported here, not at the top: every faxgw command imports this module.
    from gateway.ops import maintenance

    store = obj.settings.store.path
    made = maintenance.backup(store, path, overwrite=force)
    click.echo(f"{made.path}: backup of {store} taken at {made.taken_at} ({human_size(made.size)}, mode 0600)")


@click.command()
@click.argument("source", metavar="BACKUP", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def restore(obj: Context, source: Path) -> None:
    """Put a backup in place of the store; refused while `faxgw serve` runs.

    Every job not finished in the backup becomes `held`, with an event that
    says why: it may have been sent after the backup was taken. Check each
    with GreenFax, then `faxgw release CODE` or `faxgw cancel CODE`. The store
    being replaced is kept beside it (NAME.pre-restore-TIME.bak). A backup
    copied into place by hand is treated the same at the next start of
    `faxgw serve`.

    \b
    Example:
      faxgw --config /etc/faxgw/faxgw.toml restore /var/backups/faxgw/faxgw-2026-11-20.sqlite3
    """
    from gateway.ops import maintenance

    store = obj.settings.store.path
    done = maintenance.restore(store, source)
    taken = f"taken at {done.taken_at}" if done.taken_at else "not made by `faxgw backup`: its age is unknown"
    click.echo(f"{store}: restored from {source} ({taken})")
    if done.replaced:
        click.echo(f"the store it replaced: {done.replaced}")
    if not done.held:
        click.echo("no unfinished jobs: nothing held")
        return
    click.echo(f"{len(done.held)} job(s) held: they may have been sent after the backup; check with GreenFax,"
               " then `faxgw release CODE` or `faxgw cancel CODE`")
    for code, state in done.held:
        click.echo(f"  {code}  was {state}")


@click.command()
@click.option("--dry-run", is_flag=True, help="Only show what would be purged.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def purge(obj: Context, dry_run: bool, as_json: bool) -> None:
    """Purge message bodies and raw status mails older than [retention] period, now.

    Bodies go once every job of the message is final (delivered, failed,
    rejected, expired, cancelled) and unchanged for the period; raw status
    mails and Notify calls once received that long ago. Jobs, their events
    and the status reports' fields stay. The copies the gateway keeps beside
    the store (before a migration or a restore) go once that old too.
    `faxgw serve` does all this by itself every [retention] interval; this
    command works also while it runs.

    \b
    Examples:
      faxgw purge --dry-run
      faxgw purge
    """
    from gateway.ops import maintenance

    settings = obj.settings
    if dry_run:
        result = maintenance.preview(settings.store.path, settings.retention)
    else:
        import asyncio

        result = asyncio.run(maintenance.purge_now(settings.store.path, settings.retention))
    period = format_duration(settings.retention.period)
    done = result.purged
    if as_json:
        click.echo(json.dumps({
            "dry_run": dry_run, "period": period, "cutoff": result.cutoff, "bodies": done.bodies,
            "body_bytes": done.body_bytes, "reports": done.reports, "report_bytes": done.report_bytes,
            "free_bytes" if dry_run else "freed_bytes": result.freed,
            "copies": [str(copy) for copy in result.copies],
        }, indent=2))
        return
    verb = "would be purged" if dry_run else "purged"
    click.echo(f"retention {period}: what is older than {result.cutoff} {verb}")
    click.echo(f"{'message bodies:':22} {done.bodies} ({human_size(done.body_bytes)})")
    click.echo(f"{'raw status reports:':22} {done.reports} ({human_size(done.report_bytes)})")
    if dry_run:
        click.echo(f"{'free space in store:':22} {human_size(result.freed)} (given back by the next purge)")
    else:
        click.echo(f"{'space given back:':22} {human_size(result.freed)}")
    for copy in result.copies:
        click.echo(f"{'old copy of the store:':22} {copy} {'would be removed' if dry_run else 'removed'}")
