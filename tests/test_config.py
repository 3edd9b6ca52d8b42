"""Configuration as `faxgw` reads it: one TOML file, validated at start, secrets never shown.

Every test runs the real command in a subprocess (see `test_cli.faxgw`); the
config file comes from `--config` or FAXGW_CONFIG, and only with neither does
the sandbox set-up apply.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from conftest import free_port
from test_cli import faxgw, one_line_error, port_open, write_config

from gateway import config
from gateway.outbound.passwords import PasswordChecker

SANDBOX = "[sandbox]\nenabled = true\n"
# Ends inside [upstream], so a test may append keys of that section.
PRODUCTION = """\
[upstream]
host = "smtp.example.org"
account_sender = "faxes@office.example"
return_path = "fax-bounce@gw.office.example"
"""
SECRET = "Tr0ub4dor-and-3-secret"
HASH = PasswordHasher().hash("c0pier-Passw0rd")


def effective(result) -> dict[str, Any]:
    """The settings `faxgw check-config` printed (after its one-line verdict)."""
    assert result.returncode == 0, result.stderr
    verdict, settings = result.stdout.split("\n", 1)
    assert verdict.endswith("OK") or verdict.endswith("OK (SANDBOX)"), verdict
    return json.loads(settings)


def shown(result) -> str:
    return result.stdout + result.stderr


# --- which config ------------------------------------------------------------------------


def _by_option(path: Path) -> dict[str, Any]:
    return {"config": path}


def _by_environment(path: Path) -> dict[str, Any]:
    return {"env": {"FAXGW_CONFIG": str(path)}}


@pytest.mark.parametrize("how", [_by_option, _by_environment], ids=["--config", "FAXGW_CONFIG"])
@pytest.mark.parametrize("command", ["check-config", "serve", "status"])
def test_a_missing_named_config_is_fatal_never_the_sandbox(tmp_path, how, command):
    missing = tmp_path / "etc" / "faxgw.toml"
    result = faxgw(command, cwd=tmp_path, timeout=30, **how(missing))
    assert str(missing) in one_line_error(result)
    assert "sandbox" not in shown(result).lower()
    assert not (tmp_path / "var").exists()


def test_config_from_option_or_environment(tmp_path):
    path = write_config(tmp_path / "faxgw.toml", PRODUCTION + 'helo_name = "gw.from-file.test"\n')
    for how in (_by_option, _by_environment):
        settings = effective(faxgw("check-config", "--json", cwd=tmp_path, **how(path)))
        assert settings["upstream"]["helo_name"] == "gw.from-file.test"
        assert settings["sandbox"]["enabled"] is False
    # --config wins over the environment.
    result = faxgw("check-config", "--json", cwd=tmp_path, config=path, env={"FAXGW_CONFIG": str(tmp_path / "nope.toml")})
    assert effective(result)["upstream"]["helo_name"] == "gw.from-file.test"


def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path):
    etc = tmp_path / "etc"
    path = write_config(etc / "faxgw.toml", SANDBOX + '[store]\npath = "data/fax.sqlite3"\n')
    settings = effective(faxgw("check-config", "--json", cwd=tmp_path, config=path))
    assert settings["store"]["path"] == str(etc.resolve() / "data" / "fax.sqlite3")


def test_no_config_at_all_is_the_sandbox(tmp_path):
    result = faxgw("check-config", "--json", cwd=tmp_path)
    assert "SANDBOX" in result.stdout.splitlines()[0]
    assert effective(result)["store"]["path"] == str(tmp_path / "var" / "faxgw.sqlite3")


def test_a_bare_sandbox_config_passes_and_says_sandbox(tmp_path):
    result = faxgw("check-config", "--json", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", SANDBOX))
    assert "SANDBOX" in result.stdout.splitlines()[0]
    settings = effective(result)
    assert settings["sandbox"]["enabled"] is True
    assert settings["upstream"]["account_sender"]  # a working default in sandbox mode


# --- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, value, expected", [
    ('[upstream]\nport = "abc"\n', "upstream.port", "'abc'", "integer"),
    ('[smtp]\nlisten = ["nonsense"]\n', "smtp.listen", "'nonsense'", "HOST:PORT"),
    ('[upstream]\ntls = "ssl"\n', "upstream.tls", "'ssl'", "'starttls'"),
    ('[smtp]\nmax_message_size = "lots"\n', "smtp.max_message_size", "'lots'", "size"),
    ('[log]\nlevel = "loud"\n', "log.level", "'loud'", "'debug'"),
    # An unknown key's value is not echoed: it may be a misspelt secret.
    ('[upstream]\nhots = "smtp.example.org"\n', "upstream.hots", "unknown key", "host"),
    ('[smpt]\nlisten = []\n', "smpt", "unknown key", "smtp"),
])
def test_a_bad_value_names_the_key_the_value_and_what_is_expected(tmp_path, text, key, value, expected):
    path = write_config(tmp_path / "faxgw.toml", SANDBOX + text)
    line = one_line_error(faxgw("check-config", "--json", cwd=tmp_path, config=path))
    assert str(path) in line
    assert key in line and value in line and expected in line


def test_serve_with_a_bad_value_exits_before_listening(tmp_path):
    port = free_port()
    path = write_config(tmp_path / "faxgw.toml", SANDBOX + f"""\
