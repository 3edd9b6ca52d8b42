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

The pieces come from bench/throughput.py (the gateway and sink runners, the
workload builder, the SMTP client, the PSS readings); this file adds the
unique copies, the one-second sampler, the analysis and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import email
import email.policy
import io
import json
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import throughput as tp  # bench/throughput.py: this directory is sys.path[0] when run as a script

QUOTA_OVERRIDE = tp.QUOTA_OVERRIDE
QUOTA_REASON = ("the default daily quota of 1000 faxes per sender would refuse the soak's traffic"
                " (all from one envelope sender)")
DEFAULT_POOL = {"2k": 2000, "200k": 200}  # distinct documents built up front (see Template)
WARMUP_FRACTION = 0.10
WARMUP_MIN = 5_000
# Verdict thresholds (bench/README.md, "Soak", says why these).
FLAT_GROWTH_MIB = 2.0  # own memory (and file RSS): max after warm-up minus the value at the end of warm-up
FLAT_SLOPE_MIB_PER_10K = 0.5  # own memory: least-squares slope against messages after warm-up
CHECKPOINTS = (25, 50, 75, 100)
MIB = 2**20


# --- workload: a pool of distinct messages, each sent as many distinct copies ---------------------


class Template:
    """One message of throughput.build_pool, from which any number of distinct copies are made.

    Copy n differs from every other copy in two places:
    - the head (header and text part): the pool message's id becomes
      "<id>-<n>" everywhere, so X-Bench-Id, Message-ID, Subject, the file
      name and the text are unique;
    - the PDF: the last 12 hex digits of the first trailer /ID become n.
      That field has a fixed width, so the PDF's xref offsets stay right and
      it stays valid. Only the one or two 57-byte base64 lines that hold the
      field are encoded again; the rest of the wire bytes are reused. So the
      decoded document, and any digest of it (the duplicate guard's), differs
      per copy too.
    """

    ID_MARK = b"/ID [<"
    LINE = 57  # bytes per base64 line (base64.encodebytes: 76 characters + CRLF on the wire)

    def __init__(self, message: tp.Message) -> None:
        wire = message.wire
        self.message = message
        marker = b'.pdf"\r\n\r\n'
        start = wire.index(marker) + len(marker)  # the PDF's base64 lines start here
        end = wire.index(b"--", start)  # base64 has no "-": the closing boundary
        encoded = wire[start:end]
        pdf = base64.b64decode(encoded)
        if base64.encodebytes(pdf).replace(b"\n", b"\r\n") != encoded:
            raise ValueError("the PDF attachment is not laid out as base64.encodebytes writes it")
        at = pdf.rindex(self.ID_MARK) + len(self.ID_MARK)
        if pdf[at + 32: at + 33] != b">":
            raise ValueError("the PDF trailer /ID is not 32 hex digits")
        self.pdf = pdf
        self.field_at = at + 20  # 12 hex digits: room for 16**12 copies
        first, last = self.field_at // self.LINE, (self.field_at + 11) // self.LINE
        self.piece = (first * self.LINE, min(len(pdf), (last + 1) * self.LINE))  # PDF bytes re-encoded
        piece_wire = len(base64.encodebytes(pdf[self.piece[0]:self.piece[1]]).replace(b"\n", b"\r\n"))
        self.head = wire[:start]
        self.before = wire[start: start + first * 78]
        self.after = wire[start + first * 78 + piece_wire:]
        self.ident = message.ident.encode()

    def copy(self, n: int) -> tp.Message:
        ident = b"%s-%07d" % (self.ident, n)
        head = self.head.replace(self.ident, ident)
        piece = bytearray(self.pdf[self.piece[0]:self.piece[1]])
        offset = self.field_at - self.piece[0]
        piece[offset: offset + 12] = b"%012x" % n
        lines = b"".join(base64.b64encode(piece[i: i + self.LINE]) + b"\r\n"
                         for i in range(0, len(piece), self.LINE))
        wire = head + self.before + lines + self.after
        return tp.Message(ident=ident.decode(), rcpt=self.message.rcpt, wire=wire,
                          size=self.message.size + len(head) - len(self.head))


