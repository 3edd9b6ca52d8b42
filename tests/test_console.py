"""The web console over real HTTP: login, sessions, CSRF, roles, the proxy header, headers, bad input.

The gateway runs in-process with [web] enabled and forwards to the sandbox;
the client is aiohttp, handling cookies itself (the console's cookies are
Secure, which aiohttp's jar keeps to https). tests/test_console_browser.py
drives the same pages in a real Chromium.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from conftest import codes_in, fax_message

from gateway import store
from gateway.outbound.passwords import hash_password

pytestmark = pytest.mark.timeout(60)

PASSWORDS = {"olivia": "operator-pass-1", "victor": "viewer-pass-22"}


def add_users(path) -> None:
    conn = store.connect(path)
    try:
        store.set_web_user(conn, "olivia", "operator", hash_password(PASSWORDS["olivia"]), store.iso(store.utcnow()))
        store.set_web_user(conn, "victor", "viewer", hash_password(PASSWORDS["victor"]), store.iso(store.utcnow()))
    finally:
        conn.close()


@dataclass
class Browser:
    """An HTTP client that keeps the console's cookies as a browser on http://127.0.0.1 would."""

    base: str
    cookies: dict[str, str] = field(default_factory=dict)

    async def request(self, method: str, path: str, *, data: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, Any]]:
        sent = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items()), **(headers or {})}
        async with aiohttp.ClientSession() as session, session.request(
                method, self.base + path, data=data, headers=sent, allow_redirects=False) as response:
            for name, morsel in response.cookies.items():
                if morsel.value == "" or morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
            return response.status, await response.text(), dict(response.headers)

    async def get(self, path: str, **kw: Any) -> tuple[int, str, dict[str, Any]]:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> tuple[int, str, dict[str, Any]]:
        return await self.request("POST", path, data=data, **kw)

    async def login(self, user: str, password: str | None = None) -> tuple[int, str, dict[str, Any]]:
        _status, page, _headers = await self.get("/login")
        return await self.post("/login", {"csrf": csrf_of(page), "user": user,
                                          "password": password or PASSWORDS[user], "next": "/"})


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match[1]


@pytest.fixture
async def console(gateway, tmp_path):
    async def start(**web: Any):
        gw = await gateway(web={"enabled": True, **web}, limits={"auth_failure_delay": 0.05,
                                                                 "auth_failure_delay_max": 0.2})
        add_users(gw.store_path)
        host, port = gw.service.web.addresses["http"][0]
        return gw, Browser(f"http://{host}:{port}")
    return start


async def test_login_sets_a_strict_secure_session_cookie_and_shows_the_jobs(console):
    gw, browser = await console()
    (code,) = codes_in((await gw.send()).message)
    status, _page, headers = await browser.login("victor")
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "faxgw_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, page, headers = await browser.get("/")
    assert status == 200 and code in page and "victor (viewer)" in page
    assert headers["Cache-Control"] == "no-store"


async def test_pages_need_a_login_and_come_back_to_the_page_asked_for(console):
    gw, browser = await console()
    (code,) = codes_in((await gw.send()).message)
    status, _page, headers = await browser.get(f"/jobs/{code}")
    assert status == 303 and headers["Location"] in (f"/login?next=%2Fjobs%2F{code}", f"/login?next=/jobs/{code}")
    _status, page, _headers = await browser.get(headers["Location"])
    status, _page, headers = await browser.post("/login", {"csrf": csrf_of(page), "user": "victor",
                                                           "password": PASSWORDS["victor"], "next": f"/jobs/{code}"})
    assert headers["Location"] == f"/jobs/{code}"
    _status, page, _headers = await browser.get("/login?next=//evil.example/")
    status, _page, headers = await browser.post("/login", {"csrf": csrf_of(page), "user": "victor",
                                                           "password": PASSWORDS["victor"], "next": "//evil.example/"})
    assert headers["Location"] == "/"  # never a redirect off the site


async def test_a_wrong_password_is_refused_and_slowed_and_the_store_keeps_no_cookie(console):
    gw, browser = await console()
    status, page, _headers = await browser.login("victor", "not-the-password")
    assert status == 401 and "Wrong user name or password" in page and "faxgw_session" not in browser.cookies
    status, _page, _headers = await browser.login("nobody", "whatever-else")
    assert status == 401
    assert len(gw.service.web.console.throttle) >= 2  # failures counted per client and user
    await browser.login("olivia")
    cookie = browser.cookies["faxgw_session"]
    conn = store.connect(gw.store_path, readonly=True)
    try:
        stored = [row[0] for row in conn.execute("SELECT digest FROM web_sessions")]
    finally:
        conn.close()
    assert stored and cookie not in stored  # only a digest of the cookie is kept


