"""A private, throw-away Dovecot IMAP server for tests (root only; install
it with ``tests/peers/install-debian-packages.sh``; /etc/dovecot is unused).

127.0.0.1 only: ``port_tls`` (implicit TLS) and ``port_starttls`` (STARTTLS;
plaintext LOGIN works too, loopback counts as secure), certificate for
127.0.0.1 and localhost from ``trustme``, its CA in ``ca_file``.  One
passwd-file user (uid 65534: Dovecot refuses root) with a maildir; clients
may CREATE folders, ``mailboxes`` are auto-created.  Failed logins are not
slowed down unless ``auth_penalty=True``.  Config, certificate, state, logs:
``base_dir``.  Sockets, passwd, mail: a short ``data_dir`` in /tmp (linked as
``base_dir/data``), as socket paths are limited to 107 bytes and Dovecot's
unprivileged processes cannot enter pytest's 0700 tmp_path; ``close()``
removes it.  Mail helpers run doveadm and need the server running.

    with DovecotInstance(tmp_path / "imap", mailboxes=["Done"]) as imap:
        ctx = ssl.create_default_context(cafile=imap.ca_file)
        client = imaplib.IMAP4_SSL(imap.host, imap.port_tls, ssl_context=ctx)
        imap.deliver(message)       # like an MTA; IDLE sees EXISTS ~0.5 s later
"""
from __future__ import annotations

import contextlib
import imaplib
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from typing import Self

DOVECOT, DOVEADM = "/usr/sbin/dovecot", "/usr/bin/doveadm"
MAIL_UID = MAIL_GID = 65534
NO_AUTH_PENALTY = """auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""


def unavailable_reason() -> str | None:
    """Why a private instance cannot run here, or None when it can."""
    if not all(os.access(exe, os.X_OK) for exe in (DOVECOT, DOVEADM)):
        return ("Dovecot is not installed: run "
                "tests/peers/install-debian-packages.sh as root")
    if os.geteuid() != 0:
        return "a private Dovecot instance must run as root"
    return None


def _session_procs(sid: int) -> dict[int, str]:
    """Live processes of session ``sid``: pid -> command line."""
    procs = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                cmd = (stat.parent / "cmdline").read_bytes()
                procs[int(stat.parent.name)] = cmd.decode(errors="replace")
    return procs


def _kill(pid: int, sig: int = signal.SIGKILL, group: bool = True) -> None:
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, sig)


class DovecotInstance:
    """One private Dovecot serving a single user over IMAPS and STARTTLS."""

    def __init__(self, base_dir: pathlib.Path, *, user: str = "faxes",
                 password: str = "imap-secret-1", mailboxes: Sequence[str] = (),
                 auth_penalty: bool = False, extra_config: str = "") -> None:
        import trustme  # a test dependency
        self.base_dir = b = pathlib.Path(base_dir).resolve()
        self.user, self.password, self.host = user, password, "127.0.0.1"
        self.mailboxes = tuple(mailboxes)
        self.extra_config = ("" if auth_penalty else NO_AUTH_PENALTY) + extra_config
        with socket.socket() as s1, socket.socket() as s2:  # distinct ports
            s1.bind((self.host, 0))
            s2.bind((self.host, 0))
            self.port_tls, self.port_starttls = (s1.getsockname()[1],
                                                 s2.getsockname()[1])
        self.conf_file, self.log_path = b / "dovecot.conf", b / "dovecot.log"
        self.ca_file = str(b / "ca.pem")
        b.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(b / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(b / "key.pem"))
        ca.cert_pem.write_to_path(self.ca_file)
        self.data_dir = pathlib.Path(tempfile.mkdtemp(prefix="dovecot-"))
        self.data_dir.chmod(0o711)
        self._remove_data = weakref.finalize(self, shutil.rmtree, self.data_dir, True)
        (b / "data").unlink(missing_ok=True)
        (b / "data").symlink_to(self.data_dir)
        self.home = self.data_dir / "home" / user
        self._proc: subprocess.Popen[bytes] | None = None
        self._reap = weakref.finalize(self, lambda: None)

    def _write_config(self) -> None:
        b, passwd = self.base_dir, self.data_dir / "passwd"
        (b / "state").mkdir(exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        for path in (self.home.parent, self.home):
            os.chown(path, MAIL_UID, MAIL_GID)
        passwd.write_text(f"{self.user}:{{PLAIN}}{self.password}:{MAIL_UID}:"
                          f"{MAIL_GID}::{self.home}::\n")
        boxes = "".join(f'  mailbox "{m}" {{\n    auto = subscribe\n  }}\n'
                        for m in self.mailboxes)
        self.conf_file.write_text(f"""\
