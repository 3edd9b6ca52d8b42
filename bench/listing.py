"""Listing benchmark: `faxgw status` on a store of a million jobs.

For each filter an operator might use, it measures:

- query: the listing's query as the gateway runs it in-process
  (gateway.jobfilter + store.list_jobs on a read-only connection, warm cache);
- sqlite3: the very same SQL (captured from that run with its parameters
  bound) run by the `sqlite3` command-line tool on the same file, per
  execution (a run of K executions minus a run of K `SELECT 1`);
- command: the whole `faxgw --config CFG status ...` as an operator runs
  it, Python start included (wall time, median and worst of --runs).

Targets: query within 2x of sqlite3; command under 300 ms. Query times are
per call, each sample repeated to take at least 20 ms; the command's median,
best and worst of --runs are shown.

The store is generated once with the store's own schema (store.migrate) and
bulk inserts (a year of jobs: mostly delivered, some failed, the last day's
still waiting; skewed numbers and senders, two events per job), then cached
in --workdir, so later runs start at once. A cached store made by an older
schema is migrated as `faxgw serve` would, and the migration is timed.
Generation alone runs with synchronous=OFF (a fixture, not the gateway).

    .venv/bin/python bench/listing.py [--jobs 1000000] [--workdir /var/tmp/faxgw-bench] [--runs 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchlib import machine  # bench/ is sys.path[0] when this runs as a script
from benchlib.gatewayproc import render_config
from benchlib.report import fixed_row, write_json
from gateway import store
from gateway.jobfilter import parse_filter
from gateway.store.jobs import CODE_ALPHABET

FAXGW = Path(sys.executable).with_name("faxgw")
SEED = 4711
DAYS = 365
NUMBERS = 20_000
CHUNK = 50_000
FINAL = [("delivered", 0.90), ("failed", 0.06), ("rejected", 0.01), ("expired", 0.01), ("cancelled", 0.02)]
RECENT = [("submitted", 0.15), ("queued", 0.05), ("deferred", 0.05), ("unknown", 0.02), ("held", 0.02),
          ("delivered", 0.65), ("failed", 0.06)]
REASONS = {"failed": ["busy", "no_answer", "invalid_number", "other"], "rejected": [None], "expired": [None]}
ROLES = ["scanner", "erp", "billing", "copier", "practice", "frontdesk", "lab", "orders"]


# --- the store --------------------------------------------------------------------------------------------


def code_of(n: int) -> str:
    """A unique job code per row number (a bijection onto the code space, so codes look random)."""
    value = (n * 7919 + 12345) % len(CODE_ALPHABET) ** 6
    chars = []
    for _ in range(6):
        value, digit = divmod(value, len(CODE_ALPHABET))
        chars.append(CODE_ALPHABET[digit])
    return "FX" + "".join(chars)


def number_of(rank: int) -> str:
    return f"+1212{5_000_000 + rank:07d}"


def senders() -> list[str]:
    return [f"{ROLES[i % len(ROLES)]}{i // len(ROLES)}@site{i % 13}.office.example" for i in range(300)]


def rows(count: int, newest: datetime) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...], list[tuple[Any, ...]]]]:
    """(message, job, events) per job, oldest first."""
    rnd = random.Random(SEED)
    pool = senders()
    number_weights = [1 / (rank + 1) for rank in range(NUMBERS)]
    sender_weights = [1 / (rank + 1) ** 0.7 for rank in range(len(pool))]
    numbers = rnd.choices(range(NUMBERS), number_weights, k=count)
    chosen = rnd.choices(range(len(pool)), sender_weights, k=count)
    span = DAYS * 86400.0
    ages = sorted((rnd.random() * span for _ in range(count)), reverse=True)
    body = b"From: x@office.example\r\nSubject: fax\r\n\r\n" + b"x" * 200 + b"\r\n"
    for n in range(count):
        created = newest - timedelta(seconds=ages[n])
        at = store.iso(created)
        recent = ages[n] < 86400
        table = RECENT if recent else FINAL
        state = rnd.choices([s for s, _w in table], [w for _s, w in table])[0]
        reason = rnd.choice(REASONS[state]) if state in REASONS else None
        done = store.iso(created + timedelta(seconds=40 + rnd.random() * 200))
        final = state in ("delivered", "failed", "rejected", "expired", "cancelled")
        sender = pool[chosen[n]]
        kept = ages[n] < 30 * 86400  # retention purged older bodies
        message = (n + 1, at, "192.168.1.20", "erp", sender, None, sender, len(body), 0, 0,
                   body if kept else b"", None if kept else done)
        result = {"delivered": "delivered, 2 pages (by email-imap)", "failed": f"failed, {reason} (by notify)",
                  "queued": None, "submitted": "250 2.0.0 queued as 1234"}.get(state, state)
        job = (n + 1, code_of(n), n + 1, number_of(numbers[n])[1:] + "@greenfax.com", number_of(numbers[n]), sender,
               state, reason, 1 if state != "queued" else 0, at if state in ("queued", "deferred") else None,
               at, done if final or state == "submitted" else at, result,
               "250 2.0.0 Ok" if state != "queued" else None, str(10_000_000 + n) if final else None,
               2 if state == "delivered" else None, f"sender:{sender}", "192.168.1.20")
        events = [(n + 1, at, "intake", "queued", "accepted from 192.168.1.20")]
        if state != "queued":
            events.append((n + 1, done, "forwarder" if not final else "email-imap", state, result or state))
        yield message, job, events


def generate(path: Path, count: int) -> float:
    """Write the store to `path` (via a temporary name, so an interrupted run caches nothing)."""
    started = time.perf_counter()
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    conn = store.connect(partial)
    store.migrate(conn)
    conn.execute("PRAGMA synchronous = OFF")  # a benchmark fixture: the gateway never does this
    newest = datetime.now(UTC).replace(microsecond=0)
    store.set_meta(conn, "bench:newest", store.iso(newest))
    source = rows(count, newest)
    while True:
        chunk = [next(source, None) for _ in range(CHUNK)]
        chunk = [item for item in chunk if item is not None]
        if not chunk:
            break
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (id, received_at, client, helo, mail_from, auth_user, header_from, size, smtputf8,"
            " needs_8bitmime, raw, purged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (m for m, _j, _e in chunk))
        conn.executemany(
            "INSERT INTO jobs (id, code, message_id, recipient, number, sender, state, reason, attempts,"
            " next_attempt_at, created_at, updated_at, last_result, upstream_reply, reference_id, pages,"
            " sender_key, client) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (j for _m, j, _e in chunk))
        conn.executemany("INSERT INTO events (job_id, at, source, state, detail) VALUES (?, ?, ?, ?, ?)",
                         (event for _m, _j, events in chunk for event in events))
        conn.execute("COMMIT")
        print(f"  generated {chunk[-1][1][0]:,} jobs", file=sys.stderr, end="\r")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    partial.rename(path)
    for suffix in ("-wal", "-shm"):
        Path(str(partial) + suffix).unlink(missing_ok=True)
    print(file=sys.stderr)
    return time.perf_counter() - started


def prepare(workdir: Path, count: int) -> tuple[Path, dict[str, Any]]:
    """The cached store (generated when missing), brought to the current schema as `serve` would."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"jobs-{count}.sqlite3"
    facts: dict[str, Any] = {"path": str(path), "cached": path.exists()}
    if not path.exists():
        facts["generated_seconds"] = round(generate(path, count), 1)
    conn = store.connect(path)
    before = conn.execute("PRAGMA user_version").fetchone()[0]
    started = time.perf_counter()
    store.migrate(conn)
    if before != store.SCHEMA_VERSION:
        facts["migrated"] = f"v{before} -> v{store.SCHEMA_VERSION} in {time.perf_counter() - started:.1f} s"
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    facts["newest"] = store.get_meta(conn, "bench:newest")
    conn.close()
    facts["bytes"] = path.stat().st_size
    return path, facts


