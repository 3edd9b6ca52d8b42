"""soak.py's analysis: memory after warm-up from the one-second samples, and the verdict.

PSS = own (anonymous + shmem PSS: what the gateway allocates) + file PSS
(its share of the file-backed pages it maps, which moves whenever another
process mapping the same libraries starts or exits). The verdict judges own
memory and file RSS; total PSS is judged and shown beside it
(bench/README.md, "Soak", says why, and why these thresholds).
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import Any

WARMUP_FRACTION = 0.10
WARMUP_MIN = 5_000
# Verdict thresholds (bench/README.md, "Soak", says why these).
FLAT_GROWTH_MIB = 2.0  # own memory (and file RSS): max after warm-up minus the value at the end of warm-up
FLAT_SLOPE_MIB_PER_10K = 0.5  # own memory: least-squares slope against messages after warm-up
CHECKPOINTS = (25, 50, 75, 100)

Sample = dict[str, Any]

# The series analysed: sample key, label. PSS = own + file-backed share (bench/README.md, "Soak").
SERIES = {"pss": ("pss_kib", "PSS"), "own": ("own_kib", "own"),  # own: anonymous + shmem PSS
          "file_pss": ("pss_file_kib", "file PSS"), "file_rss": ("file_rss_kib", "file RSS")}


def _at(samples: list[Sample], accepted: int) -> Sample | None:
    """The first sample taken once `accepted` messages had their 250."""
    return next((s for s in samples if s["accepted"] >= accepted), None)


def _fit(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y on x."""
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def _point(s: Sample) -> dict[str, Any]:
    return {"t": s["t"], "accepted": s["accepted"],
            **{f"{name}_mib": round(s[key] / 1024, 2) for name, (key, _label) in SERIES.items()},
            "other_pythons": s.get("other_pythons")}


def _series(after: list[Sample], warm: Sample, total: int, warmup: int) -> dict[str, Any]:
    """Per series: the value at the end of warm-up, the maximum after it, the growth and the slope."""
    out = {}
    for name, (key, label) in SERIES.items():
        peak = max(after, key=lambda s, k=key: s[k])
        slope = _fit([(s["accepted"], s[key]) for s in after])
        slope_10k = None if slope is None else round(slope * 10_000, 1)
        out[name] = {
            "label": label, "warmup_end_mib": round(warm[key] / 1024, 2),
            "max_after_warmup_mib": round(peak[key] / 1024, 2), "max_at_message": peak["accepted"],
            "growth_mib": round((peak[key] - warm[key]) / 1024, 2), "slope_kib_per_10k": slope_10k,
            "fitted_growth_mib": None if slope_10k is None else round(slope_10k / 1024 * (total - warmup) / 10_000, 2),
            "min_after_warmup_mib": round(min(s[key] for s in after) / 1024, 2),
        }
    return out


def _file_pss_by_neighbours(after: list[Sample]) -> dict[str, Any]:
    """File PSS after warm-up, grouped by how many other processes ran the same Python."""
    by_neighbours: dict[int, list[int]] = collections.defaultdict(list)
    for s in after:
        by_neighbours[s.get("other_pythons", 0)].append(s["pss_file_kib"])
    return {str(n): {"samples": len(v), "median_mib": round(statistics.median(v) / 1024, 2),
                     "min_mib": round(min(v) / 1024, 2), "max_mib": round(max(v) / 1024, 2)}
            for n, v in sorted(by_neighbours.items())}


def analyse(samples: list[Sample], total: int, warmup: int) -> dict[str, Any]:
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
    out["series"] = _series(after, warm, total, warmup)
    out["file_pss_by_other_pythons"] = _file_pss_by_neighbours(after)
    out["peak_pss_mib"] = round(max(s["pss_kib"] for s in samples) / 1024, 2)
    out["peak_hwm_mib"] = round(max(s["hwm_kib"] for s in samples) / 1024, 2)
    return out


def _within(series: dict[str, Any], *, slope: bool = True) -> bool:
    ok = series["growth_mib"] < FLAT_GROWTH_MIB
    if slope:
        ok = ok and (series["slope_kib_per_10k"] or 0.0) / 1024 < FLAT_SLOPE_MIB_PER_10K
    return ok


def _describe(s: dict[str, Any], slope: bool = True) -> str:
    text = f"{s['growth_mib']:+.2f} MiB"
    if slope:
        text += f", slope {(s['slope_kib_per_10k'] or 0.0) / 1024:+.3f} MiB/10k"
    return text


def _pss_line(series: dict[str, Any]) -> str:
    """Total PSS against the same limits, and whether only its file-backed share went past them."""
    own, file_rss, pss, file_pss = series["own"], series["file_rss"], series["pss"], series["file_pss"]
    line = f"total PSS {_describe(pss)}: "
    if _within(pss):
        return line + "within the same limits"
    if _within(own) and _within(file_rss, slope=False):
        return line + (f"outside the limits only through its file PSS ({_describe(file_pss)}) while its file RSS"
                       f" moved {file_rss['growth_mib']:+.2f} MiB: the same pages, shared with a changing number of"
                       " other processes on the machine; not growth of the gateway")
    return line + "outside the limits"


def _caveats(result: dict[str, Any]) -> list[str]:
    """Why a flat memory line would still not pass: the run did not complete cleanly."""
    caveats = []
    if result["stopped_by"] != "count":
        caveats.append(f"stopped by {result['stopped_by']} after {result['accepted']:,} messages")
    if result["lost"] or result["duplicates"] or result["refused"] or result["arrived_without_250"]:
        caveats.append("messages were refused, lost or duplicated (see above)")
    states = result.get("job_states") or {}
    if set(states) - {"submitted"}:
        caveats.append(f"jobs not all submitted: {states}")
    return caveats


def verdict(memory: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Flat: after warm-up the gateway's own memory (anonymous + shmem PSS) never rises more than
    FLAT_GROWTH_MIB above its value at the end of warm-up, its least-squares slope is below
    FLAT_SLOPE_MIB_PER_10K per 10,000 messages, and its file-backed RSS grows less than FLAT_GROWTH_MIB.
    Total PSS is judged and shown too; its file-backed share moves with other processes (README, "Soak")."""
    if "problem" in memory:
        return {"flat": False, "line": f"inconclusive: {memory['problem']}"}
    series = memory["series"]
    own, file_rss = series["own"], series["file_rss"]
    flat = _within(own) and _within(file_rss, slope=False)
    line = (f"{'flat' if flat else 'NOT flat'}: after warm-up the gateway's own memory (anon+shmem PSS) grew"
            f" {_describe(own)}, its file-backed RSS {_describe(file_rss, False)}"
            f" (limits: < {FLAT_GROWTH_MIB:g} MiB, < {FLAT_SLOPE_MIB_PER_10K:g} MiB/10k)")
    caveats = _caveats(result)
    if caveats:
        line += "; but " + "; ".join(caveats)
    return {"flat": flat and not caveats, "line": line, "pss_line": _pss_line(series),
            "pss_within_limits": _within(series["pss"]),
            "thresholds": {"growth_mib": FLAT_GROWTH_MIB, "slope_mib_per_10k": FLAT_SLOPE_MIB_PER_10K}}


def backlog_at_end(samples: list[Sample], total: int) -> int | None:
    """Accepted but not yet at the sink when the last 250 came (the sample at 100%): queued in the store."""
    end = _at(samples, total)
    return None if end is None else end["accepted"] - end["arrived"]


def cpu_shares(samples: list[Sample], total: int) -> dict[str, float]:
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
