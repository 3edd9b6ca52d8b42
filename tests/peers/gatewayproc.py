"""`faxgw serve` as a real process tree (a supervisor and its workers) for the crash and worker tests.

The gateway runs in a session of its own, so a test can kill the whole tree
at once (what a power cut does) or one worker; its log goes to a file the
test reads (who listens, which worker runs the singletons, what died).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ACCOUNT_SENDER, RETURN_PATH, free_port


def write_config(directory: Path, upstream_port: int, *, workers: int, extra: str = "", smtp: str = "") -> Path:
    """A production config on free ports: SMTP, HTTP, store in `directory`, fast retries; `smtp`: more
    lines of its [smtp] table, `extra`: more tables."""
    path = directory / "faxgw.toml"
    path.write_text(f"""
[service]
workers = {workers}

[http]
listen = ["127.0.0.1:{free_port()}"]

[smtp]
listen = ["127.0.0.1:{free_port()}"]
hostname = "gw.test"
{smtp}
[store]
path = "store/faxgw.sqlite3"

[upstream]
host = "127.0.0.1"
port = {upstream_port}
tls = "none"
account_sender = "{ACCOUNT_SENDER}"
return_path = "{RETURN_PATH}"
retry_initial = "200ms"
retry_max = "1s"
{extra}""")
    return path


async def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20, *, log: Path | None = None) -> None:
    """Until `port` takes a connection; fails with the log if the gateway exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace") if log else proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"gateway exited ({proc.returncode}):\n{text}")
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} within {timeout} s")


class ServeProcess:
    """One `faxgw --config CFG serve`: its ports from the config, its log in serve-N.log beside it."""

    count = 0

    def __init__(self, config: Path) -> None:
        import tomllib

        self.config = config
        settings = tomllib.loads(config.read_text())
        self.smtp_port = int(settings["smtp"]["listen"][0].rsplit(":", 1)[1])
        self.http_port = int(settings["http"]["listen"][0].rsplit(":", 1)[1])
        self.store_path = config.parent / "store" / "faxgw.sqlite3"
        ServeProcess.count += 1
        self.log_path = config.parent / f"serve-{ServeProcess.count}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServeProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(self.config), "serve"],
                                         cwd=self.config.parent, stderr=log, stdout=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, event: str) -> list[str]:
        return [line for line in self.log.splitlines() if f"event={event} " in line or line.endswith(f"event={event}")]

    async def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 20) -> list[re.Match[str]]:
        """Wait until the log holds `count` matches of `pattern` (a regular expression)."""
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {pattern!r} in the log within {timeout} s:\n{self.log[-3000:]}")
            await asyncio.sleep(0.05)

    async def wait_listening(self, timeout: float = 20) -> None:
        """Until the SMTP port answers."""
        assert self.proc is not None
        await wait_listening(self.smtp_port, self.proc, timeout, log=self.log_path)

    def worker_pids(self) -> list[int]:
        """The live worker processes (children of the supervisor)."""
        assert self.proc is not None
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(pid) for pid in text.split()]

    def kill_all(self) -> None:
        """kill -9 of the whole tree at once: a power cut."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    async def stop(self, timeout: float = 40) -> int | None:
        """SIGTERM and wait, off the event loop (an in-process upstream must go on answering meanwhile)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"the gateway did not stop within {timeout} s:\n{self.log[-3000:]}") from None

    def group_alive(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True
