"""A private Postfix instance as a plain relay to the sink: throughput.py's yardstick (issue 6).

Built on tests/peers/postfix.py (PostfixInstance, loaded by path): config,
queue, data directory and maillog live in the cell's directory, smtpd
listens on a free 127.0.0.1 port, and everything is relayed to the sink
without DNS. /etc/postfix and any system instance are left alone. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from . import REPO_DIR, procs
from .gatewayproc import parse_overrides


def postfix_peer() -> Any:
    """tests/peers/postfix.py, the private Postfix instance the tests use (loaded by path)."""
    spec = importlib.util.spec_from_file_location("bench_postfix_peer", REPO_DIR / "tests" / "peers" / "postfix.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# main.cf settings of the relay, each with the reason. Most are Postfix's defaults, written out so
# that the comparison does not change silently with another Postfix version; none weakens
# durability (the cleanup server fsyncs every queue file before smtpd answers 250, and main.cf
# has no switch for that). tests/peers/postfix.py adds the private paths, the relayhost and
# loopback-only settings.
POSTFIX_SETTINGS: dict[str, tuple[str, str]] = {
    "default_process_limit": ("100", "default; room for 32 smtpd + 20 smtp + cleanup processes at once"),
    "in_flow_delay": ("1s", ("default, left on: smtpd's cleanup waits up to 1 s per message when intake"
                             " runs ahead of the queue manager (shows as slower MAIL..RCPT, see txn p99)")),
    "message_size_limit": ("10240000", "default (10 MB), far above the 200 KB messages"),
    "smtpd_client_connection_count_limit": ("50", ("default; loopback is exempt anyway"
                                                   " (smtpd_client_event_limit_exceptions = $mynetworks)")),
    "smtpd_client_connection_rate_limit": ("0", "default: no rate limit"),
    "smtpd_client_message_rate_limit": ("0", "default: no rate limit"),
    "smtp_connection_cache_on_demand": ("yes", "default: reuse connections to the sink while mail is queued"),
    "initial_destination_concurrency": ("5", "default: deliveries to the sink start at 5 in parallel"),
    "default_destination_concurrency_limit": ("20", ("default, and at least the gateway's upstream.concurrency"
                                                     " (4 unless --set raises it, then raised to match)")),
}

# What tests/peers/postfix.py sets besides POSTFIX_SETTINGS, for describe().
THE_REST = ("private paths; loopback only; no local delivery; relay from mynetworks = 127.0.0.0/8 to relayhost"
            " [127.0.0.1]:SINK_PORT without DNS (smtp_host_lookup = native, smtp_dns_support_level = disabled);"
            " retry timers of 2-4 s (they only matter for deferred mail, and verify() counts any as a problem)")


class PostfixRelay:
    """A private Postfix instance as a plain relay to the sink: the yardstick for the gateway (issue 6).

    Built on tests/peers/postfix.py: config, queue, data directory and
    maillog live in the cell's directory, smtpd listens on a free 127.0.0.1
    port, and everything is relayed to [127.0.0.1]:upstream_port without DNS.
    /etc/postfix and any system instance are left alone. Needs root.
    """

    name = "postfix"

    def __init__(self, options: argparse.Namespace) -> None:
        self.settings = {name: value for name, (value, _why) in POSTFIX_SETTINGS.items()}
        self.reasons = {name: why for name, (_value, why) in POSTFIX_SETTINGS.items()}
        # Never fewer parallel deliveries to the sink than the gateway is given (--set upstream.concurrency).
        gateway_concurrency = parse_overrides(options.set).get("upstream", {}).get("concurrency", 0)
        limit = "default_destination_concurrency_limit"
        if isinstance(gateway_concurrency, int) and gateway_concurrency > int(self.settings[limit]):
            self.settings[limit] = str(gateway_concurrency)
            self.reasons[limit] = "raised to the gateway's upstream.concurrency (--set)"
        for item in options.postfix_set:
            name, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--postfix-set {item!r}: expected NAME=VALUE")
            self.settings[name.strip()] = value.strip()
            self.reasons[name.strip()] = "--postfix-set (experiment)"
        self.peer = postfix_peer()
        self.instance: Any = None
        self.port = 0

    async def start(self, workdir: Path, upstream_port: int) -> None:
        if reason := self.peer.unavailable_reason():
            raise RuntimeError(reason)
        self.port = procs.free_port()
        self.instance = self.peer.PostfixInstance(workdir / "postfix", upstream_port, smtpd_port=self.port,
                                                  settings=self.settings)
        procs.adopt_daemon(self.instance, self.instance.stop)
        await asyncio.to_thread(self.instance.start)
        await procs.wait_listening(self.port, None, 30, "postfix")

    def pids(self) -> list[int]:
        """The master: smtpd, cleanup, qmgr, smtp... are its children, started on demand; the
        sampler walks the tree again at every sample, so they are all counted."""
        pid = self.instance.master_pid if self.instance is not None else None
        return [pid] if pid else []

    async def stop(self) -> None:
        if self.instance is None:
            return
        if self.instance.master_pid is None:  # it never started
            procs.release_daemon(self.instance)
            return
        # Everything has reached the sink by now, but the queue manager may not have removed
        # the last queue files yet: give it a moment so that verify() sees the real state.
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(self.instance.queue_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.instance.stop)
        procs.release_daemon(self.instance)

    def verify(self) -> dict[str, Any]:
        """After stop: the queue must be empty, every queued message sent, and the maillog clean."""
        assert self.instance is not None
        listing = self.instance.queue_listing()
        log = self.instance.maillog()
        queued = set(re.findall(r" (\w+): from=<.*?>, size=\d+, nrcpt=\d+ \(queue active\)", log))
        sent = set(re.findall(r" (\w+): to=<.*?>, .*status=sent ", log))
        problems = [line for line in log.splitlines()
                    if re.search(r"\b(warning|error|fatal|panic):|status=(deferred|bounced|expired)", line)]
        result: dict[str, Any] = {"queued": len(queued), "sent": len(sent), "not_sent": len(queued - sent),
                                  "queue_left": 0 if "Mail queue is empty" in listing else len(
                                      re.findall(r"(?m)^[0-9A-F]+\*?!? ", listing)),
                                  "log_warnings": len(problems)}
        if problems:
            result["log_warning_sample"] = problems[:3]
        return result

    def describe(self) -> dict[str, Any]:
        instance = self.peer.PostfixInstance(Path("/CELL_DIR/postfix"), 0, settings=self.settings)
        postconf = os.path.join(os.path.dirname(self.peer.POSTFIX), "postconf")
        version = ""
        with contextlib.suppress(Exception):
            version = subprocess.run([postconf, "-dh", "mail_version"], capture_output=True, text=True,
                                     timeout=10, check=False).stdout.strip()
        return {"command": "postfix -c DIR start (tests/peers/postfix.py, one fresh instance per cell)",
                "version": version,
                "main.cf": instance.main_settings() | {"relayhost": "[127.0.0.1]:SINK_PORT"},
                "why": self.reasons | {"the rest (tests/peers/postfix.py)": THE_REST},
                "master.cf": "smtpd on 127.0.0.1:PORT plus the usual services, chroot n, maxproc from"
                             " default_process_limit (cleanup unlimited)",
                "durability": "Postfix defaults: each queue file is fsynced before the 250"}
