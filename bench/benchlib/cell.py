"""One cell of throughput.py: a fresh sink and relay, warm-up, the timed closed loop, the drain.

A relay is a class with start(workdir, upstream_port), port, pids(),
stop(), verify() and describe(), listed in RELAYS. A cell starts the sink
and the relay in its own throw-away directory, samples the relay's PSS all
along, sends one warm-up message per session all the way to the sink, then
times `--messages` messages (or `--seconds`) and waits for them to arrive.
What it measured goes into a CellResult; the report is cellreport's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .client import ClientSession, Outcome, percentile
from .gatewayproc import GatewayRelay
from .postfixrelay import PostfixRelay
from .profiling import Profiler, summarize_profile
from .sampling import MemorySampler, cpu_seconds, machine_busy_seconds, process_seconds, process_tree, \
    thread_seconds, tree_cpu_seconds
from .sinks import SINKS, Arrivals, wait_arrivals
from .workload import Message


class DirectRelay:
    """No relay: the client talks straight to the sink (client + sink capacity)."""

    name = "direct"

    def __init__(self, options: argparse.Namespace) -> None:
        self.port = 0

    async def start(self, workdir: Path, upstream_port: int) -> None:
        self.port = upstream_port

    def pids(self) -> list[int]:
        return []

    async def stop(self) -> None:
        pass

    def verify(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {}


RELAYS = {"direct": DirectRelay, "gateway": GatewayRelay, "postfix": PostfixRelay}


@dataclass
class CellResult:
    relay: str
    sink: str
    size: str
    sessions: int
    round: int
    message_bytes: int
    sent: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    stopped_by: str = ""
    accept_seconds: float = 0.0
    accepted_per_s: float = 0.0
    arrived: int = 0
    missing: int = 0
    duplicates: int | None = None
    e2e_seconds: float = 0.0
    e2e_per_s: float = 0.0
    arrived_while_sending: int = 0  # at the sink by the time the last 250 came back
    e2e_while_sending_per_s: float = 0.0  # the forwarding rate while intake is busy too
    backlog_at_last_ack: int = 0  # accepted but not yet at the sink when sending stopped
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0
    ack_max_ms: float = 0.0
    txn_p50_ms: float = 0.0  # MAIL FROM .. final 250: includes waits before DATA (Postfix's in_flow_delay)
    txn_p99_ms: float = 0.0
    peak_pss_mib: float | None = None
    start_pss_mib: float | None = None
    peak_rss_hwm_mib: float | None = None
    cpu_pct: dict[str, float] = field(default_factory=dict)
    relay_cpu_ms_per_msg: float | None = None
    relay_thread_cpu_pct: dict[str, float] = field(default_factory=dict)
    relay_process_cpu_pct: dict[str, float] = field(default_factory=dict)  # supervisor, worker1..., smtpd...
    checks: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None


@dataclass
class CpuReading:
    """CPU seconds so far of the relay's tree, the sink's tree and this process, the relay's threads,
    and the whole machine."""

    relay: float
    sink: float
    client: float
    threads: dict[str, float]
    processes: dict[str, float]
    busy: float

    @classmethod
    def now(cls, relay: Any, sink: Any, me: psutil.Process) -> CpuReading:
        return cls(tree_cpu_seconds(relay.pids()), tree_cpu_seconds(sink.pids()), cpu_seconds([me]),
                   thread_seconds(process_tree(relay.pids())), process_seconds(relay.pids()),
                   machine_busy_seconds())


async def _warm_up(clients: list[ClientSession], pool: list[Message], sink: Any) -> Arrivals:
    """One message per session, all the way to the sink; not measured."""
    sessions = len(clients)
    outcomes = await asyncio.gather(*(c.send(m) for c, m in zip(clients, pool[-sessions:], strict=True)))
    if any(o.code != 250 for o in outcomes):
        raise RuntimeError(f"warm-up refused: {sorted({o.code for o in outcomes})}")
    base = await wait_arrivals(sink, sessions, 60)
    if base.count < sessions:
        raise RuntimeError(f"warm-up: only {base.count} of {sessions} messages reached the sink")
    return base


async def _closed_loop(clients: list[ClientSession], pool: list[Message], limit: int,
                       deadline: float) -> tuple[list[Outcome], bool]:
    """Every session sends the next message as soon as its last one has its reply, until `limit`
    messages or the deadline; returns the outcomes and whether the count (not the time) ended it."""
    next_index = 0
    results: list[Outcome] = []

    async def loop(client: ClientSession) -> None:
        nonlocal next_index
        while next_index < limit and time.monotonic() < deadline:
            message = pool[next_index]
            next_index += 1
            results.append(await client.send(message))

    await asyncio.gather(*(loop(client) for client in clients))
    return results, next_index >= limit


def _record_sending(result: CellResult, results: list[Outcome], started: float, arrived_while_sending: int) -> None:
    """Counts, rates and latencies of the timed phase, up to the last 250."""
    accepted = [o for o in results if o.code == 250]
    result.sent = len(results)
    result.accepted = len(accepted)
    result.refused = dict(collections.Counter(str(o.code) for o in results if o.code != 250))
    last_ack = max((o.done_at for o in accepted), default=started)
    result.accept_seconds = last_ack - started
    result.accepted_per_s = len(accepted) / result.accept_seconds if accepted else 0.0
    result.arrived_while_sending = arrived_while_sending
    result.e2e_while_sending_per_s = (result.arrived_while_sending / result.accept_seconds
                                      if result.accept_seconds > 0 else 0.0)
    result.backlog_at_last_ack = max(0, len(accepted) - result.arrived_while_sending)
    latencies = [o.latency * 1000 for o in accepted]
    result.ack_p50_ms = percentile(latencies, 50)
    result.ack_p99_ms = percentile(latencies, 99)
    result.ack_max_ms = max(latencies, default=math.nan)
    transactions = [o.transaction * 1000 for o in accepted]
    result.txn_p50_ms = percentile(transactions, 50)
    result.txn_p99_ms = percentile(transactions, 99)


def _record_arrivals(result: CellResult, final: Arrivals, base: Arrivals, started: float, ended: float) -> None:
    result.arrived = final.count - base.count
    result.missing = max(0, result.accepted - result.arrived)
    if final.unique is not None:
        result.duplicates = final.count - final.unique
    last_arrival = final.last if final.last is not None else ended
    result.e2e_seconds = max(last_arrival - started, 1e-9)
    result.e2e_per_s = result.arrived / result.e2e_seconds


def _record_cpu(result: CellResult, before: CpuReading, after: CpuReading, span: float, *, relay_ran: bool,
                sink_ran: bool) -> None:
    """CPU% of relay, sink, client and everything else; the relay's threads and CPU per message."""
    pairs = {"relay": (before.relay, after.relay), "sink": (before.sink, after.sink),
             "client": (before.client, after.client)}
    result.cpu_pct = {name: round(100 * (b - a) / span, 1) for name, (a, b) in pairs.items()
                      if not (name == "relay" and not relay_ran) and not (name == "sink" and not sink_ran)}
    result.relay_thread_cpu_pct = {
        name: round(100 * (seconds - before.threads.get(name, 0.0)) / span, 1)
        for name, seconds in after.threads.items() if seconds - before.threads.get(name, 0.0) > 0.005}
    result.relay_process_cpu_pct = {
        name: round(100 * (seconds - before.processes.get(name, 0.0)) / span, 1)
        for name, seconds in after.processes.items() if seconds - before.processes.get(name, 0.0) > 0.005}
    ours = sum(b - a for a, b in pairs.values())
    result.cpu_pct["other"] = round(max(0.0, 100 * ((after.busy - before.busy) - ours) / span), 1)
    if relay_ran and result.arrived:
        result.relay_cpu_ms_per_msg = round(1000 * (after.relay - before.relay) / result.arrived, 3)


