"""IMAP: GreenFax's status emails from the account sender's mailbox.

imaplib (with imap-tools for TLS/STARTTLS connections and IDLE) runs in one
worker thread, because a blocking client reports a dead connection as an
error, which is what reconnecting needs (aioimaplib does not: see
FIELD-NOTES). Each recognised status mail is handed to the event loop, which
applies it through the one correlation path; only after that commit is the
mail moved to the processed folder (or flagged). So processing is
at-least-once and applying exactly-once (the report's dedup key).

- Mail no rule recognises is left untouched and not stored: it may be a
  person's mail. Nothing is ever expunged except, on a server without MOVE,
  the one message just copied to the processed folder (UID EXPUNGE).
- UIDVALIDITY and the last UID seen are kept in the store; when UIDVALIDITY
  changes the folder is scanned again from the start (dedup makes that safe).
- IDLE is re-issued at least every `idle_refresh` (routers drop idle
  connections silently); without IDLE the folder is polled. Disconnects and
  server restarts are survived with exponential backoff.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from imap_tools import MailBox, MailBoxStartTls, MailBoxUnencrypted
from imap_tools.mailbox import BaseMailBox

from gateway.config import ImapSettings
from gateway.logs import log_event
from gateway.status.inbound import StatusMail, Verdict, apply_verdict
from gateway.models import Channel
from gateway.runner import Runner
from gateway.store import Writer, get_meta, set_meta, utcnow

log = logging.getLogger("faxgw.imap")
SLICE = 1.0  # seconds: how often a waiting reader checks whether it should stop
MAX_BACKOFF = 300.0
PROCESSED_KEYWORD = "$FaxgwProcessed"


class Stopping(Exception):
    """The service is stopping: leave the session."""


@dataclass
class ImapState:
    """Health facts for logs and later the health check."""

    connected: bool = False
    last_error: str | None = None
    applied: int = 0
    left_alone: int = 0


class ImapReader(Runner):
    """Runner: one IMAP session per round, in a worker thread; a failed session is retried with backoff."""

    name = "imap"
    expected = (Exception,)  # network, TLS, server: all mean "try again later"
    error_event = "imap-error"
    logger = log
    retry_max = MAX_BACKOFF

    def __init__(self, settings: ImapSettings, status: StatusMail, writer: Writer, *,
                 read_meta: Callable[[str], str | None], clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(clock=clock)
        self.settings = settings
        self.status = status
        self.writer = writer
        self.read_meta = read_meta
        self.state = ImapState()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._key = f"imap:{settings.username}@{settings.host}/{settings.mailbox}"

    async def step(self) -> float:
        """Read the mailbox until the session fails (raised: backoff) or the service stops."""
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._session)
        except Stopping:
            self.stopping = True
            return 0
        except Exception as exc:
            self.state.connected = False
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - started > 60:
                self.loop_state.failures = 0  # the session worked for a while: start the backoff afresh
            raise
        return 0

    def stop(self) -> None:
        super().stop()
        self._stop.set()

    def where(self) -> dict[str, str]:
        return {"server": self._where()}

    # --- the session (in the worker thread) ---------------------------------------------

    def _session(self) -> None:
        with self._connect() as mailbox:
            self.state.connected = True
            self.state.last_error = None
            log_event(log, "imap-connected", server=self._where(), mailbox=self.settings.mailbox)
            self._ensure_folder(mailbox)
            uidvalidity = self._select(mailbox)
            while not self._stop.is_set():
                self._scan(mailbox, uidvalidity)
                if not self._wait_for_news(mailbox):
                    uidvalidity = self._select(mailbox)
        raise Stopping

    def _connect(self) -> BaseMailBox:
        s = self.settings
        context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        port = s.effective_port
        if s.tls == "implicit":
            mailbox: BaseMailBox = MailBox(s.host, port, timeout=s.timeout, ssl_context=context)
        elif s.tls == "starttls":
            mailbox = MailBoxStartTls(s.host, port, timeout=s.timeout, ssl_context=context)
        else:
            mailbox = MailBoxUnencrypted(s.host, port, timeout=s.timeout)
        password = s.password.get_secret_value() if s.password else ""
        try:
            mailbox.login(s.username or "", password, initial_folder=None)
            # imaplib keeps the capabilities of the greeting; servers announce
            # more (MOVE, UIDPLUS) once logged in.
            typ, data = mailbox.client.capability()
            if typ == "OK" and data and data[-1]:
                mailbox.client.capabilities = tuple(data[-1].decode().upper().split())
        except Exception:
            mailbox.client.shutdown()
            raise
        return mailbox

    def _ensure_folder(self, mailbox: BaseMailBox) -> None:
        folder = self.settings.processed_folder
        if folder and not mailbox.folder.exists(folder):
            mailbox.folder.create(folder)

    def _select(self, mailbox: BaseMailBox) -> int:
        typ, _data = mailbox.client.select(self._quoted(self.settings.mailbox))
        if typ != "OK":
            raise imaplib.IMAP4.error(f"cannot select {self.settings.mailbox}")
        value = mailbox.client.untagged_responses.get("UIDVALIDITY", [b"0"])[-1]
        return int(value)

    def _scan(self, mailbox: BaseMailBox, uidvalidity: int) -> None:
        stored_validity = self.read_meta(self._key + ":uidvalidity")
        last_uid = int(self.read_meta(self._key + ":last_uid") or 0)
        if stored_validity != str(uidvalidity):
            if stored_validity is not None:
                log_event(log, "imap-uidvalidity-changed", mailbox=self.settings.mailbox,
                          old=stored_validity, new=uidvalidity, action="rescanning the folder")
            last_uid = 0
            self._remember(uidvalidity, 0)
        typ, data = mailbox.client.uid("SEARCH", f"UID {last_uid + 1}:*")
        if typ != "OK":
            raise imaplib.IMAP4.error("UID SEARCH failed")
        uids = sorted(int(u) for u in (data[0] or b"").split() if int(u) > last_uid)
        for uid in uids:
            if self._stop.is_set():
                raise Stopping
            self._handle(mailbox, uid)
            self._remember(uidvalidity, uid)

    def _handle(self, mailbox: BaseMailBox, uid: int) -> None:
        typ, data = mailbox.client.uid("FETCH", str(uid), "(BODY.PEEK[])")
        raw = next((part[1] for part in data or [] if isinstance(part, tuple)), None)
        if typ != "OK" or raw is None:
            return  # expunged meanwhile
        verdict: Verdict = self.status.understand(bytes(raw), channel=Channel.IMAP,
                                                  trusted_source=self.settings.trusted)
        if verdict.kind == "unrecognised":
            self.state.left_alone += 1
            return  # perhaps a person's mail: not ours to touch or keep
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(apply_verdict(self.status, self.writer, verdict), self._loop)
        future.result(timeout=60)  # committed before the mail is moved
        self.state.applied += 1
        self._file_away(mailbox, uid)

    def _file_away(self, mailbox: BaseMailBox, uid: int) -> None:
        """Move an applied status mail to the processed folder, or flag it; never expunge blindly."""
        folder = self.settings.processed_folder
        client = mailbox.client
        if not folder:
            client.uid("STORE", str(uid), "+FLAGS", f"(\\Seen {PROCESSED_KEYWORD})")
        elif "MOVE" in client.capabilities:
            client.uid("MOVE", str(uid), self._quoted(folder))
        else:
            client.uid("COPY", str(uid), self._quoted(folder))
            client.uid("STORE", str(uid), "+FLAGS", "(\\Deleted)")
            if "UIDPLUS" in client.capabilities:
                client.uid("EXPUNGE", str(uid))  # only this message, never others marked \\Deleted

    def _wait_for_news(self, mailbox: BaseMailBox) -> bool:
        """Wait for new mail (IDLE, re-issued every idle_refresh, or a poll); False if the folder changed."""
        deadline = time.monotonic() + (self.settings.idle_refresh if "IDLE" in mailbox.client.capabilities
                                       else self.settings.poll_interval)
        if "IDLE" not in mailbox.client.capabilities:
            while time.monotonic() < deadline:
                if self._stop.wait(SLICE):
                    raise Stopping
            mailbox.client.noop()
            return True
        mailbox.idle.start()
        news: list[bytes] = []
        try:
            while not news and time.monotonic() < deadline and not self._stop.is_set():
                news = mailbox.idle.poll(timeout=SLICE)
        finally:
            mailbox.idle.stop()  # a dead connection fails here, which ends the session
        if any(line.startswith(b"* BYE") for line in news):
            raise imaplib.IMAP4.abort(b" ".join(news).decode("ascii", "replace"))
        if self._stop.is_set():
            raise Stopping
        return not any(re.search(rb"UIDVALIDITY", line) for line in news)

    def _remember(self, uidvalidity: int, last_uid: int) -> None:
        assert self._loop is not None

        def write(conn) -> None:  # type: ignore[no-untyped-def]
            set_meta(conn, self._key + ":uidvalidity", str(uidvalidity))
            set_meta(conn, self._key + ":last_uid", str(last_uid))

        asyncio.run_coroutine_threadsafe(self.writer.run(write), self._loop).result(timeout=60)

    @staticmethod
    def _quoted(name: str) -> str:
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.effective_port} (tls={self.settings.tls})"


def meta_reader(conn_factory: Callable[[], object]) -> Callable[[str], str | None]:
    """Read meta facts with a short-lived read connection (from the worker thread)."""

    def read(key: str) -> str | None:
        conn = conn_factory()
        try:
            return get_meta(conn, key)  # type: ignore[arg-type]
        finally:
            conn.close()  # type: ignore[attr-defined]

    return read
