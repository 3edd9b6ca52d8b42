"""Who may set a fax's outcome: trust made real on the status listener (DESIGN.md, "Correlation and trust").

The status listener faces the internet, so its mail is tried as an attacker
would send it: a From of greenfax.com written by anyone, a job code guessed
or read off a cover page, a DSN aimed at the return path. Only a DKIM
signature aligned with a trusted From domain, or a connection from a
trusted network, makes mail trusted; an untrusted report changes a job only
when it presents that job's secret (the VERP tag, our Message-ID).
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from conftest import ACCOUNT_SENDER, NUMBER, RETURN_PATH, RunningGateway, codes_in
from test_status_smtp import (
    deliver,
    dsn,
    faxgw,
    notifications,
    plaintext_report,
    reports,
    rsa_key,
    signed,
    status_port,
    submitted_fax,
)

from gateway.sandbox.statusmail import status_email
from gateway.rules import RulesInForce

pytestmark = pytest.mark.timeout(60)
# The production defaults: greenfax.com is the trusted From domain, DKIM is required, no trusted networks.
LISTENER = {"listen": ["127.0.0.1:0"]}


def verp(code: str, secret: str | None) -> str:
    local, _, domain = RETURN_PATH.partition("@")
    return f"{local}+{code}{'.' + secret if secret else ''}@{domain}"


async def test_a_from_of_greenfax_com_alone_never_makes_mail_trusted(gateway, sandbox):
    gw = await gateway(status=LISTENER)
    code, _fax = await submitted_fax(gw, sandbox)
    by_number = plaintext_report(status="FAILED - LINE BUSY", number=NUMBER, code=None, reference="4243")
    by_code = plaintext_report(status="SUCCESS", number=NUMBER, code=code, reference="4244")

    for forged in (by_number, by_code):
        assert await deliver(status_port(gw), forged, sender="noreply@greenfax.com") == (
            "250 2.0.0 Status report unmatched")

    job = gw.job(code)
    assert job["state"] == "submitted" and job["reference_id"] != "4244"
    assert notifications(gw, code) == 0  # no failure notice went to the fax's sender
    assert [(r["trusted"], r["outcome"]) for r in reports(gw)] == [(0, "unmatched"), (0, "unmatched")]
    assert reports(gw)[1]["note"] == (f"untrusted report names {code} but carries no job secret"
                                      " (kept for review: `faxgw match`)")


async def test_a_trusted_network_makes_mail_trusted_and_other_sources_stay_untrusted(gateway, sandbox):
    gw = await gateway(status={**LISTENER, "require_dkim": False, "trusted_networks": ["192.0.2.0/24"]})
    code, _fax = await submitted_fax(gw, sandbox)
    report = plaintext_report(status="SUCCESS", number=NUMBER, code=code, reference="4245")
    assert await deliver(status_port(gw), report, sender="noreply@greenfax.com") == (
        "250 2.0.0 Status report unmatched")  # 127.0.0.1 is not in 192.0.2.0/24
    assert gw.job(code)["state"] == "submitted"



async def test_mail_from_a_trusted_network_with_a_trusted_from_domain_is_trusted(gateway, sandbox):
    trusting = await gateway(status={**LISTENER, "require_dkim": False, "trusted_networks": ["127.0.0.0/8"]})
    code, _fax = await submitted_fax(trusting, sandbox)
    report = plaintext_report(status="SUCCESS", number=NUMBER, code=None, reference="4246")
    assert await deliver(status_port(trusting), report, sender="noreply@greenfax.com") == (
        f"250 2.0.0 Status report applied for {code}")  # trusted: even by number and time window
    # From the trusted network but with a From domain nobody trusts: untrusted, and it changes nothing.
    code, fax = await submitted_fax(trusting, sandbox)
    other = status_email(fax, ACCOUNT_SENDER)  # the sandbox's layout, from sandbox.greenfax.localhost
    assert await deliver(status_port(trusting), other) == "250 2.0.0 Status report unmatched"
    assert trusting.job(code)["state"] == "submitted"


async def test_with_dkim_and_networks_both_are_needed(gateway, sandbox):
    key, record = rsa_key()
    gw = await gateway(status={**LISTENER, "trusted_networks": ["192.0.2.0/24"],
                               "dkim_keys": {"fax2024._domainkey.greenfax.com": record}})
    code, _fax = await submitted_fax(gw, sandbox)
    report = signed(plaintext_report(status="SUCCESS", number=NUMBER, code=code, reference="4248"), key)
    assert await deliver(status_port(gw), report, sender="noreply@greenfax.com") == (
        "250 2.0.0 Status report unmatched")
    assert gw.job(code)["state"] == "submitted"


async def test_dkim_must_align_with_the_from_domain(gateway, sandbox):
    key, record = rsa_key()
    gw = await gateway(status={**LISTENER, "trusted_sender_domains": ["greenfax.com", "fax-partner.example"],
                               "dkim_keys": {"fax2024._domainkey.mail.greenfax.com": record,
                                             "fax2024._domainkey.fax-partner.example": record}})
    code, _fax = await submitted_fax(gw, sandbox)

    def report(n: int, sender: str) -> bytes:
        return plaintext_report(status="SUCCESS", number=NUMBER, code=None, reference=f"92{n}")\
            .replace(b"noreply@greenfax.com", sender.encode())

    # Signed by a trusted domain, but not the From's: a signature any customer of that domain could make.
    misaligned = signed(report(1, "noreply@greenfax.com"), key, "fax-partner.example")
    assert await deliver(status_port(gw), misaligned) == "250 2.0.0 Status report unmatched"
    # Signed by a subdomain of the From's domain: aligned (DMARC's relaxed mode).
    aligned = signed(report(2, "noreply@greenfax.com"), key, "mail.greenfax.com")
    assert await deliver(status_port(gw), aligned) == f"250 2.0.0 Status report applied for {code}"


async def test_a_bounce_changes_a_job_only_with_the_jobs_secret(gateway, sandbox):
    gw = await gateway(status=LISTENER)
    code, fax = await submitted_fax(gw, sandbox)
    secret = gw.secret(code)
    assert fax.envelope_sender == verp(code, secret)

    for label, rcpt in (("code alone", verp(code, None)), ("wrong secret", verp(code, "a" * 16))):
        reply = await deliver(status_port(gw), dsn(to=rcpt), sender="", rcpt=rcpt)
        assert reply == "250 2.0.0 Status report unmatched", label
        assert gw.job(code)["state"] == "submitted", label
    assert [r["note"] for r in reports(gw)] == [
        f"untrusted report names {code} but carries no job secret (kept for review: `faxgw match`)",
        f"untrusted report names {code} but carries a wrong job secret (kept for review)",
    ]

    rcpt = verp(code, secret)
    assert await deliver(status_port(gw), dsn(to=rcpt), sender="", rcpt=rcpt) == (
        f"250 2.0.0 Status report applied for {code}")
    job = gw.job(code)
    assert (job["state"], job["reason"]) == ("failed", "bounced")


async def test_a_dsn_quoting_our_message_id_is_ours_and_one_quoting_the_subject_tag_is_not(gateway, sandbox):
    """Some MTAs bounce to the From (the account sender): only our Message-ID, with the secret, proves it."""
    gw = await gateway(status=LISTENER)
    code, fax = await submitted_fax(gw, sandbox)
    by_subject = dsn(to=ACCOUNT_SENDER, returned_subject=f"[{code}] Invoice 4711")
    assert await deliver(status_port(gw), by_subject, sender="") == "250 2.0.0 Status report unmatched"
    assert gw.job(code)["state"] == "submitted"

    message_id = next(line for line in fax.raw.split(b"\r\n") if line.lower().startswith(b"message-id:"))
    by_message_id = dsn(to=ACCOUNT_SENDER).replace(b"Content-Type: text/rfc822-headers\r\n\r\n",
                                                    b"Content-Type: text/rfc822-headers\r\n\r\n" + message_id + b"\r\n")
    assert await deliver(status_port(gw), by_message_id, sender="") == f"250 2.0.0 Status report applied for {code}"
    assert gw.job(code)["state"] == "failed"


async def test_an_untrusted_report_never_turns_delivered_into_failed(gateway, sandbox):
    gw = await gateway(status={**LISTENER, "require_dkim": False, "trusted_networks": ["127.0.0.0/8"],
                               "trusted_sender_domains": ["sandbox.greenfax.localhost"]})
    code, fax = await submitted_fax(gw, sandbox)
    assert await deliver(status_port(gw), status_email(fax, ACCOUNT_SENDER)) == (
        f"250 2.0.0 Status report applied for {code}")
    assert gw.job(code)["state"] == "delivered"

    rcpt = verp(code, gw.secret(code))  # even with the job's secret: a bounce after the fax went through
    reply = await deliver(status_port(gw), dsn(to=rcpt), sender="", rcpt=rcpt)

    assert reply == "250 2.0.0 Status report unmatched"
    job = gw.job(code)
    assert job["state"] == "delivered" and notifications(gw, code) == 0
    assert reports(gw)[-1]["note"] == f"untrusted report names {code}, which is not waiting for a result"


async def test_the_job_secret_is_never_shown(gateway, sandbox, tmp_path):
    gw: RunningGateway = await gateway(status=LISTENER)
    code, _fax = await submitted_fax(gw, sandbox)
    secret = gw.secret(code)
    shown = faxgw(gw, tmp_path, "show", code, "--json")
    assert shown.returncode == 0 and code in shown.stdout
    listing = faxgw(gw, tmp_path, "status", "--json")
    assert secret not in shown.stdout + shown.stderr + listing.stdout + listing.stderr
    assert secret not in json.dumps(gw.job(code))


# --- a real signature, misused ----------------------------------------------------------------------


async def test_a_signed_report_with_a_field_above_the_signed_one_is_not_trusted(gateway, sandbox):
    """The parser reads the first Subject, DKIM covers the last: a prepended Subject could name any job."""
    key, record = rsa_key()
    gw = await gateway(status={**LISTENER, "dkim_keys": {"fax2024._domainkey.greenfax.com": record}})
    victim, _fax = await submitted_fax(gw, sandbox)
    genuine = signed(plaintext_report(status="FAILED - LINE BUSY", number="13125550123", code=None,
                                      reference="5001"), key)
    forged = f"Subject: GreenFax Delivery Report - Your reference: {victim}\r\n".encode() + genuine
    assert await deliver(status_port(gw), forged, sender="noreply@greenfax.com") == (
        "250 2.0.0 Status report unmatched")
    assert gw.job(victim)["state"] == "submitted"


async def test_a_signed_report_for_another_customer_replayed_to_us_is_not_trusted(gateway, sandbox):
    key, record = rsa_key()
    gw = await gateway(status={**LISTENER, "dkim_keys": {"fax2024._domainkey.greenfax.com": record}})
    code, _fax = await submitted_fax(gw, sandbox)
    theirs = plaintext_report(status="FAILED - NO ANSWER", number=NUMBER, code=None, reference="5002")\
        .replace(f"To: {ACCOUNT_SENDER}".encode(), b"To: faxes@other-customer.example")
    assert await deliver(status_port(gw), signed(theirs, key), sender="noreply@greenfax.com") == (
        "250 2.0.0 Status report unmatched")
    assert gw.job(code)["state"] == "submitted"


def test_partial_and_piled_up_signatures_do_not_make_mail_trusted(tmp_path):
    import dkim as dkimpy
    from conftest import settings_for

    from gateway.status.inbound import StatusMail
    from gateway.status.mailrules import load_rules

    key, record = rsa_key()
    status = StatusMail(settings_for(tmp_path, 9, status={"dkim_keys": {"fax2024._domainkey.greenfax.com": record}}),
                        RulesInForce(mail=load_rules()))
    report = plaintext_report(status="SUCCESS", number=NUMBER, code=None, reference="5003")
    assert status.trust_checks(signed(report, key))[0]
    headers = [b"from", b"to", b"subject", b"date", b"message-id", b"content-type", b"mime-version"]
    partial = dkimpy.sign(report, b"fax2024", b"greenfax.com", key, include_headers=headers, length=True)
    assert not status.trust_checks(partial + report + b"Appended by anyone.\r\n")[0]
    unsigned_subject = dkimpy.sign(report, b"fax2024", b"greenfax.com", key, include_headers=[b"from", b"to"])
    ok, checks = status.trust_checks(unsigned_subject + report)
    assert not ok and "unsigned" in checks[-1] and "subject" in checks[-1]
    piled = b"".join(f"DKIM-Signature: v=1; a=rsa-sha256; d=greenfax.com; s=s{n}; h=from; bh=x; b=y\r\n".encode()
                     for n in range(6)) + signed(report, key)
    ok, checks = status.trust_checks(piled)
    assert not ok and "more than 5 DKIM signatures" in checks[-1]


async def test_an_upstream_that_quotes_the_return_path_does_not_give_the_secret_away(gateway, tmp_path, caplog):
    """A 5xx to MAIL FROM often quotes the sender, which carries the job's secret: it is kept out of the
    job's history, /healthz, `faxgw show` and the log."""
    caplog.set_level(logging.DEBUG)
    refusals = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 quoting.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-quoting.test\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                sender = line.decode().partition("<")[2].partition(">")[0]
                refusals.append(sender)
                writer.write(f"553 5.7.1 <{sender}>: Sender address rejected: not owned by user\r\n".encode())
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 OK\r\n")
            await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        gw = await gateway(upstream_port=upstream.sockets[0].getsockname()[1])
        (code,) = codes_in((await gw.send()).message)
        secret = gw.secret(code)
        for _ in range(100):
            if gw.job(code)["state"] == "deferred":
                break
            await asyncio.sleep(0.05)
        assert refusals and secret in refusals[0]  # the upstream did see (and quote) it
        health = await gw.service.health()
        shown = faxgw(gw, tmp_path, "show", code, "--json").stdout
        assert "553 5.7.1" in json.dumps(gw.job(code)) and "553 5.7.1" in json.dumps(health)
        assert secret not in json.dumps(gw.job(code)) + json.dumps(health) + shown + caplog.text
    finally:
        upstream.close()
        await upstream.wait_closed()