async def _profile_start(profiler: Profiler, opts: argparse.Namespace, relay: Any, name: str) -> None:
    """py-spy on the gateway during the timed phase, with --profile (it reads Python processes only)."""
    if opts.profile is not None and relay.name == "gateway" and relay.pids():
        await profiler.start(relay.pids()[0], opts.profile / f"{name}.collapsed")


async def _profile_stop(profiler: Profiler) -> dict[str, Any] | None:
    path = await profiler.stop()
    return None if path is None else {"file": str(path), **summarize_profile(path)}


async def _measure(result: CellResult, clients: list[ClientSession], pool: list[Message], sink: Any, relay: Any,
                   profiler: Profiler, opts: argparse.Namespace) -> None:
    """Warm-up, then the timed phase bounded by count and time, then the drain to the sink."""
    base = await _warm_up(clients, pool, sink)
    limit = min(opts.messages, len(pool) - len(clients))
    me = psutil.Process()
    relay_ran, sink_ran = bool(process_tree(relay.pids())), bool(process_tree(sink.pids()))
    before = CpuReading.now(relay, sink, me)
    await _profile_start(profiler, opts, relay, f"{relay.name}-{result.size}-{result.sessions}s-r{result.round}")
    started = time.monotonic()
    results, by_count = await _closed_loop(clients, pool, limit, started + opts.seconds)
    during = await sink.arrivals()
    result.stopped_by = "count" if by_count else "time"
    _record_sending(result, results, started, during.count - base.count)
    # End to end: until every accepted message reached the sink (or the drain timeout).
    final = await wait_arrivals(sink, base.count + result.accepted, opts.drain_timeout)
    ended = time.monotonic()
    result.profile = await _profile_stop(profiler)
    after = CpuReading.now(relay, sink, me)
    _record_arrivals(result, final, base, started, ended)
    _record_cpu(result, before, after, max(ended - started, 1e-9), relay_ran=relay_ran, sink_ran=sink_ran)


async def run_cell(relay_name: str, sink_name: str, size: str, sessions: int, round_no: int,
                   pool: list[Message], opts: argparse.Namespace, workroot: Path) -> CellResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"{relay_name}-{size}-{sessions}-", dir=workroot))
    sink = SINKS[sink_name]()
    relay = RELAYS[relay_name](opts)
    result = CellResult(relay=relay_name, sink=sink_name, size=size, sessions=sessions, round=round_no,
                        message_bytes=round(sum(m.size for m in pool) / len(pool)))
    clients = [ClientSession(0) for _ in range(sessions)]
    sampler: MemorySampler | None = None
    profiler = Profiler(gil=opts.profile_gil, rate=250, flags=("--nonblocking", "--subprocesses"), settle=0.3)
    try:
        await sink.start(workdir)
        await relay.start(workdir, sink.port)
        sampler = MemorySampler(relay.pids())
        sampler.start()
        for client in clients:
            client.port = relay.port
        await asyncio.gather(*(client.connect() for client in clients))
        await _measure(result, clients, pool, sink, relay, profiler, opts)
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        await profiler.stop()
        if sampler is not None:
            await sampler.stop()
        await relay.stop()
        await sink.stop()
    if sampler is not None and sampler.samples:
        result.peak_pss_mib = round(sampler.peak_pss / 2**20, 1)
        result.start_pss_mib = round(sampler.first_pss / 2**20, 1)
        result.peak_rss_hwm_mib = round(sampler.peak_hwm / 2**20, 1)
    result.checks = relay.verify()
    if not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
