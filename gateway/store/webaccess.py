"""The web console's tables: its users, their sessions, and the audit log.

A session row holds the SHA-256 digest of the cookie, never the cookie:
someone who reads the store (or a backup) cannot take over a session. A
session ends on logout, after [web] session_idle without use, or after
session_max in all; each is checked on every request.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

ROLES = ("viewer", "operator")


@dataclass(frozen=True)
class WebSession:
    user: str
    role: str
    csrf: str


def digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8", "surrogateescape")).hexdigest()


def set_web_user(conn: sqlite3.Connection, name: str, role: str, password_hash: str, now: str) -> bool:
    """Add the user, or replace its role and password; True when it is new. Its sessions end."""
    with conn:
        new = conn.execute("SELECT 1 FROM web_users WHERE name = ?", (name,)).fetchone() is None
        conn.execute("INSERT INTO web_users (name, role, hash, created_at) VALUES (?, ?, ?, ?)"
                     " ON CONFLICT (name) DO UPDATE SET role = excluded.role, hash = excluded.hash",
                     (name, role, password_hash, now))
        conn.execute("DELETE FROM web_sessions WHERE user = ?", (name,))
    return new


def remove_web_user(conn: sqlite3.Connection, name: str) -> bool:
    with conn:
        conn.execute("DELETE FROM web_sessions WHERE user = ?", (name,))
        return conn.execute("DELETE FROM web_users WHERE name = ?", (name,)).rowcount > 0


def web_users(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute("SELECT name, role, created_at FROM web_users ORDER BY name")]


def web_user(conn: sqlite3.Connection, name: str) -> tuple[str, str] | None:
    """(role, argon2 hash) of a user, or None."""
    row = conn.execute("SELECT role, hash FROM web_users WHERE name = ?", (name,)).fetchone()
    return (row["role"], row["hash"]) if row else None


def open_session(conn: sqlite3.Connection, user: str, now: str) -> str:
    """A new session for `user`; returns the cookie value (only its digest is stored)."""
    cookie = secrets.token_urlsafe(32)
    conn.execute("INSERT INTO web_sessions (digest, user, csrf, created_at, seen_at) VALUES (?, ?, ?, ?, ?)",
                 (digest(cookie), user, secrets.token_urlsafe(24), now, now))
    return cookie


def find_session(conn: sqlite3.Connection, cookie: str, *, idle_since: str, created_since: str) -> WebSession | None:
    """The session a cookie names, if it is still alive (used after `idle_since`, opened after `created_since`)."""
    row = conn.execute(
        "SELECT s.user, s.csrf, u.role FROM web_sessions s JOIN web_users u ON u.name = s.user"
        " WHERE s.digest = ? AND s.seen_at >= ? AND s.created_at >= ?",
        (digest(cookie), idle_since, created_since)).fetchone()
    return WebSession(row["user"], row["role"], row["csrf"]) if row else None


def touch_session(conn: sqlite3.Connection, cookie: str, now: str) -> None:
    conn.execute("UPDATE web_sessions SET seen_at = ? WHERE digest = ?", (now, digest(cookie)))


def close_session(conn: sqlite3.Connection, cookie: str) -> None:
    conn.execute("DELETE FROM web_sessions WHERE digest = ?", (digest(cookie),))


def end_stale_sessions(conn: sqlite3.Connection, *, idle_since: str, created_since: str) -> int:
    return conn.execute("DELETE FROM web_sessions WHERE seen_at < ? OR created_at < ?",
                        (idle_since, created_since)).rowcount


def audit(conn: sqlite3.Connection, now: str, user: str, action: str, target: str | None,
          detail: str | None = None) -> None:
    """Who did or saw what, when (a job page view, an operator action, a login)."""
    conn.execute("INSERT INTO audit (at, user, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                 (now, user, action, target, detail))


def audit_log(conn: sqlite3.Connection, *, target: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    where, params = ("WHERE target = ?", (target,)) if target else ("", ())
    return [dict(row) for row in conn.execute(
        f"SELECT at, user, action, target, detail FROM audit {where} ORDER BY id DESC LIMIT ?", (*params, limit))]
