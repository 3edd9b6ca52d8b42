"""Prometheus metrics: counters the stages increment, gauges read from the store at scrape time.

Names are prefixed `faxgw_`, counters end in `_total`, ages in `_seconds`;
labels come from bounded sets only (policy check names, job states, channel
names, outcomes), never numbers, senders or free text. One `Metrics` object
is built by the service and handed to the stages that count.

With several worker processes each counts in its own files in
PROMETHEUS_MULTIPROC_DIR (the supervisor makes it, and removes a dead
worker's gauges); /metrics from any worker sums the counters of all of
them, dead ones included, so a total never goes down.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.models import JobState
from gateway.store import job_counts, parse_iso, utcnow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The *_created series only double the output; Prometheus does not need them.
disable_created_metrics()


class Metrics:
    def __init__(self, read_store: Callable[[], sqlite3.Connection] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.accepted = Counter("faxgw_messages_accepted_total", "Fax emails accepted (250)",
                                registry=self.registry)
        self.refused = Counter("faxgw_messages_refused_total", "SMTP refusals, by the policy check that refused",
                               ["reason"], registry=self.registry)
        self.forwards = Counter("faxgw_forward_attempts_total", "Forward attempts, by outcome", ["outcome"],
                                registry=self.registry)
        self.reports = Counter("faxgw_status_reports_total", "Status reports received, by channel",
                               ["channel"], registry=self.registry)
        self.unmatched = Counter("faxgw_unmatched_reports_total", "Status reports that matched no job",
                                 ["channel"], registry=self.registry)
        self.runner_up = Gauge("faxgw_runner_up", "1 while a background runner runs, by runner", ["runner"],
                               registry=self.registry, multiprocess_mode="livemax")
        self.runner_errors = Counter("faxgw_runner_errors_total", "Rounds of a background runner that failed",
                                     ["runner"], registry=self.registry)
        self.feed_polls = Counter("faxgw_feed_polls_total", "XML feed polls, by outcome", ["outcome"],
                                  registry=self.registry)
        self.limit_refusals = Counter("faxgw_limit_refusals_total",
                                      "Refusals by an abuse or cost limit, by limit name (gateway.outbound.quotas)",
                                      ["limit"], registry=self.registry)
        self.held = Counter("faxgw_jobs_held_total", "Jobs held at intake for an operator, by hold rule",
                            ["rule"], registry=self.registry)
        self.auth_failures = Counter("faxgw_auth_failures_total", "Failed SMTP AUTH attempts, by mechanism",
                                     ["mechanism"], registry=self.registry)
        self.oauth_requests = Counter("faxgw_oauth_token_requests_total",
                                      "Requests to the OAuth2 token endpoint, by outcome (ok, unavailable, refused)",
                                      ["outcome"], registry=self.registry)
        self.shown = self.registry  # what /metrics renders
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            self.shown = CollectorRegistry(auto_describe=True)
            multiprocess.MultiProcessCollector(self.shown)
        if read_store is not None:
            self.shown.register(StoreCollector(read_store))

    def report(self, channel: str, outcome: str) -> None:
        self.reports.labels(channel).inc()
        if outcome in ("unmatched", "unrecognised", "foreign"):
            self.unmatched.labels(channel).inc()

    def render(self) -> bytes:
        return generate_latest(self.shown)


class StoreCollector(Collector):
    """Jobs by state, queue depth and the oldest waiting job's age, read at scrape time."""

    def __init__(self, read_store: Callable[[], sqlite3.Connection]) -> None:
        self.read_store = read_store

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        conn = self.read_store()
        try:
            counts, oldest = job_counts(conn)
        finally:
            conn.close()
        jobs = GaugeMetricFamily("faxgw_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs
        waiting = sum(counts.get(s, 0) for s in ("queued", "deferred", "sending"))
        yield GaugeMetricFamily("faxgw_queue_depth", "Jobs waiting to be sent (queued, deferred, sending)",
                                value=waiting)
        age = (utcnow() - parse_iso(oldest)).total_seconds() if oldest else 0.0
        yield GaugeMetricFamily("faxgw_queue_oldest_age_seconds", "Age of the oldest job waiting to be sent",
                                value=max(age, 0.0))
