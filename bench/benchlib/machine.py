"""What the machine is, for the reports: numbers only mean something next to the machine they came from.

`machine()` is the full description (throughput.py, soak.py); `brief()` the
few fields status.py and listing.py record, under the names their JSON has.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from . import REPO_DIR

PACKAGES = ("greenfax-gateway", "aiosmtpd", "aiosmtplib", "pypdf", "psutil")


def _first_field(path: str, prefix: str, sep: str) -> str:
    """The value of the first line of `path` starting with `prefix` ("" if none, or no such file)."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(sep, 1)[1]
    return ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gateway_commit() -> str | None:
    """HEAD of the repository, and whether gateway/ differs from it (then it is the working tree that ran)."""
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "gateway"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit and dirty:
            commit += " (gateway/ has uncommitted changes)"
    return commit


def machine() -> dict[str, Any]:
    return {
        "cpu_model": _first_field("/proc/cpuinfo", "model name", ":").strip(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "memory_total_mib": round(psutil.virtual_memory().total / 2**20),
        "os": _first_field("/etc/os-release", "PRETTY_NAME=", "=").strip('"'),
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "packages": {p: _version(p) for p in PACKAGES},
        "gateway_commit": gateway_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# brief()'s fields: the name in the JSON, how it is read.
BRIEF: dict[str, Callable[[], Any]] = {
    "cores": os.cpu_count,
    "python": platform.python_version,
    "kernel": platform.release,
    "sqlite": lambda: sqlite3.sqlite_version,
    "load": os.getloadavg,
    "cpu": lambda: platform.processor() or platform.machine(),
}


def brief(*fields: str) -> dict[str, Any]:
    """The named fields of BRIEF, in that order."""
    return {name: BRIEF[name]() for name in fields}


def filesystem_of(path: Path) -> str:
    best, fstype = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def summary_line(desc: dict[str, Any]) -> str:
    """The first line a run prints: "machine: CPU, cores, memory, Python, kernel, store on FS"."""
    return (f"machine: {desc['cpu_model']}, {desc['cores_logical']} cores, {desc['memory_total_mib']} MiB, "
            f"{desc['python']}, {desc['kernel'].split(' #')[0]}, store on {desc['store_filesystem']}")
