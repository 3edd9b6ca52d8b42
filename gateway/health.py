"""Health: what /healthz reports of a running gateway, each part, and the failing ones named.

The store must take a write, every SMTP listener serve, the upstream's set-up
work, every background runner run without a failing round; the IMAP reader
and the feed poller say how they are doing. Any failing part makes the
status "failing" (HTTP 503) and is named in `failing`, with what to do where
the part knows it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from gateway import store
from gateway.errors import StoreError

if TYPE_CHECKING:
    from gateway.outbound.oauth import TokenSource
    from gateway.service import Service


async def health_report(service: Service) -> dict[str, Any]:
    failing: list[str] = []
    try:
        await service.writer.run(store.set_meta, "health_checked_at", store.iso(service.clock()))
        store_part: dict[str, Any] = {"writable": True}
    except StoreError as exc:
        store_part = {"writable": False, "error": str(exc)}
        failing.append(f"store: {exc}")
    report: dict[str, Any] = {
        "status": "ok", "failing": failing, "mode": "SANDBOX" if service.settings.sandbox_mode else "production",
        "store": store_part, **local_report(service, failing),
        "unknown_jobs": await asyncio.to_thread(_count, service, "unknown"),
    }
    if service.worker is not None:
        report["workers"] = await asyncio.to_thread(_workers, service, report, failing)
    report["status"] = "failing" if failing else "ok"
    return report


def local_report(service: Service, failing: list[str]) -> dict[str, Any]:
    """The parts this process runs (with several workers, each writes these into its heartbeat)."""
    serving = [server.is_serving() for server in service.servers]
    if not all(serving):
        failing.append("listeners: an SMTP listener is down")
    report: dict[str, Any] = {
        "listeners": {"smtp": [f"{h}:{p}" for h, p in service.smtp_addresses], "up": all(serving)},
        "upstream": _upstream(service, failing),
        "runners": service.runners.report(),
    }
    failing.extend(service.runners.failing())
    if service.tokens is not None:
        report["oauth"] = _oauth(service.tokens)
    if service.imap is not None:
        state = service.imap.state
        report["imap"] = {"connected": state.connected, "last_error": state.last_error, "applied": state.applied}
    if service.feed is not None:
        feed = service.feed.state
        report["feed"] = {"last_poll": store.iso(feed.last_poll_at) if feed.last_poll_at else None,
                          "last_error": feed.last_error, "last_rows": feed.last_rows,
                          "next_allowed": store.iso(feed.next_allowed_at) if feed.next_allowed_at else None}
    return report


def _workers(service: Service, report: dict[str, Any], failing: list[str]) -> list[dict[str, Any]]:
    """Every worker process from its heartbeat: a failing part of any one, or a silent one, fails the whole."""
    assert service.worker is not None
    conn = service.read_store()
    try:
        rows = store.worker_rows(conn)
    finally:
        conn.close()
    now = service.clock()
    out = []
    for row in rows:
        age = (now - store.parse_iso(row["seen_at"])).total_seconds()
        health, mine = row["health"], row["name"] == service.name
        problems = [] if mine else [f"worker {row['name']}: {item}" for item in health.get("failing", [])]
        if not mine and age > store.STALE:
            problems = [f"worker {row['name']}: no heartbeat for {age:.0f} s (hung, or stopped without its"
                        " supervisor noticing)"]
        failing.extend(problems)
        for part in ("imap", "feed"):  # the singletons' parts, from the worker that runs them
            if part in health and part not in report:
                report[part] = health[part]
        out.append({"name": row["name"], "pid": row["pid"], "started_at": row["started_at"], "seen_at": row["seen_at"],
                    "this": mine, "singletons": bool(health.get("singletons")),
                    "status": "failing" if problems else "ok"})
    live = sum(1 for w in out if w["this"] or w["status"] == "ok")
    if live < service.worker.workers:
        failing.append(f"workers: {live} of {service.worker.workers} are running (the supervisor starts the others)")
    return out


def _upstream(service: Service, failing: list[str]) -> dict[str, Any]:
    fwd = service.forwarder
    if fwd is None:
        return {"last_reached": None, "last_setup_failure": None, "last_setup_failure_at": None}
    if fwd.setup_failing:
        failing.append(f"upstream: {fwd.last_setup_failure}")
    if fwd.unrecorded:
        failing.append(f"forwarder: {fwd.unrecorded} outcomes wait for the store to take them")
    return {"last_reached": store.iso(fwd.last_success) if fwd.last_success else None,
            "last_setup_failure": fwd.last_setup_failure,
            "last_setup_failure_at": store.iso(fwd.last_setup_failure_at) if fwd.last_setup_failure_at else None,
            "outcomes_waiting": fwd.unrecorded}


def _oauth(tokens: TokenSource) -> dict[str, Any]:
    """The access token's state: never the token itself."""
    valid_for = tokens.valid_for()
    refused = tokens.refused
    return {"provider": tokens.settings.provider, "grant": tokens.settings.grant,
            "token_valid_for": round(valid_for) if valid_for is not None else None,
            "obtained_at": store.iso(tokens.obtained_at) if tokens.obtained_at else None,
            "requests": tokens.requests, "problem": str(refused) if refused else tokens.problem,
            "sending_stopped": refused is not None}


def _count(service: Service, state: str) -> int:
    conn = service.read_store()
    try:
        return store.count_jobs(conn, state)
    finally:
        conn.close()
