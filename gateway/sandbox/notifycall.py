"""The sandbox's HTTP Notify: the GET GreenFax makes to the customer's URL after each fax.

Parameters and timestamp format as seen in a real integration:
result=success, timestamp=01/10/2005 02:10:25 PM EST (GMT-5),
destination=12157018714, duration=78, greenfaxreferenceid=8591334,
userjobcode=<the job code>, pages, cost.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from zoneinfo import ZoneInfo

import aiohttp

from gateway.logs import log_event
from gateway.sandbox.greenfax import SandboxFax

log = logging.getLogger("faxgw.sandbox")
ZONE = ZoneInfo("America/New_York")
RESULTS = {None: "success", "busy": "busy", "no_answer": "noanswer", "invalid_number": "invalidnumber",
           "refused_by_service": "refused"}


def notify_timestamp(moment: datetime) -> str:
    """GreenFax's style: local time, 12-hour clock, zone abbreviation and GMT offset."""
    local = moment.astimezone(ZONE)
    hours = int(local.utcoffset().total_seconds() // 3600)  # type: ignore[union-attr]
    return local.strftime("%m/%d/%Y %I:%M:%S %p ") + f"{local.tzname()} (GMT{hours:+d})"


def notify_parameters(fax: SandboxFax) -> dict[str, str]:
    return {
        "result": RESULTS.get(fax.reason, "failed") if fax.result != "delivered" else "success",
        "timestamp": notify_timestamp(fax.received_at), "destination": fax.number, "pages": str(fax.pages),
        "duration": str(fax.pages * 26), "userjobcode": fax.code or "",
        "greenfaxreferenceid": str(fax.reference_id), "cost": f"{fax.pages * 0.10:.2f}",
    }


class NotifyCaller:
    """Calls the Notify URL after each fax; GreenFax does not retry, and neither does the sandbox."""

    def __init__(self, url: str, *, delay: float = 0.2) -> None:
        self.url = url
        self.delay = delay
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls: list[int] = []  # HTTP statuses received

    def __call__(self, fax: SandboxFax) -> None:
        task = asyncio.get_running_loop().create_task(self._call(fax))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, fax: SandboxFax) -> None:
        await asyncio.sleep(self.delay)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                async with session.get(self.url, params=notify_parameters(fax)) as response:
                    self.calls.append(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log_event(log, "sandbox-notify", level=logging.WARNING, code=fax.code, problem=str(exc))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
