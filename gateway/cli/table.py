"""How `faxgw` prints for people: the one table printer, and the times, costs, ages and sizes in it.

Every command that prints rows (status, show, queue, unmatched, feed foreign)
goes through `table`; durations come from gateway.units, so a table's AGE
reads as the config writes durations.
"""

from __future__ import annotations

import re
from typing import Any

from gateway import store
from gateway.units import age

Columns = list[tuple[str, str]]

# The columns of a status-report table: `faxgw show` (a job's reports) and `faxgw unmatched`.
REPORT_COLUMNS: Columns = [
    ("id", "ID"), ("received_at", "RECEIVED"), ("channel", "CHANNEL"), ("outcome", "OUTCOME"),
    ("result", "RESULT"), ("reason", "REASON"), ("number", "NUMBER"), ("job_code", "CODE"), ("note", "NOTE"),
]


def table(rows: list[dict[str, Any]], columns: Columns) -> str:
    """Rows as aligned columns under a title line; a missing value is "-", trailing blanks are trimmed."""
    cells = [[title for _key, title in columns]]
    for row in rows:
        cells.append([str(row.get(key) if row.get(key) is not None else "-") for key, _title in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in cells)


def age_of(created_at: str) -> str:
    """How long ago a stored time was: "3d", "2h" (a table's AGE column)."""
    return age((store.utcnow() - store.parse_iso(created_at)).total_seconds())


def when(stored: str | None) -> str | None:
    """A stored time for people: "2026-11-27 01:02:03 UTC", with the fraction of a second only where it has one
    (a report's time is to the second; the gateway's own times to the microsecond)."""
    if not stored:
        return stored
    moment = store.parse_iso(stored)
    fraction = f".{moment.microsecond:06d}" if moment.microsecond else ""
    return f"{moment:%Y-%m-%d %H:%M:%S}{fraction} UTC"


def cost(value: str | None, currency: str) -> str | None:
    """A cost with its currency: GreenFax writes "0.20" (the account's currency), sometimes "$0.20"."""
    if not value:
        return None
    return f"{value} {currency}" if re.fullmatch(r"\d+(?:\.\d+)?", value.strip()) else value


def human_size(size: int) -> str:
    """A size for people, in decimal units: "512 B", "1.5 MB" (backup and purge)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"
