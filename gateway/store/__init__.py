"""The status store: the only package with SQL.

SQLite in WAL mode with synchronous=FULL, reached through sqlite-utils for
the schema and plain statements on the hot path. Tables:

- messages: each accepted email as raw RFC 5322 bytes (a BLOB) and its envelope;
- jobs: one per fax recipient, with its current state;
- events: the append-only history of every job;
- meta: small facts about the store itself (mode, feed state...).

Writes from the running service go through one writer thread (`Writer`),
which commits everything queued at the moment in one transaction (group
commit), so an acknowledgement never waits for more than one fsync and
concurrent messages share it. Commands such as `faxgw cancel` write from
their own process with short transactions; SQLite serialises them.
"""

from __future__ import annotations

from gateway.store.base import (
    StoreLock,
    connect,
    immediate,
    get_meta,
    is_disk_full,
    iso,
    parse_iso,
    set_meta,
    utcnow,
)
from gateway.store.jobs import (
    ACTIONS,
    claim_due,
    count_due,
    count_jobs,
    job_counts,
    enqueue_notification,
    get_job,
    insert_message,
    list_jobs,
    new_code,
    next_due,
    operator_action,
    record_outcome,
    recover_sending,
    waiting_jobs,
)
from gateway.store.states import MOVES, add_event, transition
from gateway.store.schema import SCHEMA_VERSION, migrate
from gateway.store.writer import Writer

__all__ = [
    "ACTIONS", "MOVES", "SCHEMA_VERSION", "StoreLock", "Writer", "add_event", "claim_due", "connect", "immediate", "count_due", "count_jobs", "job_counts", "enqueue_notification",
    "get_job", "get_meta", "insert_message", "is_disk_full", "iso", "list_jobs", "migrate", "new_code",
    "next_due", "operator_action", "parse_iso", "record_outcome", "recover_sending", "set_meta", "transition", "utcnow",
    "waiting_jobs",
]
