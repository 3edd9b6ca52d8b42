"""Several worker processes on one store: what `faxgw serve` runs when [service] workers is more than one.

The supervisor (`WorkerPool`) does what one process did before it listens:
it takes the store's exclusive lock, migrates the store, turns jobs left
`sending` by a crash into `unknown`, and binds every listening socket (SMTP,
status, HTTP, Notify). Then it forks the workers, each a whole gateway on
its own event loop (gateway.service with a `Worker`) on those sockets.
Every worker accepts on every socket, taking turns on the SMTP ones so that
each has its share of the connections (gateway/ops/accept.py); every worker runs an intake and a forwarder (the
upstream's concurrency is shared out among them); the singletons (feed
poller, IMAP reader, retention, sender notices, checkpoints) run in the one
worker that holds `<store>.singletons` (a flock: the kernel gives it up the
moment its holder dies, and another worker takes it within a second).

Forked, not started afresh: the supervisor has imported the whole gateway
and frozen its objects (gc.freeze) before it forks, so the workers share
those pages with it and with each other, and a second worker costs its own
working memory only, not another interpreter's worth of modules. For that
the supervisor holds no thread, no event loop and no store connection when
it forks: it waits for signals with sigtimedwait.

When a worker dies, the supervisor marks that worker's `sending` jobs
`unknown` at once (each job records the worker that claimed it), removes its
heartbeat row and its metrics, and forks a new one (after a backoff if they
keep dying). SIGTERM and SIGINT are passed to every worker, which stop as a
single gateway does (sends in flight finish); SIGHUP is passed on. A worker
whose supervisor is gone (kill -9) sees its pipe close and stops too; while
any worker lives it holds the store's lock (an inherited descriptor), so a
second `faxgw serve` still refuses to start.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from gateway import store
from gateway.config import Settings
from gateway.errors import ConfigError, GatewayError
from gateway.logs import log_event
from gateway.ops.accept import Sessions

log = logging.getLogger("faxgw.workers")

BACKLOG = 128
STOP_GRACE = 25.0  # seconds the workers have to stop (their sends' grace and more) before they are killed
RESTART_INITIAL = 0.5  # seconds before a dead worker is started again, doubling while workers keep dying...
RESTART_MAX = 30.0  # ...up to this
STEADY = 60.0  # a worker that lived this long resets the backoff


@dataclass(frozen=True)
class Listener:
    """A listening address of the gateway, and the config key that names it (for a bind error)."""

    host: str
    port: int
    key: str

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def listeners(settings: Settings) -> list[Listener]:
    """Every address the gateway listens on, each once (an SMTP listener may also take status mail)."""
    smtp, found = settings.smtp, {}
    for key, addresses in (("[smtp] listen", smtp.listen), ("[smtp] listen_tls", smtp.listen_tls),
                           ("[status] listen", settings.status.listen), ("[http] listen", settings.http.listen),
                           ("[notify] listen", settings.notify.listen)):
        for host, port in addresses:
            found.setdefault((host, port), Listener(host, port, key))
    return list(found.values())


def bind(listener: Listener) -> list[socket.socket]:
    """Listening sockets for one address (a name may stand for several), as asyncio would make them."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(listener.host or None, listener.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        what = "for HTTP " if listener.key in ("[http] listen", "[notify] listen") else ""
        hint = " (with no [http] listen in the config, 127.0.0.1:8025 is the default)" \
            if listener.key == "[http] listen" else ""
        raise ConfigError(f"cannot listen {what}on {listener.where}: {exc.strerror or exc}; set {listener.key} to a"
                          f" free address{hint}") from None
    return sockets


# --- the worker's side ---------------------------------------------------------------------------


