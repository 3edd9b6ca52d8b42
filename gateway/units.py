"""Durations and sizes: read as the config writes them ("30s", "5m", "20MiB"), and written back for people.

One place for every such conversion: the config's parsers, check-config's
writer, the replies' windows ("10 min") and the tables' ages ("2h").
"""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, \"30s\", \"5m\", \"2h\" or \"2d\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("expected a duration such as 30, \"30s\", \"5m\", \"2h\" or \"2d\"")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds < 0:
        raise ValueError("expected a duration of zero or more")
    return seconds


def parse_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("expected a size above zero")
        return value
    match = _SIZE.match(str(value))
    if not match or isinstance(value, bool):
        raise ValueError("expected a size in bytes such as 20971520 or \"20MiB\"")
    return int(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]


def format_duration(seconds: float) -> str:
    """A duration as the config writes it: "30d", "2h", "90s", "0.2s" (the largest unit that divides it)."""
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """A size as the config writes it: "20MiB", "256KiB", or bytes."""
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def span(seconds: float) -> str:
    """A window for people: "45 s", "10 min", "1 h", "2 d"."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def age(seconds: float) -> str:
    """How old something is, in its largest whole unit: "3d", "2h", "5m", "40s" (a table's AGE column)."""
    for unit in ("d", "h", "m"):
        if seconds >= _DURATION_UNITS[unit]:
            return f"{int(seconds // _DURATION_UNITS[unit])}{unit}"
    return f"{int(max(seconds, 0))}s"


def backoff(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after `failures` failures in a row: initial, 2x, 4x... up to maximum (the one backoff:
    jobs, notices, the runners, the feed, wrong AUTH passwords)."""
    return min(maximum, initial * 2 ** min(max(0, failures - 1), 32))
