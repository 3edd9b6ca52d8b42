"""How the benchmarks print numbers and tables and write their JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Other processes' CPU% during a measurement above which the report flags it.
BUSY_PCT = 20.0


def fmt(value: float | None, digits: int = 1) -> str:
    """A number with `digits` decimals; "-" for none or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def aligned(rows: list[list[str]], *, right: set[int], rule: bool = True, indent: str = "") -> list[str]:
    """Rows (the first is the header) in columns as wide as their widest cell, two spaces apart.

    `right`: the columns aligned right; `rule`: a line of dashes under the header.
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(indent + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if n == 0 and rule:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return lines


def fixed_row(cells: list[Any], spec: str) -> str:
    """One row of a table with fixed columns, one space apart; `spec` gives each column's format spec
    ("<10 >7 ..."), applied to the cell as text."""
    return " ".join(f"{str(cell):{column}}" for cell, column in zip(cells, spec.split(), strict=True))


def write_json(path: Path, data: Any, *, indent: int = 2) -> None:
    """`data` as JSON (what JSON cannot hold, as text), ending with a newline; makes the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n")
