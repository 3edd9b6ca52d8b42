"""The store's connections (gateway/store/base.py) under the gateway's own use of them."""

from __future__ import annotations

import subprocess
import sys

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
