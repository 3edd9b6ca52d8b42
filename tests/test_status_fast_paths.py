"""The status path's quicker ways give exactly what the slower ones gave, and batching keeps failures apart.

Each quick reading is compared with the reading it stands in for, on real
and generated input: a plain mail (gateway.status.mailparse.quick_reading) with
mail-parser's reading, the feed's XML (feedxml.read_tree, row_xml) with
defusedxml and ElementTree's writer, feed times with strptime (numbers:
tests/test_numbers.py). Each stays because bench/status.py measured the
status path below its floor without it. Then the
batches: status mails, Notify calls and feed rows written together still
fail one by one, and what does not fail is stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.policy
import random
import re
import shutil
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import defusedxml.ElementTree as SafeET
import pytest
from conftest import ACCOUNT_SENDER, new_message, settings_for

from gateway import store
from gateway.rules import RulesInForce
from gateway.errors import StoreError
from gateway.models import Channel, Result, StatusReport, Trust
from gateway.sandbox.greenfax import SandboxFax
from gateway.sandbox.statusmail import status_email
from gateway.status import inbound, mailparse
from gateway.status.batches import Batched
from gateway.status.correlate import CorrelationPolicy, apply_report
from gateway.status.feedpoll import FeedPoller
from gateway.status.feedxml import row_xml, parse_feed, read_tree
from gateway.status.inbound import StatusMail, receive
from gateway.status.mailrules import load_rules
from gateway.status.report import plain_time, dedup_key

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SAMPLES = Path(__file__).parent / "data" / "status"

# --- status mail: the quick reading is mail-parser's --------------------------------------------


def mailparser_reading(raw: bytes) -> mailparse.ParsedMail:
    return dataclasses.replace(mailparse.with_mailparser(raw), parser="quick")


def mail(*, body: str = "Result: Delivered\nPages: 2\n", html: str | None = None, encoding: str | None = None,
         headers: dict[str, str] | None = None, lf: bool = False) -> bytes:
    message = EmailMessage()
    for name, value in (headers or {"From": "GreenFax Status <status@sandbox.greenfax.localhost>",
                                    "To": ACCOUNT_SENDER, "Subject": "Fax to 12125551234 delivered [FX7K3M9Q]",
                                    "Message-ID": "<a.1@sandbox.greenfax.localhost>"}).items():
        message[name] = value
    message.set_content(body, cte=encoding) if encoding else message.set_content(body)
    if html is not None:
        message.add_alternative(html, subtype="html", cte=encoding) if encoding else message.add_alternative(
            html, subtype="html")
    raw = message.as_bytes(policy=email.policy.SMTP)
    return raw.replace(b"\r\n", b"\n") if lf else raw


GENERATED = {
    "sandbox": status_email(SandboxFax(reference_id=8591334, number="12125551234", code="FX7K3M9Q",
                                       sender=ACCOUNT_SENDER, envelope_sender="", raw=b"", result="failed",
                                       reason="busy", pages=0, received_at=datetime(2026, 11, 27, tzinfo=UTC)),
                            ACCOUNT_SENDER),
    "plain LF": mail(lf=True),
    "quoted-printable": mail(body="Result: Delivered " + "x" * 90 + "\n", encoding="quoted-printable"),
    "base64": mail(encoding="base64"),
    "alternative": mail(html="<table><tr><th>Status</th><td>Delivered</td></tr></table>"),
    "alternative base64": mail(html="<p>Status</p><p>Failed - Line Busy</p>", encoding="base64"),
    "no message-id": mail(headers={"From": "noreply@greenfax.com", "To": f"Faxes <{ACCOUNT_SENDER}>, b@c.example",
                                   "Subject": "GreenFax Delivery Report - Job 8591334",
                                   "Date": "Fri, 27 Nov 2026 01:02:03 +0000"}),
    "two subjects": b"From: <noreply@greenfax.com>\r\nSubject: \r\nSubject: second\r\nReceived: a\r\nReceived: b\r\n"
                    b"To: a@b.example\r\n\r\nStatus: SUCCESS\r\n",
    "folded subject": b"From: noreply@greenfax.com\r\nSubject: Fax status:\r\n Failed\r\n\r\nbody\r\n",
    "empty from": b"From: \r\nSubject: x\r\n\r\nbody\r\n",
    "no body": b"From: a@b.example\r\nSubject: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_the_quick_reading_of_a_plain_mail_is_mail_parsers(name):
    raw = GENERATED[name]
    quick = mailparse.quick_reading(raw)
    assert quick is not None, "a plain mail takes the quick reading"
    assert quick == mailparser_reading(raw)
    assert mailparse.parse_mail(raw) == quick


@pytest.mark.parametrize("sample", sorted(SAMPLES.glob("*.eml")), ids=lambda p: p.name)
def test_the_shipped_samples_read_the_same_either_way(sample):
    raw = sample.read_bytes()
    quick = mailparse.quick_reading(raw)
    assert quick is None or quick == mailparser_reading(raw)


@pytest.mark.parametrize("raw", [
    b"From: a@b.example\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\nx\r\n",  # an encoded word
    "From: a@b.example\r\nSubject: x\r\n\r\ncafé\r\n".encode(),  # 8-bit
    b'From: "Quoted" <a@b.example>\r\n\r\nx\r\n',  # a quoted name
    b"From: a@b.example\r\nContent-Type: text/plain; name=x.txt\r\n\r\nx\r\n",  # a file name
    b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n",  # no close
    b"From: a@b.example\r\nContent-Type: application/pdf\r\n\r\nx\r\n",
], ids=["encoded word", "8-bit", "quoted name", "file name", "unclosed multipart", "not text"])
def test_anything_but_a_plain_mail_is_left_to_mail_parser(raw):
    assert mailparse.quick_reading(raw) is None


@pytest.mark.skipif(not (CORPUS / "MANIFEST.tsv").is_file(), reason="the shared email corpus is not there")
def test_on_the_corpus_the_quick_reading_is_mail_parsers_whenever_it_is_taken():
    taken = 0
    for path in sorted(p for p in CORPUS.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        for variant in (raw, re.sub(rb"\r\n|\r|\n", b"\r\n", raw)):
            quick = mailparse.quick_reading(variant)
            if quick is not None:
                taken += 1
                assert quick == mailparser_reading(variant), path
    assert taken > 100  # the quick reading really runs, not only the fallback


# --- numbers, times, Notify's canonical form ------------------------------------------------------


def test_feed_times_are_read_as_strptime_reads_them():
    rnd = random.Random(7)
    cases = ["2026-11-27 01:02:03", "2026-02-30 01:02:03", "0000-01-01 00:00:00", "2026-1-27 01:02:03"]
    cases += [f"{rnd.randint(0, 9999):04d}-{rnd.randint(0, 13):02d}-{rnd.randint(0, 32):02d} {rnd.randint(0, 25):02d}:"
              f"{rnd.randint(0, 61):02d}:{rnd.randint(0, 61):02d}" for _ in range(20000)]
    for case in cases:
        try:
            expected = datetime.strptime(case, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            expected = None
        quick = plain_time(case)
        assert quick is None or quick == expected, case
        assert quick is not None or expected is None or not re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", case)


# --- the feed's XML -----------------------------------------------------------------------------------

XML = [
    b'<?xml version="1.0" encoding="UTF-8"?>\n<outbound>\n  <fax><jobid>1</jobid></fax>\n</outbound>\n',
    b'<o xmlns="urn:x"><FAX a="1"><JobID>17</JobID><e/></FAX>\n<fax>t<x>1 &amp; 2</x>t2<y/>tail</fax>tail2</o>',
    b"<r>&amp;&#65;&lt;<![CDATA[<a&>]]><!-- c --><?pi x?><fax><sender>Faxes &lt;a@b&gt;</sender></fax></r>",
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x "y">]><r>&x;</r>',
    b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd"><r/>',
    b"<!-- first --><!DOCTYPE r><r/>",
    b"<r>&x;</r>", b"", b"garbage", b"<r><a></r>", b"<r/><r/>", b"<a:r/>", b"<r>\xff</r>", b"<?xml?><r/>",
    b'<?xml version="1.0" encoding="TF-8"?><r/>', b'<?xml version="1.0" encoding="shift_jis"?><r/>',
    b'<?xml version="1.0" encoding="latin-1"?><r><fax><jobid>\xe9</jobid></fax></r>',
    '<?xml version="1.0" encoding="UTF-16"?><r><fax><jobid>\u00e9</jobid></fax></r>'.encode("utf-16"),
]


def outcome(read, body: bytes) -> tuple:
    try:
        root = read(body)
    except Exception as exc:  # noqa: BLE001 - the exception is what is compared
        return type(exc), str(exc), getattr(exc, "code", None), getattr(exc, "position", None)
    return "read", ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize("body", XML)
def test_the_feed_xml_is_read_or_refused_as_defusedxml_does(body):
    def defused(data: bytes) -> ET.Element:
        return SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)

    assert outcome(read_tree, body) == outcome(defused, body)


def test_a_row_is_written_as_elementtree_writes_it():
    for body in XML[:3]:
        for element in read_tree(body).iter():
            assert row_xml(element) == ET.tostring(element, encoding="unicode")


# --- batches keep failures apart ------------------------------------------------------------------------


def submitted_jobs(path: Path, count: int) -> list[str]:
    conn = store.connect(path)
    store.migrate(conn)
    codes = []
    with conn:
        for n in range(count):
            codes += store.insert_message(conn, new_message(f"+1212555{1000 + n}", header_from=None),
                                          store.iso(store.utcnow()))
        conn.execute("UPDATE jobs SET state = 'submitted', reference_id = 9000000 + id")
    conn.close()
    return codes


def stored(path: Path, sql: str) -> list[tuple]:
    conn = store.connect(path, readonly=True)
    try:
        return [tuple(row) for row in conn.execute(sql)]
    finally:
        conn.close()


def notify_report(code: str, n: int) -> StatusReport:
    raw = f"result=success&userjobcode={code}"
    return StatusReport(channel=Channel.NOTIFY, trust=Trust.AUTHENTIC, raw=raw, result=Result.DELIVERED, job_code=code,
                        dedup_key=dedup_key("notify", None, raw), rule="http-notify", pages=n)


async def test_batched_writes_fail_one_by_one(tmp_path):
    path = tmp_path / "s.sqlite3"
    codes = submitted_jobs(path, 6)
    writer = store.Writer(path)
    writer.start()

    def apply_or_fail(conn, report: StatusReport, now: str, policy: CorrelationPolicy):
        if report.pages == 3:
            conn.execute("INSERT INTO no_such_table VALUES (1)")  # a failure in the store, half-way
        return apply_report(conn, report, now, policy)

    try:
        batched = Batched(writer, apply_or_fail)
        results = await asyncio.gather(*(batched.run(notify_report(code, n), store.iso(store.utcnow()),
                                                     CorrelationPolicy())
                                         for n, code in enumerate(codes)), return_exceptions=True)
    finally:
        writer.close()
    assert isinstance(results[3], StoreError)
    assert [r.kind for i, r in enumerate(results) if i != 3] == ["applied"] * 5
    assert sorted(stored(path, "SELECT job_code FROM reports")) == sorted((c,) for i, c in enumerate(codes) if i != 3)
    assert stored(path, f"SELECT state FROM jobs WHERE code = '{codes[3]}'") == [("submitted",)]


def status_mails(tmp_path: Path, codes: list[str]) -> tuple[StatusMail, list[bytes]]:
    status = StatusMail(settings_for(tmp_path, 9, status={"trusted_sender_domains": ["sandbox.greenfax.localhost"],
                                                          "require_dkim": False, "trusted_networks": ["127.0.0.0/8"]}),
                        RulesInForce(mail=load_rules()))
    return status, [status_email(SandboxFax(reference_id=1, number=f"1212555{1000 + n}", code=code,
                                            sender=ACCOUNT_SENDER, envelope_sender="", raw=b"", result="delivered",
                                            reason=None, pages=1, received_at=datetime.now(UTC)), ACCOUNT_SENDER)
                    for n, code in enumerate(codes)]


async def receive_all(path: Path, status: StatusMail, mails: list[bytes]) -> list:
    """The mails arrive together (so they are read and written as one batch)."""
    writer = store.Writer(path)
    writer.start()
    try:
        return await asyncio.gather(*(receive(status, writer, raw, channel=Channel.SMTP, client="127.0.0.1")
                                      for raw in mails),
                                    return_exceptions=True)
    finally:
        writer.close()


async def test_a_status_mail_that_cannot_be_read_fails_alone(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite3"
    codes = submitted_jobs(path, 5)
    status, mails = status_mails(tmp_path, codes)
    understand = StatusMail.understand

    def understand_or_fail(self, raw: bytes, **options):
        if codes[1].encode() in raw:
            raise RuntimeError("cannot read this one")
        return understand(self, raw, **options)

    monkeypatch.setattr(StatusMail, "understand", understand_or_fail)
    results = await receive_all(path, status, mails)
    assert isinstance(results[1], RuntimeError)
    assert [r[0].kind for i, r in enumerate(results) if i != 1] == ["applied"] * 4
    assert sorted(stored(path, "SELECT job_code FROM reports")) == sorted((c,) for i, c in enumerate(codes) if i != 1)


async def test_status_mails_are_stored_one_by_one_when_their_batch_fails(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite3"
    codes = submitted_jobs(path, 5)
    status, mails = status_mails(tmp_path, codes)
    batches: list[int] = []

    def store_all(conn, verdicts, now, policy):
        batches.append(len(verdicts))
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    monkeypatch.setattr(inbound, "_store_all", store_all)
    results = await receive_all(path, status, mails)
    assert batches == [5]  # tried together first
    assert [outcome.kind for outcome, _verdict in results] == ["applied"] * 5
    assert sorted(stored(path, "SELECT job_code FROM reports")) == sorted((c,) for c in codes)


def test_a_feed_row_that_fails_is_set_aside_alone(tmp_path):
    path = tmp_path / "s.sqlite3"
    codes = submitted_jobs(path, 4)
    refs = [str(9000000 + n) for n in range(1, 5)]
    body = "<outbound>" + "".join(f"<fax><jobid>{ref}</jobid><status>Success</status></fax>" for ref in refs) + \
           "</outbound>"
    rows = parse_feed(body.encode(), ZoneInfo("America/New_York"))
    settings = settings_for(tmp_path, 9, feed={"url": "http://127.0.0.1:9/feed", "min_interval": 1})
    poller = FeedPoller(settings, None, CorrelationPolicy())  # type: ignore[arg-type]
    conn = store.connect(path)
    # The store refuses one row's report, whichever way the chunk writes it.
    conn.execute(f"CREATE TEMP TRIGGER refuse BEFORE INSERT ON reports WHEN NEW.reference_id = '{refs[2]}'"
                 " BEGIN SELECT RAISE(ABORT, 'this row cannot be applied'); END")
    with conn:
        conn.execute("BEGIN")
        counts, listed = poller.apply_chunk(conn, rows)
    assert counts == {"applied": 3, "error": 1} and listed == {c for i, c in enumerate(codes) if i != 2}
    assert sorted(stored(path, "SELECT reference_id FROM reports")) == sorted((r,) for i, r in enumerate(refs) if i != 2)


def mixed_feed_store(path: Path) -> None:
    """Jobs a feed chunk meets: matched by reference id and by number, unknown, final, two to one number."""
    submitted_jobs(path, 8)
    conn = store.connect(path)
    with conn:
        conn.execute("UPDATE jobs SET reference_id = NULL WHERE id IN (3, 4, 7, 8)")
        conn.execute("UPDATE jobs SET state = 'unknown' WHERE id = 4")
        conn.execute("UPDATE jobs SET state = 'delivered' WHERE id = 5")
        conn.execute("UPDATE jobs SET number = (SELECT number FROM jobs WHERE id = 7) WHERE id = 8")
    conn.close()


def mixed_feed_rows(path: Path, zone: ZoneInfo) -> list:
    numbers = dict(stored(path, "SELECT id, substr(number, 2) FROM jobs"))
    stamp = datetime.now(zone).strftime("%Y-%m-%d %H:%M:%S")
    rows = [  # (jobid, job whose number the row has, sender, status, pages)
        ("9000001", None, ACCOUNT_SENDER, "Success", 2), ("9000001", None, ACCOUNT_SENDER, "Success", 2),
        ("9000002", None, ACCOUNT_SENDER, "Pending", None), ("9000002", None, ACCOUNT_SENDER, "Busy", 0),
        ("7777", 3, ACCOUNT_SENDER, "Success", 0), ("7777", 3, ACCOUNT_SENDER, "Busy", 0),
        ("", 4, ACCOUNT_SENDER, "Pending", None), ("9000005", None, ACCOUNT_SENDER, "Failed", 1),
        ("", 6, "someone@else.example", "Success", 1), ("", 7, ACCOUNT_SENDER, "Success", 1),
        ("9000009", None, ACCOUNT_SENDER, "Success", 1), ("9000006", None, ACCOUNT_SENDER, "Whatever", 1),
    ]
    body = "<outbound>" + "".join(
        f"<fax><jobid>{ref}</jobid><faxnumber>{numbers[job] if job else ''}</faxnumber><sender>{sender}</sender>"
        f"<status>{status}</status><pages>{pages if pages is not None else ''}</pages><timestamp>{stamp}</timestamp>"
        "</fax>" for ref, job, sender, status, pages in rows) + "</outbound>"
    return parse_feed(body.encode(), zone)


def test_a_feed_chunk_applied_together_stores_what_row_by_row_application_stores(tmp_path):
    zone = ZoneInfo("America/New_York")
    settings = settings_for(tmp_path, 9, feed={"url": "http://127.0.0.1:9/feed", "min_interval": 1})
    now = store.utcnow()
    poller = FeedPoller(settings, None, CorrelationPolicy(), clock=lambda: now)  # type: ignore[arg-type]
    mixed_feed_store(tmp_path / "jobs.sqlite3")
    rows = mixed_feed_rows(tmp_path / "jobs.sqlite3", zone)
    results = {}
    for way in ("together", "apart"):
        path = tmp_path / f"{way}.sqlite3"
        shutil.copy(tmp_path / "jobs.sqlite3", path)
        conn = store.connect(path)
        polls = []
        for _poll in range(2):  # the second time every row was received before
            with conn:
                conn.execute("BEGIN")
                polls.append(poller.apply_chunk(conn, rows) if way == "together"
                             else poller._apply_apart(conn, rows, store.iso(now)))
        conn.close()
        results[way] = polls, {table: stored(path, f"SELECT * FROM {table} ORDER BY id")
                               for table in ("jobs", "events", "reports", "notifications")}
    assert results["together"] == results["apart"]
    counts = results["together"][0][0][0]
    assert set(counts) >= {"applied", "duplicate", "contradicting", "foreign", "unmatched"}


# --- the listing's index ----------------------------------------------------------------------------------


def test_a_search_by_sender_reads_the_created_at_and_sender_index(tmp_path):
    conn = store.connect(tmp_path / "s.sqlite3")
    store.migrate(conn)
    plan = " ".join(row[3] for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT code FROM jobs WHERE instr(lower(sender), lower(?)) > 0"
        " ORDER BY created_at DESC, id DESC LIMIT 50", ("scanner",)))
    assert "jobs_created_sender" in plan and "TEMP B-TREE" not in plan