base_dir = {self.data_dir}/run
state_dir = {b}/state
instance_name = dovecot-test-{self.port_tls}
log_path = {self.log_path}
protocols = imap
listen = {self.host}
ssl = yes
ssl_cert = <{b}/cert.pem
ssl_key = <{b}/key.pem
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
first_valid_uid = {MAIL_UID}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
{boxes}}}
service imap-login {{
  inet_listener imap {{
    port = {self.port_starttls}
  }}
  inet_listener imaps {{
    port = {self.port_tls}
    ssl = yes
  }}
}}
{self.extra_config}""")

    def start(self, timeout: float = 10.0) -> None:
        """Start; return once both ports accept and auth is ready."""
        if reason := unavailable_reason():
            raise RuntimeError(reason)
        self._write_config()
        with open(self.base_dir / "dovecot.out", "ab") as out:
            self._proc = proc = subprocess.Popen(
                [DOVECOT, "-c", str(self.conf_file), "-F"], stdout=out,
                stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        self._reap = weakref.finalize(self, _kill, proc.pid)
        deadline = time.monotonic() + timeout
        for port in (self.port_tls, self.port_starttls):
            while True:
                with contextlib.suppress(OSError), socket.create_connection(
                        (self.host, port), 1) as s:  # greeting: auth is ready
                    if port == self.port_tls or s.recv(5) == b"* OK ":
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop(graceful=False)
                    raise RuntimeError(f"Dovecot did not start:\n{self.log_tail()}")
                time.sleep(0.01)

    def stop(self, timeout: float = 10.0, *, graceful: bool = True) -> None:
        """Stop all Dovecot processes (SIGTERM to the master alone leaves
        logged-in sessions running).  graceful: imap processes first, so
        clients get ``* BYE Server shutting down.`` even through TLS; else
        SIGKILL all at once (clients see EOF)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._reap.detach()
        deadline = time.monotonic() + timeout
        if graceful:
            imap = {pid for pid, cmd in _session_procs(proc.pid).items()
                    if cmd.rstrip("\0").endswith("/imap")}
            for pid in imap:
                _kill(pid, signal.SIGTERM, group=False)
            while imap & _session_procs(proc.pid).keys() and time.monotonic() < deadline:
                time.sleep(0.005)
        _kill(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        while proc.poll() is None or _session_procs(proc.pid):
            if time.monotonic() > deadline:
                _kill(proc.pid)
            time.sleep(0.01)

    def restart(self, *, graceful: bool = True) -> None:
        """Stop and start again on the same ports, keeping the mail."""
        self.stop(graceful=graceful)
        self.start()

    def close(self) -> None:
        """Stop and remove ``data_dir`` with the mail."""
        self.stop()
        self._remove_data()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("dovecot.out", "dovecot.log"):
            with contextlib.suppress(FileNotFoundError):
                text += (self.base_dir / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def doveadm(self, *args: str, stdin: bytes | None = None) -> str:
        proc = subprocess.run([DOVEADM, "-c", str(self.conf_file), *args],
                              input=stdin, capture_output=True, timeout=60,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"doveadm {shlex.join(args)} failed (exit {proc.returncode}):"
                f" {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout.decode(errors="replace")

    def deliver(self, message: bytes, mailbox: str = "INBOX") -> None:
        """Store a message as an MTA would, creating a missing mailbox."""
        save = ("save", "-u", self.user, "-m", mailbox)
        try:
            self.doveadm(*save, stdin=message)
        except RuntimeError as exc:
            if "exist" not in str(exc):
                raise
            self.doveadm("mailbox", "create", "-u", self.user, mailbox)
            self.doveadm(*save, stdin=message)

    def status(self, mailbox: str = "INBOX") -> dict[str, int]:
        """messages, uidnext, uidvalidity and unseen of ``mailbox``."""
        out = self.doveadm("-f", "flow", "mailbox", "status", "-u", self.user,
                           "messages uidnext uidvalidity unseen", mailbox)
        pairs = (f.split("=", 1) for f in out.split() if "=" in f)
        return {k: int(v) for k, v in pairs if v.isdigit()}

    def list_uids(self, mailbox: str = "INBOX") -> list[int]:
        out = self.doveadm("-f", "flow", "fetch", "-u", self.user, "uid",
                           "mailbox", mailbox, "all")
        return [int(line.split("=", 1)[1]) for line in out.splitlines()]

    def fetch_all(self, mailbox: str = "INBOX") -> list[bytes]:
        """The messages as IMAP serves them (CRLF) in UID order, flags left
        alone; read over a PREAUTH ``doveadm exec imap`` session."""
        cmd = [DOVEADM, "-c", str(self.conf_file), "exec", "imap", "-u", self.user]
        conn = imaplib.IMAP4_stream(
            f"{shlex.join(cmd)} 2>>{shlex.quote(str(self.log_path))}")
        try:
            name = mailbox.replace("\\", "\\\\").replace('"', '\\"')
            typ, data = conn.select(f'"{name}"', readonly=True)
            if typ != "OK":
                raise RuntimeError(f"SELECT {mailbox}: {data!r}")
            if data[0] == b"0":
                return []
            typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
        finally:
            conn.logout()
        return [item[1] for item in data if isinstance(item, tuple)]

    def change_uidvalidity(self, mailbox: str = "INBOX") -> int:
        """Give ``mailbox`` a new UIDVALIDITY (messages and UIDs kept) and
        return it.  A client with it selected gets ``* BYE IMAP session state
        is inconsistent, please relogin.`` at the mailbox's next change."""
        new = self.status(mailbox)["uidvalidity"] + 1
        self.doveadm("mailbox", "update", "-u", self.user, "--uid-validity",
                     str(new), mailbox)
        return new

    def kick(self) -> None:
        """Disconnect the user's IMAP sessions (they get ``* BYE``)."""
        self.doveadm("kick", self.user)
