"""The private PostgreSQL of tests/peers/postgres.py: what the store and cluster tests will rely on.

A commit survives a SIGKILL of the server, an open transaction does not, and
`SELECT ... FOR UPDATE SKIP LOCKED` lets a second connection pass over the
row a first one holds (how several workers will claim jobs from one table).
"""

from __future__ import annotations

import psycopg
import pytest
from peers.postgres import PostgresInstance, unavailable_reason

pytestmark = [
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
def postgres():
    with PostgresInstance() as pg:
        yield pg


def test_listens_on_loopback_with_fsync_on(postgres):
    assert postgres.url == f"postgresql://faxgw@127.0.0.1:{postgres.port}/faxgw"
    with psycopg.connect(postgres.url) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('listen_addresses', 'fsync', 'port')").fetchall())
        database = conn.execute("SELECT current_database()").fetchone()[0]
    assert settings == {"listen_addresses": "127.0.0.1", "fsync": "on", "port": str(postgres.port)}
    assert database == "faxgw"


def test_committed_row_survives_kill_9_and_open_transaction_does_not(postgres):
    url = postgres.create_database("crash")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE jobs (id int PRIMARY KEY, state text NOT NULL)")
        conn.execute("INSERT INTO jobs VALUES (1, 'queued')")
    pending = psycopg.connect(url)
    pending.execute("INSERT INTO jobs VALUES (2, 'queued')")  # not committed when the server dies
    killed = postgres.postmaster_pid()

    postgres.kill()

    assert postgres.postmaster_pid() is None
    with pytest.raises(psycopg.OperationalError):
        pending.commit()
    pending.close()
    postgres.restart()
    assert postgres.postmaster_pid() not in (None, killed)
    assert "automatic recovery in progress" in postgres.log_tail()  # a crash, not a shutdown
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT id, state FROM jobs ORDER BY id").fetchall() == [(1, "queued")]


def test_skip_locked_passes_over_the_row_another_connection_holds(postgres):
    url = postgres.create_database("claims")
    claim = "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE jobs (id int PRIMARY KEY, state text NOT NULL)")
        conn.execute("INSERT INTO jobs VALUES (1, 'queued'), (2, 'queued')")
    with psycopg.connect(url) as first, psycopg.connect(url) as second:
        assert first.execute(claim).fetchone() == (1,)
        assert second.execute(claim).fetchone() == (2,)
        # Without SKIP LOCKED the second would wait for the first; NOWAIT shows the lock instead.
        with pytest.raises(psycopg.errors.LockNotAvailable):
            second.execute("SELECT id FROM jobs WHERE id = 1 FOR UPDATE NOWAIT")
        second.rollback()
        first.rollback()
        assert second.execute(claim).fetchone() == (1,)


def test_stop_keeps_the_data_and_close_removes_it():
    pg = PostgresInstance(database="keep")
    try:
        pg.start()
        with psycopg.connect(pg.url) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (7)")
        pg.stop()
        assert pg.postmaster_pid() is None
        pg.start()
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]
    finally:
        pg.close()
    assert not pg.base_dir.exists()
