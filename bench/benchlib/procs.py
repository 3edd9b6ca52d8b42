"""Child processes, free ports and listeners: what every benchmark starts, and how it stops them.

Every child runs in its own session, so a terminal's Ctrl-C reaches only the
benchmark, which then stops its children in order; the kernel sends each
child SIGTERM should the benchmark die (PR_SET_PDEATHSIG). Each is stopped
by its own pid, never by name. `run_main` wraps a script's main: Ctrl-C and
SIGTERM end it with status 130, and whatever is still running is killed on
the way out (and at exit, should cleanup itself fail).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"

T = TypeVar("T")

# The children still running, by pid.
CHILDREN: dict[int, asyncio.subprocess.Process] = {}

# What runs but is not our child (a private Postfix's master is a daemon), with how to stop it.
DAEMONS: dict[int, Callable[[], None]] = {}


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


async def spawn(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """Start a child in its own session (a terminal's Ctrl-C reaches only us; we stop it in order)."""
    proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True, preexec_fn=_die_with_parent,
                                                **kwargs)
    CHILDREN[proc.pid] = proc
    return proc


async def terminate(proc: asyncio.subprocess.Process, grace: float = 30.0) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; only this one pid."""
    try:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                print(f"  pid {proc.pid} did not stop in {grace:.0f} s: SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return proc.returncode
    finally:
        CHILDREN.pop(proc.pid, None)


def forget(proc: asyncio.subprocess.Process) -> None:
    """A child that has been waited for elsewhere (py-spy, stopped by SIGINT)."""
    CHILDREN.pop(proc.pid, None)


def adopt_daemon(thing: object, stop: Callable[[], None]) -> None:
    """Something not our child that must be stopped too, should the benchmark end early."""
    DAEMONS[id(thing)] = stop


def release_daemon(thing: object) -> None:
    DAEMONS.pop(id(thing), None)


def kill_leftovers() -> None:
    """Last resort (an error inside cleanup, a second Ctrl-C): kill what we started, by pid."""
    for key, stop in list(DAEMONS.items()):
        with contextlib.suppress(Exception):
            stop()
        DAEMONS.pop(key, None)
    for pid in list(CHILDREN):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        CHILDREN.pop(pid, None)


def run_main(main: Callable[[], int], what: str) -> int:
    """A script's main: Ctrl-C (or SIGTERM, see run_async) gives 130; leftovers are killed at the end."""
    atexit.register(kill_leftovers)
    try:
        return main()
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted: everything {what} started has been stopped", file=sys.stderr)
        return 130
    finally:
        kill_leftovers()


def run_async(coro: Awaitable[T]) -> T:
    """asyncio.run, with SIGTERM cancelling the main task, so that its cleanup stops the children."""

    async def guarded() -> T:
        main_task = asyncio.current_task()
        assert main_task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        return await coro

    return asyncio.run(guarded())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


async def _answers(port: int, banner: bool) -> bool:
    """Whether the port takes a connection (and, with `banner`, greets with 220)."""
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    try:
        return not banner or (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def wait_listening(port: int, proc: asyncio.subprocess.Process | None, timeout: float, what: str,
                         log: Path | None = None, *, banner: bool = True) -> None:
    """Until the port answers (with a 220 greeting, if `banner`), or the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.returncode is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening:\n{tail}")
        if await _answers(port, banner):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {HOST}:{port} within {timeout:.0f} s")
        await asyncio.sleep(0.05)