async def test_failed_logins_are_counted_per_user_and_a_third_at_once_is_refused(console, caplog):
    import logging

    gw, first = await console()
    caplog.set_level(logging.INFO, logger="faxgw.web")
    for _ in range(3):
        status, _page, _headers = await first.login("victor", "wrong-password-x")
        assert status == 401
    counts = [int(m) for m in re.findall(r"event=web-login .*result=failed failures=(\d+)", caplog.text)]
    assert counts == [1, 2, 3]  # each failure answered later than the last (the SMTP AUTH throttle)
    assert "wrong-password-x" not in caplog.text
    # Guessing one user's password from many connections at once: two are checked, the others refused.
    browsers = [Browser(first.base) for _ in range(4)]
    answers = await asyncio.gather(*(b.login("victor", f"guess-number-{n}") for n, b in enumerate(browsers)))
    statuses = sorted(status for status, _page, _headers in answers)
    assert statuses.count(429) >= 1 and set(statuses) <= {401, 429}
    assert any("Too many logins for this user at once" in page for _s, page, _h in answers)
    status, _page, _headers = await first.login("victor")
    assert status == 303  # the right password still works once the guesses are answered


async def test_forms_without_the_csrf_token_or_from_another_site_are_refused(console):
    gw, browser = await console()
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "delivered", "submitted")
    # The login form itself: a POST without the token from its page.
    status, page, _headers = await browser.post("/login", {"user": "olivia", "password": PASSWORDS["olivia"]})
    assert status == 403 and "Refused" in page
    await browser.login("olivia")
    _status, page, _headers = await browser.get(f"/jobs/{code}")
    status, page, _headers = await browser.post(f"/jobs/{code}/cancel", {"csrf": "forged", "reason": "x"})
    assert status == 403 and "security token did not match" in page
    _status, page, _headers = await browser.get("/")
    status, page, _headers = await browser.post("/logout", {"csrf": csrf_of(page)},
                                                headers={"Origin": "http://evil.example"})
    assert status == 403 and "from another site" in page
    assert (await browser.get("/"))[0] == 200  # still logged in: nothing was done


async def test_an_operator_acts_with_a_reason_a_viewer_is_refused_and_both_are_audited(console, sandbox):
    sandbox.handler.faults.drop_after_data = True  # the upstream drops after the data: the job is unknown
    gw, olivia = await console()
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "unknown")
    sandbox.handler.faults.drop_after_data = False

    victor = Browser(olivia.base)
    await victor.login("victor")
    _status, page, _headers = await victor.get(f"/jobs/{code}")
    assert 'id="unknown"' in page and "never resends an unknown fax" in page and 'id="actions"' not in page
    status, page, _headers = await victor.post(f"/jobs/{code}/retry", {"csrf": csrf_of(page), "reason": "x"})
    assert status == 403 and "victor is a viewer" in page
    assert gw.job(code)["state"] == "unknown"

    await olivia.login("olivia")
    _status, page, _headers = await olivia.get(f"/jobs/{code}")
    assert 'id="do-retry"' in page and 'id="do-cancel"' in page
    token = csrf_of(page)
    status, page, _headers = await olivia.post(f"/jobs/{code}/retry", {"csrf": token, "reason": ""})
    assert status == 400 and "A reason is needed" in page
    status, _page, headers = await olivia.post(f"/jobs/{code}/retry", {"csrf": token,
                                                                      "reason": "GreenFax has no record of it"})
    assert status == 303 and headers["Location"] == f"/jobs/{code}"
    job = await gw.wait_state(code, "submitted", "delivered")
    event = [e for e in job["events"] if e["source"] == "web:olivia"]
    assert event and event[0]["detail"] == "retry (was unknown): GreenFax has no record of it"
    _status, page, _headers = await olivia.get(f"/jobs/{code}")
    audit = page.split('id="audit"', 1)[1]
    assert "olivia: retry (GreenFax has no record of it)" in audit and "victor: view" in audit