listen = ["127.0.0.1:{free_port()}"]
[smtp]
listen = ["127.0.0.1:{port}"]
[upstream]
port = "abc"
""")
    result = faxgw("serve", cwd=tmp_path, config=path, timeout=30)
    assert "upstream.port = 'abc'" in one_line_error(result)
    assert not port_open(port)
    assert not (tmp_path / "var").exists()  # nothing was started, not even the store


@pytest.mark.parametrize("text, keys", [
    (SANDBOX + '[upstream]\nhost = "smtp.example.org"\n', ["sandbox.enabled", "upstream.host"]),
    (PRODUCTION.replace('host = "smtp.example.org"\n', ""), ["upstream.host"]),
    (PRODUCTION.replace('account_sender = "faxes@office.example"\n', ""), ["upstream.account_sender"]),
    (PRODUCTION.replace('return_path = "fax-bounce@gw.office.example"\n', ""), ["upstream.return_path"]),
], ids=["sandbox-and-upstream-host", "no-upstream-host", "no-account-sender", "no-return-path"])
def test_contradictory_or_incomplete_setups_are_refused(tmp_path, text, keys):
    path = write_config(tmp_path / "faxgw.toml", text)
    for command in ("check-config", "serve"):
        line = one_line_error(faxgw(command, cwd=tmp_path, config=path, timeout=30))
        assert all(key in line for key in keys), line


CLEARTEXT = {
    "upstream": (PRODUCTION + f'tls = "none"\nusername = "fax"\npassword = "{SECRET}"\n', "upstream"),
    "imap": (PRODUCTION + f'[status.imap]\nhost = "imap.example.org"\ntls = "none"\nusername = "fax"\n'
             f'password = "{SECRET}"\n', "status.imap"),
    "feed": (PRODUCTION + f'[feed]\nurl = "http://www.greenfax.example/api/xml/outbound.php"\naccountid = "1"\n'
             f'password = "{SECRET}"\n', "feed"),
}


@pytest.mark.parametrize("name", CLEARTEXT)
def test_a_password_in_clear_beyond_loopback_is_refused_unless_allowed(tmp_path, name):
    text, section = CLEARTEXT[name]
    path = write_config(tmp_path / "faxgw.toml", text)
    line = one_line_error(faxgw("check-config", "--json", cwd=tmp_path, config=path, timeout=30))
    assert "in clear to" in line and f"{section}.allow_insecure = true" in line and SECRET not in line, line
    # Said explicitly: accepted.
    allowed = text.replace(f'password = "{SECRET}"\n', f'password = "{SECRET}"\nallow_insecure = true\n')
    result = faxgw("check-config", "--json", cwd=tmp_path, config=write_config(tmp_path / "ok.toml", allowed), timeout=30)
    assert result.returncode == 0, result.stderr
    # To loopback (a local relay, the sandbox's feed): no question asked.
    local = text.replace("imap.example.org", "127.0.0.1").replace("www.greenfax.example", "127.0.0.1")
    local = local.replace('host = "smtp.example.org"', 'host = "127.0.0.1"')
    result = faxgw("check-config", "--json", cwd=tmp_path, config=write_config(tmp_path / "local.toml", local), timeout=30)
    assert result.returncode == 0, result.stderr


# --- secrets -------------------------------------------------------------------------------

SECRET_FORMS = {
    "inline": f'"{SECRET}"',
    "env": '{ env = "FAXGW_TEST_SECRET" }',
    "file": '{ file = "upstream.secret" }',  # relative to the config file's directory
}


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_secrets_resolve_and_are_masked(tmp_path, monkeypatch, form):
    etc = tmp_path / "etc"
    path = write_config(etc / "faxgw.toml", PRODUCTION + f'username = "fax"\npassword = {SECRET_FORMS[form]}\n')
    (etc / "upstream.secret").write_text(SECRET + "\n")

    result = faxgw("check-config", "--json", cwd=tmp_path, config=path, env={"FAXGW_TEST_SECRET": SECRET})
    assert effective(result)["upstream"]["password"] == "********"
    assert SECRET not in shown(result)
    monkeypatch.setenv("FAXGW_TEST_SECRET", SECRET)
    assert config.load(path).upstream.password.get_secret_value() == SECRET


@pytest.mark.parametrize("value, named", [
    ('{ env = "FAXGW_UNSET_SECRET" }', ["FAXGW_UNSET_SECRET", "not set"]),
    ('{ file = "missing.secret" }', ["missing.secret"]),
    ('{ file = "binary.secret" }', ["binary.secret", "UTF-8"]),
    ('{ file = "a", env = "B" }', ["env", "file"]),
], ids=["unset-env", "missing-file", "binary-file", "both"])
def test_a_secret_that_cannot_be_resolved_is_named_but_never_shown(tmp_path, value, named):
    etc = tmp_path / "etc"
    # The sandbox password holds the secret too: an error that dumped the config would show it.
    path = write_config(etc / "faxgw.toml", PRODUCTION + f'password = {value}\n[sandbox]\npassword = "{SECRET}"\n')
    (etc / "binary.secret").write_bytes(b"\xff" + SECRET.encode())
    result = faxgw("check-config", "--json", cwd=tmp_path, config=path)
    line = one_line_error(result)
    assert "upstream.password" in line and all(word in line for word in named), line
    assert SECRET not in shown(result) and "0xff" not in line


@pytest.mark.parametrize("text, secret", [
    (PRODUCTION + f'password = "{SECRET}"\nport = "abc"\n', SECRET),
    (PRODUCTION + "password = 987654321\n", "987654321"),
    (PRODUCTION + f'pasword = "{SECRET}"\n', SECRET),
    (SANDBOX + f'[smtp]\ntls_cert = "cert.pem"\n[smtp.users]\nscanner = "{HASH}"\n', HASH),
], ids=["beside-a-bad-value", "secret-of-a-wrong-type", "misspelt-secret-key", "section-check"])
def test_errors_never_show_secrets_or_hashes(tmp_path, text, secret):
    result = faxgw("check-config", "--json", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text))
    one_line_error(result)
    assert secret not in shown(result)


def test_a_plaintext_user_password_is_refused(tmp_path):
    path = write_config(tmp_path / "faxgw.toml", SANDBOX + '[smtp.users]\nscanner = "plain-Passw0rd"\n')
    result = faxgw("check-config", "--json", cwd=tmp_path, config=path)
    line = one_line_error(result)
    assert "smtp.users.scanner" in line and "faxgw passwd" in line
    assert "plain-Passw0rd" not in shown(result)


def test_passwd_prints_a_snippet_whose_hash_verifies_and_configures(tmp_path):
    password = "c0pier-Passw0rd"
    result = faxgw("passwd", "scanner", "--stdin", cwd=tmp_path, stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    assert password not in shown(result)
    hashed = tomllib.loads(result.stdout)["smtp"]["users"]["scanner"]
    assert PasswordHasher().verify(hashed, password)
    assert PasswordChecker({"scanner": hashed}).verify("scanner", password.encode())

    path = write_config(tmp_path / "faxgw.toml", SANDBOX + result.stdout)
    checked = faxgw("check-config", "--json", cwd=tmp_path, config=path)
    assert effective(checked)["smtp"]["users"] == {"scanner": "(argon2 hash)"}
    assert hashed not in shown(checked)


def test_passwd_refuses_a_short_password(tmp_path):
    line = one_line_error(faxgw("passwd", "scanner", "--stdin", cwd=tmp_path, stdin="short\n"))
    assert "8 characters" in line


def test_check_config_warns_of_an_open_api_and_of_status_mail_nothing_trusts(tmp_path):
    text = PRODUCTION + '[status]\nlisten = ["127.0.0.1:2525"]\nrequire_dkim = false\n'
    result = faxgw("check-config", "--json", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "faxgw: warning: http.api_token is not set: any local user can read the fax log" in result.stderr
    assert "faxgw: warning: status.require_dkim = false and no status.trusted_networks" in result.stderr
    quiet = PRODUCTION.replace("[upstream]", f'[http]\napi_token = "{SECRET}"\n[upstream]')
    result = faxgw("check-config", "--json", cwd=tmp_path, config=write_config(tmp_path / "quiet.toml", quiet), timeout=30)
    assert result.returncode == 0 and "warning" not in result.stderr and SECRET not in result.stdout


def test_check_config_prints_the_settings_as_the_config_file_writes_them(tmp_path):
    text = PRODUCTION + f'password = "{SECRET}"\n[retention]\nperiod = "30d"\n[smtp]\nlisten = ["[::1]:2525"]\n'
    result = faxgw("check-config", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text), timeout=30)
    assert result.returncode == 0, result.stderr
    verdict, body = result.stdout.split("\n", 1)
    assert verdict.endswith(": OK")
    shown = tomllib.loads(body)  # TOML, comments for keys without a value
    assert shown["retention"]["period"] == "30d" and shown["upstream"]["timeout"] == "2m"
    assert shown["smtp"]["listen"] == ["[::1]:2525"] and shown["smtp"]["max_message_size"] == "20MiB"
    assert shown["upstream"]["password"] == "********" and SECRET not in result.stdout
    assert "# max_size = (not set)" in body and shown["addressing"]["numbers"]["default_region"] == "US"
    assert len(result.stdout.splitlines()) < 300


def test_the_sandbox_has_one_feed_interval(tmp_path):
    result = faxgw("check-config", cwd=tmp_path, timeout=30)
    shown = tomllib.loads(result.stdout.split("\n", 1)[1])
    assert shown["feed"]["interval"] == shown["feed"]["min_interval"] == "1m"


def test_an_http_port_in_use_names_the_key_to_set(tmp_path):
    """A config that leaves [http] listen unset takes 127.0.0.1:8025; when that is taken, the error says so."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        text = PRODUCTION.replace('host = "smtp.example.org"', 'host = "127.0.0.1"\nport = 9\ntls = "none"') + (
            f'[smtp]\nlisten = ["127.0.0.1:{free_port()}"]\n[http]\nlisten = ["127.0.0.1:{taken}"]\n'
            f'[store]\npath = "{tmp_path / "store.sqlite3"}"\n')
        result = faxgw("serve", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text), timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f"cannot listen for HTTP on 127.0.0.1:{taken}: " in line and "set [http] listen to a free address" in line


