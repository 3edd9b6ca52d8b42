"""What the faxes cost, per sender and per day or month: the console's report and its CSV export."""

from __future__ import annotations

import sqlite3
from decimal import Decimal, InvalidOperation
from typing import Any

PERIODS = {"day": 10, "month": 7}  # characters of the stored time that name the period


def cost_report(conn: sqlite3.Connection, *, since: str, until: str, by: str = "day") -> list[dict[str, Any]]:
    """Rows of (period, sender, billing code, faxes, delivered, pages, cost) for jobs created in [since, until),
    oldest first.

    Cost is summed as decimals, as GreenFax reports it (a string in the store): no float rounding.
    """
    width = PERIODS[by]
    totals: dict[tuple[str, str, str], dict[str, Any]] = {}
    for period, sender, billing, state, pages, cost in conn.execute(
            f"SELECT substr(created_at, 1, {width}), sender, COALESCE(billing_code, ''), state, pages, cost FROM jobs"
            " WHERE created_at >= ? AND created_at < ? ORDER BY created_at", (since, until)):
        row = totals.setdefault((period, sender, billing), {
            "period": period, "sender": sender, "billing_code": billing, "faxes": 0, "delivered": 0, "pages": 0,
            "cost": Decimal(0)})
        row["faxes"] += 1
        row["delivered"] += state == "delivered"
        row["pages"] += pages or 0
        try:
            row["cost"] += Decimal(cost) if cost else 0
        except InvalidOperation:
            pass  # a cost GreenFax wrote in a form that is not a number: shown on the job, not summed
    return list(totals.values())