async def test_logout_and_idle_and_removed_users_end_the_session(console, tmp_path):
    gw, browser = await console(session_idle=1)
    await browser.login("victor")
    stolen = dict(browser.cookies)
    _status, page, _headers = await browser.get("/")
    await browser.post("/logout", {"csrf": csrf_of(page)})
    thief = Browser(browser.base, stolen)  # the cookie, copied before the logout
    assert (await thief.get("/"))[0] == 303  # the session is gone on the server, not only in the browser

    await browser.login("victor")
    assert (await browser.get("/"))[0] == 200
    await asyncio.sleep(1.5)  # longer than session_idle
    status, _page, headers = await browser.get("/")
    assert status == 303 and headers["Location"].startswith("/login")

    await browser.login("olivia")
    assert (await browser.get("/"))[0] == 200
    result = subprocess.run([sys.executable, "-m", "gateway", "--config", str(write_config(gw, tmp_path)),
                             "web-user", "remove", "olivia"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (await browser.get("/"))[0] == 303


def write_config(gw, tmp_path):
    import tomli_w

    path = tmp_path / "console.toml"
    path.write_text(tomli_w.dumps({"store": {"path": str(gw.store_path)}, "sandbox": {"enabled": True}}))
    return path


async def test_the_proxy_header_counts_only_from_a_trusted_proxy(console):
    gw, browser = await console(trusted_proxies=["127.0.0.1/32"])
    status, page, _headers = await browser.get("/", headers={"X-Remote-User": "olivia"})
    assert status == 200 and "olivia (operator)" in page
    status, page, _headers = await browser.get("/", headers={"X-Remote-User": "mallory"})
    assert status == 403 and "faxgw web-user add mallory" in page

    await gw.service.stop()
    _gw, other = await console(trusted_proxies=["192.0.2.10/32"])  # we are not that proxy
    status, _page, headers = await other.get("/", headers={"X-Remote-User": "olivia"})
    assert status == 303 and headers["Location"].startswith("/login")


async def test_security_headers_on_every_console_page(console):
    _gw, browser = await console()
    for path in ("/login", "/static/console.js", "/jobs/FXNOSUCH"):
        _status, _page, headers = await browser.get(path)
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    _status, page, _headers = await browser.get("/login")
    assert "<script>" not in page  # the one script is a file of the package
    assert not re.search(r"<[^>]+\son[a-z]+=", page)  # no inline event handlers either


@pytest.mark.parametrize("path, status, words", [
    ("/jobs/FXNOSUCH", 404, "There is no job with code"),
    ("/?state=lost", 400, "is not a job state"),
    ("/?since=2026-13-45", 400, "since"),
    ("/?number=hello", 400, "number"),
    ("/static/../../etc/passwd", 404, ""),
])
async def test_bad_input_gets_a_page_that_says_what_was_wrong(console, path, status, words):
    _gw, browser = await console()
    await browser.login("victor")
    got, page, headers = await browser.get(path)
    assert got == status and words in page and "Traceback" not in page
    assert headers.get("Content-Type", "").startswith("text/html")


async def test_the_job_list_filters_and_pages_by_keyset(console):
    gw, browser = await console()
    codes = [codes_in((await gw.send()).message)[0] for _ in range(3)]
    (other,) = codes_in((await gw.send(rcpts=["13125550142@greenfax.com"])).message)
    await browser.login("victor")
    _status, page, _headers = await browser.get("/?number=%2B1+312+555+0142")
    assert other in page and not any(code in page for code in codes)
    import gateway.http.console as console_module

    console_module.PAGE_SIZE, saved = 2, console_module.PAGE_SIZE
    try:
        _status, first, _headers = await browser.get("/")
        older = re.search(r'href="(/\?before=FX[0-9A-Z]+)" id="older"', first)[1]
        _status, second, _headers = await browser.get(older.replace("&amp;", "&"))
    finally:
        console_module.PAGE_SIZE = saved
    newest_first = [other, *reversed(codes)]
    assert [c for c in newest_first if c in first] == newest_first[:2]
    assert [c for c in newest_first if c in second] == newest_first[2:]


def test_the_console_beyond_loopback_needs_tls_or_a_trusted_proxy(tmp_path):
    from gateway import config
    from gateway.errors import ConfigError

    base = {"sandbox": {"enabled": True}, "http": {"listen": ["0.0.0.0:8025"], "api_token": "t" * 20}}
    with pytest.raises(ConfigError, match="web.enabled = true with \\[http\\] listening beyond loopback needs TLS"):
        config.validate({**base, "web": {"enabled": True}}, source="t", base=tmp_path)
    config.validate({**base, "web": {"enabled": True, "trusted_proxies": ["10.0.0.5/32"]}}, source="t", base=tmp_path)
    config.validate(base, source="t", base=tmp_path)  # the console off: the API alone is as before


def test_web_user_add_reads_the_password_from_standard_input(tmp_path):
    import tomli_w

    path = tmp_path / "faxgw.toml"
    path.write_text(tomli_w.dumps({"sandbox": {"enabled": True}, "store": {"path": str(tmp_path / "s.sqlite3")}}))
    run = lambda *args, stdin="": subprocess.run(  # noqa: E731
        [sys.executable, "-m", "gateway", "--config", str(path), "web-user", *args], input=stdin,
        capture_output=True, text=True, timeout=30)
    added = run("add", "frontdesk", "--role", "viewer", stdin="a-long-enough-password\n")
    assert added.returncode == 0 and "added frontdesk (viewer)" in added.stdout, added.stderr
    assert "a-long-enough-password" not in added.stdout + added.stderr
    short = run("add", "x", "--role", "operator", stdin="short\n")
    assert short.returncode == 1 and "at least 10 characters" in short.stderr
    listed = run("list")
    assert "frontdesk" in listed.stdout and "viewer" in listed.stdout
    conn = store.connect(tmp_path / "s.sqlite3", readonly=True)
    try:
        role, stored = store.web_user(conn, "frontdesk")
    finally:
        conn.close()
    assert role == "viewer" and stored.startswith("$argon2")
    assert run("remove", "nobody").returncode == 1


NOTIFY_TOKEN = "notify-token-for-console-tests"


@pytest.fixture
async def console_with_notify(gateway):
    async def start():
        gw = await gateway(web={"enabled": True}, notify={"token": NOTIFY_TOKEN})
        add_users(gw.store_path)
        host, port = gw.service.web.addresses["http"][0]
        return gw, Browser(f"http://{host}:{port}")
    return start


async def delivered(gw, *, pages: str, cost: str, sender: str = "erp@legacy.example") -> str:
    (code,) = codes_in((await gw.send(fax_message(sender=sender), sender=sender)).message)
    await gw.wait_state(code, "submitted")
    assert await gw.notify(NOTIFY_TOKEN, result="Success", userjobcode=code, pages=pages, cost=cost,
                        greenfaxreferenceid=str(abs(hash(code)) % 10**8), destination="12125551234") == 200
    await gw.wait_state(code, "delivered")
    return code


async def test_an_unmatched_report_is_linked_to_a_candidate_job_by_an_operator_only(console_with_notify):
    gw, olivia = await console_with_notify()
    code = await delivered(gw, pages="1", cost="0.07")
    # A second report for that number with a reference nobody knows: no job waits for it.
    assert await gw.notify(NOTIFY_TOKEN, result="Busy", destination="12125551234", greenfaxreferenceid="555000111") == 200
    victor = Browser(olivia.base)
    await victor.login("victor")
    _status, page, _headers = await victor.get("/unmatched")
    report_id = re.search(r'id="report-(\d+)"', page)[1]
    assert 'id="do-link' not in page  # a viewer sees no link button
    status, page, _headers = await victor.post(f"/unmatched/{report_id}", {"csrf": csrf_of(page), "code": code})
    assert status == 403

    await olivia.login("olivia")
    _status, page, _headers = await olivia.get("/unmatched")
    assert f'<option value="{code}">' in page  # the job to that number, offered as the candidate
    status, _page, headers = await olivia.post(f"/unmatched/{report_id}", {"csrf": csrf_of(page), "code": code})
    assert status == 303 and headers["Location"] == f"/jobs/{code}"
    assert any(f"status report #{report_id} linked by hand" in (e["detail"] or "") for e in gw.job(code)["events"])
    _status, page, _headers = await olivia.get("/unmatched")
    assert f'id="report-{report_id}"' not in page


async def test_the_queue_and_health_pages_say_what_the_gateway_says(console_with_notify, sandbox):
    gw, browser = await console_with_notify()
    sandbox.handler.faults.rcpt = "450 4.2.1 Try later (sandbox)"
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "deferred")
    await browser.login("victor")
    _status, page, _headers = await browser.get("/queue")
    row = page.split(f'data-code="{code}"', 1)[1].split("</tr>", 1)[0]
    assert "deferred" in row and "upstream deferred" in row and "next attempt" in row
    _status, page, _headers = await browser.get("/health")
    assert 'id="status">ok<' in page and "forwarder" in page


async def test_the_cost_report_and_its_csv_add_up_to_the_store(console_with_notify):
    gw, browser = await console_with_notify()
    await delivered(gw, pages="2", cost="0.14")
    await delivered(gw, pages="3", cost="0.21", sender="accounts@legacy.example")
    await delivered(gw, pages="1", cost="0.07")
    await browser.login("victor")
    status, page, _headers = await browser.get("/reports")
    assert status == 200 and 'id="chart"' in page
    assert 'id="total-pages">6<' in page and 'id="total-cost">0.42<' in page and 'id="total-faxes">3<' in page
    csv_link = re.search(r'href="(/reports\.csv\?[^"]+)"', page)[1].replace("&amp;", "&")
    status, text, headers = await browser.get(csv_link)
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    import csv
    from decimal import Decimal

    rows = list(csv.DictReader(text.splitlines()))
    conn = store.connect(gw.store_path, readonly=True)
    try:
        pages, costs = zip(*conn.execute("SELECT pages, cost FROM jobs").fetchall())
    finally:
        conn.close()
    assert sum(int(r["pages"]) for r in rows) == sum(pages) == 6
    assert sum(Decimal(r["cost (USD)"]) for r in rows) == sum(Decimal(c) for c in costs) == Decimal("0.42")
    by_sender = {r["sender"]: int(r["faxes"]) for r in rows}
    assert by_sender == {"erp@legacy.example": 2, "accounts@legacy.example": 1}
    status, page, _headers = await browser.get("/reports?since=2026-12-31&until=2026-01-01")
    assert status == 400 and "is after until" in page


async def test_the_job_page_shows_the_messages_facts_and_a_first_page_thumbnail(console):
    import io

    from PIL import Image

    gw, browser = await console()
    (pdf_job,) = codes_in((await gw.send(fax_message(subject="Lab results", filename="results.pdf"))).message)
    tiff = io.BytesIO()
    Image.new("L", (1728, 2200), 255).save(tiff, format="TIFF")
    (tiff_job,) = codes_in((await gw.send(fax_message(pdf=tiff.getvalue(), filename="scan.tif",
                                                      attachment_type=("image", "tiff")))).message)
    await browser.login("victor")
    _status, page, _headers = await browser.get(f"/jobs/{pdf_job}")
    assert 'id="subject">Lab results<' in page and "results.pdf (application/pdf" in page
    assert f'src="/jobs/{pdf_job}/thumbnail.png"' in page
    host, port = gw.service.web.addresses["http"][0]
    cookie = {"Cookie": f"faxgw_session={browser.cookies['faxgw_session']}"}
    for code in (pdf_job, tiff_job):
        async with aiohttp.ClientSession() as session, session.get(
                f"http://{host}:{port}/jobs/{code}/thumbnail.png", headers=cookie) as answer:
            assert answer.status == 200 and answer.headers["Content-Type"] == "image/png"
            png = await answer.read()
        picture = Image.open(io.BytesIO(png))
        assert png.startswith(b"\x89PNG") and picture.size[0] <= 360 and picture.size[1] > picture.size[0]


async def test_a_purged_message_has_no_thumbnail_and_the_page_says_so(console):
    gw, browser = await console()
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    conn = store.connect(gw.store_path)
    try:
        with conn:
            conn.execute("UPDATE messages SET raw = x'' WHERE id = (SELECT message_id FROM jobs WHERE code = ?)",
                         (code,))
    finally:
        conn.close()
    await browser.login("victor")
    _status, page, _headers = await browser.get(f"/jobs/{code}")
    assert 'id="purged"' in page and "thumbnail.png" not in page
    status, page, _headers = await browser.get(f"/jobs/{code}/thumbnail.png")
    assert status == 404 and "purged after the retention period" in page


async def test_billing_codes_from_the_subject_or_header_are_stored_shown_filtered_and_summed(console, sandbox):
    gw, browser = await console()
    (tagged,) = codes_in((await gw.send(fax_message(subject="Invoice 4711 [billing: ACME-42]"))).message)
    (headed,) = codes_in((await gw.send(fax_message(extra_headers={"X-Fax-Billing-Code": "MATTER/7"}))).message)
    (plain,) = codes_in((await gw.send()).message)
    await gw.wait_state(tagged, "submitted")
    assert [gw.job(c)["billing_code"] for c in (tagged, headed, plain)] == ["ACME-42", "MATTER/7", None]
    forwarded = next(f for f in sandbox.faxes if f.code == tagged).raw
    assert b"billing" not in forwarded.lower() and b"Invoice 4711" in forwarded  # GreenFax never sees it
    await browser.login("victor")
    _status, page, _headers = await browser.get(f"/jobs/{tagged}")
    assert 'id="billing">ACME-42<' in page
    _status, page, _headers = await browser.get("/?billing=MATTER%2F7")
    assert headed in page and tagged not in page and plain not in page
    _status, text, _headers = await browser.get("/reports.csv")
    assert {line.split(",")[2] for line in text.splitlines()[1:]} == {"ACME-42", "MATTER/7", ""}


async def test_a_required_billing_code_is_asked_for_at_data(gateway):
    import aiosmtplib

    gw = await gateway(addressing={"content": {"require_billing_code": True}})
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await gw.send()
    assert refused.value.code == 550 and "[billing: CODE] in the subject" in refused.value.message
    assert "X-Fax-Billing-Code: CODE" in refused.value.message
    (code,) = codes_in((await gw.send(fax_message(subject="Scan [billing: 0042]"))).message)
    assert gw.job(code)["billing_code"] == "0042"


async def test_a_final_job_has_a_one_page_transmission_report(console_with_notify):
    import io

    from pypdf import PdfReader

    gw, browser = await console_with_notify()
    (waiting,) = codes_in((await gw.send()).message)
    await gw.wait_state(waiting, "submitted")
    code = await delivered(gw, pages="2", cost="0.14")
    await browser.login("victor")
    status, page, _headers = await browser.get(f"/jobs/{waiting}/report.pdf")
    assert status == 409 and "once the fax is delivered" in page  # not final yet
    _status, page, _headers = await browser.get(f"/jobs/{code}")
    assert f'href="/jobs/{code}/report.pdf"' in page
    host, port = gw.service.web.addresses["http"][0]
    async with aiohttp.ClientSession() as session, session.get(
            f"http://{host}:{port}/jobs/{code}/report.pdf",
            headers={"Cookie": f"faxgw_session={browser.cookies['faxgw_session']}"}) as answer:
        assert answer.status == 200 and answer.headers["Content-Type"] == "application/pdf"
        document = PdfReader(io.BytesIO(await answer.read()))
    assert len(document.pages) == 1
    text = document.pages[0].extract_text()
    for words in (code, "DELIVERED", "+12125551234", "0.14 USD", "Fax transmission report"):
        assert words in text, words
    assert document.pages[0].images  # the first page's thumbnail


async def test_the_search_box_finds_a_job_by_code_reference_billing_code_number_or_sender(console_with_notify):
    gw, browser = await console_with_notify()
    code = await delivered(gw, pages="1", cost="0.07", sender="front_desk@clinic.example")
    (billed,) = codes_in((await gw.send(fax_message(to="13125550123@greenfax.com",
                                                    subject="Scan [billing: MATTER-9]"),
                                        rcpts=["13125550123@greenfax.com"])).message)
    (other,) = codes_in((await gw.send(fax_message(sender="frontXdesk@clinic.example"),
                                       sender="frontXdesk@clinic.example")).message)
    await gw.wait_state(billed, "submitted")
    reference = gw.job(code)["reference_id"]
    assert reference
    await browser.login("victor")

    async def found(text: str) -> set[str]:
        status, page, _headers = await browser.get("/?" + urlencode({"text": text}))
        assert status == 200 and 'id="filter-text"' in page
        return {c for c in (code, billed, other) if f'href="/jobs/{c}"' in page}

    assert await found(code.lower()) == {code}
    assert await found(reference) == {code}
    assert await found("MATTER-9") == {billed}
    assert await found("+1 (312) 555-0123") == {billed}
    assert await found("clinic.EXAMPLE") == {code, other}
    assert await found("front_desk") == {code}  # _ is a character here, not SQL's wildcard
    assert await found("%") == set()
    assert await found("nothing-like-it") == set()
    status, page, _headers = await browser.get("/?" + urlencode({"text": "x" * 201}))
    assert status == 400 and "longer than 200 characters" in page
