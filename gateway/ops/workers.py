"""Several worker processes on one store: what `faxgw serve` runs when [service] workers is more than one.

The supervisor (`WorkerPool`) does what one process did before it listens:
it takes the store's exclusive lock, migrates the store, turns jobs left
`sending` by a crash into `unknown`, and binds every listening socket (SMTP,
status, HTTP, Notify). Then it starts the workers: `faxgw serve` again, each
a whole gateway on its own event loop (gateway.service with a `Worker`),
given those sockets, the lock's descriptor and the read end of a pipe.
Every worker accepts on every socket, so the kernel hands each connection to
a worker that is free; every worker runs an intake and a forwarder (the
upstream's concurrency is shared out among them); the singletons (feed
poller, IMAP reader, retention, sender notices, checkpoints) run in the one
worker that holds `<store>.singletons` (a flock: the kernel gives it up the
moment its holder dies, and another worker takes it within a second).

The supervisor holds no store connection while the workers run and no
thread. When a worker dies, it marks that worker's `sending` jobs `unknown`
at once (each job records the worker that claimed it), removes its
heartbeat row and its metrics, and starts a new one (after a backoff if it
keeps dying). SIGTERM and SIGINT are passed to every worker, which stop as a
single gateway does (sends in flight finish); SIGHUP is passed on. A worker
whose supervisor is gone (kill -9) sees its pipe close and stops too; while
any worker lives it holds the store's lock, so a second `faxgw serve` still
refuses to start.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from gateway import store
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.logs import log_event

log = logging.getLogger("faxgw.workers")

ENV = "FAXGW_WORKER"  # the supervisor's description of a worker, for the worker (JSON)
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
    name: str = field(default="")
    singletons_fd: int | None = None  # the singleton lock's descriptor, once this worker holds it

    def __post_init__(self) -> None:
        # The heartbeat row's and the claims' name: unique on this host for the process's life.
        self.name = self.name or f"{socket.gethostname()}:{os.getpid()}"

    @classmethod
    def from_env(cls) -> Worker | None:
        text = os.environ.pop(ENV, None)
        if not text:
            return None
        spec = json.loads(text)
        sockets = {where: [socket.socket(fileno=fd) for fd in fds] for where, fds in spec["sockets"].items()}
        return cls(index=spec["index"], workers=spec["workers"], sockets=sockets, parent_fd=spec["parent"])

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


@dataclass
class Child:
    index: int
    process: asyncio.subprocess.Process
    pipe: int  # the write end of its pipe
    started: float

    @property
    def name(self) -> str:
        return f"{socket.gethostname()}:{self.process.pid}"


class WorkerPool:
    """`faxgw serve` with several workers: prepares the store, binds, starts, watches and stops them."""

    def __init__(self, settings: Settings, argv: list[str], *, prepare: Callable[[], None],
                 clock: Callable[[], datetime] = store.utcnow) -> None:
        self.settings = settings
        self.argv = argv  # how to run `faxgw serve` again with this config
        self.prepare = prepare  # the store's start-up work (migrate, recover): gateway.service.prepare_store
        self.clock = clock
        self.lock = store.StoreLock(settings.store.path)
        self.sockets: dict[str, list[socket.socket]] = {}
        self.children: dict[int, Child] = {}
        self.stopping = False
        self.restarts = 0
        self.metrics_dir: str | None = None
        self._stopped = asyncio.Event()

    async def run(self) -> int:
        self.lock.acquire()
        try:
            self.prepare()
            for listener in listeners(self.settings):
                self.sockets[listener.where] = bind(listener)
            self.metrics_dir = tempfile.mkdtemp(prefix="faxgw-metrics-")
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop)
            loop.add_signal_handler(signal.SIGHUP, self._pass, signal.SIGHUP)
            for index in range(self.settings.workers):
                await self._start(index)
            log_event(log, "workers-started", workers=self.settings.workers, supervisor=os.getpid(),
                      pids=" ".join(str(c.process.pid) for c in self.children.values()),
                      listen=" ".join(self.sockets))
            await self._watch()
        finally:
            await self._kill_all()
            for sockets in self.sockets.values():
                for sock in sockets:
                    sock.close()
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.lock.release()
        log_event(log, "stopped", workers=self.settings.workers)
        return 0

    async def _start(self, index: int) -> None:
        read, write = os.pipe()
        fds = {where: [sock.fileno() for sock in sockets] for where, sockets in self.sockets.items()}
        spec = {"index": index, "workers": self.settings.workers, "sockets": fds, "parent": read}
        assert self.lock.fd is not None
        env = {**os.environ, ENV: json.dumps(spec), "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir or ""}
        passed = [read, self.lock.fd, *(fd for group in fds.values() for fd in group)]
        try:
            process = await asyncio.create_subprocess_exec(*self.argv, env=env, pass_fds=passed,
                                                           stdin=asyncio.subprocess.DEVNULL)
        finally:
            os.close(read)
        self.children[index] = Child(index, process, write, time.monotonic())

    async def _watch(self) -> None:
        """Until stopped: wait for any worker to exit, clean up after it, start another."""
        waits: dict[asyncio.Task[int], int] = {}
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            while True:
                for index, child in self.children.items():
                    if index not in waits.values():
                        waits[asyncio.ensure_future(child.process.wait())] = index
                done, _ = await asyncio.wait({*waits, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if stopped in done:
                    return
                for task in done:
                    index = waits.pop(task)
                    child = self.children.pop(index)
                    await self._bury(child, task.result())
                    if self.stopping:
                        continue
                    delay = self._restart_delay(child)
                    log_event(log, "worker-restart", level=logging.WARNING, worker=index, in_seconds=f"{delay:g}")
                    await asyncio.sleep(delay)
                    if not self.stopping:
                        await self._start(index)
        finally:
            stopped.cancel()
            for task in waits:
                task.cancel()

    def _restart_delay(self, child: Child) -> float:
        if time.monotonic() - child.started >= STEADY:
            self.restarts = 0
        self.restarts += 1
        return min(RESTART_MAX, RESTART_INITIAL * 2 ** (self.restarts - 1))

    async def _bury(self, child: Child, returncode: int) -> None:
        """A worker has exited: its claimed jobs become `unknown` now, its heartbeat and metrics go."""
        os.close(child.pipe)
        name = child.name
        interrupted = await asyncio.to_thread(self._recover, name)
        if self.metrics_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.process.pid, self.metrics_dir)
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        level = logging.INFO if self.stopping and returncode == 0 else logging.ERROR
        log_event(log, "worker-exited", level=level, worker=child.index, pid=child.process.pid, how=how,
                  unknown=" ".join(interrupted) or None,
                  action="check these with GreenFax, then `faxgw retry CODE` or `faxgw cancel CODE`"
                  if interrupted else None)

    def _recover(self, name: str) -> list[str]:
        conn = store.connect(self.settings.store.path)
        try:
            with store.immediate(conn):
                codes = store.recover_sending(
                    conn, store.iso(self.clock()), owner=name, source="supervisor",
                    detail="the worker process sending this job died; not resent automatically")
                store.forget_worker(conn, name)
            return codes
        finally:
            conn.close()

    def _stop(self) -> None:
        if not self.stopping:
            log_event(log, "stopping", workers=len(self.children))
        self.stopping = True
        self._pass(signal.SIGTERM)
        self._stopped.set()

    def _pass(self, sig: int) -> None:
        for child in self.children.values():
            if child.process.returncode is None:
                child.process.send_signal(sig)

    async def _kill_all(self) -> None:
        """Wait for the workers to stop (killed after STOP_GRACE), then clean up after each."""
        self.stopping = True
        self._pass(signal.SIGTERM)
        for child in list(self.children.values()):
            try:
                async with asyncio.timeout(STOP_GRACE):
                    code = await child.process.wait()
            except TimeoutError:
                log_event(log, "worker-killed", level=logging.ERROR, worker=child.index, pid=child.process.pid,
                          reason=f"did not stop within {STOP_GRACE:g} s")
                child.process.kill()
                code = await child.process.wait()
            await self._bury(child, code)
        self.children.clear()


def serve_argv(config_path: str | None) -> list[str]:
    """The command that runs a worker: this same `faxgw serve`, with the same config."""
    argv = [sys.executable, "-m", "gateway"]
    if config_path:
        argv += ["--config", str(Path(config_path).resolve())]
    return [*argv, "serve"]


def run_pool(settings: Settings, config_path: str | None, prepare: Callable[[], None]) -> int:
    pool = WorkerPool(settings, serve_argv(config_path), prepare=prepare)
    return asyncio.run(pool.run())

