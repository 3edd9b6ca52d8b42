"""Hostile and broken input (issue 5, section 3): property-based and fuzz tests with hypothesis.

- SMTP, against a real gateway (and the sandbox behind it) running on its own
  event loop in a thread, spoken to over raw sockets: random and garbage
  command lines (NUL, 8-bit, huge arguments), pipelined batches, and random
  DATA content (bare LF, bare CR, NUL, invalid encodings, 8-bit headers,
  broken and deep MIME, damaged winmail.dat), to fax and to status
  addresses; then a 1 MB header and MIME nested 200 and 2,000 levels deep.
  Each command gets one well-formed reply; a refusal has an enhanced status
  code and a text; no reply is the internal-error one; nothing is logged at
  ERROR (an exception in a hook, a callback or the forwarder); after each
  example the same session still takes a good fax; and the store stays
  consistent: every 250 has its message (the bytes sent) and its jobs,
  `PRAGMA integrity_check` is ok, no job lacks its message or its history.
- The addressing rules (Policy.classify_recipient), the status-mail rules
  and parser (StatusMail.understand), mime.inspect and the winmail.dat
  reader, the Notify parser (notify_report) and the feed parser
  (parse_feed): generated and mutated input, where each either answers or
  raises only its own documented error.

Examples are bounded so that the whole file runs in well under a minute;
FAXGW_FUZZ_SCALE=N runs N times as many.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import logging
import os
import re
import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote_from_bytes
from zoneinfo import ZoneInfo

import phonenumbers
import pytest
from conftest import ACCOUNT_SENDER, NUMBER, SandboxServer, codes_in, fax_message, new_message, pdf_bytes, settings_for
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import replies, store
from gateway.outbound import mime, mimeparse, tnef, winmail
from gateway.outbound.smtpserver import has_long_line
from gateway.models import Channel, Recipient, Refusal, StatusReport
from gateway.outbound.policy import SUBJECT_MAILBOX, Policy
from gateway.rules import RulesInForce, load_addressing
from gateway.service import Service
from gateway.status.correlate import CorrelationPolicy, Outcome, apply_report, keep_unrecognised
from gateway.status.feedxml import FeedRow, parse_feed
from gateway.status.inbound import StatusMail, Verdict
from gateway.status.mailrules import load_rules
from gateway.status.notify import PARAMETERS, notify_report
from gateway.errors import FeedError, MissingParameters, TnefError

FAX = f"{NUMBER}@greenfax.com"
SENDER = "erp@legacy.example"
TOKEN = "fuzz-notify-token-0123456789"
DATA = Path(__file__).parent / "data"
INTERNAL = re.compile(r"Local error in processing|Traceback|Error: \(\w+\)|Exception")
REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9](?:[ -].*)?$")
ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")

# FAXGW_FUZZ_SCALE=10 runs ten times as many examples (a longer hunt, not for every run).
SCALE = max(1, int(os.environ.get("FAXGW_FUZZ_SCALE", "1")))
FAST = settings(max_examples=250 * SCALE, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])
SMTP_RUNS = settings(FAST, max_examples=150 * SCALE)


# --- the gateway on its own loop ------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Every record at ERROR or above, from any thread: an exception that escaped somewhere."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()} {record.exc_text or ''}"[:2000])


@dataclass
class Background:
    """The gateway and the sandbox on an event loop in a thread, for blocking raw-socket clients."""

    loop: asyncio.AbstractEventLoop
    service: Service
    store_path: Path
    errors: ErrorLog

    @property
    def port(self) -> int:
        return self.service.smtp_addresses[0][1]

    @property
    def http(self) -> tuple[str, int]:
        assert self.service.web is not None
        return self.service.web.addresses["http"][0]

    def store(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.store_path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    tmp = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-gateway", daemon=True)
    thread.start()

    def run(coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    sandbox = SandboxServer()
    run(sandbox.start())
    # One listener takes faxes and status mail (the status listener is the SMTP listener).
    # No quotas: thousands of messages come from one client and sender here (issue 5 section 1 tests them).
    settings_ = settings_for(tmp, sandbox.port, status={"listen": ["127.0.0.1:0"], "max_messages_per_minute": 0},
                             notify={"token": TOKEN},
                             limits={"client": {"connections": 0}, "sender": {"faxes_per_day": 0}})
    service = Service(settings_)
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    run(service.start())
    try:
        yield Background(loop, service, settings_.store.path, errors)
    finally:
        run(service.stop())
        run(sandbox.stop())
        logging.getLogger().removeHandler(errors)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- a raw SMTP client ---------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(line[4:] for line in self.lines)

    def __str__(self) -> str:
        return " | ".join(self.lines)


class Wire:
    """Blocking SMTP over a raw socket: exactly the bytes given go out; every reply is checked as read."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        greeting = self.reply()
        assert greeting.code == 220, greeting

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buffer[:200]!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def reply(self) -> Answer:
        """One reply: well-formed lines (code, "-" on all but the last), never the internal error."""
        lines: list[str] = []
        while not lines or lines[-1][3:4] == "-":
            raw = self._line()
            assert raw.endswith(b"\r"), f"reply line not ended by CRLF: {raw[:200]!r}"
            raw = raw[:-1]
            assert REPLY_LINE.match(raw), f"not an SMTP reply line: {raw[:200]!r}"
            assert not lines or raw[:3].decode() == lines[0][:3], f"codes differ within a reply: {lines} {raw!r}"
            lines.append(raw.decode("utf-8", "replace"))
        answer = Answer(int(lines[0][:3]), tuple(lines))
        assert not INTERNAL.search(answer.text), f"internal error shown to the client: {answer}"
        return answer

    def command(self, line: bytes) -> Answer:
        self.send(line + b"\r\n")
        return self.reply()


def stuffed(content: bytes) -> bytes:
    """DATA as a client sends it: leading dots doubled, a last line end, then CRLF.CRLF."""
    body = re.sub(rb"(?m)^\.", b"..", content)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def assert_refusal_names_the_problem(answer: Answer, *, enhanced: bool = True) -> None:
    """A 4xx or 5xx whose text says something; the gateway's own refusals carry an enhanced status code.

    aiosmtpd's replies to bad syntax or sequence (500 Error: command "X" not
    recognized, 503 Error: need MAIL command, 454 TLS not available...) have none.
    """
    assert answer.code >= 400, answer
    text = answer.lines[0][4:]
    if enhanced:
        assert ENHANCED.match(text), f"a refusal without an enhanced status code: {answer}"
        text = text.split(" ", 1)[1]
    assert len(text.strip()) >= 10, f"a refusal that says nothing: {answer}"


def good_fax(wire: Wire) -> dict[str, bytes]:
    """The same session takes a good fax: the listener and the session are alive. Its code and bytes."""
    message = fax_message()
    assert wire.command(b"RSET").code == 250
    assert wire.command(f"MAIL FROM:<{SENDER}>".encode()).code == 250
    assert wire.command(f"RCPT TO:<{FAX}>".encode()).code == 250
    assert wire.command(b"DATA").code == 354
    wire.send(stuffed(message))
    answer = wire.reply()
    assert answer.code == 250, answer
    (code,) = codes_in(answer.text)
    return {code: message}


def assert_consistent(gw: Background, accepted: dict[str, bytes]) -> None:
    """Every acknowledged fax is in the store, byte for byte, with its jobs and their history."""
    conn = gw.store()
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        orphans = conn.execute("SELECT COUNT(*) FROM jobs LEFT JOIN messages m ON m.id = jobs.message_id"
                               " WHERE m.id IS NULL").fetchone()[0]
        assert orphans == 0
        silent = conn.execute("SELECT COUNT(*) FROM jobs WHERE NOT EXISTS"
                              " (SELECT 1 FROM events e WHERE e.job_id = jobs.id)").fetchone()[0]
        assert silent == 0
        for code, content in accepted.items():
            row = conn.execute("SELECT m.raw FROM jobs j JOIN messages m ON m.id = j.message_id WHERE j.code = ?",
                               (code,)).fetchone()
            assert row is not None, f"{code} was acknowledged but is not in the store"
            assert row["raw"] in (content, content + b"\r\n"), f"{code}: the store does not hold what was sent"
    finally:
        conn.close()
    errors, gw.errors.records = gw.errors.records, []
    assert errors == []


# --- strategies: SMTP commands --------------------------------------------------------------

VERBS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP", b"BDAT", b"ETRN",
         b"TURN", b"XCLIENT", b"mail", b"Rcpt", b""]
# Commands after which the client must say more than one line, or that end the session: sent alone.
CONVERSATIONS = {b"DATA", b"AUTH", b"QUIT", b"STARTTLS"}
no_line_end = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" "))
addresses = st.one_of(
    st.sampled_from([FAX, "13125550123@greenfax.com", ACCOUNT_SENDER, "", "<>", "12125551234@GREENFAX.COM.",
                     '"12125551234"@greenfax.com', "@relay.example:12125551234@greenfax.com", "x@y@greenfax.com",
                     "1212555123%x@greenfax.com", "jörg@legacy.example", "12125551234@greenfax.com\x00.evil"]),
    st.text(max_size=40),
).map(lambda s: s.replace("\n", " ").encode("utf-8", "surrogatepass"))
arguments = st.one_of(
    st.builds(lambda a, rest: b"FROM:<" + a + b">" + rest, addresses,
              st.sampled_from([b"", b" SIZE=1000", b" SIZE=999999999999", b" BODY=8BITMIME", b" SMTPUTF8",
                               b" BODY=BINARYMIME", b" AUTH=<>", b" SIZE=-1", b" SIZE=1e9"])),
    st.builds(lambda a, rest: b"TO:<" + a + b">" + rest, addresses,
              st.sampled_from([b"", b" NOTIFY=NEVER", b" ORCPT=rfc822;x@y", b" X=" + b"y" * 600])),
    st.builds(lambda a: b"FROM:" + a, addresses), st.builds(lambda a: b"TO:" + a, addresses),
    no_line_end, st.just(b"A" * 70000), st.just(b"\x00" * 300), st.just(bytes(range(128, 256)) * 2),
)


@st.composite
def command_lines(draw, *, alone: bool = True) -> bytes:
    """One command line without its CRLF: a verb and an argument, or anything at all."""
    kind = draw(st.integers(0, 9))
    if kind <= 6:
        verb = draw(st.sampled_from(VERBS))
        line = verb + (b" " + draw(arguments) if draw(st.booleans()) else b"")
    elif kind <= 8:
        line = draw(no_line_end)
    else:
        line = draw(st.sampled_from([b"DATA", b"DATA x", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH XOAUTH2 Zm9v",
                                     b"STARTTLS", b"QUIT now"]))
    if not alone and line.split(b" ", 1)[0].strip().upper() in CONVERSATIONS:
        line = b"NOOP " + line
    return line.replace(b"\n", b" ")


def ends_session(answer: Answer) -> bool:
    """QUIT's 221, or aiosmtpd's goodbye after too many unknown commands (502) or calls (421)."""
    return answer.code in (221, 421) or "goodbye" in answer.text


def converse(wire: Wire, line: bytes) -> Answer | None:
    """Send one command and answer what it leads to; None when the server ended the session."""
    answer = wire.command(line)
    if answer.code == 354:  # DATA: an empty message
        wire.send(b".\r\n")
        assert_refusal_names_the_problem(wire.reply())
    elif answer.code == 334:  # AUTH: cancelled (RFC 4954 4)
        assert wire.command(b"*").code in (501, 535)
    elif ends_session(answer):
        return None
    elif answer.code >= 400:
        assert_refusal_names_the_problem(answer, enhanced=False)
    return answer


# --- strategies: messages ---------------------------------------------------------------------

PDF = pdf_bytes()
SAMPLE_TNEF = (DATA / "tnef" / "umlaut.tnef").read_bytes()
header_names = st.one_of(
    st.sampled_from([b"From", b"To", b"Cc", b"Subject", b"Date", b"Message-ID", b"MIME-Version", b"Content-Type",
                     b"Content-Transfer-Encoding", b"Content-Disposition", b"X-Mailer", b"Received"]),
    st.binary(min_size=1, max_size=30).map(lambda b: re.sub(rb"[\r\n: ]", b"x", b)),
)
header_values = st.one_of(
    no_line_end,
    st.text(max_size=60).map(lambda t: t.replace("\n", " ").replace("\r", " ").encode("utf-8", "surrogatepass")),
    st.sampled_from([b"=?utf-8?b?SsO2cmc=?=", b"=?x-unknown?q?abc?=", b"=?utf-8?b?!!!invalid?=", b"=?utf-8?q?",
                     b"multipart/mixed; boundary=", b'multipart/mixed; boundary="b"; boundary="c"',
                     b"application/pdf; name*=utf-8''%FF%FE", b"base64", b"quoted-printable", b"8bit", b"x-uuencode",
                     b"attachment; filename=winmail.dat", b"<>", b"\xff\xfe\x00\x01",
                     b"Mon, 32 Foo 99999 25:61:61 +9999"]),
)
CONTENT_TYPES = [b"text/plain", b"text/html", b"application/pdf", b"image/tiff", b"application/octet-stream",
                 b"application/ms-tnef", b"message/rfc822", b"message/delivery-status", b"text/rfc822-headers",
                 b"application/x-msdownload", b"image/png"]


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


@st.composite
def leaves(draw) -> bytes:
    """One MIME part: header lines, an empty line, a body (well- or ill-encoded)."""
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    payload = draw(st.one_of(
        st.just(b64(PDF)), st.just(b64(SAMPLE_TNEF)), st.binary(max_size=200).map(b64),
        st.binary(max_size=100).map(lambda b: b64(SAMPLE_TNEF[:50] + b + SAMPLE_TNEF[50 + len(b):])),
        st.just(b"!!!not base64 at all===\r\n"),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.just(b"=E9=\r\nsoft=\r\nbreak=ZZ\r\n"), st.just(b"begin 644 x.pdf\r\n#0V%T\r\n`\r\nend\r\n"),
    ))
    name = draw(st.sampled_from([b"", b"; name=invoice.pdf", b"; name=winmail.dat", b'; name="a\\"b.pdf"',
                                 b"; name*=utf-8''%C3%BC.pdf"]))
    headers = b"Content-Type: " + content_type + name + b"\r\n"
    headers += b"Content-Transfer-Encoding: " + draw(st.sampled_from([b"base64", b"7bit", b"8bit", b"binary",
                                                                      b"quoted-printable", b"bogus"])) + b"\r\n"
    if draw(st.booleans()):
        headers += b"Content-Disposition: attachment; filename=" + draw(
            st.sampled_from([b"doc.pdf", b"winmail.dat", b'"a b.tif"', b"x.exe", b""])) + b"\r\n"
    return headers + b"\r\n" + payload


def multiparts(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw) -> bytes:
        boundary = draw(st.sampled_from([b"b1", b"=_x", b"a b", b"--", b"b1--", b"\xc3\xa4", b"x" * 80]))
        declared = draw(st.sampled_from([boundary, boundary, b"other", b""]))
        parts = draw(st.lists(children, min_size=0, max_size=4))
        close = draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"", b"--" + boundary + b"--  \r\nepilogue\r\n"]))
        subtype = draw(st.sampled_from([b"mixed", b"related", b"alternative", b"report", b"x-unknown"]))
        body = b"preamble\r\n" if draw(st.booleans()) else b""
        for part in parts:
            body += b"--" + boundary + b"\r\n" + part + b"\r\n"
        return (b"Content-Type: multipart/" + subtype + b'; boundary="' + declared + b'"\r\n\r\n' + body + close)
    return build()


mime_trees = st.recursive(leaves(), multiparts, max_leaves=8)


@st.composite
def messages(draw) -> bytes:
    """A message as a legacy program, a broken one or an attacker might send it."""
    fields = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    head = b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    if draw(st.booleans()):
        head = b"From: " + SENDER.encode() + b"\r\nSubject: " + draw(header_values) + b"\r\n" + head
    if draw(st.booleans()):
        head += b"MIME-Version: 1.0\r\n" + draw(mime_trees)
        raw = head
    else:
        raw = head + b"\r\n" + draw(st.binary(max_size=300))
    # Line-ending and byte damage at random places.
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(raw)))
        raw = raw[:position] + draw(st.sampled_from([b"\n", b"\r", b"\x00", b"\xff", b"\r\n.\r\n", b"\r\n\r\n",
                                                     b".", b"\r\n..\r\n"])) + raw[position:]
    return raw


# --- SMTP: commands ---------------------------------------------------------------------------


@SMTP_RUNS
@given(lines=st.lists(command_lines(), min_size=1, max_size=8), ehlo=st.booleans())
def test_any_command_sequence_gets_proper_replies_and_the_session_survives(background, lines, ehlo):
    wire = Wire(background.port)
    try:
        if ehlo:
            assert wire.command(b"EHLO fuzz.test").code == 250
        for line in lines:
            if converse(wire, line) is None:  # QUIT or a goodbye: a new session
                wire.close()
                wire = Wire(background.port)
        assert wire.command(b"EHLO fuzz.test").code == 250
        accepted = good_fax(wire)
    finally:
        wire.close()
    assert_consistent(background, accepted)


@SMTP_RUNS
@given(batch=st.lists(command_lines(alone=False), min_size=1, max_size=12),
       rcpts=st.lists(addresses, min_size=0, max_size=4))
def test_pipelined_batches_get_one_reply_per_command_in_order(background, batch, rcpts):
    wire = Wire(background.port)
    try:
        assert wire.command(b"EHLO fuzz.test").code == 250
        lines = [b"MAIL FROM:<" + SENDER.encode() + b">", *(b"RCPT TO:<" + a + b">" for a in rcpts), *batch,
                 b"NOOP end-of-batch"]
        wire.send(b"".join(line + b"\r\n" for line in lines))
        answers: list[Answer] = []
        while len(answers) < len(lines) and not (answers and ends_session(answers[-1])):
            answers.append(wire.reply())
        assert answers[0].code == 250
        for answer in answers:
            if answer.code >= 400:
                assert_refusal_names_the_problem(answer, enhanced=False)
        if ends_session(answers[-1]):  # too many unknown commands: aiosmtpd said goodbye
            wire.close()
            wire = Wire(background.port)
            assert wire.command(b"EHLO fuzz.test").code == 250
        else:
            assert answers[-1].code == 250, f"replies out of step: {[str(a) for a in answers]}"
        accepted = good_fax(wire)
    finally:
        wire.close()
    assert_consistent(background, accepted)


# --- SMTP: message content -------------------------------------------------------------------


def transaction(wire: Wire, content: bytes, *, rcpt: str) -> Answer:
    assert wire.command(f"MAIL FROM:<{SENDER}> BODY=8BITMIME SMTPUTF8".encode()).code == 250
    assert wire.command(f"RCPT TO:<{rcpt}>".encode()).code == 250
    assert wire.command(b"DATA").code == 354
    wire.send(stuffed(content))
    return wire.reply()


def check_content(gw: Background, content: bytes, *, status: bool) -> Answer:
    """One message to a fax or status address: a 250 with what it says stored, or a refusal that names why."""
    accepted: dict[str, bytes] = {}
    wire = Wire(gw.port)
    try:
        assert wire.command(b"EHLO fuzz.test").code == 250
        answer = transaction(wire, content, rcpt=ACCOUNT_SENDER if status else FAX)
        if answer.code == 250:
            if status:
                assert "Status report" in answer.text or "Kept for review" in answer.text, answer
            else:
                (code,) = codes_in(answer.text)
                accepted[code] = content
        else:
            assert_refusal_names_the_problem(answer)
            assert answer.code in (550, 552, 553, 554), answer  # broken content is refused for good
        accepted.update(good_fax(wire))
    finally:
        wire.close()
    assert_consistent(gw, accepted)
    return answer


@SMTP_RUNS
@given(content=messages(), status=st.booleans())
@example(content=b"From: a@b.example\r\n\r\nbare\nLF\n", status=False)
@example(content=b"From: a@b.example\r\n\r\nbare\rCR\r\n", status=True)
@example(content=b"Subject: \xff\xfe8-bit \x00 NUL\r\n\r\n\x00\x00\r\n", status=False)
@example(content=b"\r\n\r\nno header at all\r\n", status=False)
@example(content=b"", status=True)
def test_any_message_is_stored_as_sent_or_refused_by_name(background, content, status):
    check_content(background, content, status=status)


def nested(depth: int) -> bytes:
    """A fax whose PDF is `depth` multiparts deep."""
    inner = (b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
             b"Content-Disposition: attachment; filename=deep.pdf\r\n\r\n" + b64(PDF))
    for level in range(depth):
        boundary = f"level{level}".encode()
        inner = (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" + boundary + b"\r\n"
                 + inner + b"\r\n--" + boundary + b"--\r\n")
    return b"From: " + SENDER.encode() + b"\r\nSubject: deep\r\nMIME-Version: 1.0\r\n" + inner


KEPT = "250 2.0.0 Kept for review"
# name: (message, the reply to it as a fax, the reply to it as status mail)
ENORMOUS = {
    "1 MB header line": (b"From: a@b.example\r\nSubject: " + b"x" * 2**20 + b"\r\n\r\nbody\r\n",
                         "552 5.6.0 Message has a line longer than", "552 5.6.0 Message has a line longer than"),
    # Refused before anything parses them: a header of so many lines costs memory out of proportion to its size.
    "1 MB folded header": (b"From: a@b.example\r\nSubject: s" + b"\r\n x" * (2**20 // 4) + b"\r\n\r\nbody\r\n",
                           "552 5.3.4 Message header exceeds the limit of 262144 bytes",
                           "552 5.3.4 Message header exceeds the limit of 262144 bytes"),
    "5,000 header fields": (b"From: a@b.example\r\n" + b"X-Field: value\r\n" * 5000 + b"\r\nbody\r\n",
                             "552 5.3.4 Message header exceeds the limit of 1000 lines",
                             "552 5.3.4 Message header exceeds the limit of 1000 lines"),
    "900 header fields": (b"From: a@b.example\r\n" + b"X-Field: value\r\n" * 900 + b"\r\nbody\r\n",
                          "550 5.7.0 Nothing to fax", KEPT),
    "MIME 200 deep": (nested(200), "250 2.0.0 queued as", KEPT),
    "MIME 2,000 deep": (nested(2000), "554 5.6.0 The message cannot be read as MIME (its parts are nested too deep)",
                        KEPT),
    "8-bit header and NUL body": (b"From: \xe9\xe8@legacy.example\r\nSubject: \xc3\xa4\r\n\r\n" + b"\x00" * 5000,
                                  "550 5.7.0 Nothing to fax", KEPT),
    "winmail.dat damaged": (fax_message().replace(b"Content-Type: application/pdf",
                                                  b"Content-Type: application/ms-tnef"),
                            "554 5.6.3 The attachment winmail.dat (Outlook Rich Text) is damaged", KEPT),
}


@pytest.mark.parametrize("name", sorted(ENORMOUS))
@pytest.mark.parametrize("status", [False, True], ids=["fax", "status"])
def test_enormous_and_deep_messages_get_a_clear_reply(background, name, status):
    content, as_fax, as_status = ENORMOUS[name]
    reply = check_content(background, content, status=status)
    assert str(reply).startswith(as_status if status else as_fax), reply


# --- addressing rules -----------------------------------------------------------------------

VALID_NUMBERS = ["+12125551234", "+13125550123", "+441632960961", "+4930123456", "+33142685300", "+61212345678",
                 "+819012345678", "+5511987654321", "+971501234567", "+88160000000", "+19005550123"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return Policy(settings_for(tmp_path_factory.mktemp("policy"), 9), RulesInForce(load_addressing()))


def written(number: str, style: int) -> str:
    """A number as people write it in an address: with or without +, separators, spaces."""
    digits = number.lstrip("+")
    return [digits, "+" + digits, f"{digits[:3]}-{digits[3:6]}.{digits[6:]}", f"({digits[:1]}){digits[1:]}",
            f"{digits[:4]} {digits[4:]}", f"00{digits}"][style]


local_parts = st.one_of(
    st.builds(written, st.sampled_from(VALID_NUMBERS), st.integers(0, 5)),
    st.text(alphabet="0123456789+-()./ ", max_size=20),
    st.text(max_size=25),
    st.sampled_from(["１２１２５５５１２３４", "١٢١٢٥٥٥١٢٣٤", "12125551234%evil", "1212555123\x00", "+0", "+",
                     "1" * 40, "12125551234@other.example", "", " ", "1-800-FLOWERS"]),
)
domains = st.one_of(
    st.sampled_from(["greenfax.com", "GreenFax.COM", "greenfax.com.", "greenfax.com..", "greenfax.co", "xgreenfax.com",
                     "greenfax.com.evil.example", "[127.0.0.1]", "", "ｇreenfax.com", "greenfax。com"]),
    st.text(max_size=20),
)


@FAST
@given(local=local_parts, domain=domains, at=st.sampled_from(["@", "", "@@", "%"]))
def test_classify_recipient_never_raises_and_accepts_only_valid_numbers_in_an_allowed_domain(policy, local, domain, at):
    address = f"{local}{at}{domain}"
    result = policy.classify_recipient(address)
    assert isinstance(result, (Recipient, Refusal))
    if isinstance(result, Refusal):
        assert result.reply.code >= 500 and result.reply.text
        return
    assert result.address == address
    if result.number.e164 == SUBJECT_MAILBOX:
        assert address.lower() == (policy.rules.recipients.subject_mailbox or "").lower()
        return
    allowed = {policy.settings.upstream.domain.lower(), *policy.rules.recipients.local_fax_domains}
    assert address.rpartition("@")[2].lower().rstrip(".") in allowed
    assert re.fullmatch(r"[0-9+()./\- ]+", address.rpartition("@")[0])
    assert re.fullmatch(r"\+[1-9][0-9]{6,14}", result.number.e164)
    parsed = phonenumbers.parse(result.number.e164)
    assert phonenumbers.is_valid_number(parsed)
    assert phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == result.number.e164
    # Accepting is stable: the number, written again, is the same recipient.
    again = policy.classify_recipient(f"{result.number.digits}@{policy.settings.upstream.domain}")
    assert isinstance(again, Recipient) and again.number == result.number


@pytest.mark.parametrize("style", range(3))
def test_the_property_above_is_not_vacuous_a_valid_number_is_accepted_however_written(policy, style):
    result = policy.classify_recipient(f"{written('+12125551234', style)}@greenfax.com")
    assert isinstance(result, Recipient) and result.number.e164 == "+12125551234"


# --- values status reports carry -------------------------------------------------------------

OFFSETS = ["", " UTC", " EST (GMT-5)", " (GMT+14)", " GMT-12:30", " (GMT+99)", " +0100", " -2359", " +2400", " PST"]
STAMP_FORMATS = ["%Y-%m-%d %H:%M:%S", "%m/%d/%Y %I:%M:%S %p", "%a, %d %b %Y %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]


def _stamp(moment: datetime, fmt: str, offset: str) -> str:
    return moment.strftime(fmt.replace("%Y", f"{moment.year:04d}")) + offset


timestamps = st.one_of(
    st.builds(_stamp, st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
              st.sampled_from(STAMP_FORMATS), st.sampled_from(OFFSETS)),
    st.sampled_from(["0001-01-01 00:00:00 (GMT+14)", "9999-12-31 23:59:59 (GMT-12)", "GMT+99", "13/45/2026 99:99:99 PM",
                     "Mon, 01 Jan 0001 00:00:00 +0100", "Fri, 31 Dec 9999 23:59:59 -1200", "\x00",
                     "0000-00-00 00:00:00"]),
    st.text(max_size=30),
)
counts = st.one_of(
    st.integers(-5, 10**25).map(str),
    st.sampled_from(["²", "١٢", "٣:٤٥", "1e3", "0x10", "", " 7 ", "99:99:99", "1:2:3:4", "9" * 5000, "9" * 5000 + ":00",
                     "1" * 19, "12:34", "0:01:18"]),
    st.text(max_size=12),
)
numbers = st.one_of(
    st.sampled_from(["12125551234", "+1 (212) 555-1234", "0049 30 123456", "", "+", "1" * 40, "9" * 5000]),
    st.text(max_size=20),
)
query_values = st.one_of(st.text(max_size=30), timestamps, counts, numbers)


@dataclass
class ReportStore:
    """A store with one job in it, where reports are applied as the gateway applies them."""

    conn: sqlite3.Connection
    code: str
    policy: CorrelationPolicy

    def apply(self, report: StatusReport, *, recognised: bool = True) -> Outcome:
        now = store.iso(store.utcnow())
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            outcome = apply_report(self.conn, report, now, self.policy) if recognised else \
                keep_unrecognised(self.conn, report, now)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return outcome


@pytest.fixture(scope="module")
def report_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReportStore]:
    tmp = tmp_path_factory.mktemp("reports")
    conn = store.connect(tmp / "store.sqlite3")
    store.migrate(conn)
    message = new_message("+" + NUMBER, raw=fax_message(), mail_from=SENDER, header_from=SENDER)
    (code,) = store.insert_message(conn, message, store.iso(store.utcnow()))
    yield ReportStore(conn, code, CorrelationPolicy.from_settings(settings_for(tmp, 9)))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


# --- status mail ----------------------------------------------------------------------------------

STATUS_SAMPLES = [path.read_bytes() for path in sorted((DATA / "status").glob("*.eml"))]
TEMPLATE = (DATA / "status" / "plaintext-success.eml").read_bytes()


@pytest.fixture(scope="module")
def status_mail(tmp_path_factory: pytest.TempPathFactory) -> StatusMail:
    return StatusMail(settings_for(tmp_path_factory.mktemp("status"), 9), RulesInForce(mail=load_rules()))


@st.composite
def mutated(draw, samples: list[bytes]) -> bytes:
    """A sample with a few bytes flipped, cut, repeated or inserted."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.integers(0, 4))
        if action == 0:
            data[position] = draw(st.integers(0, 255))
        elif action == 1:
            del data[position:position + draw(st.integers(1, 200))]
        elif action == 2:
            data[position:position] = draw(st.binary(min_size=1, max_size=30))
        elif action == 3:
            data[position:position] = data[position:position + draw(st.integers(1, 300))]
        else:
            data = data[:position]
    return bytes(data)


@st.composite
def templated(draw) -> bytes:
    """GreenFax's status mail with other values where its rule reads them."""
    mail = TEMPLATE
    for old, values in ((b"01/10/2005 02:10:25 PM EST (GMT-5)", timestamps), (b"12157018714", numbers),
                        (b": 2\n", counts), (b"78 sec", counts), (b"FXBBBB33", st.sampled_from(["FXBBBB33", "", "fx"])),
                        (b"SUCCESS", st.sampled_from(["SUCCESS", "Busy", "", "Failed - No Answer", "\u00e9chec"]))):
        value = draw(values).replace("\n", " ").replace("\r", " ").encode("utf-8", "surrogatepass")
        mail = mail.replace(old, value + (b"\n" if old.endswith(b"\n") else b""))
    return mail


@FAST
@given(raw=st.one_of(templated(), mutated(STATUS_SAMPLES), messages()),
       rcpt=st.sampled_from([ACCOUNT_SENDER, "fax-bounce+FX7K3M9Q@gw.office.example", "fax-bounce+@gw.office.example"]),
       channel=st.sampled_from([Channel.SMTP, Channel.IMAP]), trusted=st.booleans())
@example(raw=TEMPLATE.replace(b"01/10/2005 02:10:25 PM EST (GMT-5)", b"01/01/0001 00:00:00 AM (GMT+14)"),
         rcpt=ACCOUNT_SENDER, channel=Channel.IMAP, trusted=True)
def test_status_mail_is_always_understood_and_stored_as_something(status_mail, report_store, raw, rcpt, channel,
                                                                   trusted):
    verdict = status_mail.understand(raw, channel=channel, envelope_rcpts=(rcpt,), trusted_source=trusted)
    assert isinstance(verdict, Verdict) and verdict.kind in ("rule", "bounce", "unrecognised")
    report = verdict.report
    assert isinstance(report, StatusReport) and isinstance(report.raw, str) and report.dedup_key
    assert report.result is None or report.result.value in ("delivered", "failed")
    outcome = report_store.apply(report, recognised=verdict.kind != "unrecognised")
    assert outcome.kind


# --- mime.inspect and winmail.dat --------------------------------------------------------------

TNEF_SAMPLES = [path.read_bytes() for path in sorted((DATA / "tnef").glob("*.tnef")) if path.stat().st_size < 100_000]


@FAST
@given(raw=messages())
def test_inspect_never_raises_and_the_forwarder_unwraps_what_the_intake_accepted(raw):
    raw = re.sub(rb"\r?\n|\r", b"\r\n", raw)  # as the intake stores it
    facts = mime.inspect(raw)
    assert isinstance(facts.attachments, tuple)
    refusal = mime.refusal(facts)
    assert refusal is None or (refusal.reply.code == 554 and refusal.check in ("tnef", "mime"))
    try:
        unwrapped = winmail.unwrap_tnef(raw)
    except tnef.TnefError as exc:
        assert exc.kind in replies.WINMAIL_REFUSED
        assert refusal is not None, f"the intake would accept what the forwarder cannot unwrap: {exc}"
    else:
        assert unwrapped is None or unwrapped.documents > 0


@FAST
@given(lines=st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=8),
       limit=st.integers(1, 16), final_crlf=st.booleans())
def test_the_long_line_check_finds_exactly_the_lines_over_the_limit(lines, limit, final_crlf):
    data = b"\r\n".join(lines) + (b"\r\n" if final_crlf and lines else b"")
    expected = bool(data) and max(map(len, data.split(b"\r\n"))) > limit
    assert has_long_line(data, limit) == expected


@FAST
@given(raw=st.lists(st.sampled_from([b"-", b"b", b"\r", b"\n", b"x", b" ", b"--b", b"\r\n--b", b"\n--b--", b"\r\n"]),
                    max_size=16).map(b"".join), cut=st.tuples(st.integers(0, 80), st.integers(0, 80)))
def test_delimiter_lines_are_found_exactly_where_a_multiline_regex_finds_them(raw, cut):
    start, end = sorted(min(c, len(raw)) for c in cut)
    regex = re.compile(rb"(?m)^--b(--)?[ \t]*(?:\r\n|\r|\n|\Z)")
    expected = [(m.start(), m.end(), bool(m[1])) for m in regex.finditer(raw, start, end)]
    assert list(mimeparse.delimiters(raw, start, end, b"--b")) == expected


def test_a_body_full_of_delimiter_lookalikes_is_not_read_on_the_event_loop():
    """inspect_inline() and the forwarder's check give up (a worker thread reads it); inspect() still answers."""
    lookalikes = (b"Content-Type: multipart/mixed; boundary=\"x\"\r\nMIME-Version: 1.0\r\n\r\n"
                  + b"--xy\r\n" * 5000 + b"--x\r\nContent-Type: text/plain\r\n\r\nhello\r\n--x--\r\n")
    assert mime.inspect_inline(lookalikes) is None and not winmail.without_winmail(lookalikes)
    assert mime.inspect(lookalikes) == mime.inspect(lookalikes, quick=False)
    assert winmail.without_winmail(fax_message())


def tree(message) -> list[tuple]:
    """A message's MIME tree as inspect() reads it: each entity's headers, defects and leaf payload."""
    return [(part.get_content_type(), part.items(), [type(d).__name__ for d in part.defects],
             len(part.get_payload()) if part.is_multipart() else part.get_payload())
            for part in message.walk()]


@FAST
@given(raw=messages())
def test_the_quick_parse_reads_every_message_as_the_email_package_does(raw):
    raw = re.sub(rb"\r?\n|\r", b"\r\n", raw)  # as the intake stores it
    full = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert tree(mimeparse.parse(raw)) == tree(full)
    assert mime.inspect(raw) == mime.inspect(raw, quick=False)
    assert mime.inspect_inline(raw) in (None, mime.inspect(raw))


def test_the_quick_parse_is_taken_for_an_ordinary_fax_and_not_for_broken_mime():
    """The property above is not vacuous: the quick path really reads ordinary faxes (and only those)."""
    ordinary = fax_message()
    quick = mimeparse.quick_entity(ordinary, 0, len(ordinary), 0)
    assert quick.is_multipart() and tree(quick) == tree(email.message_from_bytes(ordinary,
                                                                                 policy=email.policy.compat32))
    assert mime.inspect_inline(ordinary) == mime.inspect(ordinary, quick=False)
    assert mime.inspect_inline(b"Subject: x\r\n" * 5000 + b"\r\nbody\r\n") is None  # over its budget: a thread
    unclosed = ordinary[:ordinary.rindex(b"--\r\n")] + b"\r\n"  # no closing delimiter
    with pytest.raises(mimeparse.Unusual):
        mimeparse.quick_entity(unclosed, 0, len(unclosed), 0)
    assert tree(mimeparse.parse(unclosed)) == tree(email.message_from_bytes(unclosed, policy=email.policy.compat32))


@settings(FAST, max_examples=150)
@given(data=st.one_of(mutated(TNEF_SAMPLES), st.binary(max_size=300).map(lambda b: b"\x78\x9f\x3e\x22" + b)))
def test_the_winmail_dat_reader_gives_documents_or_says_damaged(data):
    try:
        found = tnef.documents(data)
    except tnef.TnefError as exc:
        assert exc.kind == "damaged"
    else:
        assert all(d.filename and "/" in d.content_type and d.data for d in found)


# --- Notify ---------------------------------------------------------------------------------------

notify_queries = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(PARAMETERS), st.text(max_size=10)), query_values, max_size=10),
    st.fixed_dictionaries(
        {"result": st.one_of(st.sampled_from(["success", "Busy", "No Answer", "x"]), st.text(max_size=10))},
        optional={"timestamp": timestamps, "destination": numbers, "pages": counts, "duration": counts,
                  "cost": st.text(max_size=10), "userjobcode": st.sampled_from(["FX7K3M9Q", "", "code"]),
                  "greenfaxreferenceid": st.text(max_size=12), "TIMESTAMP": timestamps}),
)


