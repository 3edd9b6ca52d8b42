"""Upgrades, backups, retention and SIGHUP, as an operator meets them: real stores, real `faxgw` processes.

- `faxgw backup` while `faxgw serve` takes faxes: the copy opens, is
  consistent, is the owner's alone, and is never written over by accident.
- A restore (by `faxgw restore`, or a backup copied into place by hand)
  holds every unfinished job, with an event that says why.
- `serve` copies a store before migrating it, and refuses a newer schema.
- Retention: bodies and raw status mails go, job history stays, the file
  shrinks; `faxgw purge --dry-run` shows what would go.
- SIGHUP to a running `faxgw serve`: a renewed certificate is served on the
  next STARTTLS and HTTPS handshake, changed rules apply, a session opened
  before goes on; a broken rules file or certificate changes nothing.
"""

from __future__ import annotations

import asyncio
import email.policy
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
from contextlib import closing
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import sqlite_utils
import trustme
from conftest import NUMBER, codes_in, fax_message, free_port, pdf_bytes, send

# Fixtures (`jobs`, `serve`) and helpers shared with the tests of the other commands.
from test_cli import (  # noqa: F401
    _environ,
    faxgw,
    jobs,
    one_line_error,
    sandbox_config,
    serve,
    write_config,
)

from gateway import store
from gateway.store.schema import MIGRATIONS

pytestmark = pytest.mark.timeout(120)

# The maintenance commands, added to the `faxgw` group exactly as gateway/cli/main.py adds them.
ADMIN = ("import sys; from gateway.cli.main import cli, main; from gateway.cli.admin import backup, purge, restore;"
         " [cli.add_command(command) for command in (backup, restore, purge)]; main()")


def admin(*args: str, cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `faxgw backup|restore|purge ...` in a real process."""
    argv = [sys.executable, "-c", ADMIN, *(["--config", str(config)] if config else []), *args]
    return subprocess.run(argv, cwd=cwd, env=_environ(None), capture_output=True, text=True, timeout=60,
                          check=False)


def read_store(path: Path) -> sqlite3.Connection:
    return store.connect(path, readonly=True)


def states(path: Path) -> dict[str, str]:
    with closing(read_store(path)) as conn:
        return {job["code"]: job["state"] for job in store.list_jobs(conn, limit=100_000)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def wait_for(predicate, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# --- backup ------------------------------------------------------------------------------------


async def test_backup_while_serve_runs_and_faxes_flow(tmp_path, serve):
    config, port = sandbox_config(tmp_path / "faxgw.toml")
    serve(config, port)
    live = tmp_path / "var" / "faxgw.sqlite3"
    acked: list[str] = []
    stop = asyncio.Event()

    async def client(worker: int) -> None:
        for n in range(100):
            if stop.is_set():
                return
            number = f"1212555{worker}{n:03d}"
            message = fax_message(f"{number}@greenfax.com", pdf=pdf_bytes(marker=number))
            reply = await send(port, message, rcpts=[f"{number}@greenfax.com"])
            acked.extend(codes_in(reply.message))

    clients = [asyncio.create_task(client(worker)) for worker in range(1, 4)]
    await wait_for(lambda: len(acked) >= 15, "faxes before the backup")
    before = len(acked)
    target = tmp_path / "backups" / "faxgw-backup.sqlite3"
    target.parent.mkdir()
    result = await asyncio.to_thread(admin, "backup", str(target), cwd=tmp_path, config=config)
    after = len(acked)
    stop.set()
    await asyncio.gather(*clients)

    assert result.returncode == 0, result.stderr
    assert str(target) in result.stdout and "0600" in result.stdout
    assert mode(target) == 0o600
    assert not [p for p in target.parent.iterdir() if p != target], "a temporary file was left behind"
    with closing(read_store(target)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("PRAGMA foreign_key_check").fetchall() == []
        assert copy.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        assert store.get_meta(copy, "backup:taken_at")
        # A snapshot: every job has its message and its intake event; each 250 before it is in it.
        orphans = copy.execute("SELECT COUNT(*) FROM jobs j LEFT JOIN messages m ON m.id = j.message_id"
                               " WHERE m.id IS NULL OR length(m.raw) = 0").fetchone()[0]
        no_intake = copy.execute("SELECT COUNT(*) FROM jobs j WHERE NOT EXISTS (SELECT 1 FROM events e"
                                 " WHERE e.job_id = j.id AND e.source = 'intake')").fetchone()[0]
        codes = {row[0] for row in copy.execute("SELECT code FROM jobs")}
    assert (orphans, no_intake) == (0, 0)
    assert set(acked[:before]) <= codes
    assert len(codes) <= after + 3  # at most the messages in flight when it was taken
    with closing(read_store(live)) as conn:
        assert store.get_meta(conn, "backup:taken_at") is None  # the marker is in the copy only

    again = admin("backup", str(target), cwd=tmp_path, config=config)
    assert "--force" in one_line_error(again)
    forced = admin("backup", str(target), "--force", cwd=tmp_path, config=config)
    assert forced.returncode == 0, forced.stderr
    assert mode(target) == 0o600
    assert "is a directory" in one_line_error(admin("backup", str(target.parent), cwd=tmp_path, config=config))


# --- restore -------------------------------------------------------------------------------------


def restore_events(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [event for event in job["events"] if event["source"] == "restore"]


async def test_restore_holds_every_unfinished_job(jobs, tmp_path):
    backup = tmp_path / "before.sqlite3"
    made = admin("backup", str(backup), cwd=tmp_path, config=jobs.config)
    assert made.returncode == 0, made.stderr
    # The running gateway holds the store: no restore under it.
    refused = one_line_error(admin("restore", str(backup), cwd=tmp_path, config=jobs.config))
    assert f"pid {os.getpid()}" in refused and "stop it before restoring" in refused
    # After the backup: the deferred job is cancelled (the restore brings back the old state).
    assert jobs.faxgw("cancel", jobs.codes["deferred"]).returncode == 0
    await jobs.gw.service.stop()

    result = admin("restore", str(backup), cwd=tmp_path, config=jobs.config)
    assert result.returncode == 0, result.stderr
    path = jobs.gw.store_path
    unfinished = {label: jobs.codes[label] for label in ("submitted", "scanner", "deferred", "unknown")}
    listed = dict(re.findall(r"^  (FX\w+)  was (\w+)$", result.stdout, re.MULTILINE))
    assert listed == {code: "deferred" if label == "deferred" else "unknown" if label == "unknown"
                      else "submitted" for label, code in unfinished.items()}
    now = states(path)
    assert {code: now[code] for code in unfinished.values()} == {code: "held" for code in unfinished.values()}
    assert now[jobs.codes["rejected"]] == "rejected"  # final jobs stay as they were
    job = jobs.gw.job(jobs.codes["submitted"])
    (event,) = restore_events(job)
    assert event["state"] == "held"
    assert re.search(r"restored from a backup taken at \S+Z \(was submitted\): it may have been sent",
                     event["detail"])
    assert mode(path) == 0o600
    with closing(read_store(path)) as conn:
        assert store.get_meta(conn, "backup:taken_at") is None
    # The store it replaced is kept, the owner's alone, with the cancellation in it.
    (replaced,) = path.parent.glob("faxgw.sqlite3.pre-restore-*.bak")
    assert mode(replaced) == 0o600
    assert states(replaced)[jobs.codes["deferred"]] == "cancelled"


async def test_a_backup_copied_into_place_is_held_at_the_next_start(gateway, tmp_path):
    gw = await gateway(upstream={"retry_initial": 3600, "retry_max": 3600})
    address = "12125550450@greenfax.com"  # the sandbox defers it
    (deferred,) = codes_in((await gw.send(fax_message(address), rcpts=[address])).message)
    (submitted,) = codes_in((await gw.send()).message)
    await gw.wait_state(deferred, "deferred")
    await gw.wait_state(submitted, "submitted")
    config = write_config(tmp_path / "cli.toml", f"""
        [store]
        path = "{gw.store_path}"
        [sandbox]
        enabled = true
    """)
    copy = tmp_path / "copy.sqlite3"
    assert admin("backup", str(copy), cwd=tmp_path, config=config).returncode == 0
    await gw.service.stop()

    # The operator's way without `faxgw restore`: stop, copy the file over the store, start.
    for suffix in ("-wal", "-shm"):
        Path(f"{gw.store_path}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, gw.store_path)
    restarted = await gateway(upstream={"retry_initial": 3600, "retry_max": 3600})
    assert states(gw.store_path) == {deferred: "held", submitted: "held"}
    (event,) = restore_events(restarted.job(deferred))
    assert event["state"] == "held" and "(was deferred)" in event["detail"]

    # Released, it is tried again (the sandbox defers it again); a later start holds nothing (no marker).
    assert faxgw("release", deferred, cwd=tmp_path, config=config).returncode == 0
    await restarted.service.stop()
    again = await gateway(upstream={"retry_initial": 3600, "retry_max": 3600})
    await wait_for(lambda: again.job(deferred)["attempts"] == 2, "the released job's attempt")
    job = await again.wait_state(deferred, "deferred")
    assert [(e["source"], e["state"]) for e in job["events"]][-4:] == [
        ("restore", "held"), ("operator", "queued"), ("forwarder", "sending"), ("forwarder", "deferred")]
    assert states(gw.store_path)[submitted] == "held"


# --- schema upgrades --------------------------------------------------------------------------------


def older_store(path: Path) -> None:
    """A store at the schema version before this gateway's, with one job in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(store.connect(path)) as conn:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        db = sqlite_utils.Database(conn)
        for number, step in enumerate(MIGRATIONS[:-1], start=1):
            step(db)
            conn.execute(f"PRAGMA user_version = {number}")
        now = store.iso(store.utcnow())
        message = conn.execute("INSERT INTO messages (received_at, raw, size) VALUES (?, ?, 5)",
                               (now, b"x: y\r\n")).lastrowid
        job = conn.execute("INSERT INTO jobs (code, message_id, number, state, created_at, updated_at)"
                           " VALUES ('FX2345AB', ?, '+12125551234', 'delivered', ?, ?)",
                           (message, now, now)).lastrowid
        store.add_event(conn, job, now, "intake", "queued", "accepted")


def test_serve_backs_the_store_up_before_migrating(tmp_path, serve):
    config, port = sandbox_config(tmp_path / "faxgw.toml")
    path = tmp_path / "var" / "faxgw.sqlite3"
    older_store(path)
    proc = serve(config, port)
    proc.terminate()
    proc.wait(15)

    (copy,) = path.parent.glob(f"faxgw.sqlite3.pre-v{store.SCHEMA_VERSION}-*.bak")
    assert re.fullmatch(rf"faxgw\.sqlite3\.pre-v{store.SCHEMA_VERSION}-\d{{8}}T\d{{6}}Z\.bak", copy.name)
    assert mode(copy) == 0o600
    with closing(read_store(copy)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION - 1
        assert conn.execute("SELECT code FROM jobs").fetchall()[0][0] == "FX2345AB"
    with closing(read_store(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    log = (tmp_path / "serve-0.log").read_text()
    assert f"event=store-backup reason=\"before migrating to schema v{store.SCHEMA_VERSION}\" path={copy}" in log
    # Once migrated, a start makes no more copies.
    serve(config, port)
    assert len(list(path.parent.glob("*.bak"))) == 1


def test_a_store_with_a_newer_schema_is_refused(tmp_path):
    config, _port = sandbox_config(tmp_path / "faxgw.toml")
    path = tmp_path / "var" / "faxgw.sqlite3"
    older_store(path)
    newer = store.SCHEMA_VERSION + 1
    with closing(store.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    result = faxgw("serve", cwd=tmp_path, config=config, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"faxgw: error: the store has schema version {newer}, newer than this gateway knows"
        f" ({store.SCHEMA_VERSION}); run the newer faxgw, or restore a backup made for this version")
    assert "Traceback" not in result.stderr
    assert not list(path.parent.glob("*.bak"))
    with closing(read_store(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
    # Nor is such a store restored over this gateway's.
    shutil.copyfile(path, tmp_path / "newer.sqlite3")
    line = one_line_error(admin("restore", str(tmp_path / "newer.sqlite3"), cwd=tmp_path, config=config))
    assert f"schema version {newer}, newer than this gateway knows" in line


# --- retention -------------------------------------------------------------------------------------


def retention_config(tmp_path: Path, **retention: str) -> tuple[Path, int]:
    """A sandbox config whose faxes end delivered within a second; [retention] as given."""
    config, port = sandbox_config(tmp_path / "faxgw.toml")
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in retention.items())
    config.write_text(config.read_text() + f"[retention]\n{lines}\n")
    return config, port


async def test_purge_dry_run_then_purge(tmp_path, serve):
    config, port = retention_config(tmp_path, enabled=False, period="0s")
    serve(config, port)
    path = tmp_path / "var" / "faxgw.sqlite3"
    delivered = []
    for n in range(8):
        pdf = pdf_bytes(marker=os.urandom(150_000).hex())  # about 300 KB each
        delivered += codes_in((await send(port, fax_message(pdf=pdf))).message)
    (deferred,) = codes_in((await send(port, fax_message("12125550450@greenfax.com"),
                                       rcpts=["12125550450@greenfax.com"])).message)
    await wait_for(lambda: all(states(path).get(code) == "delivered" for code in delivered), "deliveries")
    with closing(read_store(path)) as conn:
        sizes = dict(conn.execute("SELECT j.code, m.size FROM jobs j JOIN messages m ON m.id = j.message_id"))
        reports = conn.execute("SELECT COUNT(*), SUM(length(CAST(raw AS BLOB))) FROM reports"
                               " WHERE raw IS NOT NULL").fetchone()
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert reports[0] >= len(delivered)  # a status mail and a Notify call per fax
    # The copies the gateway left beside the store (they hold bodies too), and one of the operator's.
    old = [path.with_name("faxgw.sqlite3.pre-v2-20200101T000000Z.bak"),
           path.with_name("faxgw.sqlite3.pre-restore-20200101T000000Z.bak")]
    kept = path.with_name("operator-copy.bak")
    for copy in (*old, kept):
        copy.write_bytes(b"")
        os.utime(copy, (time.time() - 3600, time.time() - 3600))

    preview = admin("purge", "--dry-run", "--json", cwd=tmp_path, config=config)
    assert preview.returncode == 0, preview.stderr
    shown = json.loads(preview.stdout)
    assert shown["dry_run"] is True and shown["period"] == "0s"
    assert (shown["bodies"], shown["body_bytes"]) == (len(delivered), sum(sizes[c] for c in delivered))
    assert shown["reports"] >= reports[0] and shown["report_bytes"] >= reports[1]
    assert shown["copies"] == [str(copy) for copy in sorted(old)]
    table = admin("purge", "--dry-run", cwd=tmp_path, config=config)
    assert re.search(rf"^message bodies:\s+{len(delivered)} \(\d+\.\d MB\)$", table.stdout, re.MULTILINE)
    assert "would be purged" in table.stdout
    assert states(path)[delivered[0]] == "delivered"  # a dry run changes nothing
    with closing(read_store(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages WHERE length(raw) = 0").fetchone()[0] == 0

    with closing(store.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size_before = path.stat().st_size
    done = admin("purge", "--json", cwd=tmp_path, config=config)
    assert done.returncode == 0, done.stderr
    purged = json.loads(done.stdout)
    assert purged["bodies"] == len(delivered) and purged["reports"] >= reports[0]
    assert not any(copy.exists() for copy in old) and kept.exists()
    assert purged["freed_bytes"] > 0.8 * sum(sizes[c] for c in delivered)
    assert path.stat().st_size < size_before - 0.8 * sum(sizes[c] for c in delivered)

    with closing(read_store(path)) as conn:
        bodies = dict(conn.execute("SELECT j.code, length(m.raw) FROM jobs j JOIN messages m ON m.id = j.message_id"))
        kept = "SELECT COUNT(*) FROM reports WHERE raw IS NOT NULL AND received_at < ?"
        assert conn.execute(kept, (purged["cutoff"],)).fetchone()[0] == 0  # later ones may have come since
        assert conn.execute("SELECT COUNT(*) FROM reports WHERE job_id IS NOT NULL AND result IS NOT NULL"
                            " AND raw IS NULL").fetchone()[0] >= len(delivered)
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] >= events + len(delivered)
    assert all(bodies[code] == 0 for code in delivered)
    assert bodies[deferred] == sizes[deferred]  # waiting jobs keep their message
    # The history stays, and says what happened.
    shown = faxgw("show", delivered[0], "--json", cwd=tmp_path, config=config)
    job = json.loads(shown.stdout)
    assert job["state"] == "delivered"
    assert [e["source"] for e in job["events"]][:3] == ["intake", "forwarder", "forwarder"]
    assert job["events"][-1]["source"] == "retention"
    assert job["events"][-1]["detail"] == "message body purged (retention 0s)"
    assert job["reports"] and all(report["result"] for report in job["reports"])
    assert json.loads(admin("purge", "--dry-run", "--json", cwd=tmp_path, config=config).stdout)["bodies"] == 0


async def test_a_purged_job_cannot_be_sent_again(gateway, tmp_path):
    gw = await gateway(retention={"period": "0s", "interval": "1s"})
    address = "12125550550@greenfax.com"  # refused by the sandbox: rejected, a final state
    (code,) = codes_in((await gw.send(fax_message(address), rcpts=[address])).message)
    await gw.wait_state(code, "rejected")
    # The service's own runner purges it (its first pass comes one interval after the start).
    await wait_for(lambda: any(e["source"] == "retention" for e in gw.job(code)["events"]), "the runner's purge")
    with closing(read_store(gw.store_path)) as conn:
        assert tuple(conn.execute("SELECT length(raw), purged_at IS NOT NULL FROM messages").fetchone()) == (0, 1)
    config = write_config(tmp_path / "cli.toml", f"""
        [store]
        path = "{gw.store_path}"
        [sandbox]
        enabled = true
    """)
    line = one_line_error(faxgw("retry", code, cwd=tmp_path, config=config))
    assert f"{code} cannot be sent again: its message was purged after the retention period" in line
    assert gw.job(code)["state"] == "rejected"
    # Intake goes on beside the runner.
    (other,) = codes_in((await gw.send()).message)
    await gw.wait_state(other, "submitted")


# --- SIGHUP -------------------------------------------------------------------------------------------


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def install(cert: trustme.LeafCert, directory: Path, *, key_of: trustme.LeafCert | None = None) -> None:
    """Put a certificate in place as certbot does: new files renamed over the old ones."""
    directory.mkdir(exist_ok=True)
    for name, blob in (("cert.pem", cert.cert_chain_pems[0]), ("key.pem", (key_of or cert).private_key_pem)):
        blob.write_to_path(str(directory / f"{name}.new"))
        os.replace(directory / f"{name}.new", directory / name)


def https_cert(port: int, client: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.getpeercert(binary_form=True)


async def starttls_session(port: int, client: ssl.SSLContext) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=client, timeout=10)
    await smtp.connect()
    await smtp.starttls()
    return smtp


def session_cert(smtp: aiosmtplib.SMTP) -> bytes:
    return smtp.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)


def status_mail(code: str, *, note: str) -> bytes:
    """A status mail in a form no shipped rule knows (CUSTOM_RULE does); `note` makes each one new."""
    msg = EmailMessage()
    msg["From"] = "GreenFax Status <status@sandbox.greenfax.localhost>"
    msg["To"] = "faxgw@sandbox.localhost"
    msg["Subject"] = f"Custom report [{code}]"
    msg.set_content(f"Outcome: Delivered\nNote: {note}\n")
    return msg.as_bytes(policy=email.policy.SMTP)


CUSTOM_RULE = r"""
[[rule]]
name = "custom"
senders = ['^status@sandbox\.greenfax\.localhost$']
subject = '^Custom report'
[rule.fields]
job_code = { pattern = '\[(FX[0-9A-Z]{6})\]', sources = ["subject"] }
result = { pattern = '^Outcome:\s*(.+?)\s*$' }
[[rule.results]]
match = 'delivered'
result = "delivered"
"""


def sighup_config(tmp_path: Path, ports: tuple[int, int, int], *, fax_domains: list[str]) -> Path:
    """A sandbox config with TLS on SMTP and HTTP, the operator's status rules and [addressing] overrides."""
    port, http_port, sandbox_port = ports
    return write_config(tmp_path / "faxgw.toml", f"""
        [sandbox]
        enabled = true
        listen = ["127.0.0.1:{sandbox_port}"]
        status_mail = "none"
        notify = false
        feed = false
        [smtp]
        listen = ["127.0.0.1:{port}"]
        hostname = "gw.test"
        tls_cert = "tls/cert.pem"
        tls_key = "tls/key.pem"
        [http]
        listen = ["127.0.0.1:{http_port}"]
        tls_cert = "tls/cert.pem"
        tls_key = "tls/key.pem"
        [status]
        rule_files = ["status-rules.toml"]
        [addressing.recipients]
        local_fax_domains = {json.dumps(fax_domains)}
    """)



async def test_sighup_reloads_certificates_and_rules_without_dropping_a_session(tmp_path, serve):
    ca = trustme.CA()
    first, second = ca.issue_cert("127.0.0.1", "gw.test"), ca.issue_cert("127.0.0.1", "gw.test")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    install(first, tmp_path / "tls")
    (tmp_path / "status-rules.toml").write_text("# no rules of our own yet\n")
    ports = port, http_port, _sandbox_port = free_port(), free_port(), free_port()
    config = sighup_config(tmp_path, ports, fax_domains=[])
    proc = serve(config, port)
    log = tmp_path / "serve-0.log"
    path = tmp_path / "var" / "faxgw.sqlite3"

    async def hangup(event: str) -> str:
        seen = log.read_text().count(f"event={event}")
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: log.read_text().count(f"event={event}") > seen, event, timeout=10)
        return [line for line in log.read_text().splitlines() if f"event={event}" in line][-1]

    before = await starttls_session(port, client)
    assert session_cert(before) == der(first)
    assert https_cert(http_port, client) == der(first)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await before.sendmail("erp@legacy.example", ["2125550123@fax.test"], fax_message("2125550123@fax.test"))
    await before.rset()
    (waiting,) = codes_in((await send(port, fax_message())).message)
    await wait_for(lambda: states(path).get(waiting) == "submitted", "a submitted job")
    await send(port, status_mail(waiting, note="before"), rcpts=["faxgw@sandbox.localhost"],
               sender="status@sandbox.greenfax.localhost")
    assert states(path)[waiting] == "submitted"  # no rule knows that mail yet

    # Renewed certificate, a new fax domain, a status rule of the operator's.
    install(second, tmp_path / "tls")
    sighup_config(tmp_path, ports, fax_domains=["fax.test"])
    (tmp_path / "status-rules.toml").write_text(CUSTOM_RULE)
    line = await hangup("reloaded")
    assert "tls=\"smtp http\"" in line and "restart_needed" not in line

    after = await starttls_session(port, client)
    assert session_cert(after) == der(second)
    assert https_cert(http_port, client) == der(second)
    _errors, reply = await after.sendmail("erp@legacy.example", ["2125550123@fax.test"],
                                          fax_message("2125550123@fax.test"))
    assert codes_in(reply)
    await send(port, status_mail(waiting, note="after"), rcpts=["faxgw@sandbox.localhost"],
               sender="status@sandbox.greenfax.localhost")
    await wait_for(lambda: states(path)[waiting] == "delivered", "the custom rule to apply")
    # The session opened before the reload goes on, on its own certificate.
    _errors, reply = await before.sendmail("erp@legacy.example", [f"{NUMBER}@greenfax.com"], fax_message())
    assert codes_in(reply) and session_cert(before) == der(first)

    # Broken rules, then a key that does not fit: refused, and what is in force stays.
    (tmp_path / "status-rules.toml").write_text("[[rule]\nname = 'broken\n")
    line = await hangup("reload-refused")
    assert "status-rules.toml" in line
    (tmp_path / "status-rules.toml").write_text(CUSTOM_RULE)
    sighup_config(tmp_path, ports, fax_domains=[])
    install(first, tmp_path / "tls", key_of=second)
    line = await hangup("reload-refused")
    assert "smtp.tls_cert/smtp.tls_key: cannot load" in line
    third = await starttls_session(port, client)
    assert session_cert(third) == der(second)
    _errors, reply = await third.sendmail("erp@legacy.example", ["2125550124@fax.test"],
                                          fax_message("2125550124@fax.test"))
    assert codes_in(reply)  # fax.test is still a fax domain: the refused reload changed nothing
    for session in (before, after, third):
        await session.quit()
    assert proc.poll() is None
    assert "ERROR" in log.read_text() and "Traceback" not in log.read_text()
