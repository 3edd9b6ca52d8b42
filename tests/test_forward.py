"""The outbound path end to end: gateway and sandbox on loopback, what arrives is checked byte for byte."""

from __future__ import annotations

import email
import email.policy

from conftest import ACCOUNT_SENDER, NUMBER, codes_in, fax_message, pdf_bytes

from gateway.outbound import mimeparse


async def test_pdf_fax_is_forwarded_with_body_bytes_unchanged(gateway, sandbox):
    gw = await gateway()
    original = fax_message(pdf=pdf_bytes(3), extra_headers={"Cc": "boss@legacy.example", "Message-ID": "<orig@x>"})
    reply = await gw.send(original)
    (code,) = codes_in(reply.message)
    assert reply.code == 250 and reply.message.startswith(f"2.0.0 queued as {code}")

    (fax,) = await sandbox.wait_for(1)
    job = await gw.wait_state(code, "submitted")
    assert fax.code == code
    assert fax.pages == 3 and fax.result == "delivered"
    # Envelope: the return path carries the job code and its secret; the recipient is the one number.
    secret = gw.secret(code)
    assert len(secret) == 16 and fax.envelope_sender == f"fax-bounce+{code}.{secret}@gw.office.example"
    assert fax.number == NUMBER
    # Body bytes as received, headers rewritten as DESIGN.md says.
    assert mimeparse.split(fax.raw)[1] == mimeparse.split(original)[1]
    forwarded = email.message_from_bytes(fax.raw, policy=email.policy.default)
    assert forwarded["From"] == ACCOUNT_SENDER
    assert forwarded["Reply-To"] == "erp@legacy.example"
    assert forwarded["To"] == f"{NUMBER}@greenfax.com"
    assert forwarded["Subject"] == f"[{code}] Invoice 4711"
    assert forwarded["Cc"] is None and forwarded["Bcc"] is None
    assert forwarded["Message-ID"] == f"<{code}.{secret}.1@gw.test>"  # the secret proves a bounce quoting it ours
    assert forwarded.get_all("Received")[0].startswith("by gw.test (greenfax-gateway) with ESMTP id " + code)
    assert job["upstream_reply"].startswith("250 2.0.0 Ok: queued as")
    assert [e["state"] for e in job["events"]] == ["queued", "sending", "submitted"]


async def test_one_job_per_recipient(gateway, sandbox):
    gw = await gateway()
    reply = await gw.send(rcpts=[f"{NUMBER}@greenfax.com", "2125550123@fax.localhost", "+1-312-555-0123@fax.localhost"])
    codes = codes_in(reply.message)
    assert len(codes) == 3
    faxes = await sandbox.wait_for(3)
    assert sorted(f.number for f in faxes) == ["12125550123", NUMBER, "13125550123"]
    assert sorted(f.code for f in faxes) == sorted(codes)
    for fax in faxes:  # each copy is addressed to its own number only
        assert email.message_from_bytes(fax.raw)["To"] == f"{fax.number}@greenfax.com"
