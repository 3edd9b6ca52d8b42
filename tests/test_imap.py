"""Status mail by IMAP against a real Dovecot on loopback (private instance, throw-away config)."""

from __future__ import annotations

import asyncio
import email
import time
from datetime import UTC, datetime

import pytest
from conftest import ACCOUNT_SENDER, RunningGateway, codes_in, fax_message, send, settings_for
from peers.dovecot import DovecotInstance, unavailable_reason

from gateway import config, store
from gateway.sandbox.greenfax import SandboxFax
from gateway.sandbox.statusmail import status_email
from gateway.service import Service

pytestmark = [
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
    pytest.mark.timeout(90),
]
PROCESSED = "GreenFax-Processed"


@pytest.fixture
def dovecot(tmp_path):
    with DovecotInstance(tmp_path / "imap") as imap:
        yield imap


def imap_settings(imap: DovecotInstance, tls: str = "implicit", *, trusted: bool = True) -> dict:
    """A mailbox only GreenFax writes to (`trusted`), as most tests here want; see the test of an ordinary one."""
    return {"host": imap.host, "port": imap.port_tls if tls == "implicit" else imap.port_starttls, "tls": tls,
            "ca_file": str(imap.ca_file), "username": "faxes", "password": "imap-secret-1",
            "processed_folder": PROCESSED, "idle_refresh": 5, "timeout": 5, "trusted": trusted}


def status_mail_for(job: dict, *, result: str = "delivered", reason: str | None = None, pages: int = 2,
                    reference: int = 8_600_001) -> bytes:
    fax = SandboxFax(reference_id=reference, number=job["number"].lstrip("+"), code=job["code"],
                     sender=ACCOUNT_SENDER, envelope_sender="", raw=b"", result=result, reason=reason,
                     pages=pages, received_at=datetime.now(UTC))
    return status_email(fax, ACCOUNT_SENDER)