def copy_number(bench_id: str) -> int | None:
    """n from a copy's X-Bench-Id ("<pool id>-<n>")."""
    tail = bench_id.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def check_copies(templates: list[Template]) -> dict[str, Any]:
    """The copies are what they claim: valid MIME with a readable PDF whose bytes differ per copy."""
    import hashlib

    from pypdf import PdfReader

    copies = [templates[0].copy(n) for n in (0, 1, 123456)] + [templates[-1].copy(7)]
    digests, ids, pages = set(), set(), []
    for message in copies:
        raw = message.wire[:-3].replace(b"\r\n..", b"\r\n.")
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        parts = [p for p in parsed.walk() if p.get_content_type() == "application/pdf"]
        assert len(parts) == 1, "no PDF attachment in a copy"
        pdf = parts[0].get_payload(decode=True)
        pages.append(len(PdfReader(io.BytesIO(pdf), strict=True).pages))
        n = copy_number(message.ident)
        assert n is not None and b"%012x> <" % n in pdf, "the PDF trailer /ID does not carry the copy number"
        assert parsed["X-Bench-Id"] == message.ident, "X-Bench-Id not rewritten"
        digests.add(hashlib.sha256(pdf).hexdigest())
        ids.add(parsed["Message-ID"])
    assert len(digests) == len(copies) and len(ids) == len(copies), "copies are not all distinct"
    return {"copies_checked": len(copies), "pages": pages}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Soak benchmark of the fax gateway: PSS of the gateway's process tree, sampled every second,"
                    " over a long closed-loop SMTP run on 127.0.0.1; is it flat after warm-up?",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000, help="messages to send")
    parser.add_argument("--size", default="2k", choices=list(tp.SIZES), help="message size")
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
    if opts.messages < 2 or opts.sessions < 1 or opts.interval <= 0:
        parser.error("--messages must be at least 2, --sessions at least 1 and --interval above 0")
    opts.pool = opts.pool or DEFAULT_POOL[opts.size]
    if opts.warmup is None:
        opts.warmup = min(max(WARMUP_MIN, math.ceil(WARMUP_FRACTION * opts.messages)), opts.messages // 2)
    if not 0 < opts.warmup < opts.messages:
        parser.error("--warmup must be between 1 and --messages - 1")
    opts.user_set = list(opts.set)
    opts.set = tp.with_quota_off(opts.set)
    return opts


def disk_check(workroot: Path, opts: argparse.Namespace) -> None:
    """The store keeps every body (retention: 30 days), and the log two lines per message."""
    need = opts.messages * (tp.SIZES[opts.size] * 1.2 + 2_000) + 64 * MIB
    free = shutil.disk_usage(workroot).free
    if free < 1.5 * need:
        raise SystemExit(f"{workroot}: {free / 2**30:.1f} GiB free, the run needs about {need / 2**30:.1f} GiB"
                         " (store and log); use --workdir elsewhere or fewer --messages")


async def sampler(progress: Progress, relay: tp.GatewayRelay, sink: tp.FastSink, samples: list[dict[str, Any]],
                  interval: float, started: float, stop: asyncio.Event) -> None:
    """Every `interval` s: PSS of the gateway's tree, messages accepted and arrived, CPU seconds."""
    me = psutil.Process()
    next_at = time.monotonic()
    while True:
        mem = tp.tree_memory(relay.pids())
        pythons = other_pythons(relay.pids())
        arrived = await sink.arrivals()
        now = time.monotonic()
        if not mem["processes"]:
            progress.stop_reason = progress.stop_reason or "the gateway exited"
            stop.set()
            return
        samples.append({
            "t": round(now - started, 3), "sent": progress.sent, "accepted": progress.accepted,
            "refused": sum(progress.refused.values()), "arrived": arrived.count,
            "pss_kib": mem["pss"] // 1024, "own_kib": (mem["pss_anon"] + mem["pss_shmem"]) // 1024,
            "pss_anon_kib": mem["pss_anon"] // 1024, "pss_shmem_kib": mem["pss_shmem"] // 1024,
            "pss_file_kib": mem["pss_file"] // 1024, "rss_kib": mem["rss"] // 1024,
            "file_rss_kib": (mem["rss"] - mem["anonymous"]) // 1024, "hwm_kib": mem["hwm"] // 1024,
            "processes": mem["processes"], "other_pythons": pythons,
            "gateway_cpu_s": round(tp.tree_cpu_seconds(relay.pids()), 2),
            "sink_cpu_s": round(tp.tree_cpu_seconds(sink.pids()), 2),
            "client_cpu_s": round(tp.cpu_seconds([me]), 2),
            "machine_busy_s": round(tp.machine_busy_seconds(), 2),
        })
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


async def send_loop(client: tp.ClientSession, templates: list[Template], progress: Progress, deadline: float,
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
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    workroot = Path(tempfile.mkdtemp(prefix="faxgw-soak-", dir=opts.workdir))
    started_wall = time.time()
    try:
        return await soak(opts, workroot, started_wall)
    finally:
        if opts.keep:
            print(f"kept: {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)


async def soak(opts: argparse.Namespace, workroot: Path, started_wall: float) -> int:
    disk_check(workroot, opts)
    desc = tp.machine()
    desc["store_filesystem"] = tp.filesystem_of(workroot)
    print(f"machine: {desc['cpu_model']}, {desc['cores_logical']} cores, {desc['memory_total_mib']} MiB, "
          f"{desc['python']}, {desc['kernel'].split(' #')[0]}, store on {desc['store_filesystem']},"
          f" load {desc['load_average_at_start']}")
    if desc["gateway_commit"] and "uncommitted" in desc["gateway_commit"]:
        print(f"note: gateway/ has uncommitted changes; this measures the working tree ({desc['gateway_commit']})")
    print(f"soak: {opts.messages:,} messages of {opts.size} over {opts.sessions} sessions, at most"
          f" {opts.seconds:g} s of sending; warm-up = the first {opts.warmup:,} messages; PSS every"
          f" {opts.interval:g} s")
    print(f"gateway: production defaults (durability unchanged) except {QUOTA_OVERRIDE}: {QUOTA_REASON}"
          + (f"; experiments: {', '.join(opts.user_set)}" if opts.user_set else ""))

    nonce = f"{int(started_wall) % 100000:05d}"
    built = time.monotonic()
    pool = tp.build_pool(f"soak{opts.size}", tp.SIZES[opts.size], opts.pool, nonce)
    templates = [Template(m) for m in pool]
    workload = {"target_bytes": tp.SIZES[opts.size], "pool": len(pool),
                "mean_bytes": round(sum(m.size for m in pool) / len(pool)),
                "min_bytes": min(m.size for m in pool), "max_bytes": max(m.size for m in pool),
                "pool_sample": tp.check_pool(pool), "copies": check_copies(templates),
                "build_seconds": round(time.monotonic() - built, 2)}
    del pool
    print(f"workload: {len(templates):,} distinct documents built in {workload['build_seconds']:g} s, mean"
          f" {workload['mean_bytes']:,} bytes; each message sent is a unique copy (own X-Bench-Id, Message-ID,"
          f" PDF /ID)")

    workdir = workroot / "gateway"
    workdir.mkdir()
    sink = tp.FastSink(reply_limit=64 * MIB)  # the `ids` reply lists every X-Bench-Id
    relay = tp.GatewayRelay(opts)
    clients = [tp.ClientSession(0) for _ in range(opts.sessions)]
    progress = Progress(limit=opts.messages, accepted_numbers=bytearray(opts.messages))
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    sink_ids: list[str] = []
    final = tp.Arrivals(0, None, 0)
    drained_at = None
    try:
        await sink.start(workdir)
        await relay.start(workdir, sink.port)
        print(f"gateway pid {relay.pids()[0]} on {tp.HOST}:{relay.port}, sink on {tp.HOST}:{sink.port};"
              f" work directory {workroot}")
        for client in clients:
            client.port = relay.port
        await asyncio.gather(*(client.connect() for client in clients))
        started = time.monotonic()
        progress.first_send = started
        tasks.append(asyncio.create_task(sampler(progress, relay, sink, samples, opts.interval, started, stop)))
        tasks.append(asyncio.create_task(report_progress(progress, samples, started, stop)))
        deadline = started + opts.seconds
        refusal_limit = max(100, opts.messages // 100)
        await asyncio.gather(*(send_loop(c, templates, progress, deadline, stop, refusal_limit) for c in clients))
        if not progress.stop_reason:
            progress.stop_reason = "count"
        print(f"  sending done ({progress.stop_reason}): {progress.accepted:,} accepted in"
              f" {time.monotonic() - started:.0f} s; waiting for the sink", flush=True)
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        final = await tp.wait_arrivals(sink, progress.accepted, opts.drain_timeout)
        drained_at = time.monotonic()
        await asyncio.sleep(opts.idle_after)  # PSS at rest, queue empty
        final = await sink.arrivals()
        sink_ids = await sink.ids()
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        await relay.stop()
        await sink.stop()
    checks = relay.verify()
    if opts.keep:
        checks["work_directory"] = str(workroot)

    arrived_numbers = collections.Counter(copy_number(i) for i in sink_ids)
    accepted_set = {n for n, flag in enumerate(progress.accepted_numbers) if flag}
    lost = sorted(accepted_set - set(arrived_numbers))
    unexpected = sorted(set(arrived_numbers) - accepted_set)  # arrived without a 250 seen by the client
    sending_seconds = max(progress.last_ack - started, 1e-9)
    e2e_seconds = max((final.last or time.monotonic()) - started, 1e-9)
    result = {
        "stopped_by": progress.stop_reason, "sent": progress.sent, "accepted": progress.accepted,
        "refused": dict(progress.refused), "arrived": final.count, "arrived_unique": final.unique,
        "lost": len(lost), "lost_sample": lost[:10], "duplicates": final.count - (final.unique or 0),
        "arrived_without_250": len(unexpected), "arrived_without_250_sample": unexpected[:10],
        "accept_seconds": round(sending_seconds, 2), "accepted_per_s": round(progress.accepted / sending_seconds, 1),
        "e2e_seconds": round(e2e_seconds, 2), "e2e_per_s": round(final.count / e2e_seconds, 1),
        "drain_seconds": round(drained_at - progress.last_ack, 2) if drained_at and progress.last_ack else None,
        "backlog_at_last_ack": backlog_at_end(samples, progress.accepted),
        "ack_p50_ms": tp.percentile(progress.ack_ms, 50), "ack_p99_ms": tp.percentile(progress.ack_ms, 99),
        "cpu_pct": cpu_shares(samples, progress.accepted),
        "job_states": checks.get("job_states"), "checks": checks,
    }
    memory = analyse(samples, progress.accepted, opts.warmup)
    memory["verdict"] = verdict(memory, result)
    print_report(opts, result, memory)
    if opts.json:
        report = {
            "benchmark": "greenfax-gateway bench/soak.py",
            "requirement": "Memory stays flat over a long run: a soak of 100,000 messages shows no growth in PSS"
                           " after warm-up.",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
            "duration_s": round(time.time() - started_wall, 1),
            "machine": desc,
            "settings": {"messages": opts.messages, "size": opts.size, "sessions": opts.sessions,
                         "seconds": opts.seconds, "warmup_messages": opts.warmup, "pool": opts.pool,
                         "interval_s": opts.interval, "drain_timeout_s": opts.drain_timeout,
                         "idle_after_s": opts.idle_after, "sink": "fast (bench/sink.py)",
                         "gateway": relay.describe(),
                         "quota_override": {"setting": QUOTA_OVERRIDE, "why": QUOTA_REASON},
                         "durability": "gateway defaults: SQLite WAL, synchronous=FULL, 250 after commit",
                         "thresholds": {"growth_mib": FLAT_GROWTH_MIB,
                                        "slope_mib_per_10k": FLAT_SLOPE_MIB_PER_10K}},
            "workload": workload,
            "result": result,
            "memory": memory,
            "sample_fields": "t: s since the first send; sent/accepted/refused: client counts; arrived: at the"
                             " sink; *_kib: the gateway's process tree from smaps_rollup (hwm: VmHWM of the"
                             " largest process); *_cpu_s: cumulative CPU seconds; machine_busy_s: all CPUs",
            "samples": samples,
        }
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\nJSON written to {opts.json} ({len(samples)} samples)")
    return 0 if memory["verdict"]["flat"] else 1


# --- analysis ------------------------------------------------------------------------------------

# The series analysed: sample key, label. PSS = own + file-backed share (bench/README.md, "Soak").
SERIES = {"pss": ("pss_kib", "PSS"), "own": ("own_kib", "own"),  # own: anonymous + shmem PSS
          "file_pss": ("pss_file_kib", "file PSS"), "file_rss": ("file_rss_kib", "file RSS")}


def _at(samples: list[dict[str, Any]], accepted: int) -> dict[str, Any] | None:
    """The first sample taken once `accepted` messages had their 250."""
    return next((s for s in samples if s["accepted"] >= accepted), None)


def _fit(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y on x."""
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def _point(s: dict[str, Any]) -> dict[str, Any]:
    return {"t": s["t"], "accepted": s["accepted"],
            **{f"{name}_mib": round(s[key] / 1024, 2) for name, (key, _label) in SERIES.items()},
            "other_pythons": s.get("other_pythons")}


def analyse(samples: list[dict[str, Any]], total: int, warmup: int) -> dict[str, Any]:
    """For each series: the value at the end of warm-up and at 25/50/75/100% of the messages, the maximum
    after warm-up, the growth (that maximum minus the value at the end of warm-up) and the slope."""
    out: dict[str, Any] = {"warmup_messages": warmup, "samples": len(samples)}
    if not samples or total <= warmup:
        out["problem"] = f"too few messages accepted ({total:,}) for a warm-up of {warmup:,}"
        return out
    end = _at(samples, total)
    sending = samples[: samples.index(end) + 1] if end is not None else samples  # up to the sample at 100%
    warm = _at(sending, warmup)
    after = [s for s in sending if s["accepted"] >= warmup]
    if warm is None or len(after) < 3:
        out["problem"] = f"too few samples after a warm-up of {warmup:,} messages"
        return out
    out["samples_after_warmup"] = len(after)
    out["first"] = _point(samples[0])
    out["warmup_end"] = _point(warm)
    out["checkpoints"] = {}
    for pct in CHECKPOINTS:
        at = _at(sending, math.ceil(total * pct / 100))
        out["checkpoints"][f"{pct}%"] = _point(at) if at is not None else None
    out["at_rest"] = _point(samples[-1])  # after the drain and --idle-after seconds
    out["series"] = {}
    for name, (key, label) in SERIES.items():
        peak = max(after, key=lambda s, k=key: s[k])
        slope = _fit([(s["accepted"], s[key]) for s in after])
        slope_10k = None if slope is None else round(slope * 10_000, 1)
        out["series"][name] = {
            "label": label, "warmup_end_mib": round(warm[key] / 1024, 2),
            "max_after_warmup_mib": round(peak[key] / 1024, 2), "max_at_message": peak["accepted"],
            "growth_mib": round((peak[key] - warm[key]) / 1024, 2), "slope_kib_per_10k": slope_10k,
            "fitted_growth_mib": None if slope_10k is None else round(slope_10k / 1024 * (total - warmup) / 10_000, 2),
            "min_after_warmup_mib": round(min(s[key] for s in after) / 1024, 2),
        }
    by_neighbours: dict[int, list[int]] = collections.defaultdict(list)
    for s in after:
        by_neighbours[s.get("other_pythons", 0)].append(s["pss_file_kib"])
    out["file_pss_by_other_pythons"] = {
        str(n): {"samples": len(v), "median_mib": round(statistics.median(v) / 1024, 2),
                 "min_mib": round(min(v) / 1024, 2), "max_mib": round(max(v) / 1024, 2)}
        for n, v in sorted(by_neighbours.items())}
    out["peak_pss_mib"] = round(max(s["pss_kib"] for s in samples) / 1024, 2)
    out["peak_hwm_mib"] = round(max(s["hwm_kib"] for s in samples) / 1024, 2)
    return out


def _within(series: dict[str, Any], *, slope: bool = True) -> bool:
    ok = series["growth_mib"] < FLAT_GROWTH_MIB
    if slope:
        ok = ok and (series["slope_kib_per_10k"] or 0.0) / 1024 < FLAT_SLOPE_MIB_PER_10K
    return ok


def verdict(memory: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Flat: after warm-up the gateway's own memory (anonymous + shmem PSS) never rises more than
    FLAT_GROWTH_MIB above its value at the end of warm-up, its least-squares slope is below
    FLAT_SLOPE_MIB_PER_10K per 10,000 messages, and its file-backed RSS grows less than FLAT_GROWTH_MIB.
    Total PSS is judged and shown too; its file-backed share moves with other processes (README, "Soak")."""
    if "problem" in memory:
        return {"flat": False, "line": f"inconclusive: {memory['problem']}"}
    series = memory["series"]
    own, file_rss, pss, file_pss = series["own"], series["file_rss"], series["pss"], series["file_pss"]
    flat = _within(own) and _within(file_rss, slope=False)

    def describe(s: dict[str, Any], slope: bool = True) -> str:
        text = f"{s['growth_mib']:+.2f} MiB"
        if slope:
            text += f", slope {(s['slope_kib_per_10k'] or 0.0) / 1024:+.3f} MiB/10k"
        return text

    line = (f"{'flat' if flat else 'NOT flat'}: after warm-up the gateway's own memory (anon+shmem PSS) grew"
            f" {describe(own)}, its file-backed RSS {describe(file_rss, False)}"
            f" (limits: < {FLAT_GROWTH_MIB:g} MiB, < {FLAT_SLOPE_MIB_PER_10K:g} MiB/10k)")
    pss_line = f"total PSS {describe(pss)}: "
    if _within(pss):
        pss_line += "within the same limits"
    elif _within(own) and _within(file_rss, slope=False):
        pss_line += (f"outside the limits only through its file PSS ({describe(file_pss)}) while its file RSS"
                     f" moved {file_rss['growth_mib']:+.2f} MiB: the same pages, shared with a changing number of"
                     " other processes on the machine; not growth of the gateway")
    else:
        pss_line += "outside the limits"
    caveats = []
    if result["stopped_by"] != "count":
        caveats.append(f"stopped by {result['stopped_by']} after {result['accepted']:,} messages")
    if result["lost"] or result["duplicates"] or result["refused"] or result["arrived_without_250"]:
        caveats.append("messages were refused, lost or duplicated (see above)")
    states = result.get("job_states") or {}
    if set(states) - {"submitted"}:
        caveats.append(f"jobs not all submitted: {states}")
    if caveats:
        line += "; but " + "; ".join(caveats)
    return {"flat": flat and not caveats, "line": line, "pss_line": pss_line, "pss_within_limits": _within(pss),
            "thresholds": {"growth_mib": FLAT_GROWTH_MIB, "slope_mib_per_10k": FLAT_SLOPE_MIB_PER_10K}}


def backlog_at_end(samples: list[dict[str, Any]], total: int) -> int | None:
    """Accepted but not yet at the sink when the last 250 came (the sample at 100%): queued in the store."""
    end = _at(samples, total)
    return None if end is None else end["accepted"] - end["arrived"]


def cpu_shares(samples: list[dict[str, Any]], total: int) -> dict[str, float]:
    """CPU% (100 = one core) of the gateway, sink, client and everything else, over the sending phase."""
    end = _at(samples, total) or (samples[-1] if samples else None)
    if not samples or end is None or end is samples[0]:
        return {}
    first, span = samples[0], end["t"] - samples[0]["t"]
    ours = {k: end[f"{k}_cpu_s"] - first[f"{k}_cpu_s"] for k in ("gateway", "sink", "client")}
    out = {k: round(100 * v / span, 1) for k, v in ours.items()}
    out["other"] = round(max(0.0, 100 * (end["machine_busy_s"] - first["machine_busy_s"] - sum(ours.values()))
                             / span), 1)
    return out


def print_report(opts: argparse.Namespace, result: dict[str, Any], memory: dict[str, Any]) -> None:
    fmt = tp._fmt
    print()
    print(f"messages: sent {result['sent']:,}, accepted {result['accepted']:,}, refused"
          f" {sum(result['refused'].values()):,}{' ' + str(result['refused']) if result['refused'] else ''};"
          f" arrived {result['arrived']:,} ({result['arrived_unique']:,} unique): lost {result['lost']:,},"
          f" duplicates {result['duplicates']:,}, arrived without a 250 {result['arrived_without_250']:,}")
    print(f"rates: {result['accepted_per_s']:.1f} acc/s over {result['accept_seconds']:.0f} s,"
          f" {result['e2e_per_s']:.1f} e2e/s over {result['e2e_seconds']:.0f} s;"
          f" ack p50 {fmt(result['ack_p50_ms'], 2)} ms, p99 {fmt(result['ack_p99_ms'], 2)} ms;"
          f" stopped by {result['stopped_by']}; queued in the store at the last 250: {result['backlog_at_last_ack']},"
          f" drained {fmt(result['drain_seconds'], 0)} s later")
    cpu = result["cpu_pct"]
    if cpu:
        print(f"CPU% while sending (100 = one core): gateway {cpu['gateway']}, sink {cpu['sink']},"
              f" client {cpu['client']}, other {cpu['other']}"
              + ("  <- other load on the machine" if cpu["other"] >= tp.BUSY_PCT else ""))
    checks = result["checks"]
    states = result["job_states"] or {}
    print("job states in the store: " + (", ".join(f"{k} {v:,}" for k, v in sorted(states.items())) or "none")
          + ("" if set(states) <= {"submitted"} else "  <- not all submitted"))
    if checks.get("log_warnings"):
        print(f"gateway log: {checks['log_warnings']:,} warning/error lines, e.g. {checks['log_warning_sample'][0]}")
    print()
    if "problem" in memory:
        print(f"memory: {memory['problem']}")
        print(f"verdict: {memory['verdict']['line']}")
        return
    print(f"memory of the gateway's process tree (smaps_rollup every {opts.interval:g} s, {memory['samples']}"
          f" samples; warm-up = the first {memory['warmup_messages']:,} messages), MiB:")
    print("  PSS = own (anonymous + shmem PSS: heap, stacks) + file PSS (its share of code and libraries, divided"
          " among all processes mapping them);\n  file RSS = the file-backed pages it has mapped, whoever else maps them")
    names = list(SERIES)
    print(f"  {'':<19} {'messages':>9} {'t s':>6} " + " ".join(f"{SERIES[n][1]:>9}" for n in names)
          + "  other pythons")
    rows = [("first sample", memory["first"]), ("end of warm-up", memory["warmup_end"])]
    rows += list(memory["checkpoints"].items()) + [("at rest (drained)", memory["at_rest"])]
    for label, p in rows:
        if p is None:
            print(f"  {label:<19} {'-':>9}")
            continue
        print(f"  {label:<19} {p['accepted']:>9,} {p['t']:>6.0f} "
              + " ".join(f"{p[n + '_mib']:>9.2f}" for n in names) + f"  {p['other_pythons']:>13}")
    series = memory["series"]
    print(f"  {'max after warm-up':<19} {'':>9} {'':>6} "
          + " ".join(f"{series[n]['max_after_warmup_mib']:>9.2f}" for n in names))
    print(f"  {'growth after w-up':<19} {'':>9} {'':>6} " + " ".join(f"{series[n]['growth_mib']:>+9.2f}" for n in names))
    print(f"  {'slope KiB/10k msg':<19} {'':>9} {'':>6} "
          + " ".join(f"{fmt(series[n]['slope_kib_per_10k']):>9}" for n in names))
    print(f"  (growth = max after warm-up - value at the end of warm-up; slope: least squares over the"
          f" {memory['samples_after_warmup']} samples after warm-up; peak PSS {memory['peak_pss_mib']:.1f} MiB,"
          f" VmHWM {memory['peak_hwm_mib']:.1f} MiB)")
    print("  file PSS after warm-up by the number of other processes running the same Python (sink and client"
          " included):\n    " + "; ".join(
              f"{n}: median {v['median_mib']:.2f} MiB ({v['min_mib']:.2f}-{v['max_mib']:.2f}, {v['samples']} samples)"
              for n, v in memory["file_pss_by_other_pythons"].items()))
    print(f"verdict: {memory['verdict']['line']}")
    print(f"         {memory['verdict']['pss_line']}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return asyncio.run(run(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: everything the soak started has been stopped", file=sys.stderr)
        return 130
    finally:
        tp._kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
