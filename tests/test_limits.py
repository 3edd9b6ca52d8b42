"""Abuse and cost controls (issue 5, section 1), and the AUTH slowdown (section 2).

Pure parts first (day boundaries, page counting and the documents' digest,
the per-minute windows and the AUTH delay with a clock the test turns), then
the store's admission on a real SQLite store, then the real gateway over
SMTP: every over-limit reply says which limit and when it resets, exactly.
"""

from __future__ import annotations

import asyncio
import email.policy
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import test_intake
from click.testing import CliRunner
from conftest import NUMBER, codes_in, fax_message, new_message, pdf_bytes
from PIL import Image
from test_intake import (
    FAX,
    OTHER_FAX,
    OUTSIDE,
    SENDER,
    assert_refused,
    assert_reply,
    auth_login,
    auth_plain,
    envelope,
    queued,
    submit,
)

from gateway import config, store
from gateway.cli.main import cli
from gateway.errors import ConfigError
from gateway.units import span
from gateway.outbound.quotas import (
    AuthThrottle,
    IntakeLimits,
    Party,
    day_start,
)
from gateway.outbound.documents import document_facts
from gateway.outbound.policy import Policy
from gateway.rules import RulesInForce, load_addressing
from gateway.store.admission import (
    Admission,
    Admitted,
    DailyQuota,
    Duplicate,
    OverQuota,
    admit_message,
    usage_since,
)

# test_intake's fixtures: `connect` (raw SMTP clients, closed at the end) and `users` ([smtp.users]).
connect = test_intake.connect
users = test_intake.users

NEW_YORK = ZoneInfo("America/New_York")
ZONE = "America/New_York"  # the [greenfax] timezone of every gateway here
TIME = r"\d\d:\d\d:\d\d"


# === pure parts ======================================================================================


@pytest.mark.parametrize("moment, start", [
    ("2024-06-01T03:59:00", "2024-05-31T04:00:00"),  # 23:59 in New York: still the day before
    ("2024-06-01T04:00:00", "2024-06-01T04:00:00"),
    ("2024-03-10T12:00:00", "2024-03-10T05:00:00"),  # the day clocks go forward: it began in winter time
    ("2024-03-11T03:59:00", "2024-03-10T05:00:00"),
    ("2024-11-03T12:00:00", "2024-11-03T04:00:00"),  # the day clocks go back: it began in summer time
])
def test_a_day_ends_at_local_midnight(moment, start):
    at = datetime.fromisoformat(moment).replace(tzinfo=UTC)
    assert day_start(at, NEW_YORK) == datetime.fromisoformat(start).replace(tzinfo=UTC)


def test_a_day_whose_midnight_is_skipped_begins_at_the_change():
    # Chile moves its clocks from 00:00 to 01:00: 8 September 2024 began at 04:00 UTC.
    at = datetime(2024, 9, 8, 12, tzinfo=UTC)
    assert day_start(at, ZoneInfo("America/Santiago")) == datetime(2024, 9, 8, 4, tzinfo=UTC)


@pytest.mark.parametrize("seconds, text", [(3600, "1 h"), (600, "10 min"), (86400, "1 d"), (45, "45 s"), (90, "90 s")])
def test_windows_read_as_people_write_them(seconds, text):
    assert span(seconds) == text


