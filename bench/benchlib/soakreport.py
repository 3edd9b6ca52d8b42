"""soak.py's report: what the run did, the memory table and the verdict, printed and as JSON."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .report import BUSY_PCT, fmt
from .soakmemory import FLAT_GROWTH_MIB, FLAT_SLOPE_MIB_PER_10K, SERIES

QUOTA_REASON = ("the default daily quota of 1000 faxes per sender would refuse the soak's traffic"
                " (all from one envelope sender)")
REQUIREMENT = ("Memory stays flat over a long run: a soak of 100,000 messages shows no growth in PSS"
               " after warm-up.")
SAMPLE_FIELDS = ("t: s since the first send; sent/accepted/refused: client counts; arrived: at the"
                 " sink; *_kib: the gateway's process tree from smaps_rollup (hwm: VmHWM of the"
                 " largest process); *_cpu_s: cumulative CPU seconds; machine_busy_s: all CPUs")


def print_run(result: dict[str, Any]) -> None:
    """Messages, rates, CPU and the store's and log's state after the run."""
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
              + ("  <- other load on the machine" if cpu["other"] >= BUSY_PCT else ""))
    checks = result["checks"]
    states = result["job_states"] or {}
    print("job states in the store: " + (", ".join(f"{k} {v:,}" for k, v in sorted(states.items())) or "none")
          + ("" if set(states) <= {"submitted"} else "  <- not all submitted"))
    if checks.get("log_warnings"):
        print(f"gateway log: {checks['log_warnings']:,} warning/error lines, e.g. {checks['log_warning_sample'][0]}")


def _print_points(memory: dict[str, Any]) -> None:
    """One row per point of the run: first sample, end of warm-up, the checkpoints, at rest."""
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


def _print_growth(memory: dict[str, Any]) -> None:
    """Maximum, growth and slope after warm-up per series, and file PSS by neighbours."""
    names = list(SERIES)
    series = memory["series"]
    print(f"  {'max after warm-up':<19} {'':>9} {'':>6} "
          + " ".join(f"{series[n]['max_after_warmup_mib']:>9.2f}" for n in names))
    print(f"  {'growth after w-up':<19} {'':>9} {'':>6} "
          + " ".join(f"{series[n]['growth_mib']:>+9.2f}" for n in names))
    print(f"  {'slope KiB/10k msg':<19} {'':>9} {'':>6} "
          + " ".join(f"{fmt(series[n]['slope_kib_per_10k']):>9}" for n in names))
    print(f"  (growth = max after warm-up - value at the end of warm-up; slope: least squares over the"
          f" {memory['samples_after_warmup']} samples after warm-up; peak PSS {memory['peak_pss_mib']:.1f} MiB,"
          f" VmHWM {memory['peak_hwm_mib']:.1f} MiB)")
    print("  file PSS after warm-up by the number of other processes running the same Python (sink and client"
          " included):\n    " + "; ".join(
              f"{n}: median {v['median_mib']:.2f} MiB ({v['min_mib']:.2f}-{v['max_mib']:.2f}, {v['samples']} samples)"
              for n, v in memory["file_pss_by_other_pythons"].items()))


def print_memory(opts: argparse.Namespace, memory: dict[str, Any]) -> None:
    """The memory table and the verdict."""
    print()
    if "problem" in memory:
        print(f"memory: {memory['problem']}")
        print(f"verdict: {memory['verdict']['line']}")
        return
    print(f"memory of the gateway's process tree (smaps_rollup every {opts.interval:g} s, {memory['samples']}"
          f" samples; warm-up = the first {memory['warmup_messages']:,} messages), MiB:")
    print("  PSS = own (anonymous + shmem PSS: heap, stacks) + file PSS (its share of code and libraries, divided"
          " among all processes mapping them);\n"
          "  file RSS = the file-backed pages it has mapped, whoever else maps them")
    _print_points(memory)
    _print_growth(memory)
    print(f"verdict: {memory['verdict']['line']}")
    print(f"         {memory['verdict']['pss_line']}")


def json_report(opts: argparse.Namespace, *, desc: dict[str, Any], gateway: dict[str, Any],
                workload: dict[str, Any], result: dict[str, Any], memory: dict[str, Any],
                samples: list[dict[str, Any]], started_wall: float, quota_override: str) -> dict[str, Any]:
    return {
        "benchmark": "greenfax-gateway bench/soak.py",
        "requirement": REQUIREMENT,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
        "duration_s": round(time.time() - started_wall, 1),
        "machine": desc,
        "settings": {"messages": opts.messages, "size": opts.size, "sessions": opts.sessions,
                     "seconds": opts.seconds, "warmup_messages": opts.warmup, "pool": opts.pool,
                     "interval_s": opts.interval, "drain_timeout_s": opts.drain_timeout,
                     "idle_after_s": opts.idle_after, "sink": "fast (bench/sink.py)",
                     "gateway": gateway,
                     "quota_override": {"setting": quota_override, "why": QUOTA_REASON},
                     "durability": "gateway defaults: SQLite WAL, synchronous=FULL, 250 after commit",
                     "thresholds": {"growth_mib": FLAT_GROWTH_MIB,
                                    "slope_mib_per_10k": FLAT_SLOPE_MIB_PER_10K}},
        "workload": workload,
        "result": result,
        "memory": memory,
        "sample_fields": SAMPLE_FIELDS,
        "samples": samples,
    }
