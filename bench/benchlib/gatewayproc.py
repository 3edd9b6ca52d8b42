"""The gateway as a subprocess: `python -m gateway --config CFG serve`, config written from sections.

GatewayProcess starts it on a config given as {section: {key: value}} in a
throw-away directory, with its log beside it, and stops it by pid.
GatewayRelay is the system under test of throughput.py and soak.py: a fresh
store, production defaults apart from addresses, the store path and the
sender quota, `--set` overrides for experiments (never `store.*`), and after
the run the job states in the store and the warnings in the log.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from . import procs
from .procs import HOST
from .workload import ACCOUNT_SENDER, RETURN_PATH

Sections = dict[str, dict[str, Any]]

# The one setting the benchmarks change from the gateway's defaults, unless --set gives it: every
# message comes from one envelope sender, and the default daily quota of 1,000 faxes per sender
# would refuse the rest of a long cell (Postfix has no such quota to compare with).
QUOTA_OVERRIDE = "limits.sender.faxes_per_day=0"

FORBIDDEN_OVERRIDES = ("store.",)  # durability is not a knob of the benchmarks


def with_quota_off(settings: list[str]) -> list[str]:
    """The --set list with the sender's daily quota switched off, unless it sets that quota itself."""
    if any(s.startswith("limits.sender.faxes_per_day=") for s in settings):
        return settings
    return [*settings, QUOTA_OVERRIDE]


def parse_overrides(items: list[str]) -> Sections:
    """`--set SECTION.KEY=VALUE` items as sections (a VALUE that is not TOML is kept as text)."""
    overrides: Sections = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _ or "." not in key:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        if key.startswith(FORBIDDEN_OVERRIDES):
            raise SystemExit(f"--set {key}: store settings are not changed by the benchmark (durability)")
        section, name = key.split(".", 1)
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        overrides.setdefault(section, {})[name] = parsed
    return overrides


def render_config(sections: Sections) -> str:
    """Sections as a TOML config file (values written as JSON, which TOML reads for these types)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


class GatewayProcess:
    """`python -m gateway --config CFG serve` in `workdir`: faxgw.toml, its stderr in gateway.log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config = workdir / "faxgw.toml"
        self.log = workdir / "gateway.log"
        self.proc: Any = None

    async def start(self, sections: Sections, *, ports: list[int], banner: bool = True,
                    timeout: float = 60) -> None:
        """Write the config, start the gateway and wait until each of `ports` answers (with a 220
        greeting, if `banner`)."""
        self.config.write_text(render_config(sections))
        with self.log.open("ab") as err:
            self.proc = await procs.spawn(sys.executable, "-m", "gateway", "--config", str(self.config), "serve",
                                          stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                          cwd=self.workdir)
        for port in ports:
            await procs.wait_listening(port, self.proc, timeout, "the gateway", self.log, banner=banner)

    def could_not_listen(self) -> bool:
        """Whether the gateway's log says a port was taken (by someone else, after free_port chose it)."""
        return "cannot listen" in self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.returncode is None else []

    async def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (SIGKILL after `grace` seconds); its exit status, None if it never ran."""
        if self.proc is None:
            return None
        code = await procs.terminate(self.proc, grace)
        self.proc = None
        return code


class GatewayRelay:
    """`python -m gateway --config CFG serve` with a fresh store per cell."""

    name = "gateway"

    def __init__(self, options: argparse.Namespace) -> None:
        self.overrides = parse_overrides(options.set)
        self.log_level = options.gateway_log_level
        self.gateway: GatewayProcess | None = None
        self.port = 0
        self.workdir: Path | None = None

    def sections(self, workdir: Path, port: int, upstream_port: int) -> Sections:
        sections: Sections = {
            "smtp": {"listen": [f"{HOST}:{port}"], "hostname": "gw.bench.localhost"},
            "http": {"listen": [f"{HOST}:0"]},
            "store": {"path": str(workdir / "store" / "faxgw.sqlite3")},
            "upstream": {"host": HOST, "port": upstream_port, "tls": "none", "account_sender": ACCOUNT_SENDER,
                         "return_path": RETURN_PATH},
            "log": {"level": self.log_level},
        }
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        return sections

    async def start(self, workdir: Path, upstream_port: int) -> None:
        self.workdir = workdir
        for attempt in range(3):
            self.port = procs.free_port()
            self.gateway = GatewayProcess(workdir)
            try:
                await self.gateway.start(self.sections(workdir, self.port, upstream_port), ports=[self.port])
                return
            except RuntimeError:
                if attempt == 2 or not self.gateway.could_not_listen():
                    raise
                await self.gateway.stop()  # the free port was taken meanwhile: try another

    def pids(self) -> list[int]:
        return self.gateway.pids() if self.gateway is not None else []

    async def stop(self) -> None:
        if self.gateway is not None:
            code = await self.gateway.stop()
            self.gateway = None
            if code is not None and code not in (0, -signal.SIGTERM):
                print(f"  warning: the gateway exited with {code}; see its log", file=sys.stderr)

    def verify(self) -> dict[str, Any]:
        """After stop: job states in the store, warnings in the log."""
        assert self.workdir is not None
        result: dict[str, Any] = {}
        path = self.workdir / "store" / "faxgw.sqlite3"
        if path.exists():
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                result["job_states"] = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
                result["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                conn.close()
        log = self.workdir / "gateway.log"
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()
            bad = [line for line in lines if " WARNING " in line or " ERROR " in line]
            result["log_warnings"] = len(bad)
            if bad:
                result["log_warning_sample"] = bad[:3]
        return result

    def describe(self) -> dict[str, Any]:
        return {"command": "python -m gateway --config CFG serve", "overrides": self.overrides,
                "log_level": self.log_level}