@dataclass
class Worker:
    """What a worker process was given: its name, the listening sockets, its supervisor's pipe."""

    index: int
    workers: int
    sockets: dict[str, list[socket.socket]]  # "host:port" as in the settings -> the bound sockets
    parent_fd: int  # read end of a pipe whose other end only the supervisor holds
    sessions: Sessions  # every worker's open SMTP connections, shared (gateway/ops/accept.py)
    ready_fd: int | None = None  # write end of the pipe that tells the supervisor "started" or why not
    name: str = field(default="")
    singletons_fd: int | None = None  # the singleton lock's descriptor, once this worker holds it

    def __post_init__(self) -> None:
        # The heartbeat row's and the claims' name: unique on this host for the process's life.
        self.name = self.name or f"{socket.gethostname()}:{os.getpid()}"

    def started(self, error: str | None = None) -> None:
        """Tell the supervisor that this worker listens, or why it could not start (once)."""
        if self.ready_fd is None:
            return
        fd, self.ready_fd = self.ready_fd, None
        try:
            os.write(fd, b"ok" if error is None else b"error:" + error.encode(errors="replace")[:4000])
        finally:
            os.close(fd)

    @property
    def tag(self) -> str:
        return f"w{self.index}"

    def take(self, host: str, port: int) -> list[socket.socket]:
        """The inherited sockets of an address of the settings (each taken once)."""
        sockets = self.sockets.pop(f"{host}:{port}", None)
        if sockets is None:
            raise ConfigError(f"the supervisor bound no socket for {host}:{port}; restart `faxgw serve`")
        return sockets

    def try_singletons(self, store_path: Path) -> bool:
        """Take the singletons' lock if no other worker holds it; True once this worker does."""
        if self.singletons_fd is not None:
            return True
        fd = os.open(store_path.with_name(store_path.name + ".singletons"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.singletons_fd = fd
        return True

    def watch_parent(self, loop: asyncio.AbstractEventLoop, on_gone: Callable[[], None]) -> None:
        """Call `on_gone` when the supervisor's pipe closes: it died, and nobody would stop this worker."""
        def readable() -> None:
            try:
                data = os.read(self.parent_fd, 64)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(self.parent_fd)
                log_event(log, "supervisor-gone", level=logging.ERROR, worker=self.name,
                          action="this worker stops; start `faxgw serve` again")
                on_gone()

        os.set_blocking(self.parent_fd, False)
        loop.add_reader(self.parent_fd, readable)


# --- the supervisor ------------------------------------------------------------------------------

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


@dataclass
class Child:
    index: int
    pid: int
    pipe: int  # the write end of its pipe: closed when the supervisor dies, which the worker notices
    started: float

    @property
    def name(self) -> str:
        return f"{socket.gethostname()}:{self.pid}"


WorkerMain = Callable[[Worker], int]  # runs a worker in the forked child; its exit status
START_TIMEOUT = 120.0  # seconds a worker may take to start listening


class WorkerPool:
    """`faxgw serve` with several workers: prepares the store, binds, forks, watches and stops them."""

    def __init__(self, settings: Settings, *, prepare: Callable[[], None], worker_main: WorkerMain,
                 metrics_dir: str | None = None, clock: Callable[[], datetime] = store.utcnow) -> None:
        self.settings = settings
        self.prepare = prepare  # the store's start-up work (migrate, recover): gateway.service.prepare_store
        self.worker_main = worker_main
        self.metrics_dir = metrics_dir  # PROMETHEUS_MULTIPROC_DIR, set before prometheus_client was imported
        self.clock = clock
        self.lock = store.StoreLock(settings.store.path)
        self.sockets: dict[str, list[socket.socket]] = {}
        self.sessions = Sessions(settings.workers)
        self.children: dict[int, Child] = {}  # by pid
        self.due: dict[int, float] = {}  # worker index -> monotonic time to fork it again
        self.stopping = False
        self.stop_deadline = 0.0
        self.restarts = 0

    def run(self) -> int:
        self.lock.acquire()
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that a blocked SIGCHLD stays pending
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            self.prepare()
            for listener in listeners(self.settings):
                self.sockets[listener.where] = bind(listener)
            gc.freeze()  # what is here now stays shared with the workers: the collector never writes to it
            for index in range(self.settings.workers):
                # One after the other: a start-up error (a rule file, a certificate) is reported once, as
                # the one process would report it, and nothing was started.
                problem = self._fork(index)
                if problem is not None:
                    raise ConfigError(problem)
            log_event(log, "workers-started", workers=self.settings.workers, supervisor=os.getpid(),
                      pids=" ".join(str(pid) for pid in self.children), listen=" ".join(self.sockets))
            self._watch()
        finally:
            self._stop_all()
            for sockets in self.sockets.values():
                for sock in sockets:
                    sock.close()
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.lock.release()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        log_event(log, "stopped", workers=self.settings.workers)
        return 0

    def _fork(self, index: int) -> str | None:
        """Fork worker `index` and wait until it listens; what stopped it if it could not start."""
        assert threading.active_count() == 1, "the supervisor forks only without threads"
        read, write = os.pipe()
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            worker = Worker(index=index, workers=self.settings.workers, parent_fd=read, ready_fd=ready_write,
                            sessions=self.sessions,
                            sockets={where: list(group) for where, group in self.sockets.items()})
            try:
                os.close(write)
                os.close(ready_read)
                for child in self.children.values():  # the other workers' pipes are not this one's to hold
                    os.close(child.pipe)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
                self.sessions.present(index)  # before it listens: from now on it counts its connections
                code = self.worker_main(worker)
            except GatewayError as exc:  # a start-up error: the supervisor says it, once
                worker.started(str(exc))
            except BaseException:  # noqa: BLE001 - a worker never returns into the supervisor's code
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(read)
        os.close(ready_write)
        child = Child(index, pid, write, time.monotonic())
        self.children[pid] = child
        try:
            answer = _read_all(ready_read, START_TIMEOUT)
        finally:
            os.close(ready_read)
        if answer == b"ok":
            return None
        # It did not start, so it sent nothing: gone without a word of its own (the caller says why).
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(child.pipe)
        self.sessions.absent(index)
        del self.children[pid]
        if answer.startswith(b"error:"):
            return answer[len(b"error:"):].decode(errors="replace")
        return f"worker {index} did not start (it exited, or did not listen within {START_TIMEOUT:g} s); see the log"

    def _watch(self) -> None:
        """Until stopped: take signals, bury the workers that exit, fork the ones due again."""
        while not self.stopping:
            timeout = max(0.05, min((at - time.monotonic() for at in self.due.values()), default=1.0))
            info = signal.sigtimedwait(SIGNALS, timeout)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log_event(log, "stopping", workers=len(self.children))
                self.stopping = True
                return
            if info is not None and info.si_signo == signal.SIGHUP:
                self._pass(signal.SIGHUP)
            for child, status in self._reap():
                self._bury(child, status)
                delay = self._restart_delay(child)
                log_event(log, "worker-restart", level=logging.WARNING, worker=child.index, in_seconds=f"{delay:g}")
                self.due[child.index] = time.monotonic() + delay
            for index, at in list(self.due.items()):
                if at <= time.monotonic():
                    del self.due[index]
                    problem = self._fork(index)
                    if problem is not None:
                        log_event(log, "worker-start-failed", level=logging.ERROR, worker=index, problem=problem)

    def _reap(self) -> list[tuple[Child, int]]:
        gone = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            if child is not None:
                gone.append((child, os.waitstatus_to_exitcode(status)))
        return gone

    def _restart_delay(self, child: Child) -> float:
        if time.monotonic() - child.started >= STEADY:
            self.restarts = 0
        self.restarts += 1
        return min(RESTART_MAX, RESTART_INITIAL * 2 ** (self.restarts - 1))

    def _bury(self, child: Child, returncode: int) -> None:
        """A worker has exited: its claimed jobs become `unknown` now, its heartbeat and metrics go."""
        os.close(child.pipe)
        self.sessions.absent(child.index)
        interrupted = self._recover(child.name)
        if self.metrics_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.pid, self.metrics_dir)
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        level = logging.INFO if self.stopping and returncode == 0 else logging.ERROR
        log_event(log, "worker-exited", level=level, worker=child.index, pid=child.pid, how=how,
                  unknown=" ".join(interrupted) or None,
                  action="check these with GreenFax, then `faxgw retry CODE` or `faxgw cancel CODE`"
                  if interrupted else None)

    def _recover(self, name: str) -> list[str]:
        try:
            conn = store.connect(self.settings.store.path)
        except Exception as exc:  # noqa: BLE001 - the next start turns them unknown all the same
            log.error("cannot open the store to mark the jobs of worker %s unknown: %s", name, exc)
            return []
        try:
            with store.immediate(conn):
                codes = store.recover_sending(
                    conn, store.iso(self.clock()), owner=name, source="supervisor",
                    detail="the worker process sending this job died; not resent automatically")
                store.forget_worker(conn, name)
            return codes
        except Exception as exc:  # noqa: BLE001
            log.error("cannot mark the jobs of worker %s unknown: %s (the next start does)", name, exc)
            return []
        finally:
            conn.close()

    def _pass(self, sig: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _stop_all(self) -> None:
        """SIGTERM to every worker, wait for them (killed after STOP_GRACE), clean up after each."""
        self.stopping = True
        self.due.clear()
        self._pass(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.children:
            for child, status in self._reap():
                self._bury(child, status)
            if not self.children:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                for child in self.children.values():
                    log_event(log, "worker-killed", level=logging.ERROR, worker=child.index, pid=child.pid,
                              reason=f"did not stop within {STOP_GRACE:g} s")
                self._pass(signal.SIGKILL)
                deadline = time.monotonic() + 5
                continue
            signal.sigtimedwait({signal.SIGCHLD}, min(left, 0.5))


def _read_all(fd: int, timeout: float) -> bytes:
    """What a worker writes into its ready pipe before it closes it (b"" if it died first)."""
    deadline, data = time.monotonic() + timeout, b""
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return data
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def run_pool(settings: Settings, *, prepare: Callable[[], None], worker_main: WorkerMain,
             metrics_dir: str | None) -> int:
    return WorkerPool(settings, prepare=prepare, worker_main=worker_main, metrics_dir=metrics_dir).run()


def metrics_dir() -> str:
    """A fresh directory for the workers' metrics, named in PROMETHEUS_MULTIPROC_DIR before prometheus_client is
    imported (it chooses its storage at import)."""
    path = tempfile.mkdtemp(prefix="faxgw-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path
