"""The schema and its versioned migrations (PRAGMA user_version)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.errors import StoreError

if TYPE_CHECKING:  # imported in migrate(): read-only commands (faxgw status) start faster without it
    import sqlite_utils


def _migration_1(db: sqlite_utils.Database) -> None:
    """Initial schema (incremental auto-vacuum is set by migrate() just before it)."""
    db["messages"].create(
        {
            "id": int, "received_at": str, "client": str, "helo": str, "mail_from": str,
            "auth_user": str, "header_from": str, "size": int, "smtputf8": int,
            "needs_8bitmime": int, "raw": bytes,
        },
        pk="id", not_null={"received_at", "raw"},
    )
    db["jobs"].create(
        {
            "id": int, "code": str, "message_id": int, "recipient": str, "number": str,
            "sender": str, "state": str, "reason": str, "attempts": int,
            "next_attempt_at": str, "created_at": str, "updated_at": str,
            "last_result": str, "upstream_reply": str, "reference_id": str,
        },
        pk="id", not_null={"code", "message_id", "number", "state", "created_at", "updated_at"},
        foreign_keys=[("message_id", "messages", "id")], defaults={"attempts": 0},
    )
    db["jobs"].create_index(["code"], unique=True)
    # The forwarder's claim: only waiting jobs, in due order, without a sort.
    db.execute("CREATE INDEX jobs_due ON jobs (next_attempt_at) WHERE state IN ('queued', 'deferred')")
    db["jobs"].create_index(["state", "created_at"])
    db["jobs"].create_index(["number", "created_at"])
    db["jobs"].create_index(["created_at"])
    db["events"].create(
        {"id": int, "job_id": int, "at": str, "source": str, "state": str, "detail": str},
        pk="id", not_null={"job_id", "at", "source"}, foreign_keys=[("job_id", "jobs", "id")],
    )
    db["events"].create_index(["job_id", "id"])
    db["meta"].create({"key": str, "value": str}, pk="key")


def _migration_2(db: sqlite_utils.Database) -> None:
    """Status reports from every channel, what they told about each job, and sender notifications."""
    jobs = db["jobs"]
    for column, kind in (("pages", int), ("duration", int), ("cost", str), ("reported_at", str), ("flagged", int)):
        jobs.add_column(column, kind)
    jobs.create_index(["reference_id"])
    db["reports"].create(
        {
            "id": int, "received_at": str, "channel": str, "trusted": int, "outcome": str, "job_id": int,
            "result": str, "result_text": str, "reason": str, "number": str, "pages": int, "duration": int,
            "cost": str, "reference_id": str, "job_code": str, "reported_at": str, "reported_at_raw": str,
            "rule": str, "note": str, "dedup_key": str, "raw": str,
        },
        pk="id", not_null={"received_at", "channel", "outcome", "dedup_key"},
        foreign_keys=[("job_id", "jobs", "id")],
    )
    db["reports"].create_index(["dedup_key"], unique=True)
    db["reports"].create_index(["outcome", "received_at"])
    db["reports"].create_index(["job_id"])
    db["notifications"].create(
        {
            "id": int, "job_id": int, "state": str, "attempts": int, "next_attempt_at": str,
            "created_at": str, "updated_at": str, "last_error": str,
        },
        pk="id", not_null={"job_id", "state", "created_at"}, foreign_keys=[("job_id", "jobs", "id")],
        defaults={"attempts": 0},
    )
    db["notifications"].create_index(["state", "next_attempt_at"])


def _migration_3(db: sqlite_utils.Database) -> None:
    """Retention: when a message body was purged, and the indexes the purge finds its rows by."""
    db["messages"].add_column("purged_at", str)
    # Purged bodies become empty, never NULL (raw is NOT NULL); only bodies still kept are looked at.
    db.execute("CREATE INDEX messages_kept ON messages (received_at, id) WHERE purged_at IS NULL")
    db.execute("CREATE INDEX reports_raw_kept ON reports (received_at) WHERE raw IS NOT NULL")
    # "Are all jobs of this message final?" (and the foreign key's own checks).
    db.execute("CREATE INDEX jobs_message ON jobs (message_id)")


def _migration_4(db: sqlite_utils.Database) -> None:
    """Intake facts for limits and the duplicate guard, with the indexes their daily counts use."""
    jobs = db["jobs"]
    for column, kind in (("sender_key", str), ("client", str), ("document_pages", int), ("document_digest", str)):
        jobs.add_column(column, kind)
    jobs.create_index(["sender_key", "created_at"])
    jobs.create_index(["client", "created_at"])


def _migration_5(db: sqlite_utils.Database) -> None:
    """`faxgw status --sender`: the created_at index holds the sender too, so that a search by sender (a
    substring, which no index finds) reads the index alone and only the jobs it matches, newest first."""
    db.execute("DROP INDEX idx_jobs_created_at")
    db.execute("CREATE INDEX jobs_created_sender ON jobs (created_at, id, sender)")


def _migration_6(db: sqlite_utils.Database) -> None:
    """Trust made real: each job's secret (in its VERP address and Message-ID, so that only a bounce of ours
    can change it), and a report's trust as a level (0 untrusted, 1 authentic, 2 trusted) where it was a flag."""
    db["jobs"].add_column("secret", str)
    db.execute("UPDATE reports SET trusted = 2 WHERE trusted = 1")


def _migration_7(db: sqlite_utils.Database) -> None:
    """The web console: its users (argon2 hashes, a role), their sessions (only a digest of the cookie is
    kept), and the audit log of who looked at or changed which job."""
    db.execute("CREATE TABLE web_users (name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL,"
               " created_at TEXT NOT NULL)")
    db.execute("CREATE TABLE web_sessions (digest TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL,"
               " created_at TEXT NOT NULL, seen_at TEXT NOT NULL)")
    db.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, at TEXT NOT NULL, user TEXT NOT NULL,"
               " action TEXT NOT NULL, target TEXT, detail TEXT)")
    db.execute("CREATE INDEX audit_target ON audit (target, id)")


def _migration_8(db: sqlite_utils.Database) -> None:
    """Billing codes: each job's cost allocation code, from its subject tag or header (outbound/billing.py)."""
    db["jobs"].add_column("billing_code", str)


def _migration_9(db: sqlite_utils.Database) -> None:
    """The console's search: jobs by billing code (its filter, and the text search that tries a code), newest
    first from an index that holds only jobs with a code; without it a rare code read every job."""
    db.execute("CREATE INDEX jobs_billing ON jobs (billing_code, created_at) WHERE billing_code IS NOT NULL")


def _migration_10(db: sqlite_utils.Database) -> None:
    """Several worker processes on one store: which one sends each `sending` job (a worker that dies leaves
    exactly its own jobs `unknown`), and each worker's heartbeat with its health for /healthz of any worker."""
    db["jobs"].add_column("claimed_by", str)
    db["workers"].create({"name": str, "pid": int, "started_at": str, "seen_at": str, "health": str},
                         pk="name", not_null={"pid", "started_at", "seen_at"})


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1, _migration_2, _migration_3,
                                                              _migration_4, _migration_5, _migration_6,
                                                              _migration_7, _migration_8, _migration_9,
                                                              _migration_10]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; refuse a store written by a newer gateway."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {version}, newer than this gateway knows ({SCHEMA_VERSION});"
            " run the newer faxgw, or restore a backup made for this version"
        )
    if version == 0:
        # Migration 1's first step: incremental auto-vacuum, so purged message
        # bodies give their space back. It takes effect through VACUUM (cheap
        # on an empty file), which cannot run inside a transaction.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION

