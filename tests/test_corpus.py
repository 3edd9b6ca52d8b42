"""Robustness on real-world and broken mail (issue 3, section 7): every file of ../shared/corpus/.

(a) Each of the 570 message files is fed to the status-mail parser and to
    the rules and DSN reader: no exception escapes, and each comes out as a
    report (a bounce), or as not a status mail. None of them is a GreenFax
    status mail, so no status rule may claim one.
(b) Each is sent, with CRLF line endings, through a running gateway's status
    listener to the account sender address, on one SMTP connection: each is
    accepted and stored as a status report (unmatched, unrecognised, or a
    duplicate of one stored before), or refused with the reply written down
    below for that file. Nothing is faxed, and the listener still takes a
    fax afterwards.

The corpus is shared data outside the repository (see its README.md);
without it these tests are skipped.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
from pathlib import Path

import pytest
from conftest import ACCOUNT_SENDER, RETURN_PATH, codes_in, settings_for

from gateway import store
from gateway.rules import RulesInForce
from gateway.outbound import mime, mimeparse
from gateway.status.inbound import StatusMail
from gateway.status.mailparse import ParsedMail, parse_mail
from gateway.status.mailrules import load_rules
from gateway.models import Channel, Result, StatusReport

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
NOT_MESSAGES = re.compile(r"LICENSE|NOTICE|README|MANIFEST|^\.gitattributes$")
CODE = "FX7K3M9Q"
BOUNCE_ADDRESS = RETURN_PATH.replace("@", f"+{CODE}@")

pytestmark = pytest.mark.skipif(not (CORPUS / "MANIFEST.tsv").is_file(),
                                reason=f"the shared email corpus is not there ({CORPUS}/MANIFEST.tsv)")


def corpus() -> list[tuple[str, str]]:
    """(path under the corpus, line-ending style) of every message file, as MANIFEST.tsv lists them."""
    lines = (CORPUS / "MANIFEST.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:4] == ["path", "bytes", "sha256", "line_endings"]
    files = [(row[0], row[3]) for row in (line.split("\t") for line in lines[1:])]
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file() and not NOT_MESSAGES.search(p.name)}
    assert {path for path, _style in files} == on_disk
    assert len(files) == 570
    return files


def crlf(raw: bytes, style: str) -> bytes:
    """The file as a well-behaved client sends it: LF-only and CR-only files get CRLF line endings.

    Files the manifest calls CRLF are sent as they are, stray bare LF or CR included.
    """
    if style == "LF":
        assert b"\r" not in raw
        return raw.replace(b"\n", b"\r\n")
    if style == "CR":
        assert b"\n" not in raw
        return raw.replace(b"\r", b"\r\n")
    assert style == "CRLF"
    return raw


def status_mail(tmp_path: Path) -> StatusMail:
    return StatusMail(settings_for(tmp_path, 9), RulesInForce(mail=load_rules()))


# --- (a) the parser and the rules -------------------------------------------------------------

# DSNs from MTAs that bend RFC 3464, and how their report must begin (action, status, diagnostic).
KNOWN_BOUNCES = {
    # per-recipient fields in the per-message block, no blank line between them
    "bounces/err/make-test-09.eml": "failed 5.2.0",
    # Diagnostic-Code continued on lines that are not folded, Status and Action after them
    "bounces/bsd/rhost-messagelabs-01.eml": "failed 5.0.0 smtp; 550-Please turn on SMTP Authentication",
    "bounces/mac/rhost-messagelabs-01.eml": "failed 5.0.0 smtp; 550-Please turn on SMTP Authentication",
    # a first message/delivery-status part of free text, the real one second
    "malformed/mikel-mail/multipart_report_emails/multipart_report_multiple_status.eml": "failed 5.3.0",
    # the DSN in a multipart/mixed, not a multipart/report (and no Status field)
    "bounces/bsd/lhost-mcafee-01.eml": "failed smtp; 550 Unknown user",
    "bounces/bsd/lhost-opensmtpd-10.eml": "failed 5.0.0",
    # a 4.x.x status may still be a final failure; only the Action counts
    "malformed/spamscope-mail-parser/mail_malformed_2.eml": "failed 4.2.2",
    "malformed/mikel-mail/multipart_report_emails/report_422.eml": "delayed 4.2.2",
    "bounces/bsd/rfc3464-28.eml": "deliverable 2.1.5",  # not an RFC 3464 action: informational
}
# Files with a message/delivery-status part that has an Action field, which are still not read as DSNs.
NOT_READ_AS_DSN = {
    # "boundary" is cut off ("bo"), so the email package finds no parts at all; kept for review
    "malformed/cpython-test_email/msg_25.txt",
}
# mail-parser 4.8.0 raises on these (missing MIME close boundary, FIELD-NOTES); the email package reads them.
MAILPARSER_RAISES = ["bounces/bsd/lhost-sendgrid-01.eml", "bounces/bsd/lhost-sendgrid-02.eml",
                     "bounces/dos/lhost-sendgrid-01.eml"]
_DSN_WITH_ACTION = re.compile(rb"(?ims)content-type:\s*message/delivery-status.*?^[ \t]*action[ \t]*:[ \t]*\w")


def test_every_corpus_file_is_a_report_or_not_a_status_mail_and_nothing_raises(tmp_path):
    status = status_mail(tmp_path)
    problems: list[str] = []
    bounces: dict[str, StatusReport] = {}
    for path, style in corpus():
        raw = (CORPUS / path).read_bytes()
        try:
            mail = parse_mail(raw)
            at_account = status.understand(raw, channel=Channel.SMTP, envelope_rcpts=(ACCOUNT_SENDER,))
            at_return_path = status.understand(raw, channel=Channel.SMTP, envelope_rcpts=(BOUNCE_ADDRESS,))
            by_imap = status.understand(raw, channel=Channel.IMAP, trusted_source=True)
        except Exception as exc:  # noqa: BLE001 - any exception is the failure this test looks for
            problems.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        if not (isinstance(mail, ParsedMail) and mail.raw is raw):
            problems.append(f"{path}: parse_mail gave {mail!r}")
        for verdict in (at_account, at_return_path, by_imap):
            report = verdict.report
            if verdict.kind == "bounce":
                ok = (report.channel is Channel.BOUNCE and report.rule == "dsn" and report.trusted is False
                      and (report.result, report.reason) in ((Result.FAILED, "bounced"), (None, None))
                      and (report.result is Result.FAILED) == report.result_text.startswith("failed"))
            elif verdict.kind == "unrecognised":
                ok = report.result is None and report.rule is None and report.job_code is None
            else:  # "rule": a status rule took a mail that is not GreenFax's for a status report
                ok = False
            if not (ok and report.dedup_key.startswith("mail:") and isinstance(report.raw, str)):
                problems.append(f"{path}: {verdict.kind}: {verdict.explanation[:200]} {report}")
        if at_return_path.kind == "bounce":
            bounces[path] = at_return_path.report
            if at_return_path.report.job_code != CODE:
                problems.append(f"{path}: a bounce to {BOUNCE_ADDRESS} not linked to {CODE}")
        if at_account.kind != at_return_path.kind or by_imap.kind != at_account.kind:
            problems.append(f"{path}: read as {at_account.kind} at the account sender, {at_return_path.kind}"
                            f" at the return path, {by_imap.kind} by IMAP")
        # The same mail is the same report whatever its line endings (a file, IMAP, SMTP).
        if parse_mail(crlf(raw, style)).identity() != mail.identity():
            problems.append(f"{path}: its CRLF copy is not the same report")
        has_dsn = _DSN_WITH_ACTION.search(re.sub(rb"\r\n?", b"\n", raw)) is not None
        if has_dsn != (path in bounces) and path not in NOT_READ_AS_DSN:
            problems.append(f"{path}: {'has' if has_dsn else 'has no'} DSN with an Action, read as {at_account.kind}")
    assert problems == []
    for path, begins in KNOWN_BOUNCES.items():
        assert bounces[path].result_text.startswith(begins), (path, bounces[path].result_text)
        assert (bounces[path].result is Result.FAILED) == begins.startswith("failed "), path
    assert not NOT_READ_AS_DSN & set(bounces)
    assert len(bounces) > 200  # the corpus is mostly bounces


def test_the_quick_mime_parse_reads_every_corpus_file_as_the_email_package_does():
    """mimeparse.parse() skips reading body lines; on every corpus file it must give the email package's tree."""
    quick = 0
    for path, style in corpus():
        raw = crlf((CORPUS / path).read_bytes(), style)
        full = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert tree(mimeparse.parse(raw)) == tree(full), path
        assert mime.inspect(raw) == mime.inspect(raw, quick=False), path
        assert mime.inspect_inline(raw) in (None, mime.inspect(raw)), path
        try:
            mimeparse.quick_entity(raw, 0, len(raw), 0)
            quick += 1
        except mimeparse.Unusual:
            pass
    assert quick > 100  # the quick path really ran, not only the fallback


def tree(message: email.message.Message) -> list[tuple]:
    return [(part.get_content_type(), part.items(), [type(d).__name__ for d in part.defects],
             len(part.get_payload()) if part.is_multipart() else part.get_payload())
            for part in message.walk()]


@pytest.mark.parametrize("charset", [None, "UFT-8"], ids=["as-is", "unknown-charset"])
def test_mail_the_mail_parser_library_cannot_read_is_still_parsed(charset):
    """The fallback reads them; an unknown charset label on a part (lhost-x3-05 has "UFT-8") does not stop it."""
    for path in MAILPARSER_RAISES:
        raw = (CORPUS / path).read_bytes()
        if charset:
            raw = re.sub(rb"(?im)^(Content-Type: text/plain)\r?$", rb"\1; charset=" + charset.encode(), raw, count=1)
            assert charset.encode() in raw, path
        mail = parse_mail(raw)
        reference = email.message_from_bytes(raw, policy=email.policy.default)
        assert mail.parser == "email", path
        assert mail.subject == str(reference["subject"]) and mail.subject, path
        assert mail.message_id == str(reference["message-id"]).strip(), path
        assert mail.text.strip(), path


def test_not_bounces_are_not_read_as_bounces(tmp_path):
    status = status_mail(tmp_path)
    negatives = sorted((CORPUS / "bounces" / "not").iterdir())
    assert len(negatives) == 3
    for path in negatives:
        verdict = status.understand(path.read_bytes(), channel=Channel.SMTP, envelope_rcpts=(BOUNCE_ADDRESS,))
        assert verdict.kind == "unrecognised", path


# --- (b) through the status listener -----------------------------------------------------------

BARE_LF = ("550 5.6.0 Message has bare LF line endings; SMTP requires CRLF (configure the program to use CRLF,"
           " or ask the administrator to set smtp.bare_lf = \"normalize\")")
BARE_CR = "550 5.6.0 Message has a bare CR (carriage return without line feed); SMTP requires CRLF line endings"
EXPECTED_REFUSALS = {
    # Marked CRLF, so sent as it is; four lines of a quoted SMTP reply end in CR CR LF.
    "bounces/bsd/lhost-dragonfly-01.eml": BARE_CR,
    # A binary Outlook .msg file (CFBF), not RFC 822: bare LF, bare CR, NUL and very long "lines".
    "malformed/spamscope-mail-parser/mail_outlook_1.msg": BARE_LF,
}
ACCEPTED = {
    "250 2.0.0 Status report unmatched": "unmatched",  # a DSN, but of no fax of ours
    "250 2.0.0 Kept for review: not recognised as a status mail (see faxgw unmatched)": "unrecognised",
    "250 2.0.0 Status report duplicate": "duplicate",  # the same Message-ID and body came before
}


def send_all(port: int, messages: list[tuple[str, bytes]]) -> dict[str, str]:
    """Send every message on one SMTP connection (from <>, as bounces come); the reply to each one's data."""
    replies: dict[str, str] = {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="mx.corpus.test", timeout=30) as client:
        assert client.ehlo()[0] == 250
        for path, data in messages:
            code, text = client.mail("")
            assert code == 250, (path, code, text)
            code, text = client.rcpt(ACCOUNT_SENDER)
            assert code == 250, (path, code, text)
            code, text = client.data(data)  # dot-stuffs, and ends the data with CRLF.CRLF
            replies[path] = f"{code} {text.decode('utf-8', 'replace')}"
        assert client.noop()[0] == 250
    return replies


async def test_every_corpus_file_through_the_status_listener_is_stored_or_refused_by_name(gateway, tmp_path):
    # Every file from this one client within the minute: the per-client rate limit is off here.
    gw = await gateway(status={"listen": ["127.0.0.1:0"], "max_messages_per_minute": 0})
    ((_host, port),) = gw.service.status_addresses
    messages = [(path, crlf((CORPUS / path).read_bytes(), style)) for path, style in corpus()]

    replies = await asyncio.to_thread(send_all, port, messages)

    refusals = {path: reply for path, reply in replies.items() if not reply.startswith("250 ")}
    assert refusals == EXPECTED_REFUSALS
    # Every accepted mail is stored as what its reply says, raw or (untrusted, unrecognised: anyone may send
    # it) as an excerpt of at most status.review_excerpt bytes; a duplicate was stored before.
    excerpt = gw.settings.status.review_excerpt
    conn = store.connect(gw.store_path, readonly=True)
    try:
        stored = {row["dedup_key"]: dict(row) for row in conn.execute("SELECT * FROM reports")}
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        conn.close()
    understand = gw.service.status_mail.understand
    seen: set[str] = set()
    problems = []
    for path, data in messages:
        if path in refusals:
            continue
        kind = ACCEPTED.get(replies[path])
        received = data if data.endswith(b"\r\n") else data + b"\r\n"
        report = understand(received, channel=Channel.SMTP, envelope_rcpts=(ACCOUNT_SENDER,)).report
        key = report.dedup_key
        row = stored.get(key)
        kept_whole = row is not None and row["raw"] == received.decode("utf-8", "replace")
        kept_excerpt = (row is not None and len(received) > excerpt and row["raw"] == report.raw
                        and len(row["raw"].encode()) < excerpt + 100 and received.decode("utf-8", "replace")
                        .startswith(row["raw"].rpartition("\n[")[0]))
        if kind is None or row is None:
            problems.append(f"{path}: {replies[path]}; stored: {row and row['outcome']}")
        elif kind == "duplicate" or key in seen:
            if key not in seen:
                problems.append(f"{path}: duplicate of nothing received before")
        elif row["outcome"] != kind or not (kept_whole or kept_excerpt) or row["job_id"]:
            problems.append(f"{path}: reply {kind}, stored {row['outcome']} (job {row['job_id']})")
        seen.add(key)
    assert problems == []
    assert len(stored) == len(seen)
    assert jobs == 0  # nothing sent to a status address becomes a fax
    # The listener is still up and still takes faxes.
    reply = await gw.send()
    (code,) = codes_in(reply.message)
    await gw.wait_state(code, "submitted")