# --- upstream OAuth2 ----------------------------------------------------------------------

OAUTH = PRODUCTION.replace('host = "smtp.example.org"', 'host = "smtp.office365.com"') + 'auth = "xoauth2"\n'


def test_provider_defaults_fill_the_token_url_scope_and_grant(tmp_path):
    text = OAUTH + (f'[upstream.oauth]\nprovider = "microsoft"\ntenant = "office.example"\nclient_id = "app-1"\n'
                    f'client_secret = "{SECRET}"\nuser = "fax@office.example"\n')
    result = faxgw("check-config", "--json", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text), timeout=30)
    oauth = effective(result)["upstream"]["oauth"]
    assert oauth["grant"] == "client_credentials" and oauth["scope"] == "https://outlook.office365.com/.default"
    assert oauth["token_url"] == "https://login.microsoftonline.com/office.example/oauth2/v2.0/token"
    assert oauth["client_secret"] == "********" and SECRET not in result.stdout

    delegated = config.validate({"upstream": {
        "host": "smtp.office365.com", "account_sender": "a@b.example", "return_path": "r@b.example",
        "auth": "xoauth2", "username": "fax@office.example", "oauth": {
            "provider": "microsoft", "tenant": "t1", "client_id": "app-1", "refresh_token": {"file": "rt"}}}},
        source="test", base=tmp_path)
    oauth = delegated.upstream.oauth
    assert oauth.grant == "refresh_token" and oauth.scope == "https://outlook.office.com/SMTP.Send offline_access"
    assert oauth.user == "fax@office.example" and oauth.refresh_token.file == tmp_path / "rt"


