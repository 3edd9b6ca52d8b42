"""Soak benchmark: does the gateway's memory stay flat over a long run?

A script a user runs by hand (not a test):

    .venv/bin/python bench/soak.py [--messages 100000] [--size 2k] [--sessions 8] [--json out.json]

The requirement it checks: "Memory stays flat over a long run: a soak of
100,000 messages shows no growth in PSS after warm-up."

It starts one gateway (`python -m gateway --config CFG serve`, throw-away
config and store, production defaults) and the fast sink (bench/sink.py),
then sends `--messages` messages over `--sessions` closed-loop aiosmtplib
sessions, everything on 127.0.0.1. Every second it samples the PSS of the
gateway's process tree (/proc/PID/smaps_rollup, summed) together with the
messages accepted (250) and arrived at the sink so far. After warm-up (the
first 10% of the messages, at least 5,000) memory must not grow. The verdict
judges the gateway's own part of PSS (anonymous + shmem) and its file-backed
RSS; total PSS is judged and printed too, but its file-backed share moves
whenever other processes mapping the same libraries start or stop. See
`verdict()` for the thresholds and bench/README.md ("Soak") for why.

One setting differs from the defaults: limits.sender.faxes_per_day = 0. The
default quota (1000 faxes per sender per day) would refuse the soak's
traffic, which all comes from one envelope sender. Durability is unchanged.

This file is the driver: options, the run, the one-second sampler. The
pieces are in bench/benchlib/: the gateway and sink runners, the workload
builder, the SMTP client and the PSS readings that throughput.py uses too,
and soakcopies.py (the unique copies), soakmemory.py (the analysis and the
verdict) and soakreport.py (the report).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchlib import machine, procs  # bench/ is sys.path[0] when this runs as a script
from benchlib.client import ClientSession, percentile
from benchlib.gatewayproc import QUOTA_OVERRIDE, GatewayRelay, with_quota_off
from benchlib.report import write_json
from benchlib.sampling import cpu_seconds, machine_busy_seconds, tree_cpu_seconds, tree_memory
from benchlib.sinks import Arrivals, FastSink, wait_arrivals
from benchlib.soakcopies import Template, check_copies, copy_number
from benchlib.soakmemory import WARMUP_FRACTION, WARMUP_MIN, analyse, backlog_at_end, cpu_shares, verdict
from benchlib.soakreport import QUOTA_REASON, json_report, print_memory, print_run
from benchlib.workload import SIZES, build_pool, check_pool, pool_figures

DEFAULT_POOL = {"2k": 2000, "200k": 200}  # distinct documents built up front (see Template)
MIB = 2**20


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the clients did so far (read by the sampler)."""

    limit: int
    next_n: int = 0
    sent: int = 0
    accepted: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted_numbers: bytearray = field(default_factory=bytearray)  # 1 at n: copy n got a 250
    first_send: float = 0.0
    last_ack: float = 0.0
    stop_reason: str = ""
    ack_ms: list[float] = field(default_factory=list)


@dataclass
class SoakRun:
    """One soak: the gateway, its sink and clients, and what they did."""

    relay: GatewayRelay
    sink: FastSink
    clients: list[ClientSession]
    progress: Progress
    samples: list[dict[str, Any]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0
    final: Arrivals = field(default_factory=lambda: Arrivals(0, None, 0))
    drained_at: float | None = None
    sink_ids: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak benchmark of the fax gateway: PSS of the gateway's process tree, sampled every second,"
                    " over a long closed-loop SMTP run on 127.0.0.1; is it flat after warm-up?",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000, help="messages to send")
    parser.add_argument("--size", default="2k", choices=list(SIZES), help="message size")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent SMTP sessions (closed loop)")
    parser.add_argument("--seconds", type=float, default=1800.0,
                        help="cap on the sending phase; the run stops by itself after it (plus the drain)")
    parser.add_argument("--warmup", type=int,
                        help=f"messages of warm-up (default: {WARMUP_FRACTION * 100:.0f}%% of --messages, at least"
                             f" {WARMUP_MIN:,}, at most half)")
    parser.add_argument("--pool", type=int, help="distinct documents built up front (2,000 at 2k, 200 at 200k)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between two PSS samples")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report and every sample here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="further gateway config overrides, for experiments (not store.*)")
    parser.add_argument("--gateway-log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the gateway's [log] level (info = the production default)")
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="seconds to wait after the last 250 for everything to reach the sink")
    parser.add_argument("--idle-after", type=float, default=10.0,
                        help="seconds to keep sampling once everything has arrived (PSS at rest)")
    parser.add_argument("--workdir", type=Path, help="parent of the throw-away directory (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away directory (store, log, config)")
    opts = parser.parse_args(argv)
    check_args(parser, opts)
    return opts


