"""The HTTP face checked with a real HTTP client: Notify, the JSON API, health and metrics."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from conftest import ACCOUNT_SENDER, RunningGateway, codes_in, send, settings_for

from gateway import store
from gateway.errors import ConfigError
from gateway.sandbox.statusmail import status_email
from gateway.service import Service
from gateway.store.reports import reports_for_job

pytestmark = pytest.mark.timeout(60)
TOKEN = "n0tify-t0ken-4711"
OLD_TOKEN = "old-t0ken-0815"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def base(gw) -> str:
    host, port = gw.service.web.addresses["http"][0]
    return f"http://{host}:{port}"


async def submitted(gw, number: str = "12125551234") -> dict:
    (code,) = codes_in((await gw.send(rcpts=[f"{number}@greenfax.com"])).message)
    return await gw.wait_state(code, "submitted")


async def notify(http, gw, token: str = TOKEN, **params) -> aiohttp.ClientResponse:
    async with http.get(f"{base(gw)}/greenfax/notify/{token}", params=params) as response:
        await response.read()
        return response


async def test_valid_notify_reaches_a_final_state(gateway, sandbox, http):
    gw = await gateway(notify={"token": [TOKEN, OLD_TOKEN]})
    job = await submitted(gw)
    response = await notify(http, gw, result="success", timestamp="01/10/2005 02:10:25 PM EST (GMT-5)",
                            destination="12125551234", pages="2", duration="78", userjobcode=job["code"],
                            greenfaxreferenceid="8591334", cost="0.20")
    assert response.status == 200
    done = gw.job(job["code"])
    assert done["state"] == "delivered" and done["pages"] == 2 and done["reference_id"] == "8591334"
    assert done["reported_at"] == "2005-01-10T19:10:25.000000Z"  # GMT-5 wins over "EST"
    assert done["events"][-1]["source"] == "notify"
    # The old token still works while it is being rotated out.
    other = await submitted(gw, "13125550123")
    assert (await notify(http, gw, OLD_TOKEN, result="busy", userjobcode=other["code"])).status == 200
    assert gw.job(other["code"])["state"] == "failed"


async def test_wrong_or_missing_token_is_404_and_changes_nothing(gateway, sandbox, http):
    gw = await gateway(notify={"token": TOKEN})
    job = await submitted(gw)
    for token in ("wrong", ""):
        response = await notify(http, gw, token, result="success", userjobcode=job["code"])
        assert response.status == 404
    assert gw.job(job["code"])["state"] == "submitted"


async def test_source_allowlist(gateway, sandbox, http):
    gw = await gateway(notify={"token": TOKEN, "allowed_networks": ["10.0.0.0/8"]})
    job = await submitted(gw)
    assert (await notify(http, gw, result="success", userjobcode=job["code"])).status == 404
    assert gw.job(job["code"])["state"] == "submitted"


async def test_missing_identifiers_get_400_naming_them(gateway, sandbox, http):
    gw = await gateway(notify={"token": TOKEN})
    async with http.get(f"{base(gw)}/greenfax/notify/{TOKEN}", params={"pages": "2"}) as response:
        text = await response.text()
    assert response.status == 400
    assert "result" in text and "userjobcode" in text and "destination" in text


async def test_missing_or_malformed_optional_fields_are_stored_raw(gateway, sandbox, http):
    gw = await gateway(notify={"token": TOKEN})
    job = await submitted(gw)
    response = await notify(http, gw, result="success", userjobcode=job["code"], pages="two", timestamp="soon")
    assert response.status == 200
    done = gw.job(job["code"])
    assert done["state"] == "delivered" and done["pages"] is None
    (report,) = reports_for_job(store.connect(gw.store_path, readonly=True), job["code"])
    assert report["reported_at"] is None


async def test_url_encoded_values_and_a_foreign_userjobcode(gateway, sandbox, http):
    gw = await gateway(notify={"token": TOKEN})
    job = await submitted(gw)
    await gw.wait_state(job["code"], "submitted")
    reference = sandbox.faxes[-1].reference_id
    url = (f"{base(gw)}/greenfax/notify/{TOKEN}?result=success&userjobcode=Model%3Apk"
           f"&greenfaxreferenceid={reference}&timestamp=01%2F10%2F2005%2002%3A10%3A25%20PM%20EST%20%28GMT-5%29")
    async with http.get(url) as response:
        assert response.status == 200
    # userjobcode=Model:pk is not ours: the reference id is unknown to us, so the report is unmatched.
    assert gw.job(job["code"])["state"] == "submitted"


async def test_unknown_result_is_unmatched_never_failed(gateway, sandbox, http):
    gw = await gateway(notify={"token": TOKEN})
    job = await submitted(gw)
    assert (await notify(http, gw, result="partially-sent", userjobcode=job["code"])).status == 200
    assert gw.job(job["code"])["state"] == "submitted"


async def test_repeated_call_is_a_no_op(gateway, sandbox, http):
    gw = await gateway(notify={"token": TOKEN})
    job = await submitted(gw)
    for _ in range(3):
        assert (await notify(http, gw, result="busy", userjobcode=job["code"])).status == 200
    events = [e for e in gw.job(job["code"])["events"] if e["source"] == "notify"]
    assert len(events) == 1


async def test_notify_and_status_mail_for_the_same_job(gateway, sandbox, http):
    """One final state; both reports recorded as events (the second changes nothing)."""
    # The sandbox's status mail is trusted from this machine here (as from the site's MX).
    gw = await gateway(notify={"token": TOKEN}, smtp={"listen": ["127.0.0.1:0"]},
                       status={"listen": ["127.0.0.1:0"], "trusted_sender_domains": ["sandbox.greenfax.localhost"],
                               "require_dkim": False, "trusted_networks": ["127.0.0.0/8"]})
    job = await submitted(gw)
    assert (await notify(http, gw, result="success", userjobcode=job["code"], pages="1")).status == 200
    fax = sandbox.faxes[-1]
    host, port = gw.service.status_addresses[0]
    reply = await send(port, status_email(fax, ACCOUNT_SENDER), rcpts=[ACCOUNT_SENDER],
                       sender="status@sandbox.greenfax.localhost")
    assert "duplicate" in reply.message
    done = gw.job(job["code"])
    assert done["state"] == "delivered"
    sources = [e["source"] for e in done["events"]]
    assert "notify" in sources and "email-smtp" in sources


async def test_token_absent_from_every_log_line(gateway, sandbox, http, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await gateway(notify={"token": TOKEN})
    job = await submitted(gw)
    await notify(http, gw, result="success", userjobcode=job["code"])
    await notify(http, gw, "bad-token", result="success")
    await asyncio.sleep(0.1)
    assert "/greenfax/notify/********" in caplog.text
    assert TOKEN not in caplog.text


async def test_api_lists_and_shows_jobs(gateway, sandbox, http):
    gw = await gateway()
    job = await submitted(gw)
    async with http.get(f"{base(gw)}/api/jobs", params=[("state", "submitted"), ("state", "queued")]) as r:
        jobs = await r.json()
    assert r.status == 200 and [j["code"] for j in jobs] == [job["code"]]
    assert {"code", "number", "sender", "state", "created_at", "updated_at", "last_result"} <= set(jobs[0])
    async with http.get(f"{base(gw)}/api/jobs/{job['code']}") as r:
        one = await r.json()
    assert one["code"] == job["code"] and [e["state"] for e in one["events"]][:2] == ["queued", "sending"]
    async with http.get(f"{base(gw)}/api/jobs", params={"since": "yesterdayish"}) as r:
        assert r.status == 400 and "since" in (await r.json())["error"]
    async with http.get(f"{base(gw)}/api/jobs/FXNOSUCH") as r:
        assert r.status == 404


async def test_api_needs_a_bearer_token_beyond_loopback(tmp_path, sandbox, http):
    with pytest.raises(ConfigError, match="api_token"):
        settings_for(tmp_path, sandbox.port, http={"listen": ["0.0.0.0:0"]})
    settings = settings_for(tmp_path, sandbox.port, http={"listen": ["0.0.0.0:0"], "api_token": "api-s3cret"})
    service = Service(settings)
    await service.start()
    try:
        gw = RunningGateway(service, settings)
        port = service.web.addresses["http"][0][1]
        async with http.get(f"http://127.0.0.1:{port}/api/jobs") as r:
            assert r.status == 401
        async with http.get(f"http://127.0.0.1:{port}/api/jobs", headers={"Authorization": "Bearer api-s3cret"}) as r:
            assert r.status == 200
        assert gw.port
    finally:
        await service.stop()


async def test_health_names_the_failing_part(gateway, sandbox, http):
    gw = await gateway()
    async with http.get(f"{base(gw)}/healthz") as r:
        health = await r.json()
    assert r.status == 200 and health["status"] == "ok" and health["store"]["writable"]
    sandbox.handler.credentials = ("gw", "pw-1")  # the upstream now demands AUTH the gateway cannot give
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "deferred")
    async with http.get(f"{base(gw)}/healthz") as r:
        health = await r.json()
    assert r.status == 503 and any(part.startswith("upstream:") for part in health["failing"])


async def test_metrics_are_prometheus_text_with_bounded_labels(gateway, sandbox, http):
    gw = await gateway()
    await submitted(gw)
    try:
        await gw.send(rcpts=["someone@example.com"])
    except Exception:
        pass
    async with http.get(f"{base(gw)}/metrics") as r:
        text = await r.text()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert "faxgw_messages_accepted_total 1.0" in text
    assert 'faxgw_messages_refused_total{reason="relay"} 1.0' in text
    assert 'faxgw_jobs{state="submitted"} 1.0' in text
    assert 'faxgw_forward_attempts_total{outcome="submitted"} 1.0' in text
    assert "faxgw_queue_depth 0.0" in text and "faxgw_queue_oldest_age_seconds" in text
    assert "12125551234" not in text and "legacy.example" not in text
