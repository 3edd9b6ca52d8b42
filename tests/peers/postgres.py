"""A private, throw-away PostgreSQL server for tests (install it with
``tests/peers/install-debian-packages.sh``; the system cluster and /etc/postgresql
are unused).

``initdb``, ``postgres`` (in the foreground, our child) and ``pg_ctl stop``
of the newest version under /usr/lib/postgresql (they are not on PATH).
They refuse to run as root, so as root they run as the ``postgres`` system
user on a ``base_dir`` it owns: a short directory in /tmp from
``tempfile.mkdtemp``, as pytest's 0700 tmp_path cannot be entered by that
user.  It holds the cluster (``data``), the Unix socket (``run``) and the
server log (``postgres.log``); ``close()`` removes it, ``stop()`` keeps it so
that ``start()`` brings the same data back.

TCP on 127.0.0.1 only, a free port kept across restarts, trust authentication
for that address alone (pg_hba.conf has no other line).  ``fsync`` stays on,
so ``kill()`` (SIGKILL, as when the machine dies) loses only what was not
committed.  One superuser ``user`` owns ``database``, created at the first
start; ``url`` points there, ``create_database()`` gives a test its own.

    with PostgresInstance() as pg:
        with psycopg.connect(pg.url) as conn:
            conn.execute("CREATE TABLE t (id int)")
        pg.kill()                   # the postmaster and its backends, SIGKILL
        pg.start()                  # crash recovery; committed rows are back

A test module wraps it in a fixture (one server per module is faster; each
test can still take a database of its own)::

    pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                    reason=unavailable_reason() or "")

    @pytest.fixture(scope="module")
    def postgres():
        with PostgresInstance() as pg:
            yield pg
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import weakref
from typing import Self

from conftest import free_port

PG_LIB = pathlib.Path("/usr/lib/postgresql")
RUNUSER = "/usr/sbin/runuser"
SYSTEM_USER = "postgres"

# Small and quick to start; everything that makes a commit durable is left at
# its default (fsync, synchronous_commit, full_page_writes on).
SETTINGS = {
    "shared_buffers": "16MB",
    "max_connections": "50",
    "fsync": "on",
}


def bin_dir() -> pathlib.Path | None:
    """The bin directory of the newest installed PostgreSQL, or None."""
    versions = [d for d in PG_LIB.glob("*") if d.name.isdigit() and (d / "bin" / "pg_ctl").is_file()]
    if not versions:
        return None
    return max(versions, key=lambda d: int(d.name)) / "bin"


def unavailable_reason() -> str | None:
    """Why a private instance cannot run here, or None when it can."""
    if bin_dir() is None:
        return (f"PostgreSQL is not installed (no {PG_LIB}/*/bin/pg_ctl): run "
                "tests/peers/install-debian-packages.sh as root")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"PostgreSQL refuses root and there is no {SYSTEM_USER!r} user to run it as"
        if not os.access(RUNUSER, os.X_OK):
            return f"PostgreSQL refuses root and {RUNUSER} is missing to run it as {SYSTEM_USER!r}"
    return None


def _instance_pids(data_dir: pathlib.Path) -> set[int]:
    """Live processes of the cluster in ``data_dir``: the postmaster and every
    child chdir there.  Children are their own session leaders and are
    reparented when the postmaster dies, so neither session nor parent finds
    them; a zombie has no cwd and is not counted."""
    pids = set()
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(proc / "cwd") == str(data_dir):
                pids.add(int(proc.name))
    return pids


def _kill_all(data_dir: pathlib.Path, first: int | None, timeout: float = 10.0) -> None:
    """SIGKILL ``first`` (the postmaster, so it forks no more), then every
    other process of the cluster, until none is left."""
    if first is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids := _instance_pids(data_dir):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL processes {sorted(pids)} of {data_dir} did not die")
        time.sleep(0.01)


def _remove(base_dir: pathlib.Path, data_dir: pathlib.Path) -> None:
    """Finalizer: no process left behind, no directory either."""
    with contextlib.suppress(RuntimeError):
        _kill_all(data_dir, None)
    shutil.rmtree(base_dir, ignore_errors=True)


class PostgresInstance:
    """One private PostgreSQL cluster on 127.0.0.1, a free port."""

    def __init__(self, *, user: str = "faxgw", database: str = "faxgw",
                 settings: dict[str, str] | None = None) -> None:
        if reason := unavailable_reason():
            raise RuntimeError(reason)
        self.bin_dir = bin_dir()
        self.user, self.database, self.host = user, database, "127.0.0.1"
        self.port = free_port()
        self.settings = {**SETTINGS, **(settings or {})}
        self.base_dir = pathlib.Path(tempfile.mkdtemp(prefix="postgres-"))
        self.data_dir, self.run_dir = self.base_dir / "data", self.base_dir / "run"
        self.log_path = self.base_dir / "postgres.log"
        self.run_dir.mkdir()
        self._proc: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SYSTEM_USER)
            for path in (self.base_dir, self.run_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self._remove = weakref.finalize(self, _remove, self.base_dir, self.data_dir)

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{urllib.parse.quote(database, safe='')}"

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / program), *args]
        return [RUNUSER, "-u", SYSTEM_USER, "--", *command] if os.geteuid() == 0 else command

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # cwd: the system user may not be allowed into ours.
        return subprocess.run(self._command(program, *args), cwd=self.base_dir, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)

    def _check(self, proc: subprocess.CompletedProcess[str], what: str) -> None:
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()}\n"
                               f"--- server log tail ---\n{self.log_tail()}")

    def _initdb(self) -> None:
        # --no-sync: a throw-away cluster only has to survive its processes
        # dying, not the machine; the server itself keeps fsync on.
        self._check(self._run("initdb", "-D", str(self.data_dir), "-U", self.user, "--auth=trust",
                              "-E", "UTF8", "--locale=C", "--no-sync"), "initdb")
        (self.data_dir / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "host    all       all   127.0.0.1/32  trust\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start (initdb first on the first call); return once it accepts connections.

        The postmaster runs in the foreground as our child (through runuser
        as root, which waits for it), not through ``pg_ctl start``: that
        leaves it to PID 1, and after a SIGKILL its zombie keeps
        postmaster.pid looking live, so a restart refuses, until PID 1 reaps
        it (seconds here, never in some containers).
        """
        if self.postmaster_pid() is not None:
            return
        first = not self.data_dir.exists()
        if first:
            self._initdb()
        options = ["-c", f"listen_addresses={self.host}", "-p", str(self.port), "-k", str(self.run_dir),
                   *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}"))]
        with open(self.log_path, "ab") as log:
            self._proc = proc = subprocess.Popen(
                self._command("postgres", "-D", str(self.data_dir), *options), cwd=self.base_dir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ready(proc):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}")
            time.sleep(0.01)
        if first:
            self.create_database(self.database)

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """What ``pg_ctl start -w`` waits for: postmaster.pid says ready, and
        it is the file of the postmaster just started, not one left by a kill."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().split("\n")
            pid = int(lines[0])
            parent = int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return proc.pid in (pid, parent) and len(lines) > 7 and lines[7].strip() == "ready"

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid while it runs (postmaster.pid outlives a SIGKILL)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if pid in _instance_pids(self.data_dir) else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop in fast mode (sessions are ended, open transactions rolled
        back) and wait until every process of the cluster is gone; the data
        stays."""
        if self.postmaster_pid() is not None:
            self._check(self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w",
                                  "-t", str(int(timeout)), "stop", timeout=timeout + 10), "pg_ctl stop")
        # A backend of a killed postmaster may still be finishing.
        _kill_all(self.data_dir, None, timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the postmaster and then its backends, as when the machine
        dies: clients lose their connections, nothing gets to shut down.  A
        backend would go on its own once it noticed, but a restart must not
        find one still attached to the old shared memory."""
        _kill_all(self.data_dir, self.postmaster_pid())
        self._reap()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # runuser, if its postgres never got going
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        """Stop (fast) and start again on the same port with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove ``base_dir`` with the data."""
        try:
            self.stop()
        finally:
            self._remove()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_database(self, name: str) -> str:
        """Create database ``name`` owned by ``user``; its URL."""
        import psycopg  # a test dependency
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
