"""The store's connections (gateway/store/base.py) under the gateway's own use of them."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from conftest import new_message

from gateway import store


def test_a_second_connection_in_the_process_keeps_the_first_ones_locks(tmp_path):
    """Opening (and closing) the store file again must not drop SQLite's POSIX locks in this process.

    If it did, a CLI command's connection closing in another process would
    take itself for the last one and delete the WAL index under the gateway.
    """
    path = tmp_path / "faxgw.sqlite3"
    writer = store.connect(path)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (1)")
    second = store.connect(path)  # as the checkpointer or a maintenance task opens it
    second.close()
    other_process = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA journal_mode = WAL');"
                     " c.execute('SELECT * FROM t').fetchall(); c.close()")
    subprocess.run([sys.executable, "-c", other_process, str(path)], check=True)
    assert path.with_name(path.name + "-shm").exists()
    writer.execute("INSERT INTO t VALUES (2)")
    reader = store.connect(path, readonly=True)
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    reader.close()
    writer.close()


def test_iso_is_the_fixed_width_form_strftime_gives():
    """store.iso() uses isoformat() for speed; the text must stay what strftime gave (it sorts as text)."""
    rng = random.Random(7)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    for _ in range(20_000):
        moment = datetime(rng.randint(1970, 2200), rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23),
                          rng.randint(0, 59), rng.randint(0, 59), rng.choice([0, rng.randint(0, 999_999)]),
                          tzinfo=rng.choice(zones))
        assert store.iso(moment) == moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert store.parse_iso(store.iso(moment)) == moment


def test_the_state_machine_allows_only_its_moves(tmp_path):
    """Every state change goes through store.transition(): a move the table lacks is refused."""
    from gateway.models import JobState
    from gateway.store.states import MOVES, allowed_from

    conn = store.connect(tmp_path / "s.sqlite3")
    store.migrate(conn)
    message = new_message("+12125551234")
    with conn:
        (code,) = store.insert_message(conn, message, store.iso(store.utcnow()))
    job_id = conn.execute("SELECT id FROM jobs WHERE code = ?", (code,)).fetchone()[0]
    now = store.iso(store.utcnow())
    assert all(not MOVES[state] for state in JobState if state.final and state is not JobState.EXPIRED
               and state is not JobState.REJECTED)
    with pytest.raises(ValueError, match="no move from"):
        store.transition(conn, job_id, JobState.DELIVERED, now=now, source="test", detail="x",
                         expect={JobState.QUEUED})
    # Not from a state the job is not in: nothing changes, no event.
    assert not store.transition(conn, job_id, JobState.SUBMITTED, now=now, source="test", detail="x")
    assert store.transition(conn, job_id, JobState.SENDING, now=now, source="test", detail="attempt 1", attempts=1)
    assert store.transition(conn, job_id, JobState.SUBMITTED, now=now, source="test", detail="accepted")
    job = store.get_job(conn, code)
    assert (job["state"], job["attempts"]) == ("submitted", 1)
    assert [e["state"] for e in job["events"]] == ["queued", "sending", "submitted"]
    assert JobState.QUEUED not in MOVES[JobState.SUBMITTED] and JobState.SUBMITTED in allowed_from(JobState.DELIVERED)
    conn.close()
