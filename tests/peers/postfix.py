"""A private, throw-away Postfix instance for tests and benchmarks.

Postfix plays a real legacy SMTP client of the gateway: mail submitted to it
(with ``sendmail`` or, when ``smtpd_port`` is given, over SMTP) is relayed to
``[127.0.0.1]:relay_port``, where the gateway under test listens.  Everything
(config, queue, data, log) lives under ``base_dir``; ``/etc/postfix`` and any
system instance are left alone.  Postfix must run as root (CI runs as root);
install it with ``tests/peers/install-debian-packages.sh``.

    with PostfixInstance(tmp_path / "postfix", relay_port=port) as pf:
        pf.sendmail("app@legacy.example", ["12125550100@greenfax.com"], msg)

``settings`` adds or replaces main.cf parameters (the benchmark pins its
relay settings this way).

Skip cleanly when Postfix is missing::

    pytestmark = pytest.mark.skipif(not postfix_available(),
                                    reason=unavailable_reason() or "")
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import pwd
import signal
import subprocess
import time

POSTFIX = "/usr/sbin/postfix"

# Retry quickly: a deferred message is retried within seconds, not minutes.
RETRY_SECONDS = 2


def postfix_available() -> bool:
    """True when the Postfix binaries are installed."""
    return os.access(POSTFIX, os.X_OK)


def unavailable_reason() -> str | None:
    """Why a private instance cannot run here, or None when it can."""
    if not postfix_available():
        return (f"Postfix is not installed ({POSTFIX} missing): run "
                "tests/peers/install-debian-packages.sh as root")
    if os.geteuid() != 0:
        return "a private Postfix instance must run as root"
    return None


@functools.cache
def _defaults() -> dict[str, str]:
    """Compiled-in paths (daemon_directory, sendmail_path, ...)."""
    postconf = os.path.join(os.path.dirname(POSTFIX), "postconf")
    names = ["command_directory", "daemon_directory", "sendmail_path"]
    out = subprocess.run([postconf, "-d", *names], capture_output=True,
                         text=True, check=True).stdout
    pairs = (line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


# type private unpriv chroot wakeup maxproc command (chroot is always "n")
_SERVICES = """\
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class PostfixInstance:
    """One private Postfix relaying everything to 127.0.0.1:relay_port."""

    def __init__(self, base_dir: pathlib.Path, relay_port: int, *,
                 smtpd_port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.base_dir = pathlib.Path(base_dir).resolve()
        self.relay_port = relay_port
        self.smtpd_port = smtpd_port
        self.settings = dict(settings or {})
        self.config_dir = self.base_dir / "config"
        self.queue_dir = self.base_dir / "queue"
        # Relative to queue_directory (every Postfix process works from there):
        # the master opens its lock here after dropping root, and an absolute
        # path would need search permission on every ancestor of base_dir
        # (pytest's /tmp/pytest-of-root is 0700).
        self.data_dir = self.queue_dir / "data"
        self.maillog_path = self.base_dir / "maillog"
        self._master_pid: int | None = None

    def main_settings(self) -> dict[str, str]:
        """Every parameter written to main.cf (the defaults apply to the rest)."""
        d = _defaults()
        r = RETRY_SECONDS
        main = {
            "compatibility_level": "3.6",
            "command_directory": d["command_directory"],
            "daemon_directory": d["daemon_directory"],
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir.relative_to(self.queue_dir),
            "maillog_file": self.maillog_path,
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.base_dir}",
            "myhostname": "legacy.localhost",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{self.relay_port}",
            "mynetworks": "127.0.0.0/8",
            "smtp_host_lookup": "native",
            "smtp_dns_support_level": "disabled",
            "queue_run_delay": f"{r}s",
            "minimal_backoff_time": f"{r}s",
            "maximal_backoff_time": f"{2 * r}s",
        }
        main.update(self.settings)
        return {k: str(v) for k, v in main.items()}

    def _write_config(self) -> None:
        for path in (self.config_dir, self.data_dir):  # also makes queue_dir
            path.mkdir(parents=True, exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        (self.config_dir / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main_settings().items()))
        master = _SERVICES
        if self.smtpd_port is not None:
            smtpd = f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd\n"
            master = smtpd + master
        (self.config_dir / "master.cf").write_text(master)
        # A config file changed in the last seconds makes `start` wait ~2 s.
        old = time.time() - 3600
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (old, old))

    def _run(self, *args: str, stdin: bytes | None = None,
             what: str = "") -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(list(args), input=stdin, capture_output=True,
                              timeout=60)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip()
            tail = "\n".join(self.maillog().splitlines()[-20:])
            raise RuntimeError(
                f"{what or args[0]} failed (exit {proc.returncode}): {msg}\n"
                f"--- maillog tail ---\n{tail}")
        return proc

    def _cmd(self, name: str) -> str:
        return os.path.join(_defaults()["command_directory"], name)

    def start(self) -> None:
        if reason := unavailable_reason():
            raise RuntimeError(reason)
        self._write_config()
        # postfix prints nothing on stderr when it is not a tty: see maillog.
        self._run(POSTFIX, "-c", str(self.config_dir), "start",
                  what="postfix start")
        self._master_pid = self._read_master_pid()

    @property
    def master_pid(self) -> int | None:
        """The master's pid while running; every other Postfix process of
        this instance is its child."""
        return self._master_pid

    def stop(self, timeout: float = 10.0) -> None:
        """Abort at once (queued mail is kept on disk) and wait until the
        master and all its children are gone.

        ``postfix abort`` and ``postfix stop`` send the master the same
        SIGTERM (the master then stops its children); ``stop`` only adds a
        wait in one-second steps and, after 5 s, a SIGKILL to the process
        group.  This does the same with a finer wait.
        """
        pid = self._master_pid or self._read_master_pid()
        if pid is None:
            return
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "abort"],
                       capture_output=True, timeout=60)
        if not _wait_session_gone(pid, timeout):
            # The master is the leader of its own session and process group.
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not _wait_session_gone(pid, 5.0):
                raise RuntimeError(f"postfix master {pid} did not stop")
        self._master_pid = None

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sendmail(self, sender: str, recipients: list[str],
                 message: bytes) -> None:
        self._run(_defaults()["sendmail_path"], "-C", str(self.config_dir),
                  "-f", sender, "--", *recipients, stdin=message,
                  what="sendmail")

    def flush(self) -> None:
        self._run(self._cmd("postqueue"), "-c", str(self.config_dir), "-f")

    def queue_ids(self) -> list[str]:
        out = self._run(self._cmd("postqueue"), "-c", str(self.config_dir),
                        "-j").stdout
        return [json.loads(line)["queue_id"] for line in out.splitlines()
                if line.strip()]

    def queue_listing(self) -> str:
        """``postqueue -p`` (it reads the queue directly when the instance
        is stopped)."""
        return self._run(self._cmd("postqueue"), "-c", str(self.config_dir),
                         "-p").stdout.decode(errors="replace")

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None


def _wait_session_gone(sid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _session_alive(sid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _session_alive(sid: int) -> bool:
    """True while the master (session leader) or a child is not a zombie."""
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            return True
    return False