def tiff_bytes(pages: int) -> bytes:
    frames = [Image.new("1", (64, 64), 1) for _ in range(pages)]
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def message_with(*documents: tuple[bytes, str, str], body: str = "Please fax.", cte: str | None = None,
                 subject: str = "Invoice") -> bytes:
    """A fax email with these (data, content type, file name) documents."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, FAX, subject
    msg.set_content(body)
    for data, content_type, filename in documents:
        maintype, subtype = content_type.split("/")
        options = {"cte": cte} if cte else {}
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename, **options)
    return msg.as_bytes(policy=email.policy.SMTP)


@pytest.mark.parametrize("documents, pages", [
    ([(pdf_bytes(3), "application/pdf", "a.pdf")], 3),
    ([(pdf_bytes(2), "application/pdf", "a.pdf"), (pdf_bytes(3), "application/octet-stream", "b.PDF")], 5),
    ([(tiff_bytes(4), "image/tiff", "scan.tif")], 4),
    ([(b"PK\x03\x04 not really a docx", "application/msword", "letter.doc")], 1),
    ([(b"%PDF-1.4 truncated", "application/pdf", "broken.pdf")], 1),
    ([(tiff_bytes(2), "image/tiff", "a.tif"), (b"<p>x</p>", "text/html", "cover.html")], 3),
    ([], 1),  # a fax of the body alone is one page
])
def test_pages_are_counted_from_pdf_and_tiff_and_one_per_other_document(documents, pages):
    facts = document_facts(message_with(*documents), pages=True, digest=False)
    assert (facts.pages, facts.digest) == (pages, None)


def test_the_digest_is_of_the_decoded_documents_not_of_the_mime():
    pdf, tiff = pdf_bytes(2, marker="one"), tiff_bytes(1)
    first = message_with((pdf, "application/pdf", "invoice.pdf"), (tiff, "image/tiff", "a.tif"))
    digest = document_facts(first, pages=False, digest=True).digest
    assert digest is not None
    # Another boundary, transfer encoding, file names, order, subject and body: the same documents.
    again = message_with((tiff, "image/tiff", "scan-0002.tif"), (pdf, "application/pdf", "Rechnung.pdf"),
                         cte="quoted-printable", subject="Resent", body="Second try")
    assert first != again
    assert document_facts(again, pages=True, digest=True) == document_facts(first, pages=True, digest=True)
    other = message_with((pdf_bytes(2, marker="two"), "application/pdf", "invoice.pdf"), (tiff, "image/tiff", "a.tif"))
    assert document_facts(other, pages=False, digest=True).digest != digest
    assert document_facts(message_with((pdf, "application/pdf", "invoice.pdf")), pages=False,
                          digest=True).digest != digest


def test_a_fax_without_documents_is_told_apart_by_its_text():
    one = document_facts(message_with(body="Call me back please."), pages=False, digest=True).digest
    same = document_facts(message_with(body="Call me back please.\n\n", subject="x"), pages=False, digest=True).digest
    other = document_facts(message_with(body="Cancel the order."), pages=False, digest=True).digest
    assert one == same != other


def test_unparseable_input_still_has_a_page():
    assert document_facts(b"\xff\xfe not mail at all", pages=True, digest=True).pages == 1


class Clock:
    """A monotonic clock and a wall clock the test moves together."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = datetime(2024, 6, 3, 16, 0, 0, tzinfo=UTC)  # 12:00:00 in New York

    def monotonic(self) -> float:
        return self.mono

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