@FAST
@given(query=notify_queries, trusted=st.booleans(), our_job=st.booleans())
@example(query={"result": "success", "userjobcode": "x", "timestamp": "0001-01-01 00:00:00 (GMT+14)",
                "pages": "²", "duration": "9" * 5000}, trusted=True, our_job=True)
def test_notify_report_returns_a_report_that_can_be_stored_or_names_what_is_missing(report_store, query, trusted,
                                                                                   our_job):
    if our_job and "userjobcode" in query:
        query = {**query, "userjobcode": report_store.code}
    try:
        report = notify_report(query, trusted=trusted)
    except MissingParameters as exc:
        assert str(exc).startswith("missing ")
        return
    assert report.channel is Channel.NOTIFY and report.dedup_key.startswith("notify:")
    assert report.pages is None or report.pages >= 0
    assert report_store.apply(report).kind


def http_get(host: str, port: int, target: bytes) -> int:
    """A GET with exactly this request target; the response's status code."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return int(response.split(b" ", 2)[1])


@SMTP_RUNS
@given(pairs=st.lists(st.tuples(st.one_of(st.sampled_from(PARAMETERS), st.text(max_size=8)), query_values), max_size=8),
       raw_tail=st.binary(max_size=30))
def test_notify_calls_over_http_get_200_or_400_never_a_server_error(background, pairs, raw_tail):
    query = b"&".join(quote_from_bytes(k.encode("utf-8", "surrogatepass")).encode() + b"="
                      + quote_from_bytes(v.encode("utf-8", "surrogatepass")).encode() for k, v in pairs)
    # Undecodable percent escapes and stray bytes, as a broken or hostile caller sends them.
    tail = re.sub(rb"[^\x21-\x7e]", b"%FF", raw_tail).replace(b"#", b"%23")
    host, port = background.http
    status = http_get(host, port, f"/greenfax/notify/{TOKEN}?".encode() + query + b"&" + tail)
    assert status in (200, 400, 414), status  # 414: a request line over 4 KiB (gateway/http/guard.py)
    errors = background.errors.records
    background.errors.records = []
    assert errors == []


# --- the XML feed -----------------------------------------------------------------------------------

FEED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<outbound>\n'
        b"<fax><jobid>8591334</jobid><faxnumber>12125551234</faxnumber><sender>faxes@office.example</sender>"
        b"<status>Success</status><pages>2</pages><duration>78</duration><cost>0.20</cost>"
        b"<timestamp>2026-11-27 01:02:03</timestamp></fax>\n"
        b"<fax><jobid>8591335</jobid><faxnumber>+44 1632 960961</faxnumber><status>No Answer</status>"
        b"<pages>0</pages><duration>1:18</duration><timestamp>11/27/2026 01:02:03 AM</timestamp></fax>\n"
        b"</outbound>\n")
FEED_SAMPLES = [FEED, b"<error>Invalid account</error>",
                b'<!DOCTYPE x [<!ENTITY a "aaaa">]><outbound><fax><jobid>&a;</jobid></fax></outbound>']


@st.composite
def feeds(draw) -> bytes:
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        cells = list(draw(st.fixed_dictionaries({}, optional={
            "jobid": st.one_of(st.integers(0, 10**20).map(str), st.text(max_size=10)), "faxnumber": numbers,
            "sender": st.text(max_size=20), "status": st.sampled_from(["Success", "Busy", "No Answer", "Pending", "?"]),
            "pages": counts, "duration": counts, "cost": st.text(max_size=8), "timestamp": timestamps,
            "JobID": st.text(max_size=5), "Fax-Number": numbers, "x": st.text(max_size=5)})).items())
        rows.append("<fax>" + "".join(f"<{name}>{_escape(value)}</{name}>" for name, value in cells) + "</fax>")
    root = draw(st.sampled_from(["outbound", "Outbound", "x:outbound xmlns:x='urn:x'", "error"]))
    return f"<{root}>{''.join(rows)}</{root.split()[0]}>".encode("utf-8", "surrogatepass")


def _escape(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@FAST
@given(body=st.one_of(feeds(), mutated(FEED_SAMPLES), st.binary(max_size=200)),
       zone=st.sampled_from(["UTC", "America/New_York", "Pacific/Kiritimati", "Pacific/Pago_Pago"]))
@example(body=b"<outbound><fax><jobid>1</jobid><status>Busy</status><pages>" + b"9" * 5000 + b"</pages>"
              b"<timestamp>0001-01-01 00:00:00</timestamp></fax></outbound>", zone="Pacific/Kiritimati")
@example(body=FEED.replace(b"UTF-8", b"TF-8"), zone="UTC")  # an encoding expat does not know
@example(body=FEED.replace(b"UTF-8", b"shift_jis"), zone="UTC")  # one it does not support
def test_the_feed_parser_returns_rows_that_can_be_stored_or_its_own_error(report_store, body, zone):
    try:
        rows = parse_feed(body, ZoneInfo(zone))
    except FeedError:
        return
    for row in rows:
        assert isinstance(row, FeedRow) and row.report.channel is Channel.FEED
        assert report_store.apply(row.report).kind