# --- the filters -------------------------------------------------------------------------------------------


def filters(newest: str) -> dict[str, list[str]]:
    """Named `faxgw status` option lists; times are counted back from the store's newest job."""
    moment = store.parse_iso(newest)
    back = lambda **delta: (moment - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    return {
        "all": [],
        "state-failed": ["--state", "failed"],
        "state-deferred+unknown": ["--state", "deferred", "--state", "unknown"],
        "number-busy": ["--number", "+1 212 500 0000"],
        "number-rare": ["--number", "+1 212 501 5000"],
        "sender-common": ["--sender", "scanner"],
        "sender-rare": ["--sender", "orders36@"],
        "sender-none": ["--sender", "nobody@nowhere"],
        "since-2h": ["--since", back(hours=2)],
        "delivered-since-3d": ["--state", "delivered", "--since", back(days=3)],
        "failed-since-30d-limit-1000": ["--state", "failed", "--since", back(days=30), "--limit", "1000"],
    }


def as_filter(options: list[str]) -> dict[str, Any]:
    """The option list as parse_filter's arguments (what the CLI passes it)."""
    args: dict[str, Any] = {"states": []}
    for flag, value in zip(options[::2], options[1::2], strict=True):
        if flag == "--state":
            args["states"].append(value)
        else:
            args[flag.removeprefix("--")] = value
    args["states"] = tuple(args["states"])
    return args


def captured_sql(conn: sqlite3.Connection, options: list[str]) -> tuple[str, int]:
    """The listing's SQL with its parameters bound, as the gateway ran it, and its row count."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        jobs = store.list_jobs(conn, **parse_filter(**as_filter(options), region="US").as_query())
    finally:
        conn.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    return selects[-1], len(jobs)


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def time_query(conn: sqlite3.Connection, options: list[str], runs: int) -> list[float]:
    """Per-call seconds of the listing's query, each sample repeated to take at least 20 ms."""
    query = parse_filter(**as_filter(options), region="US").as_query()
    started = time.perf_counter()
    store.list_jobs(conn, **query)
    repeat = max(1, min(1000, int(0.02 / max(time.perf_counter() - started, 1e-6))))
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(repeat):
            store.list_jobs(conn, **query)
        samples.append((time.perf_counter() - started) / repeat)
    return samples


def time_sqlite_cli(path: Path, sql: str, runs: int, repeat: int) -> list[float]:
    """Per-execution seconds of `sql` in the sqlite3 shell (K executions minus K `SELECT 1`)."""
    def one(statement: str) -> float:
        script = (statement.rstrip().rstrip(";") + ";\n") * repeat
        started = time.perf_counter()
        subprocess.run(["sqlite3", "-readonly", str(path)], input=script.encode(), stdout=subprocess.DEVNULL,
                       check=True)
        return time.perf_counter() - started

    samples = []
    for _ in range(runs):
        samples.append(max(0.0, one(sql) - one("SELECT 1")) / repeat)
    return samples


def time_command(config: Path, options: list[str], runs: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k != "FAXGW_CONFIG"}
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([str(FAXGW), "--config", str(config), "status", *options], stdout=subprocess.DEVNULL,
                       env=env, check=True)
        samples.append(time.perf_counter() - started)
    return samples


def write_config(directory: Path, store_path: Path) -> Path:
    """A config for `faxgw status` on the store (the upstream is never contacted)."""
    config = directory / "faxgw.toml"
    config.write_text(render_config({
        "store": {"path": str(store_path)},
        "upstream": {"host": "127.0.0.1", "port": 2526, "tls": "none", "account_sender": "faxes@office.example",
                     "return_path": "fax-bounce@office.example"}}))
    return config


def python_start_ms(runs: int) -> float:
    """Python's own start (`python -c pass`), median of `runs`, for comparison with the command."""
    startup = [0.0] * runs
    for i in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        startup[i] = time.perf_counter() - started
    return median_ms(startup)


def measure(conn: sqlite3.Connection, path: Path, config: Path, options: list[str], runs: int,
            have_cli: bool) -> dict[str, Any]:
    """One filter: its rows and SQL, the query in-process, in the sqlite3 shell, and the whole command."""
    sql, count = captured_sql(conn, options)
    query = time_query(conn, options, runs)
    row: dict[str, Any] = {"options": options, "rows": count, "query_ms": median_ms(query), "sql": sql}
    if have_cli:
        repeat = max(1, min(200, int(0.2 / max(statistics.median(query), 1e-5))))
        row["sqlite3_ms"] = median_ms(time_sqlite_cli(path, sql, max(3, runs // 2), repeat))
    command = time_command(config, options, runs)
    row["command_ms"], row["command_max_ms"] = median_ms(command), round(max(command) * 1000, 1)
    row["command_min_ms"] = round(min(command) * 1000, 1)
    return row


TABLE_SPEC = "<30 >6 >9 >10 >6 >10 >7 >7"


def print_results(args: argparse.Namespace, facts: dict[str, Any], results: dict[str, Any]) -> None:
    print(f"store: {facts['path']} ({facts['bytes'] / 2**20:.0f} MiB, {args.jobs:,} jobs"
          f"{', cached' if facts['cached'] else ', generated in ' + str(facts['generated_seconds']) + ' s'}"
          f"{', migrated ' + facts['migrated'] if 'migrated' in facts else ''}); python start"
          f" {results['python_start_ms']} ms")
    print(fixed_row(["filter", "rows", "query ms", "sqlite3 ms", "ratio", "command ms", "best", "worst"], TABLE_SPEC))
    for name, row in results["filters"].items():
        cli = row.get("sqlite3_ms")
        ratio = f"{row['query_ms'] / cli:.2f}" if cli else "-"
        print(fixed_row([name, row["rows"], row["query_ms"], cli if cli is not None else "-", ratio,
                         row["command_ms"], row["command_min_ms"], row["command_max_ms"]], TABLE_SPEC))
    print(f"load average {results['machine']['load'][0]:.2f} when started (2 cores: above 1 means others were busy)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000, help="jobs in the store")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/faxgw-bench"), help="where the store is cached")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure")
    parser.add_argument("--only", help="filters to run, comma-separated (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    have_cli = shutil.which("sqlite3") is not None
    if not have_cli:
        print("sqlite3 command-line tool not found (apt-get install -y sqlite3): its column stays empty",
              file=sys.stderr)
    path, facts = prepare(args.workdir, args.jobs)
    results: dict[str, Any] = {"machine": machine.brief("cores", "python", "sqlite", "load"),
                               "store": facts, "filters": {}}
    results["python_start_ms"] = python_start_ms(args.runs)
    chosen = filters(facts["newest"])
    if args.only:
        chosen = {name: chosen[name] for name in args.only.split(",")}
    conn = store.connect(path, readonly=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), path)
        time_command(config, [], 1)  # warm the page cache and the bytecode
        for name, options in chosen.items():
            results["filters"][name] = measure(conn, path, config, options, args.runs, have_cli)
    conn.close()
    print_results(args, facts, results)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
