"""The worker processes of one store: each one's heartbeat and health, and what is left when one dies.

Every worker of `faxgw serve` writes its row every few seconds (HEARTBEAT):
its health as JSON, so that /healthz of any worker can say how all of them
are; a row not renewed for STALE seconds belongs to a worker that is gone.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

HEARTBEAT = 5.0  # seconds between two rows of one worker
STALE = 20.0  # a row older than this: the worker stopped beating (hung, or gone without its row removed)


def beat(conn: sqlite3.Connection, name: str, pid: int, started_at: str, now: str, health: dict[str, Any]) -> None:
    conn.execute("INSERT INTO workers (name, pid, started_at, seen_at, health) VALUES (?, ?, ?, ?, ?)"
                 " ON CONFLICT (name) DO UPDATE SET seen_at = excluded.seen_at, health = excluded.health",
                 (name, pid, started_at, now, json.dumps(health, separators=(",", ":"))))


def forget_worker(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM workers WHERE name = ?", (name,))


def worker_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every worker's last row, by name, its health decoded."""
    rows = conn.execute("SELECT name, pid, started_at, seen_at, health FROM workers ORDER BY name").fetchall()
    return [{"name": r["name"], "pid": r["pid"], "started_at": r["started_at"], "seen_at": r["seen_at"],
             "health": json.loads(r["health"]) if r["health"] else {}} for r in rows]
