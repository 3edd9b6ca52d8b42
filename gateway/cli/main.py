"""The `faxgw` command: the group, its global options, and the only place where errors become messages and exit codes.

Every command takes the config from `--config PATH` or FAXGW_CONFIG; with
neither, the sandbox set-up applies (store under ./var/). The commands live
one module per group and are added to the group below, by name:

  setupcmd.py   serve, sandbox, check-config, passwd
  jobcmd.py     status, show, queue, retry, cancel, release
  reportcmd.py  unmatched, match, rules test
  feedcmd.py    feed poll, feed status, feed foreign
  admin.py      backup, restore, purge
  upstreamcmd.py  check-upstream, oauth login, oauth test
  webcmd.py     web-user add, remove, list

They receive the `Context` below as click's `obj`, print through table.py,
and raise; `main` turns what they raise into one line and an exit code. A
command imports what only it needs inside itself: `faxgw status --help` must
not load asyncio, aiohttp or sqlite-utils.
"""

from __future__ import annotations

import sqlite3
import sys

import click

from gateway import config as config_module
from gateway import store
from gateway.cli import admin, feedcmd, jobcmd, reportcmd, setupcmd, upstreamcmd, webcmd
from gateway.config import Settings
from gateway.errors import GatewayError


class Context:
    """What every command shares: the config path given, the settings (loaded on first use), the store."""

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

    def change_store(self) -> sqlite3.Connection:
        """The store, to change by hand; where there is none, the read-only open says so."""
        path = self.settings.store.path
        return store.connect(path) if path.exists() else self.read_store()


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


# Each group's commands, added by name (nothing registers itself on import).
cli.add_command(setupcmd.serve)
cli.add_command(setupcmd.sandbox)
cli.add_command(setupcmd.check_config)
cli.add_command(setupcmd.passwd)
cli.add_command(jobcmd.status)
cli.add_command(jobcmd.show)
cli.add_command(jobcmd.queue)
cli.add_command(jobcmd.retry)
cli.add_command(jobcmd.cancel)
cli.add_command(jobcmd.release)
cli.add_command(reportcmd.unmatched)
cli.add_command(reportcmd.match)
cli.add_command(reportcmd.rules)
cli.add_command(feedcmd.feed)
cli.add_command(admin.backup)
cli.add_command(admin.restore)
cli.add_command(admin.purge)
cli.add_command(upstreamcmd.check_upstream)
cli.add_command(upstreamcmd.oauth)
cli.add_command(webcmd.web_user)


def main() -> None:
    """The entry point (`faxgw`, `python -m gateway`): run the command; an error is one line and an exit code."""
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
