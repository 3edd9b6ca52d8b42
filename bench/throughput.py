"""Throughput benchmark: accepted and end-to-end messages/s, acknowledgement latency, peak memory.

A script a user runs by hand (not a test):

    .venv/bin/python bench/throughput.py [--quick] [--json out.json]

For each cell (message size x concurrent sessions) it starts the system
under test as a subprocess, `python -m gateway --config CFG serve`, with a
config written to a throw-away directory (listen on a free 127.0.0.1 port,
store in that directory, upstream = the sink), drives it with real SMTP
clients (aiosmtplib, one connection per session reused across messages,
closed loop) and counts arrivals at the sink. Everything stays on 127.0.0.1.

The gateway runs with its production settings apart from addresses and the
store path: every 250 it gives is a committed SQLite transaction with
synchronous=FULL. The benchmark changes nothing that weakens that; `--set`
(for experiments) refuses store settings.

Sinks (`--sink`): `fast` (default), bench/sink.py in its own process: real
SMTP, counts arrivals, parses nothing. `sandbox`, the GreenFax stand-in
(`gateway.sandbox`) in this process; `sandbox-proc`, the same as
`python -m gateway sandbox`. The sandbox parses every message and counts PDF
pages with pypdf, and reads DATA line by line through aiosmtpd, so it is
slower than the gateway at 200 KB; the `direct` rows (client straight into
the sink) show each sink's capacity.

Relays (`--relays`): `direct` (no relay: client -> sink, the calibration
that shows the client and sink are not the bottleneck), `gateway`, and
`postfix`: a private Postfix instance (tests/peers/postfix.py, needs root)
relaying to the same sink, the yardstick of issue 6.
`--relays direct,gateway,postfix --rounds 2` runs direct, gateway, postfix,
gateway, postfix on each workload and prints gateway/postfix ratios. A relay
is a class with start(workdir, upstream_port), port, pids(), stop(),
verify() and describe(), listed in benchlib/cell.py's RELAYS.

This file is the driver: options, the loop over cells, the JSON. The pieces
are in bench/benchlib/ (cell.py runs one cell, cellreport.py prints them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib import machine, procs  # bench/ is sys.path[0] when this runs as a script
from benchlib.cell import RELAYS, CellResult, run_cell
from benchlib.cellreport import cell_line, print_summary, ratios
from benchlib.gatewayproc import GatewayRelay, with_quota_off
from benchlib.postfixrelay import PostfixRelay, postfix_peer
from benchlib.profiling import print_profile
from benchlib.report import write_json
from benchlib.sampling import wait_idle
from benchlib.sinks import SINKS
from benchlib.workload import SIZES, Message, build_pool, check_pool, pool_figures

FULL = {"messages": 400, "seconds": 20.0}
QUICK = {"messages": 100, "seconds": 5.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput benchmark of the fax gateway (accepted and end-to-end msg/s, ack latency, "
                    "peak PSS), with real SMTP clients on 127.0.0.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller cells: {QUICK['messages']} messages or {QUICK['seconds']:.0f} s "
                             f"(default {FULL['messages']} or {FULL['seconds']:.0f} s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--sizes", default="2k,200k", help=f"message sizes, from {list(SIZES)}")
    parser.add_argument("--sessions", default="1,8,32", help="concurrent SMTP sessions per cell")
    parser.add_argument("--messages", type=int, help="messages per cell (after warm-up)")
    parser.add_argument("--seconds", type=float, help="time bound per cell's sending phase")
    parser.add_argument("--relays", default="direct,gateway",
                        help=f"systems to run in turn on each workload, from {list(RELAYS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat each cell's relays this often (A B A B); direct runs in the first round only")
    parser.add_argument("--sink", choices=list(SINKS), default="fast", help="what the relay forwards to")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="gateway config override for experiments, e.g. upstream.concurrency=8 (not store.*)")
    parser.add_argument("--postfix-set", action="append", default=[], metavar="NAME=VALUE",
                        help="main.cf parameter for the postfix relay, for experiments, e.g. in_flow_delay=0s")
    parser.add_argument("--gateway-log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the gateway's [log] level (info = the production default)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait after the last 250 for everything to reach the sink")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="on a shared machine: before each cell, wait up to this long for other load to stop")
    parser.add_argument("--workdir", type=Path, help="parent of the throw-away directories (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away directories (stores, logs)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each gateway cell with py-spy into DIR and print a summary")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL (CPU spent in Python, not"
                             " waits for the disk, the network or other processes)")
    opts = parser.parse_args(argv)
    check_args(parser, opts)
    return opts


def check_args(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Fill in the defaults that depend on --quick, split the lists, refuse unknown names."""
    opts.set = with_quota_off(opts.set)
    defaults = QUICK if opts.quick else FULL
    opts.messages = opts.messages or defaults["messages"]
    opts.seconds = opts.seconds or defaults["seconds"]
    opts.size_list = [s.strip() for s in opts.sizes.split(",") if s.strip()]
    opts.session_list = [int(s) for s in opts.sessions.split(",") if s.strip()]
    opts.relay_list = [r.strip() for r in opts.relays.split(",") if r.strip()]
    for size in opts.size_list:
        if size not in SIZES:
            parser.error(f"--sizes: {size!r} is not one of {list(SIZES)}")
    for relay in opts.relay_list:
        if relay not in RELAYS:
            parser.error(f"--relays: {relay!r} is not one of {list(RELAYS)}")
    if "postfix" in opts.relay_list and (reason := postfix_peer().unavailable_reason()):
        parser.error(f"--relays postfix: {reason}")


