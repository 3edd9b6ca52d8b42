"""What the README tells a new user, checked against the running program.

The sandbox's claims (SANDBOX in the banner, the EHLO greeting, the reply to
the data, `faxgw status`, /healthz; Notify first, then the status mail as a
duplicate) and the "Try it" snippet, run as written with only the port and
the PDF's path put in.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from conftest import RunningGateway, pdf_bytes

from gateway import config
from gateway.service import Service

README = (Path(__file__).parent.parent / "README.md").read_text()
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def sandbox_gateway(tmp_path: Path):
    settings = config.validate(
        {"sandbox": {"enabled": True, "listen": ["127.0.0.1:0"], "feed_listen": "127.0.0.1:0"},
         "smtp": {"listen": ["127.0.0.1:0"]}, "http": {"listen": ["127.0.0.1:0"]},
         "store": {"path": str(tmp_path / "var" / "faxgw.sqlite3")}},
        source="test", base=tmp_path)
    service = Service(settings)
    await service.start()
    yield RunningGateway(service, settings)
    await service.stop()


def snippet(language: str, after: str) -> str:
    """The first ```language block after the text `after` in the README."""
    start = README.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(README, start)
    assert match is not None
    return match[1]


async def test_the_sandbox_says_so_where_the_readme_says(sandbox_gateway, tmp_path):
    gw = sandbox_gateway
    assert "The SMTP banner, the EHLO greeting, the `250` to the data (with the job\ncodes), `faxgw status` and" \
        " `/healthz` say SANDBOX." in README
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        banner = (await reader.readline()).decode()
        writer.write(b"EHLO client.test\r\n")
        greeting = (await reader.readline()).decode()
    finally:
        writer.close()
    assert banner.startswith("220 ") and "SANDBOX" in banner
    assert greeting.startswith("250-") and "SANDBOX" in greeting

    # "Try it", the Python snippet as the README has it.
    pdf = tmp_path / "page.pdf"
    pdf.write_bytes(pdf_bytes())
    code = snippet("python", "or with Python's smtplib").replace("2525", str(gw.port)).replace("/tmp/page.pdf",
                                                                                                str(pdf))
    run = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=30)
    assert run.returncode == 0, run.stderr
    match = re.fullmatch(r"250 2\.0\.0 queued as (FX[0-9A-Z]{6}) \(SANDBOX: nothing is faxed\)\n", run.stdout)
    assert match, run.stdout
    job = await gw.wait_state(match[1], "delivered")

    # Notify first; the status mail after it is recorded as "also reported", stored as a duplicate.
    final = [e for e in job["events"] if e["state"] == "delivered"]
    assert [e["source"] for e in final] == ["notify"]
    for _ in range(100):
        job = gw.job(match[1])
        if any(e["source"] == "email-smtp" for e in job["events"]):
            break
        await asyncio.sleep(0.05)
    mail = [e for e in job["events"] if e["source"] == "email-smtp"]
    assert mail and mail[0]["state"] is None and mail[0]["detail"].startswith("also reported: ")

    cfg = tmp_path / "cli.toml"
    cfg.write_text(textwrap.dedent(f"""
        [sandbox]
        enabled = true
        [store]
        path = "{gw.store_path}"
    """))
    env = {key: value for key, value in os.environ.items() if key != "FAXGW_CONFIG"}
    status = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "--config", str(cfg),
                                                      "status"], capture_output=True, text=True, env=env, timeout=30)
    assert status.returncode == 0 and status.stdout.startswith("SANDBOX"), status
    host, port = gw.service.web.addresses["http"][0]
    async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/healthz") as response:
        assert (await response.json())["mode"] == "SANDBOX"


def test_the_try_it_section_says_how_to_get_swaks():
    assert "apt-get install swaks" in README[README.index("## Try it"):README.index("## Pointing")]