def test_wrong_passwords_wait_longer_each_time_per_client_and_are_forgotten():
    clock = Clock()
    settings = config.LimitSettings(auth_failure_delay=1, auth_failure_delay_max=30, auth_failure_memory=900)
    throttle = AuthThrottle(settings, monotonic=clock.monotonic)
    assert [throttle.failed("10.0.0.1") for _ in range(7)] == [
        (1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (7, 30)]
    assert throttle.failed("10.0.0.2") == (1, 1)  # another client starts afresh
    clock.advance(899)
    assert throttle.failed("10.0.0.1") == (8, 30)
    clock.advance(901)
    assert throttle.failed("10.0.0.1") == (1, 1)


def limits_for(clock: Clock, **sections: dict) -> IntakeLimits:
    settings = config.validate({"sandbox": {"enabled": True}, **sections}, source="test", base=Path("."))
    return IntakeLimits(settings, Policy(settings, RulesInForce(load_addressing())), writer=None,  # type: ignore[arg-type]
                        clock=clock.now, monotonic=clock.monotonic)


def test_messages_per_minute_reset_as_the_oldest_leaves_the_minute():
    clock = Clock()
    limits = limits_for(clock, limits={"client": {"messages_per_minute": 2}})
    client, sender = Party.client("10.0.0.1"), Party.sender(None, SENDER)
    assert limits.take_message(client, sender) is None
    clock.advance(20)
    assert limits.take_message(client, sender) is None
    clock.advance(5)
    refusal = limits.check_rate(client, sender)
    assert refusal is not None and refusal.check == "client-messages-per-minute"
    assert str(refusal.reply) == ("451 4.7.1 Limit of 2 messages per minute for client 10.0.0.1 reached;"
                                  " resets at 12:01:00 America/New_York (in 35 s)")
    assert limits.take_message(client, sender) == refusal  # refused at DATA too, and not counted
    assert limits.check_rate(Party.client("10.0.0.2"), sender) is None
    clock.advance(35)
    assert limits.take_message(client, sender) is None


def test_per_minute_limits_per_sender_name_the_user_or_the_envelope_sender():
    clock = Clock()
    limits = limits_for(clock, limits={"sender": {"messages_per_minute": 1}})
    client = Party.client("10.0.0.1")
    assert limits.take_message(client, Party.sender("scanner", SENDER)) is None
    assert limits.take_message(client, Party.sender(None, SENDER)) is None  # not the same sender
    refusal = limits.check_rate(client, Party.sender("scanner", "other@legacy.example"))
    assert refusal is not None and "for user scanner reached" in refusal.reply.text
    refusal = limits.check_rate(client, Party.sender(None, "ERP@legacy.example"))
    assert refusal is not None and "for sender ERP@legacy.example reached" in refusal.reply.text


# === the store's admission ==========================================================================


@dataclass
class Store:
    conn: object
    path: Path

    def admit(self, admission: Admission, *numbers: str, at: datetime, client: str = "10.0.0.1"):
        message = new_message(*("+" + n for n in numbers), mail_from=SENDER, client=client, header_from=SENDER,
                              domain="greenfax.com")
        self.conn.execute("BEGIN IMMEDIATE")
        outcome = admit_message(self.conn, message, store.iso(at), admission)
        self.conn.execute("COMMIT")
        return outcome

    def state(self, code: str) -> tuple[str, str | None]:
        job = store.get_job(self.conn, code)
        return job["state"], job["reason"]

    def act(self, code: str, action: str) -> None:
        store.operator_action(self.conn, code, action, store.iso(datetime.now(UTC)))


@pytest.fixture
def db(tmp_path: Path):
    path = tmp_path / "faxgw.sqlite3"
    conn = store.connect(path)
    store.migrate(conn)
    yield Store(conn, path)
    conn.close()


NOON = datetime(2024, 6, 3, 16, tzinfo=UTC)
SINCE = store.iso(day_start(NOON, NEW_YORK))
KEY = f"sender:{SENDER}"


def test_daily_quotas_count_jobs_since_local_midnight_and_survive_a_restart(db):
    quota = Admission(sender_key=KEY, since=SINCE, pages=2, quotas=(DailyQuota("sender", KEY, faxes=3, pages=0),))
    yesterday = Admission(sender_key=KEY, since=store.iso(day_start(NOON - timedelta(days=1), NEW_YORK)), pages=2)
    assert isinstance(db.admit(yesterday, NUMBER, NUMBER, at=NOON - timedelta(hours=13)), Admitted)  # 23:00 before
    assert isinstance(db.admit(quota, NUMBER, "13125550123", at=NOON), Admitted)
    assert db.admit(quota, NUMBER, "13125550123", at=NOON) == OverQuota("sender", "faxes", 3, 2, 2)
    assert isinstance(db.admit(quota, NUMBER, at=NOON), Admitted)
    assert db.admit(quota, NUMBER, at=NOON) == OverQuota("sender", "faxes", 3, 3, 1)
    db.conn.close()
    db.conn = store.connect(db.path)  # a restart: the count is read from the jobs
    assert usage_since(db.conn, "sender", KEY, SINCE) == (3, 6)
    assert usage_since(db.conn, "client", "10.0.0.1", SINCE) == (3, 6)


def test_cancelled_jobs_do_not_count_and_pages_not_counted_count_one(db):
    quota = Admission(sender_key=KEY, since=SINCE, pages=None, quotas=(DailyQuota("sender", KEY, pages=2),))
    first = db.admit(quota, NUMBER, at=NOON)
    assert isinstance(db.admit(quota, NUMBER, at=NOON), Admitted)
    assert db.admit(quota, NUMBER, at=NOON) == OverQuota("sender", "pages", 2, 2, 1)
    db.act(first.codes[0], "cancel")
    assert isinstance(db.admit(quota, NUMBER, at=NOON), Admitted)


def test_a_refused_admission_stores_nothing(db):
    quota = Admission(sender_key=KEY, since=SINCE, quotas=(DailyQuota("client", "10.0.0.1", faxes=1),))
    assert isinstance(db.admit(quota, NUMBER, at=NOON), Admitted)
    assert isinstance(db.admit(quota, NUMBER, at=NOON), OverQuota)
    assert db.conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
    other = Admission(sender_key=KEY, since=SINCE, quotas=(DailyQuota("client", "10.0.0.2", faxes=1),))
    assert isinstance(db.admit(other, NUMBER, at=NOON, client="10.0.0.2"), Admitted)


def guard(action: str = "refuse", digest: str = "d1", sender_key: str = KEY) -> Admission:
    return Admission(sender_key=sender_key, since=SINCE, digest=digest, duplicate_since=store.iso(NOON - timedelta(hours=1)),
                     duplicate_action=action, duplicate_window="1 h")


def test_the_duplicate_guard_names_the_earlier_job(db):
    (first,) = db.admit(guard(), NUMBER, at=NOON - timedelta(minutes=30)).codes
    assert db.admit(guard(), NUMBER, at=NOON) == Duplicate(f"+{NUMBER}", first, store.iso(NOON - timedelta(minutes=30)))
    # Another number, other documents, another sender: not duplicates.
    assert isinstance(db.admit(guard(), "13125550123", at=NOON), Admitted)
    assert isinstance(db.admit(guard(digest="d2"), NUMBER, at=NOON), Admitted)
    assert isinstance(db.admit(guard(sender_key="user:scanner"), NUMBER, at=NOON), Admitted)


def test_a_duplicate_of_a_fax_that_was_not_sent_or_is_old_is_no_duplicate(db):
    assert isinstance(db.admit(guard(), NUMBER, at=NOON - timedelta(minutes=61)), Admitted)
    (cancelled,) = db.admit(guard(digest="d3"), NUMBER, at=NOON - timedelta(minutes=5)).codes
    db.act(cancelled, "cancel")
    assert isinstance(db.admit(guard(), NUMBER, at=NOON), Admitted)  # the first is outside the window
    assert isinstance(db.admit(guard(digest="d3"), NUMBER, at=NOON), Admitted)


def test_a_held_duplicate_says_which_job_it_repeats(db):
    (first,) = db.admit(guard("hold"), NUMBER, at=NOON - timedelta(minutes=1)).codes
    outcome = db.admit(guard("hold"), NUMBER, "13125550123", at=NOON)
    held, free = outcome.codes
    assert list(outcome.held) == [held]
    reason = f"duplicate of {first}: the same documents to +{NUMBER} from the same sender within 1 h"
    assert db.state(held) == ("held", reason)
    assert db.state(free)[0] == "queued"
    events = store.get_job(db.conn, held)["events"]
    assert events[-1]["state"] == "held" and f"faxgw release {held}" in events[-1]["detail"]


def test_a_new_number_is_held_until_a_fax_to_it_was_released(db):
    rule = Admission(sender_key=KEY, since=SINCE, hold_new_numbers=True)
    (first,) = db.admit(rule, NUMBER, at=NOON).codes
    assert db.state(first) == ("held", f"first fax to +{NUMBER}: never faxed before")
    (second,) = db.admit(rule, NUMBER, at=NOON).codes
    assert db.state(second)[0] == "held"  # a held fax does not make the number known
    db.act(first, "release")
    (third,) = db.admit(rule, NUMBER, at=NOON).codes
    assert db.state(third) == ("queued", None)
    db.act(second, "cancel")


# === over SMTP =======================================================================================


async def metrics_text(gw) -> str:
    return gw.service.metrics.render().decode()


async def test_connections_per_client_are_refused_at_connect(gateway, connect):
    gw = await gateway(limits={"client": {"connections": 2}})
    first = await connect(gw.port)
    await connect(gw.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    greeting = (await asyncio.wait_for(reader.readline(), 5)).decode()
    assert greeting == ("421 4.7.0 Limit of 2 concurrent connections for client 127.0.0.1 reached;"
                        " resets when one of them closes\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is closed
    writer.close()
    await first.close()
    await asyncio.sleep(0.1)
    again = await connect(gw.port)  # greeted (220) and served
    queued(await submit(again))
    text = await metrics_text(gw)
    assert 'faxgw_limit_refusals_total{limit="client-connections"} 1.0' in text
    assert 'faxgw_limit_refusals_total{limit="sender-faxes-per-day"} 0.0' in text  # the default one, shown at 0


async def test_messages_per_minute_per_client_are_refused_at_mail(gateway, connect):
    gw = await gateway(limits={"client": {"messages_per_minute": 2}})
    client = await connect(gw.port)
    queued(await submit(client))
    queued(await submit(client, sender="other@legacy.example"))
    answer = await client.command(f"MAIL FROM:<{SENDER}>")
    assert_refused(answer, 451, "4.7.1")
    assert re.fullmatch(rf"Limit of 2 messages per minute for client 127\.0\.0\.1 reached; resets at {TIME}"
                        rf" America/New_York \(in \d+ s\)", answer.text), answer
    seconds = int(re.search(r"in (\d+) s", answer.text)[1])
    assert 55 <= seconds <= 60
    assert 'faxgw_limit_refusals_total{limit="client-messages-per-minute"} 1.0' in await metrics_text(gw)


async def test_daily_faxes_per_sender_are_refused_at_rcpt_and_survive_a_restart(gateway, sandbox, connect):
    limits = {"sender": {"faxes_per_day": 2}}
    gw = await gateway(limits=limits)
    client = await connect(gw.port)
    queued(await submit(client))
    await envelope(client, rcpts=(FAX,))
    answer = await client.command(f"RCPT TO:<{OTHER_FAX}>")
    assert_refused(answer, 451, "4.7.1")
    assert answer.text == (f"Limit of 2 faxes per day for sender {SENDER} reached (1 today, 2 in this message);"
                           f" resets at 00:00 {ZONE}")
    queued(await client.data(fax_message()))  # the recipient accepted before is faxed
    queued(await submit(client, sender="someone-else@legacy.example"))
    await client.close()
    await sandbox.wait_for(3)
    await gw.service.stop()
    restarted = await gateway(limits=limits)
    client = await connect(restarted.port)
    assert_reply(await client.command(f"MAIL FROM:<{SENDER.upper()}>"), 250)  # senders compare without case
    answer = await client.command(f"RCPT TO:<{FAX}>")
    assert_refused(answer, 451, "4.7.1", "Limit of 2 faxes per day for sender", "(2 today)",
                   f"resets at 00:00 {ZONE}")


async def test_daily_pages_are_checked_at_data_and_a_message_over_the_whole_day_is_refused_for_good(gateway, connect):
    gw = await gateway(limits={"sender": {"pages_per_day": 5}})
    client = await connect(gw.port)
    queued(await submit(client, fax_message(pdf=pdf_bytes(3))))
    answer = await submit(client, fax_message(pdf=pdf_bytes(3)))
    assert_refused(answer, 451, "4.7.1")
    assert answer.text == (f"Limit of 5 pages per day for sender {SENDER} reached (3 today, this message needs 3);"
                           f" resets at 00:00 {ZONE}")
    answer = await submit(client, fax_message(pdf=pdf_bytes(6)))
    assert_refused(answer, 550, "5.7.1")
    assert answer.text == (f"This message needs 6 pages, more than the limit of 5 pages per day for sender {SENDER};"
                           " split it or ask the administrator")
    queued(await submit(client, fax_message(pdf=pdf_bytes(2))))
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250)
    assert_refused(await client.command(f"RCPT TO:<{FAX}>"), 451, "4.7.1", "5 pages per day", "(5 today")
    text = await metrics_text(gw)
    assert 'faxgw_limit_refusals_total{limit="sender-pages-per-day"} 3.0' in text


async def test_a_cancelled_fax_gives_its_place_back_at_once(gateway, connect):
    """RCPT remembers the day's usage; when that says "reached", the store has the last word."""
    gw = await gateway(limits={"sender": {"faxes_per_day": 1}}, hold={"new_number": True})
    client = await connect(gw.port)
    code = codes_in((await submit(client)).text)[0]
    assert_reply(await client.command(f"MAIL FROM:<{SENDER}>"), 250)
    assert_refused(await client.command(f"RCPT TO:<{FAX}>"), 451, "4.7.1", "(1 today)")
    assert_reply(await client.command("RSET"), 250)
    conn = store.connect(gw.store_path)
    try:
        store.operator_action(conn, code, "cancel", store.iso(datetime.now(UTC)))
    finally:
        conn.close()
    codes_in((await submit(client)).text)


async def test_a_sender_in_8bit_that_is_not_utf8_is_counted_like_any_other(gateway, connect):
    """aiosmtpd keeps such bytes as surrogates; the sender's key must still be one SQLite can store."""
    gw = await gateway(limits={"sender": {"faxes_per_day": 1}})
    client = await connect(gw.port)
    for attempt in range(2):
        await client.write(b"MAIL FROM:<j\xf6rg@legacy.example>\r\n")
        assert_reply(await client.reply(), 250)
        answer = await client.command(f"RCPT TO:<{FAX}>")
        if attempt == 0:
            assert_reply(answer, 250, "2.1.5")
            queued(await client.data(fax_message()))
        else:
            assert_refused(answer, 451, "4.7.1", "Limit of 1 fax per day for sender j\ufffdrg@legacy.example")


async def test_daily_faxes_per_client_name_the_client(gateway, connect):
    gw = await gateway(limits={"client": {"faxes_per_day": 1}})
    client = await connect(gw.port)
    queued(await submit(client))
    assert_reply(await client.command("MAIL FROM:<other@legacy.example>"), 250)
    answer = await client.command(f"RCPT TO:<{FAX}>")
    assert_refused(answer, 451, "4.7.1")
    assert answer.text == f"Limit of 1 fax per day for client 127.0.0.1 reached (1 today); resets at 00:00 {ZONE}"


AUTH_LISTENER = {**OUTSIDE, "plaintext_auth": ["127.0.0.1:0"]}


async def test_an_auth_user_is_the_sender_whatever_the_envelope_says(gateway, connect, users):
    gw = await gateway(smtp={**AUTH_LISTENER, "users": users}, limits={"sender": {"faxes_per_day": 1}})
    client = await connect(gw.port)
    assert_reply(await client.command(auth_plain()), 235, "2.7.0")
    queued(await submit(client, sender="a@legacy.example"))
    assert_reply(await client.command("MAIL FROM:<b@legacy.example>"), 250)
    assert_refused(await client.command(f"RCPT TO:<{FAX}>"), 451, "4.7.1",
                   "Limit of 1 fax per day for user scanner reached")


async def test_concurrent_sessions_per_user_are_refused_at_auth(gateway, connect, users):
    gw = await gateway(smtp={**AUTH_LISTENER, "users": users}, limits={"sender": {"connections": 1}})
    first = await connect(gw.port)
    assert_reply(await first.command(auth_plain()), 235)
    second = await connect(gw.port)
    answer = await second.command(auth_plain())
    assert (answer.code, answer.enhanced) == (421, "4.7.0")
    assert answer.text == "Limit of 1 concurrent session for user scanner reached; resets when one of them closes"
    assert await asyncio.wait_for(second.reader.read(), 5) == b""
    await first.close()
    await asyncio.sleep(0.1)
    third = await connect(gw.port)
    assert_reply(await third.command(auth_plain()), 235)
    queued(await submit(third))


# --- duplicates ---


async def test_a_duplicate_is_refused_naming_the_earlier_job(gateway, sandbox, connect):
    gw = await gateway(duplicates={"action": "refuse", "window": "10m"})
    client = await connect(gw.port)
    pdf = pdf_bytes(2, marker="invoice 4711")
    (first,) = queued(await submit(client, fax_message(pdf=pdf)))
    resent = fax_message(pdf=pdf, subject="Invoice 4711 (again)", filename="scan.pdf", body="Resending")
    answer = await submit(client, resent)
    assert_refused(answer, 550, "5.7.1")
    assert re.fullmatch(rf"Duplicate fax: the same documents went to \+{NUMBER} as job {first} at \d\d:\d\d"
                        rf" {ZONE}, less than 10 min ago; not sent again", answer.text), answer
    queued(await submit(client, resent, rcpts=(OTHER_FAX,)))
    queued(await submit(client, fax_message(pdf=pdf_bytes(2, marker="invoice 4712"))))
    queued(await submit(client, resent, sender="other@legacy.example"))
    faxes = await sandbox.wait_for(4)
    assert sorted(f.code for f in faxes).count(first) == 1
    assert 'faxgw_limit_refusals_total{limit="duplicate"} 1.0' in await metrics_text(gw)


async def test_a_duplicate_is_held_when_so_configured_and_released_by_the_operator(gateway, sandbox, connect):
    gw = await gateway(duplicates={"action": "hold"})
    client = await connect(gw.port)
    (first,) = queued(await submit(client))
    answer = await submit(client)
    assert_reply(answer, 250, "2.0.0")
    second = codes_in(answer.text)[0]
    assert answer.text == f"queued as {second}; held until an operator releases it: {second} (duplicate of {first})"
    job = gw.job(second)
    assert job["state"] == "held"
    assert job["reason"] == (f"duplicate of {first}: the same documents to +{NUMBER} from the same sender within 1 h")
    await sandbox.wait_for(1)
    await asyncio.sleep(0.3)
    assert [f.code for f in sandbox.faxes] == [first]
    release(gw, second)
    await sandbox.wait_for(2, timeout=10)
    assert [f.code for f in sandbox.faxes] == [first, second]
    assert 'faxgw_jobs_held_total{rule="duplicate"} 1.0' in await metrics_text(gw)


def release(gw, code: str) -> None:
    """`faxgw release CODE`, as the operator's command does it (from its own connection)."""
    conn = store.connect(gw.store_path)
    try:
        store.operator_action(conn, code, "release", store.iso(datetime.now(UTC)))
    finally:
        conn.close()


# --- hold rules ---


async def test_a_fax_to_a_new_number_is_held_and_the_reply_says_so(gateway, sandbox, connect):
    gw = await gateway(hold={"new_number": True})
    client = await connect(gw.port)
    answer = await submit(client)
    code = codes_in(answer.text)[0]
    assert_reply(answer, 250, "2.0.0")
    assert answer.text == f"queued as {code}; held until an operator releases it: {code} (new number)"
    assert gw.job(code)["reason"] == f"first fax to +{NUMBER}: never faxed before"
    release(gw, code)
    await gw.wait_state(code, "submitted", "delivered")
    answer = await submit(client, rcpts=(FAX, OTHER_FAX))
    known, new = codes_in(answer.text)[:2]
    assert answer.text == f"queued as {known} {new}; held until an operator releases it: {new} (new number)"
    assert gw.job(known)["state"] != "held" and gw.job(new)["state"] == "held"


async def test_international_and_long_faxes_are_held(gateway, connect):
    gw = await gateway(hold={"international": True, "max_pages": 3}, addressing={"numbers": {"allow_international": True}})
    client = await connect(gw.port)
    answer = await submit(client, fax_message(pdf=pdf_bytes(4)), rcpts=("442079460000@greenfax.com", FAX))
    london, new_york = codes_in(answer.text)[:2]
    assert answer.text == (f"queued as {london} {new_york}; held until an operator releases them:"
                           f" {london} (international, 4 pages); {new_york} (4 pages)")
    assert gw.job(london)["reason"] == ("international number +442079460000 (GB); 4 pages, more than"
                                        " hold.max_pages = 3")
    (code,) = queued(await submit(client, fax_message(pdf=pdf_bytes(3))))
    assert gw.job(code)["state"] != "held"


# --- settings ---


def test_limits_are_settings_validated_and_shown_by_check_config(tmp_path):
    path = tmp_path / "faxgw.toml"
    path.write_text('[sandbox]\nenabled = true\n[store]\npath = "store.sqlite3"\n'
                    '[limits.client]\nmessages_per_minute = 30\n[limits.sender]\npages_per_day = 500\n'
                    '[duplicates]\naction = "hold"\nwindow = "2h"\n[hold]\nmax_pages = 20\n')
    result = CliRunner().invoke(cli, ["--config", str(path), "check-config", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output.split("\n", 1)[1])
    assert shown["limits"]["client"] == {"connections": 50, "messages_per_minute": 30, "faxes_per_day": 0,
                                         "pages_per_day": 0}
    assert shown["limits"]["sender"] == {"connections": 0, "messages_per_minute": 0, "faxes_per_day": 1000,
                                         "pages_per_day": 500}
    assert shown["limits"]["auth_failure_delay"] == 1.0
    assert shown["duplicates"] == {"action": "hold", "window": 7200.0}
    assert shown["hold"] == {"new_number": False, "international": False, "max_pages": 20}


@pytest.mark.parametrize("data, message", [
    ({"limits": {"client": {"connections": -1}}}, "limits.client.connections = -1: Input should be greater than or"),
    ({"limits": {"sender": {"fax_per_day": 3}}}, "limits.sender.fax_per_day: unknown key"),
    ({"duplicates": {"action": "hold", "window": 0}}, "duplicates.window must be above zero"),
    ({"duplicates": {"action": "drop"}}, "duplicates.action = 'drop'"),
    ({"limits": {"auth_failure_delay": "5s", "auth_failure_delay_max": "1s"}}, "must not be below"),
])
def test_bad_limit_settings_name_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.validate({"sandbox": {"enabled": True}, **data}, source="test", base=Path("."))


# === AUTH: wrong passwords slowed down and counted ===================================================


async def timed(coroutine) -> tuple[object, float]:
    started = time.monotonic()
    result = await coroutine
    return result, time.monotonic() - started


async def test_wrong_passwords_are_answered_later_each_time_without_stalling_others(gateway, connect, users, caplog):
    caplog.set_level(logging.INFO, logger="faxgw")
    gw = await gateway(smtp={**AUTH_LISTENER, "users": users},
                       limits={"auth_failure_delay": 0.2, "auth_failure_delay_max": 0.8})
    client = await connect(gw.port)
    other = await connect(gw.port)
    waits = []
    for attempt in range(4):
        if attempt == 2:
            # While this client waits 0.8 s, another session is served at once: the wait is no sleep of the loop.
            pending = asyncio.ensure_future(client.command(auth_plain(password="Tr0ub4dor&3")))
            await asyncio.sleep(0.05)
            noop, took = await timed(other.command("NOOP"))
            assert_reply(noop, 250)
            assert took < 0.3
            answer, _ = await timed(pending)
            waits.append(None)
            assert_refused(answer, 535, "5.7.8", "credentials invalid")
            continue
        answer, took = await timed(client.command(auth_plain(password="Tr0ub4dor&3")))
        assert_refused(answer, 535, "5.7.8", "credentials invalid")
        waits.append(took)
    assert 0.19 <= waits[0] < 0.9 and 0.39 <= waits[1] < 1.1 and 0.79 <= waits[3] < 1.5, waits
    # The count belongs to the client address, not to the connection.
    fresh = await connect(gw.port)
    answer, took = await timed(fresh.command(auth_plain(user="nobody", password="guess")))
    assert_refused(answer, 535, "5.7.8")
    assert took >= 0.79
    # The right password is answered at once.
    answer, took = await timed(client.command(auth_plain()))
    assert_reply(answer, 235, "2.7.0")
    assert took < 0.7
    assert 'faxgw_auth_failures_total{mechanism="PLAIN"} 5.0' in await metrics_text(gw)
    lines = [r.getMessage() for r in caplog.records if "event=auth" in r.getMessage()]
    assert sum("result=failed" in line for line in lines) == 5
    assert any("user=scanner" in line and "failures=4" in line and "delay=0.8s" in line for line in lines), lines
    assert not [r for r in caplog.records if "Tr0ub4dor" in r.getMessage() or "guess" in r.getMessage()]


def test_wrong_passwords_are_counted_per_user_name_too_and_logins_per_user_are_few_at_a_time():
    clock = Clock()
    settings = config.LimitSettings(auth_failure_delay=1, auth_failure_delay_max=30, auth_failure_memory=900)
    throttle = AuthThrottle(settings, monotonic=clock.monotonic)
    # Guesses for one user from ever new addresses: the user's count grows all the same.
    assert [throttle.failed(f"10.0.0.{n}", "scanner") for n in range(1, 5)] == [(1, 1), (2, 2), (3, 4), (4, 8)]
    assert throttle.failed("10.0.0.9", "copier") == (1, 1)
    assert [throttle.begin("scanner") for _ in range(3)] == [True, True, False]
    throttle.end("scanner")
    assert throttle.begin("scanner") and throttle.begin("copier")


async def test_parallel_guesses_for_one_user_get_454_beyond_two_at_a_time(gateway, connect, users, caplog):
    caplog.set_level(logging.INFO, logger="faxgw")
    gw = await gateway(smtp={**AUTH_LISTENER, "users": users},
                       limits={"auth_failure_delay": 1, "auth_failure_delay_max": 1})
    clients = [await connect(gw.port) for _ in range(6)]
    answers = await asyncio.gather(*(client.command(auth_plain(password=f"guess-{n}"))
                                     for n, client in enumerate(clients)))
    codes = sorted(answer.code for answer in answers)
    assert codes == [454, 454, 454, 454, 535, 535], answers
    busy = next(answer for answer in answers if answer.code == 454)
    assert_refused(busy, 454, "4.7.0", "Too many logins for this user at the same time")
    assert sum("check=auth-concurrent" in r.getMessage() for r in caplog.records) == 4
    # When the guesses are answered, the user logs in as ever.
    assert_reply(await clients[0].command(auth_plain()), 235, "2.7.0")


async def test_two_guessing_connections_do_not_lock_the_user_out(gateway, connect, users, caplog):
    caplog.set_level(logging.INFO, logger="faxgw")
    gw = await gateway(smtp={**AUTH_LISTENER, "users": users},
                       limits={"auth_failure_delay": 5, "auth_failure_delay_max": 5})
    guessers = [await connect(gw.port) for _ in range(2)]
    pending = [asyncio.ensure_future(g.command(auth_plain(password=f"guess-{n}"))) for n, g in enumerate(guessers)]
    for _ in range(100):  # both guesses are checked and now wait out their delay
        if caplog.text.count("result=failed") == 2:
            break
        await asyncio.sleep(0.05)
    assert_reply(await (await connect(gw.port)).command(auth_plain()), 235, "2.7.0")
    for answer in await asyncio.gather(*pending):
        assert_refused(answer, 535, "5.7.8")


async def test_an_enormous_user_name_is_refused_unchecked_and_not_kept(gateway, connect, users, caplog):
    caplog.set_level(logging.INFO, logger="faxgw")
    gw = await gateway(smtp={**AUTH_LISTENER, "users": users})
    client = await connect(gw.port)
    assert_refused(await auth_login(client, user="u" * 5000, password="x"), 535, "5.7.8")  # one line each
    assert len(gw.service.intake.limits.auth) == 0  # nothing counted
    assert max(len(r.getMessage()) for r in caplog.records) < 1000
