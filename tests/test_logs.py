"""Logs of a real `faxgw serve` process: structured lines, and nothing private in them."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import subprocess
import sys

import aiosmtplib
import pytest
from conftest import codes_in, fax_message, free_port
from peers.gatewayproc import wait_listening

from gateway.outbound.passwords import hash_password

pytestmark = pytest.mark.timeout(60)

SUBJECT = "Confidential lab results for Jane Roe"
BODY = "Patient Jane Roe, date of birth 1970-01-01"
FILENAME = "jane-roe-results.pdf"
CLIENT_PASSWORD = "client-pw-9f3k2"
UPSTREAM_PASSWORD = "upstream-pw-7x1q8"


async def test_log_lines_carry_codes_and_replies_but_no_content_or_secrets(tmp_path):
    smtp_port, sandbox_port = free_port(), free_port()
    config = tmp_path / "faxgw.toml"
    config.write_text(f"""
[http]
listen = ["127.0.0.1:0"]

[smtp]
listen = ["127.0.0.1:{smtp_port}"]
plaintext_auth = ["127.0.0.1:{smtp_port}"]
allowed_networks = ["10.0.0.0/8"]
[smtp.users]
scanner = "{hash_password(CLIENT_PASSWORD)}"

[sandbox]
enabled = true
listen = ["127.0.0.1:{sandbox_port}"]
username = "gw"
password = "{UPSTREAM_PASSWORD}"
""")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "serve"],
                            cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        await wait_listening(smtp_port, proc)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, start_tls=False) as smtp:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await smtp.login("scanner", "wrong-password-1")
            await smtp.login("scanner", CLIENT_PASSWORD)
            message = fax_message(subject=SUBJECT, body=BODY, filename=FILENAME)
            _errors, reply = await smtp.sendmail("scanner@legacy.example", ["12125551234@greenfax.com"], message)
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                await smtp.sendmail("scanner@legacy.example", ["someone@example.com"], message)
        (code,) = codes_in(reply)
        assert "SANDBOX" in reply
        await asyncio.sleep(1.0)  # let the forwarder log its attempt
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    log = err.decode()

    assert proc.returncode == 0, log
    assert "SANDBOX" in log
    accepted = [line for line in log.splitlines() if "event=accepted" in line]
    forwarded = [line for line in log.splitlines() if "event=forward" in line]
    refused = [line for line in log.splitlines() if "event=refused" in line]
    assert len(accepted) == 1 and f"codes={code}" in accepted[0] and "client=127.0.0.1" in accepted[0]
    assert "reply=\"250 2.0.0 queued as" in accepted[0] and "user=scanner" in accepted[0]
    assert len(forwarded) == 1 and f"code={code}" in forwarded[0] and "number=+12125551234" in forwarded[0]
    assert "result=submitted" in forwarded[0]
    assert len(refused) == 1 and "check=relay" in refused[0] and "550 5.7.1" in refused[0]
    assert re.search(r"event=auth .*user=scanner .*result=failed", log)

    plain_blob = base64.b64encode(f"\0scanner\0{CLIENT_PASSWORD}".encode()).decode()
    for secret in (SUBJECT, "Jane Roe", BODY, FILENAME, CLIENT_PASSWORD, UPSTREAM_PASSWORD, plain_blob,
                   "wrong-password-1"):
        assert secret not in log, f"{secret!r} leaked into the log"