def build_workload(size: str, opts: argparse.Namespace, nonce: str) -> tuple[list[Message], dict[str, Any]]:
    """The messages of one size (enough for every cell and its warm-up), and what they are like."""
    pool = build_pool(size, SIZES[size], opts.messages + max(opts.session_list), nonce)
    facts = {"target_bytes": SIZES[size], **pool_figures(pool), "sample": check_pool(pool)}
    print(f"workload {size}: {len(pool)} different messages, mean {facts['mean_bytes']} bytes"
          f" (PDF of {facts['sample']['pages']} page(s) in the first)")
    return pool, facts


async def run_size(size: str, pool: list[Message], opts: argparse.Namespace, workroot: Path) -> list[CellResult]:
    """Every cell of one message size: sessions x rounds x relays (direct in the first round only)."""
    cells = []
    for sessions in opts.session_list:
        for round_no in range(1, opts.rounds + 1):
            for relay in opts.relay_list:
                if relay == "direct" and round_no > 1:
                    continue  # the calibration; the relays are what the rounds compare
                if opts.wait_idle:
                    await wait_idle(opts.wait_idle)
                cell = await run_cell(relay, opts.sink, size, sessions, round_no, pool, opts, workroot)
                cells.append(cell)
                print(cell_line(cell), flush=True)
                if cell.profile:
                    print_profile(cell.profile)
    return cells


async def run(opts: argparse.Namespace) -> int:
    workroot = Path(tempfile.mkdtemp(prefix="faxgw-bench-", dir=opts.workdir))
    desc = machine.machine()
    desc["store_filesystem"] = machine.filesystem_of(workroot)
    print(machine.summary_line(desc))
    print(f"cells: sizes {opts.size_list} x sessions {opts.session_list} x relays {opts.relay_list}"
          f" x {opts.rounds} round(s); {opts.messages} messages or {opts.seconds:g} s each; sink: {opts.sink}")
    cells: list[CellResult] = []
    workload: dict[str, Any] = {}
    started = time.time()
    try:
        nonce = f"{int(started) % 100000:05d}"
        for size in opts.size_list:
            pool, workload[size] = build_workload(size, opts, nonce)
            cells += await run_size(size, pool, opts, workroot)
            del pool
    finally:
        if not opts.keep:
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            print(f"kept: {workroot}")
    compared = ratios(cells)
    print_summary(cells, opts.relay_list, compared)
    if opts.json:
        write_json(opts.json, json_report(opts, desc, workload, cells, compared, started))
        print(f"\nJSON written to {opts.json}")
    return 0


def json_report(opts: argparse.Namespace, desc: dict[str, Any], workload: dict[str, Any], cells: list[CellResult],
                compared: list[dict[str, Any]], started: float) -> dict[str, Any]:
    report = {
        "benchmark": "greenfax-gateway bench/throughput.py",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": desc,
        "settings": {"quick": opts.quick, "messages_per_cell": opts.messages, "seconds_per_cell": opts.seconds,
                     "sizes": opts.size_list, "sessions": opts.session_list, "relays": opts.relay_list,
                     "rounds": opts.rounds, "sink": opts.sink, "warmup_messages_per_cell": "one per session",
                     "gateway": GatewayRelay(opts).describe(),
                     "durability": "gateway defaults: SQLite WAL, synchronous=FULL, 250 after commit"},
        "workload": workload,
        "cells": [asdict(c) for c in cells],
        "ratios": compared,
    }
    if "postfix" in opts.relay_list:
        report["settings"]["postfix"] = PostfixRelay(opts).describe()
    return report


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return procs.run_main(lambda: procs.run_async(run(opts)), "the benchmark")


if __name__ == "__main__":
    sys.exit(main())
