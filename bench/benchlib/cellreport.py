"""throughput.py's report: a line per cell as it ends, the table, the headroom and the relay ratios."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .cell import CellResult
from .report import BUSY_PCT, aligned, fmt

LEGEND = """
acc/s       250 replies / (first send .. last 250)
e2e/s       arrivals at the sink / (first send .. last arrival)
e2e/s@send  arrivals while the clients were still sending: the forwarding rate under intake load
backlog     accepted but not yet at the sink at the last 250; a backlog that grows means e2e/s holds only
            for a burst: run longer cells (e.g. --messages 5000 --seconds 20) to see the sustained rate
ack         from writing the message data to its reply
txn         from MAIL FROM to the final reply (waits before DATA, such as Postfix's in_flow_delay, show here)
peak PSS    the relay's process tree, sampled every 50 ms
CPU%        CPU time / wall time of the timed phase (100% = one core); client = this process;
            other = everything else on the machine (other load makes a cell's numbers unreliable)"""


def cell_line(cell: CellResult) -> str:
    """The line printed as soon as a cell ends."""
    return (f"  {cell.relay:>8} {cell.size:>5} x {cell.sessions:>2}: {cell.accepted_per_s:7.1f} acc/s"
            f" {cell.e2e_per_s:7.1f} e2e/s  p50 {fmt(cell.ack_p50_ms, 2)} ms"
            f" p99 {fmt(cell.ack_p99_ms, 2)} ms txn p99 {fmt(cell.txn_p99_ms, 2)} ms"
            f"  PSS {fmt(cell.peak_pss_mib)} MiB"
            f"  CPU {cell.cpu_pct}")


def notes(c: CellResult) -> str:
    """What to know about a cell before trusting its numbers: losses, refusals, load, warnings."""
    out = []
    if c.refused:
        out.append("refused " + ",".join(f"{k}x{v}" for k, v in c.refused.items()))
    if c.missing:
        out.append(f"{c.missing} never arrived")
    if c.duplicates:
        out.append(f"{c.duplicates} duplicates")
    if c.stopped_by == "time":
        out.append("time-bound")
    if c.cpu_pct.get("other", 0) >= BUSY_PCT:
        out.append("other load on the machine")
    warnings = c.checks.get("log_warnings")
    if warnings:
        out.append(f"{warnings} log warnings")
    if c.checks.get("not_sent"):
        out.append(f"{c.checks['not_sent']} queued but not sent")
    if c.checks.get("queue_left"):
        out.append(f"{c.checks['queue_left']} left in the queue")
    return "; ".join(out)


def table(cells: list[CellResult]) -> str:
    header = ["relay", "size", "sess", "sent", "acc/s", "e2e/s", "e2e/s@send", "backlog", "ack p50 ms",
              "ack p99 ms", "txn p99 ms", "peak PSS MiB", "CPU% relay/sink/client/other", "notes"]
    rows = [header]
    for c in cells:
        cpu = "/".join(fmt(c.cpu_pct.get(k), 0) for k in ("relay", "sink", "client", "other"))
        rows.append([c.relay + (f"#{c.round}" if c.round > 1 else ""), c.size, str(c.sessions), str(c.sent),
                     fmt(c.accepted_per_s), fmt(c.e2e_per_s), fmt(c.e2e_while_sending_per_s),
                     str(c.backlog_at_last_ack), fmt(c.ack_p50_ms, 2), fmt(c.ack_p99_ms, 2),
                     fmt(c.txn_p99_ms, 2), fmt(c.peak_pss_mib), cpu, notes(c)])
    return "\n".join(aligned(rows, right={2, 3, 4, 5, 6, 7, 8, 9, 10, 11}))


def process_lines(cells: list[CellResult]) -> list[str]:
    """The relay's CPU% per process in each cell: the gateway's supervisor and workers, Postfix's daemons."""
    out = []
    for c in cells:
        if c.relay_process_cpu_pct:
            parts = sorted(c.relay_process_cpu_pct.items(), key=lambda item: -item[1])
            out.append(f"  {c.relay + (f'#{c.round}' if c.round > 1 else ''):<10} {c.size:>5} x {c.sessions:>2}  "
                       + "  ".join(f"{name} {fmt(pct, 0)}" for name, pct in parts))
    return out


def headroom(cells: list[CellResult], relay: str, baseline: str = "direct") -> list[str]:
    """How much faster the client straight into the sink is than the relay (should be several times)."""
    out = []
    best: dict[tuple[str, int, str], float] = {}
    for c in cells:
        key = (c.size, c.sessions, c.relay)
        best[key] = max(best.get(key, 0.0), c.e2e_per_s)
    for (size, sessions, name), rate in best.items():
        if name != relay:
            continue
        base = best.get((size, sessions, baseline))
        if base and rate:
            ratio = base / rate
            flag = "" if ratio >= 2 else "  <-- client/sink may limit this cell"
            out.append(f"  {size:>5} x {sessions:>2} sessions: client->sink {base:7.1f}/s vs client->{relay}->sink"
                       f" {rate:7.1f}/s = {ratio:4.1f}x headroom{flag}")
    return out


# Figures compared between two relays: (label, CellResult attribute).
RATIO_FIGURES = [("acc/s", "accepted_per_s"), ("e2e/s", "e2e_per_s"), ("ack p50", "ack_p50_ms"),
                 ("ack p99", "ack_p99_ms"), ("peak PSS", "peak_pss_mib")]


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def ratios(cells: list[CellResult], relay: str = "gateway", yardstick: str = "postfix") -> list[dict[str, Any]]:
    """Per size x sessions cell: the median of each figure over the rounds, for both relays, and
    relay/yardstick. Above 1 is better for msg/s and worse for latency and memory."""
    runs: dict[tuple[str, int, str], list[CellResult]] = {}
    for c in cells:
        runs.setdefault((c.size, c.sessions, c.relay), []).append(c)
    out = []
    for (size, sessions, name), mine in runs.items():
        theirs = runs.get((size, sessions, yardstick))
        if name != relay or not theirs:
            continue
        entry: dict[str, Any] = {"size": size, "sessions": sessions, "rounds": [len(mine), len(theirs)]}
        for _label, attr in RATIO_FIGURES:
            a = _median([getattr(c, attr) for c in mine])
            b = _median([getattr(c, attr) for c in theirs])
            entry[attr] = {relay: a and round(a, 3), yardstick: b and round(b, 3),
                           "ratio": round(a / b, 2) if a and b else None}
        out.append(entry)
    return out


def ratio_lines(entries: list[dict[str, Any]], relay: str = "gateway", yardstick: str = "postfix") -> list[str]:
    header = ["size", "sess"] + [label for label, _attr in RATIO_FIGURES]
    rows = [header]
    for e in entries:
        rows.append([e["size"], str(e["sessions"])]
                    + [fmt(e[attr]["ratio"], 2) + "x" if e[attr]["ratio"] else "-" for _label, attr in RATIO_FIGURES])
    lines = [(f"{relay} / {yardstick} (median over rounds; msg/s: above 1 = {relay} faster;"
              f" ack and PSS: above 1 = {relay} slower or bigger):")]
    return lines + aligned(rows, right=set(range(len(header))), rule=False, indent="  ")


def print_summary(cells: list[CellResult], relays: list[str], compared: list[dict[str, Any]]) -> None:
    """After the last cell: the table, the headroom over each relay, the ratios and the legend."""
    print()
    print(table(cells))
    lines = process_lines(cells)
    if lines:
        print("\nthe relay's CPU% per process (100% = one core):")
        print("\n".join(lines))
    for relay in relays:
        if relay != "direct" and "direct" in relays:
            lines = headroom(cells, relay)
            if lines:
                print(f"\nclient+sink headroom over {relay} (end to end):")
                print("\n".join(lines))
    if compared:
        print()
        print("\n".join(ratio_lines(compared)))
    print(LEGEND)
