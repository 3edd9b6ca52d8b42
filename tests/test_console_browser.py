"""The web console in a real headless Chromium (Debian's chromium and chromium-driver, through Selenium).

The gateway runs in sandbox mode in-process, so a fax goes all the way from
queued to delivered (the sandbox's Notify call); the browser is driven from
a worker thread while the test's event loop serves the gateway. Screenshots
of the pages go to the test's directory, and to $FAXGW_SCREENSHOTS when set
(README's pictures: `FAXGW_SCREENSHOTS=docs/screenshots ./dev test -k browser`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from conftest import codes_in, fax_message, send
from selenium.webdriver.support.ui import Select
from test_console import PASSWORDS, add_users

from gateway import config, store
from gateway.service import Service

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                       reason="Debian's chromium and chromium-driver are not installed (./dev test installs them)"),
]


class Chromium:
    """A headless Chromium; every call runs in a worker thread (WebDriver blocks)."""

    def __init__(self, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,860", "--no-first-run", "--disable-extensions"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=DriverService(DRIVER), options=options)
        self.shots = shots

    async def run(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def open(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def find(self, css: str):
        from selenium.webdriver.common.by import By

        return await self.run(self.driver.find_element, By.CSS_SELECTOR, css)

    async def text(self, css: str) -> str:
        return (await self.find(css)).text

    async def fill(self, css: str, value: str) -> None:
        element = await self.find(css)
        await self.run(element.clear)
        await self.run(element.send_keys, value)

    async def click(self, css: str) -> None:
        await self.run((await self.find(css)).click)

    async def until(self, condition, timeout: float = 20) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                if await self.run(condition):
                    return
            except Exception:  # an element not there yet, or replaced by the refresh
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the page did not get there: {self.driver.current_url}")
            await asyncio.sleep(0.2)

    async def screenshot(self, name: str) -> None:
        path = self.shots / name
        await self.run(self.driver.save_screenshot, str(path))
        target = os.environ.get("FAXGW_SCREENSHOTS")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / name)

    def badge(self, code: str) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, f'tr[data-code="{code}"] .badge').text

    async def login(self, base: str, user: str) -> None:
        await self.open(base + "/")
        await self.until(lambda: "/login" in self.driver.current_url)
        await self.fill("#user", user)
        await self.fill("#password", PASSWORDS[user])
        await self.click("#login")
        await self.until(lambda: self.driver.current_url.rstrip("/") == base)

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
async def site(tmp_path):
    settings = config.validate({
        "sandbox": {"enabled": True, "listen": ["127.0.0.1:0"], "status_mail": "none", "feed": False},
        "smtp": {"listen": ["127.0.0.1:0"]},
        "http": {"listen": ["127.0.0.1:0"]},
        "store": {"path": str(tmp_path / "store" / "faxgw.sqlite3")},
        "web": {"enabled": True, "refresh": 0.5},
    }, source="test", base=tmp_path)
    service = Service(settings)
    await service.start()
    add_users(settings.store.path)
    browser = await asyncio.to_thread(Chromium, tmp_path)
    host, port = service.web.addresses["http"][0]
    try:
        yield service, browser, f"http://{host}:{port}"
    finally:
        await asyncio.to_thread(browser.quit)
        await service.stop()


async def test_an_operator_watches_a_fax_filters_opens_it_retries_an_unknown_one_and_logs_out(site):
    service, browser, base = site
    smtp_port = service.smtp_addresses[0][1]
    await browser.login(base, "olivia")
    await browser.run(browser.driver.execute_script, "window.stillTheSamePage = true;")

    service.sandbox.faults.delay = 1.5  # the upstream takes its time: the fax is seen on its way
    (code,) = codes_in((await send(smtp_port, fax_message())).message)
    await browser.until(lambda: browser.badge(code) in ("queued", "sending", "submitted"))
    service.sandbox.faults.delay = 0
    await browser.until(lambda: browser.badge(code) == "delivered")
    assert await browser.run(browser.driver.execute_script, "return window.stillTheSamePage === true;")
    await browser.screenshot("jobs.png")

    # An unknown job: the sandbox drops the connection after the data.
    service.sandbox.faults.drop_after_data = True
    (lost,) = codes_in((await send(smtp_port, fax_message(), rcpts=["13125550142@greenfax.com"])).message)
    await browser.until(lambda: browser.badge(lost) == "unknown")
    service.sandbox.faults.drop_after_data = False

    # Filters: by state, then by number (as people write it).
    await browser.run(lambda: Select(browser.driver.find_element("id", "filter-state")).select_by_value("delivered"))
    await browser.click("#apply")
    await browser.until(lambda: "state=delivered" in browser.driver.current_url)
    rows = await browser.text("#jobs")
    assert code in rows and lost not in rows
    await browser.open(base + "/")
    await browser.fill("#filter-number", "+1 312 555 0142")
    await browser.click("#apply")
    await browser.until(lambda: "number=" in browser.driver.current_url)
    rows = await browser.text("#jobs")
    assert lost in rows and code not in rows

    # The unknown job's page: explained, and retried with a reason after the confirmation.
    await browser.click(f'a[href="/jobs/{lost}"]')
    await browser.until(lambda: browser.driver.current_url.endswith(f"/jobs/{lost}"))
    assert "never resends an unknown fax" in await browser.text("#unknown")
    await browser.screenshot("job-unknown.png")
    await browser.fill("#reason-retry", "GreenFax has no record of it")
    await browser.click("#do-retry")
    alert = await browser.run(lambda: browser.driver.switch_to.alert)
    assert lost in alert.text
    await browser.run(alert.accept)
    await browser.until(lambda: browser.driver.find_element("id", "state").text == "delivered")
    timeline = await browser.text("#timeline")
    assert "web:olivia" in timeline and "GreenFax has no record of it" in timeline and "delivered" in timeline
    await browser.until(lambda: browser.driver.execute_script(
        "const img = document.getElementById('thumbnail'); return img.complete && img.naturalWidth > 0;"))
    await browser.screenshot("job.png")

    await browser.click("#logout")
    await browser.until(lambda: "/login" in browser.driver.current_url)
    await browser.open(base + "/")
    await browser.until(lambda: "/login" in browser.driver.current_url)  # the session is over


async def test_a_viewer_sees_no_actions_and_is_refused_one_sent_anyway(site):
    service, browser, base = site
    service.sandbox.faults.drop_after_data = True
    (lost,) = codes_in((await send(service.smtp_addresses[0][1], fax_message())).message)
    await browser.login(base, "victor")
    await browser.until(lambda: browser.badge(lost) == "unknown")
    await browser.open(f"{base}/jobs/{lost}")
    assert "victor (viewer)" in await browser.text("header")
    assert not await browser.run(browser.driver.find_elements, "id", "actions")
    # A form the page does not offer, sent with the viewer's own session and token.
    await browser.run(browser.driver.execute_script, """
        const form = document.createElement("form");
        form.method = "post"; form.action = arguments[0];
        for (const [name, value] of [["csrf", document.querySelector("input[name=csrf]").value], ["reason", "x"]]) {
            const input = document.createElement("input"); input.name = name; input.value = value; form.append(input);
        }
        document.body.append(form); form.submit();""", f"/jobs/{lost}/retry")
    await browser.until(lambda: "is a viewer" in browser.driver.find_element("id", "problem").text)
    service.sandbox.faults.drop_after_data = False
    conn = store.connect(service.settings.store.path, readonly=True)
    try:
        assert store.get_job(conn, lost)["state"] == "unknown"
    finally:
        conn.close()


async def test_an_operator_links_an_unmatched_report_and_exports_the_costs(site):
    import aiohttp

    service, browser, base = site
    (code,) = codes_in((await send(service.smtp_addresses[0][1], fax_message())).message)
    await browser.login(base, "olivia")
    await browser.until(lambda: browser.badge(code) == "delivered")
    async with aiohttp.ClientSession() as session:  # GreenFax reports the same number again, with a new reference
        async with session.get(f"{base}/greenfax/notify/sandbox-notify-token", params={
                "result": "Busy", "destination": "12125551234", "greenfaxreferenceid": "777000111"}) as answer:
            assert answer.status == 200
    await browser.open(base + "/unmatched")
    report = await browser.find("section.report")
    report_id = (await browser.run(report.get_attribute, "id")).removeprefix("report-")
    await browser.click(f"#do-link-{report_id}")
    await browser.run(lambda: browser.driver.switch_to.alert.accept())
    await browser.until(lambda: browser.driver.current_url.endswith(f"/jobs/{code}"))
    assert f"status report #{report_id} linked by hand" in await browser.text("#timeline")

    await browser.open(base + "/reports")
    await browser.screenshot("reports.png")
    href = await browser.run((await browser.find("#csv")).get_attribute, "href")
    text = await browser.run(browser.driver.execute_async_script, """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {credentials: "same-origin"}).then(r => r.text()).then(done);""", href)
    import csv

    rows = list(csv.DictReader(text.splitlines()))
    conn = store.connect(service.settings.store.path, readonly=True)
    try:
        pages, cost = conn.execute("SELECT SUM(pages), SUM(CAST(cost AS REAL)) FROM jobs").fetchone()
    finally:
        conn.close()
    assert sum(int(row["pages"]) for row in rows) == pages == 1
    assert abs(sum(float(row["cost (USD)"]) for row in rows) - cost) < 1e-9
    assert await browser.text("#total-pages") == "1"
