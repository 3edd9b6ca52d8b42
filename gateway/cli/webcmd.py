"""`faxgw web-user add|remove|list`: the web console's local accounts.

A user is a name, a role (viewer: sees; operator: may retry, cancel and
release) and an argon2 hash, kept in the store. `add` reads the password
from standard input when it is not a terminal (one line), else asks twice.
Changing a user's password or role ends its sessions.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from gateway.errors import GatewayError

if TYPE_CHECKING:
    import sqlite3

    from gateway.cli.main import Context

MIN_PASSWORD = 10


def _store(obj: Context) -> sqlite3.Connection:
    """The store, created if there is none yet; one an older gateway made must be migrated by `faxgw serve`."""
    from gateway import store

    path = obj.settings.store.path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = store.connect(path)
        store.migrate(conn)
        return conn
    conn = store.connect(path)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version < store.SCHEMA_VERSION:
        conn.close()
        raise GatewayError(f"the store has schema version {version}; start `faxgw serve` of this version once"
                           " (it migrates the store), then add the user")
    return conn


@click.group("web-user")
def web_user() -> None:
    """The web console's users ([web] enabled = true).

    \b
    Examples:
      faxgw web-user add frontdesk --role viewer
      echo "$PASSWORD" | faxgw web-user add manager --role operator
      faxgw web-user list
    """


@web_user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator"]), required=True,
              help="viewer sees the faxes; operator may also retry, cancel and release them.")
@click.pass_obj
def add(obj: Context, name: str, role: str) -> None:
    """Add a user, or give an existing one a new password and role (its sessions end).

    The password comes from standard input when that is not a terminal.

    \b
    Example:
      faxgw web-user add frontdesk --role viewer
    """
    from gateway import store
    from gateway.outbound.passwords import hash_password

    if not name.isprintable() or not 1 <= len(name) <= 64 or name != name.strip():
        raise click.BadParameter("1 to 64 printable characters, no spaces around", param_hint="'NAME'")
    if sys.stdin.isatty():
        password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        raise GatewayError(f"the password must have at least {MIN_PASSWORD} characters")
    conn = _store(obj)
    try:
        new = store.set_web_user(conn, name, role, hash_password(password), store.iso(store.utcnow()))
    finally:
        conn.close()
    click.echo(f"{'added' if new else 'changed'} {name} ({role})")


@web_user.command("remove")
@click.argument("name")
@click.pass_obj
def remove(obj: Context, name: str) -> None:
    """Remove a user; its sessions end at once.

    \b
    Example:
      faxgw web-user remove frontdesk
    """
    from gateway import store

    conn = _store(obj)
    try:
        if not store.remove_web_user(conn, name):
            raise GatewayError(f"no web user {name!r} (`faxgw web-user list` shows them)")
    finally:
        conn.close()
    click.echo(f"removed {name}")


@web_user.command("list")
@click.pass_obj
def list_users(obj: Context) -> None:
    """The users, with their roles.

    \b
    Example:
      faxgw web-user list
    """
    from gateway import store
    from gateway.cli.table import table

    conn = obj.read_store()
    try:
        rows = store.web_users(conn)
    finally:
        conn.close()
    click.echo(table(rows, [("name", "NAME"), ("role", "ROLE"), ("created_at", "CREATED")]))