async def until(predicate, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def submitted_job(gw) -> dict:
    (code,) = codes_in((await gw.send()).message)
    return await gw.wait_state(code, "submitted")


async def test_fax_to_final_state_through_imap_and_processed_folder(gateway, sandbox, dovecot):
    gw = await gateway(status={"imap": imap_settings(dovecot)})
    job = await submitted_job(gw)
    dovecot.deliver(status_mail_for(job))
    done = await gw.wait_state(job["code"], "delivered", timeout=15)
    assert done["pages"] == 2 and done["reference_id"] == "8600001"
    assert done["events"][-1]["source"] == "email-imap"
    await until(lambda: dovecot.list_uids("INBOX") == [])
    assert len(dovecot.list_uids(PROCESSED)) == 1


async def test_starttls_and_a_persons_mail_left_untouched(gateway, sandbox, dovecot):
    gw = await gateway(status={"imap": imap_settings(dovecot, tls="starttls")})
    job = await submitted_job(gw)
    personal = b"From: colleague@office.example\r\nTo: faxes@office.example\r\nSubject: Lunch?\r\n\r\nNoon?\r\n"
    dovecot.deliver(personal)
    dovecot.deliver(status_mail_for(job, result="failed", reason="busy", pages=0))
    await gw.wait_state(job["code"], "failed")
    await until(lambda: len(dovecot.list_uids(PROCESSED)) == 1)
    (left,) = dovecot.fetch_all("INBOX")
    assert b"Subject: Lunch?" in left
    conn = store.connect(gw.store_path, readonly=True)
    assert conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 1  # the person's mail is not stored


async def test_dovecot_restart_while_idle_is_survived(gateway, sandbox, dovecot):
    gw = await gateway(status={"imap": imap_settings(dovecot)})
    await until(lambda: gw.service.imap.state.connected)
    await asyncio.sleep(0.5)  # in IDLE now
    dovecot.restart(graceful=False)  # the connection drops without a goodbye
    job = await submitted_job(gw)
    dovecot.deliver(status_mail_for(job))
    await gw.wait_state(job["code"], "delivered", timeout=30)
    assert gw.service.imap.state.last_error is None


async def test_killed_between_apply_and_move_does_not_apply_twice(tmp_path, sandbox, dovecot):
    """The mail is still in the mailbox and the last UID was not saved, as after a crash at that moment."""
    settings = settings_for(tmp_path, sandbox.port, status={"imap": imap_settings(dovecot)})
    service = Service(settings)
    await service.start()
    gw = RunningGateway(service, settings)
    job = await submitted_job(gw)
    mail = status_mail_for(job)
    dovecot.deliver(mail)
    await gw.wait_state(job["code"], "delivered")
    await until(lambda: len(dovecot.list_uids(PROCESSED)) == 1)
    events = len(gw.job(job["code"])["events"])
    await service.stop()

    dovecot.deliver(mail)  # back in the INBOX, as if the move never happened
    conn = store.connect(settings.store.path)
    conn.execute("UPDATE meta SET value = '0' WHERE key LIKE 'imap:%:last_uid'")
    conn.close()
    service = Service(settings)
    await service.start()
    try:
        await until(lambda: len(dovecot.list_uids(PROCESSED)) == 2)
        assert len(gw.job(job["code"])["events"]) == events
        conn = store.connect(settings.store.path, readonly=True)
        assert conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 1
    finally:
        await service.stop()


async def test_uidvalidity_change_rescans_without_applying_twice(gateway, sandbox, dovecot):
    imap = imap_settings(dovecot) | {"processed_folder": ""}  # flag instead of move: mail stays to be rescanned
    gw = await gateway(status={"imap": imap})
    first = await submitted_job(gw)
    dovecot.deliver(status_mail_for(first, reference=8_600_010))
    await gw.wait_state(first["code"], "delivered")
    await asyncio.sleep(0.3)
    dovecot.change_uidvalidity("INBOX")
    second = await submitted_job(gw)
    dovecot.deliver(status_mail_for(second, result="failed", reason="no_answer", pages=0, reference=8_600_011))
    await gw.wait_state(second["code"], "failed", timeout=30)
    conn = store.connect(gw.store_path, readonly=True)
    outcomes = [row[0] for row in conn.execute("SELECT outcome FROM reports ORDER BY id")]
    assert outcomes.count("applied") == 2
    assert len([e for e in gw.job(first["code"])["events"] if e["source"] == "email-imap"]) == 1
    flagged = dovecot.fetch_all("INBOX")
    assert len(flagged) == 2  # flagged, not moved or expunged


async def test_sandbox_returns_status_mail_into_the_imap_mailbox(tmp_path, dovecot):
    settings = config.validate({
        "sandbox": {"enabled": True, "listen": ["127.0.0.1:0"], "status_mail": "imap", "notify": False},
        "smtp": {"listen": ["127.0.0.1:0"]},
        "http": {"listen": ["127.0.0.1:0"]},
        "store": {"path": str(tmp_path / "store.sqlite3")},
        "status": {"imap": imap_settings(dovecot)},
    }, source="test", base=tmp_path)
    service = Service(settings)
    await service.start()
    try:
        gw = RunningGateway(service, settings)
        reply = await send(gw.port, fax_message())
        (code,) = codes_in(reply.message)
        job = await gw.wait_state(code, "delivered", timeout=20)
        assert job["events"][-1]["source"] == "email-imap"
        (moved,) = dovecot.fetch_all(PROCESSED)
        assert email.message_from_bytes(moved)["Subject"].endswith(f"[{code}]")
    finally:
        await service.stop()


async def test_server_without_idle_is_polled(gateway, sandbox, tmp_path):
    # Dovecot announces what imap_capability says: here everything but IDLE.
    no_idle = "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE LITERAL+ MOVE UIDPLUS\n"
    with DovecotInstance(tmp_path / "imap-no-idle", extra_config=no_idle) as imap:
        gw = await gateway(status={"imap": imap_settings(imap) | {"poll_interval": 0.5}})
        await until(lambda: gw.service.imap.state.connected)
        job = await submitted_job(gw)
        imap.deliver(status_mail_for(job))
        await gw.wait_state(job["code"], "delivered")


async def test_an_ordinary_mailbox_trusts_only_signed_mail(gateway, sandbox, dovecot):
    """Anyone can mail the account sender: unless the mailbox is marked trusted, only DKIM makes its mail trusted."""
    from test_status_smtp import plaintext_report, rsa_key, signed

    key, record = rsa_key()
    gw = await gateway(status={"imap": imap_settings(dovecot, trusted=False),
                               "dkim_keys": {"fax2024._domainkey.greenfax.com": record}})
    job = await submitted_job(gw)
    number = job["number"].lstrip("+")
    forged = plaintext_report(status="FAILED - LINE BUSY", number=number, code=None, reference="77001")
    dovecot.deliver(forged)
    await until(lambda: len(dovecot.list_uids(PROCESSED)) == 1)  # read, kept for review, filed away
    assert gw.job(job["code"])["state"] == "submitted"
    dovecot.deliver(signed(plaintext_report(status="SUCCESS", number=number, code=None, reference="77002"), key))
    done = await gw.wait_state(job["code"], "delivered", timeout=15)
    assert done["reference_id"] == "77002"