def test_check_config_says_to_run_oauth_login_while_the_refresh_token_file_is_missing(tmp_path):
    text = OAUTH + ('[upstream.oauth]\nprovider = "microsoft"\ntenant = "t1"\nclient_id = "app-1"\n'
                    'refresh_token = { file = "refresh-token" }\nuser = "fax@office.example"\n')
    result = faxgw("check-config", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "does not exist yet: run `faxgw oauth login`" in result.stderr


def test_a_password_for_microsoft_365_is_warned_of(tmp_path):
    text = PRODUCTION.replace('host = "smtp.example.org"', 'host = "smtp.office365.com"') + f'password = "{SECRET}"\n'
    result = faxgw("check-config", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text), timeout=30)
    assert result.returncode == 0 and 'set auth = "xoauth2"' in result.stderr and SECRET not in result.stderr


@pytest.mark.parametrize("oauth, words", [
    ('provider = "microsoft"\nclient_id = "x"\nclient_secret = "y"\n', "tenant is required"),
    ('provider = "generic"\nclient_id = "x"\nclient_secret = "y"\n', "token_url is required"),
    ('provider = "google"\nclient_id = "x"\n', "refresh_token is required"),
    ('provider = "generic"\ntoken_url = "http://auth.example.org/token"\nclient_id = "x"\nclient_secret = "y"\n',
     "https://"),
    ('provider = "microsoft"\ntenant = "t"\n', "client_id is required"),
    ('provider = "google"\ngrant = "jwt_bearer"\n', "service_account_file is required"),
], ids=["no-tenant", "no-token-url", "no-refresh-token", "http-beyond-loopback", "no-client-id", "no-key"])
def test_an_incomplete_oauth_section_says_what_is_missing(tmp_path, oauth, words):
    text = OAUTH + '[upstream.oauth]\nuser = "fax@office.example"\n' + oauth
    line = one_line_error(faxgw("check-config", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text)))
    assert "upstream.oauth" in line and words in line


@pytest.mark.parametrize("text, words", [
    (OAUTH, "needs an [upstream.oauth] section"),
    (PRODUCTION + '[upstream.oauth]\nprovider = "microsoft"\ntenant = "t"\nclient_id = "x"\nclient_secret = "y"\n',
     'set auth = "xoauth2"'),
    (OAUTH + f'password = "{SECRET}"\n[upstream.oauth]\nprovider = "microsoft"\ntenant = "t"\nclient_id = "x"\n'
     'client_secret = "y"\nuser = "u@x.example"\n', "cannot be used together"),
    (OAUTH + 'tls = "none"\n[upstream.oauth]\nprovider = "microsoft"\ntenant = "t"\nclient_id = "x"\n'
     'client_secret = "y"\nuser = "u@x.example"\n', "the access token in clear"),
], ids=["no-section", "section-without-xoauth2", "password-too", "token-in-clear"])
def test_contradictory_auth_settings_are_refused(tmp_path, text, words):
    line = one_line_error(faxgw("check-config", cwd=tmp_path, config=write_config(tmp_path / "faxgw.toml", text)))
    assert words in line and SECRET not in line