def check_args(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Refuse impossible sizes; fill in the pool and the warm-up; switch the sender's quota off."""
    if opts.messages < 2 or opts.sessions < 1 or opts.interval <= 0:
        parser.error("--messages must be at least 2, --sessions at least 1 and --interval above 0")
    opts.pool = opts.pool or DEFAULT_POOL[opts.size]
    if opts.warmup is None:
        opts.warmup = min(max(WARMUP_MIN, math.ceil(WARMUP_FRACTION * opts.messages)), opts.messages // 2)
    if not 0 < opts.warmup < opts.messages:
        parser.error("--warmup must be between 1 and --messages - 1")
    opts.user_set = list(opts.set)
    opts.set = with_quota_off(opts.set)


def disk_check(workroot: Path, opts: argparse.Namespace) -> None:
    """The store keeps every body (retention: 30 days), and the log two lines per message."""
    need = opts.messages * (SIZES[opts.size] * 1.2 + 2_000) + 64 * MIB
    free = shutil.disk_usage(workroot).free
    if free < 1.5 * need:
        raise SystemExit(f"{workroot}: {free / 2**30:.1f} GiB free, the run needs about {need / 2**30:.1f} GiB"
                         " (store and log); use --workdir elsewhere or fewer --messages")


def _sample(run: SoakRun, mem: dict[str, int], pythons: int, arrived: int, now: float, me: psutil.Process
            ) -> dict[str, Any]:
    """One sample: time, client counts, the gateway's memory in KiB, CPU seconds so far."""
    progress = run.progress
    return {
        "t": round(now - run.started, 3), "sent": progress.sent, "accepted": progress.accepted,
        "refused": sum(progress.refused.values()), "arrived": arrived,
        "pss_kib": mem["pss"] // 1024, "own_kib": (mem["pss_anon"] + mem["pss_shmem"]) // 1024,
        "pss_anon_kib": mem["pss_anon"] // 1024, "pss_shmem_kib": mem["pss_shmem"] // 1024,
        "pss_file_kib": mem["pss_file"] // 1024, "rss_kib": mem["rss"] // 1024,
        "file_rss_kib": (mem["rss"] - mem["anonymous"]) // 1024, "hwm_kib": mem["hwm"] // 1024,
        "processes": mem["processes"], "other_pythons": pythons,
        "gateway_cpu_s": round(tree_cpu_seconds(run.relay.pids()), 2),
        "sink_cpu_s": round(tree_cpu_seconds(run.sink.pids()), 2),
        "client_cpu_s": round(cpu_seconds([me]), 2),
        "machine_busy_s": round(machine_busy_seconds(), 2),
    }


async def sampler(run: SoakRun, interval: float) -> None:
    """Every `interval` s: PSS of the gateway's tree, messages accepted and arrived, CPU seconds."""
    me = psutil.Process()
    next_at = time.monotonic()
    while True:
        mem = tree_memory(run.relay.pids())
        pythons = other_pythons(run.relay.pids())
        arrived = await run.sink.arrivals()
        now = time.monotonic()
        if not mem["processes"]:
            run.progress.stop_reason = run.progress.stop_reason or "the gateway exited"
            run.stop.set()
            return
        run.samples.append(_sample(run, mem, pythons, arrived.count, now, me))
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def other_pythons(pids: list[int]) -> int:
    """Other processes running the gateway's Python executable (this one and the sink included). They
    map some of the same files (libpython, and pydantic-core, cryptography, libsqlite3... if they import
    them), so the gateway's file PSS goes down while they run and up when they exit."""
    try:
        exe = psutil.Process(pids[0]).exe()
    except (IndexError, psutil.Error):
        return 0
    return sum(1 for proc in psutil.process_iter(["pid", "exe"])
               if proc.info["pid"] not in pids and proc.info["exe"] == exe)


async def send_loop(client: ClientSession, templates: list[Template], progress: Progress, deadline: float,
                    stop: asyncio.Event, refusal_limit: int) -> None:
    while progress.next_n < progress.limit and not stop.is_set():
        if time.monotonic() >= deadline:
            progress.stop_reason = progress.stop_reason or "time"
            return
        n = progress.next_n
        progress.next_n += 1
        message = templates[n % len(templates)].copy(n)
        outcome = await client.send(message)
        progress.sent += 1
        if outcome.code == 250:
            progress.accepted += 1
            progress.accepted_numbers[n] = 1
            progress.last_ack = outcome.done_at
            progress.ack_ms.append(round(outcome.latency * 1000, 2))
        else:
            progress.refused[str(outcome.code)] += 1
            if sum(progress.refused.values()) > refusal_limit:
                progress.stop_reason = progress.stop_reason or f"more than {refusal_limit} refusals"
                stop.set()


async def report_progress(progress: Progress, samples: list[dict[str, Any]], started: float,
                          stop: asyncio.Event) -> None:
    """A line at every 10% of the messages."""
    step = max(1, progress.limit // 10)
    shown = 0
    while not stop.is_set():
        await asyncio.sleep(0.5)
        if progress.accepted >= shown + step and samples:
            shown = progress.accepted // step * step
            s = samples[-1]
            elapsed = time.monotonic() - started
            print(f"  {progress.accepted:>7,} accepted ({100 * progress.accepted / progress.limit:3.0f}%)"
                  f"  {elapsed:6.0f} s  {progress.accepted / elapsed:6.1f} acc/s  arrived {s['arrived']:,}"
                  f"  PSS {s['pss_kib'] / 1024:6.1f} MiB (own {s['own_kib'] / 1024:.2f})", flush=True)


async def run(opts: argparse.Namespace) -> int:
    workroot = Path(tempfile.mkdtemp(prefix="faxgw-soak-", dir=opts.workdir))
    started_wall = time.time()
    try:
        return await soak(opts, workroot, started_wall)
    finally:
        if opts.keep:
            print(f"kept: {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)


def announce(opts: argparse.Namespace, desc: dict[str, Any]) -> None:
    """What runs, on what, with which settings."""
    print(machine.summary_line(desc) + f", load {desc['load_average_at_start']}")
    if desc["gateway_commit"] and "uncommitted" in desc["gateway_commit"]:
        print(f"note: gateway/ has uncommitted changes; this measures the working tree ({desc['gateway_commit']})")
    print(f"soak: {opts.messages:,} messages of {opts.size} over {opts.sessions} sessions, at most"
          f" {opts.seconds:g} s of sending; warm-up = the first {opts.warmup:,} messages; PSS every"
          f" {opts.interval:g} s")
    print(f"gateway: production defaults (durability unchanged) except {QUOTA_OVERRIDE}: {QUOTA_REASON}"
          + (f"; experiments: {', '.join(opts.user_set)}" if opts.user_set else ""))


def build_templates(opts: argparse.Namespace, nonce: str) -> tuple[list[Template], dict[str, Any]]:
    """The pool of distinct documents, as templates for the copies, and what it is like."""
    built = time.monotonic()
    pool = build_pool(f"soak{opts.size}", SIZES[opts.size], opts.pool, nonce)
    templates = [Template(m) for m in pool]
    workload = {"target_bytes": SIZES[opts.size], "pool": len(pool), **pool_figures(pool),
                "pool_sample": check_pool(pool), "copies": check_copies(templates),
                "build_seconds": round(time.monotonic() - built, 2)}
    print(f"workload: {len(templates):,} distinct documents built in {workload['build_seconds']:g} s, mean"
          f" {workload['mean_bytes']:,} bytes; each message sent is a unique copy (own X-Bench-Id, Message-ID,"
          f" PDF /ID)")
    return templates, workload


async def send_all(r: SoakRun, opts: argparse.Namespace, templates: list[Template]) -> None:
    """Connect, then send every copy with the sampler and the progress lines running; then drain."""
    await asyncio.gather(*(client.connect() for client in r.clients))
    r.started = time.monotonic()
    r.progress.first_send = r.started
    tasks = [asyncio.create_task(sampler(r, opts.interval)),
             asyncio.create_task(report_progress(r.progress, r.samples, r.started, r.stop))]
    try:
        deadline = r.started + opts.seconds
        refusal_limit = max(100, opts.messages // 100)
        await asyncio.gather(*(send_loop(c, templates, r.progress, deadline, r.stop, refusal_limit)
                               for c in r.clients))
        if not r.progress.stop_reason:
            r.progress.stop_reason = "count"
        print(f"  sending done ({r.progress.stop_reason}): {r.progress.accepted:,} accepted in"
              f" {time.monotonic() - r.started:.0f} s; waiting for the sink", flush=True)
        await asyncio.gather(*(client.close() for client in r.clients), return_exceptions=True)
        r.final = await wait_arrivals(r.sink, r.progress.accepted, opts.drain_timeout)
        r.drained_at = time.monotonic()
        await asyncio.sleep(opts.idle_after)  # PSS at rest, queue empty
        r.final = await r.sink.arrivals()
        r.sink_ids = await r.sink.ids()
    finally:
        r.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def drive(opts: argparse.Namespace, workroot: Path, templates: list[Template]) -> SoakRun:
    """Start the sink and the gateway, send, and stop them again (whatever happens)."""
    workdir = workroot / "gateway"
    workdir.mkdir()
    r = SoakRun(relay=GatewayRelay(opts), sink=FastSink(reply_limit=64 * MIB),  # `ids` lists every X-Bench-Id
            clients=[ClientSession(0) for _ in range(opts.sessions)],
            progress=Progress(limit=opts.messages, accepted_numbers=bytearray(opts.messages)))
    try:
        await r.sink.start(workdir)
        await r.relay.start(workdir, r.sink.port)
        print(f"gateway pid {r.relay.pids()[0]} on {procs.HOST}:{r.relay.port}, sink on {procs.HOST}:{r.sink.port};"
              f" work directory {workroot}")
        for client in r.clients:
            client.port = r.relay.port
        await send_all(r, opts, templates)
    finally:
        r.stop.set()
        await asyncio.gather(*(client.close() for client in r.clients), return_exceptions=True)
        await r.relay.stop()
        await r.sink.stop()
    return r


def outcome(r: SoakRun, checks: dict[str, Any]) -> dict[str, Any]:
    """What the run did: counts (lost and duplicated per copy number), rates, latencies, CPU, the store."""
    progress, final, samples = r.progress, r.final, r.samples
    arrived_numbers = collections.Counter(copy_number(i) for i in r.sink_ids)
    accepted_set = {n for n, flag in enumerate(progress.accepted_numbers) if flag}
    lost = sorted(accepted_set - set(arrived_numbers))
    unexpected = sorted(set(arrived_numbers) - accepted_set)  # arrived without a 250 seen by the client
    sending_seconds = max(progress.last_ack - r.started, 1e-9)
    e2e_seconds = max((final.last or time.monotonic()) - r.started, 1e-9)
    return {
        "stopped_by": progress.stop_reason, "sent": progress.sent, "accepted": progress.accepted,
        "refused": dict(progress.refused), "arrived": final.count, "arrived_unique": final.unique,
        "lost": len(lost), "lost_sample": lost[:10], "duplicates": final.count - (final.unique or 0),
        "arrived_without_250": len(unexpected), "arrived_without_250_sample": unexpected[:10],
        "accept_seconds": round(sending_seconds, 2), "accepted_per_s": round(progress.accepted / sending_seconds, 1),
        "e2e_seconds": round(e2e_seconds, 2), "e2e_per_s": round(final.count / e2e_seconds, 1),
        "drain_seconds": round(r.drained_at - progress.last_ack, 2) if r.drained_at and progress.last_ack else None,
        "backlog_at_last_ack": backlog_at_end(samples, progress.accepted),
        "ack_p50_ms": percentile(progress.ack_ms, 50), "ack_p99_ms": percentile(progress.ack_ms, 99),
        "cpu_pct": cpu_shares(samples, progress.accepted),
        "job_states": checks.get("job_states"), "checks": checks,
    }


async def soak(opts: argparse.Namespace, workroot: Path, started_wall: float) -> int:
    disk_check(workroot, opts)
    desc = machine.machine()
    desc["store_filesystem"] = machine.filesystem_of(workroot)
    announce(opts, desc)
    templates, workload = build_templates(opts, f"{int(started_wall) % 100000:05d}")
    r = await drive(opts, workroot, templates)
    checks = r.relay.verify()
    if opts.keep:
        checks["work_directory"] = str(workroot)
    result = outcome(r, checks)
    memory = analyse(r.samples, r.progress.accepted, opts.warmup)
    memory["verdict"] = verdict(memory, result)
    print_run(result)
    print_memory(opts, memory)
    if opts.json:
        write_json(opts.json, json_report(opts, desc=desc, gateway=r.relay.describe(), workload=workload,
                                          result=result, memory=memory, samples=r.samples,
                                          started_wall=started_wall, quota_override=QUOTA_OVERRIDE), indent=1)
        print(f"\nJSON written to {opts.json} ({len(r.samples)} samples)")
    return 0 if memory["verdict"]["flat"] else 1


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return procs.run_main(lambda: procs.run_async(run(opts)), "the soak")


if __name__ == "__main__":
    sys.exit(main())
