"""Status-mail rules (issue 3, section 2): the shipped layouts, `faxgw rules test`, the operator's rule files.

`faxgw rules test` runs as a real subprocess, as an operator runs it while
adapting a rule; its output is read back field by field. The samples are in
tests/data/status/, one per shipped layout (plus a plain-text report whose
time has no zone, read in the rule's time zone).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import config
from gateway.rules import RulesInForce
from gateway.errors import ConfigError
from gateway.sandbox.greenfax import OUTCOMES, SandboxFax
from gateway.sandbox.statusmail import status_email
from gateway.status.inbound import StatusMail
from gateway.status.mailrules import load_rules
from gateway.models import Channel, Result

DATA = Path(__file__).parent / "data" / "status"
ACCOUNT_SENDER = "faxes@office.example"


def write_config(directory: Path, *, rule_files: list[Path] = (), extra: str = "") -> Path:
    """A production-style config (greenfax.com is a trusted sender domain) with the operator's rule files."""
    path = directory / "faxgw.toml"
    files = ", ".join(f'"{p}"' for p in rule_files)
    path.write_text(textwrap.dedent(f"""
        [store]
        path = "{directory / 'store' / 'faxgw.sqlite3'}"
        [smtp]
        listen = ["127.0.0.1:0"]
        [upstream]
        host = "127.0.0.1"
        port = 9
        tls = "none"
        account_sender = "{ACCOUNT_SENDER}"
        return_path = "fax-bounce@gw.office.example"
        [status]
        rule_files = [{files}]
    """) + textwrap.dedent(extra))
    return path


def faxgw(config_path: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "FAXGW_CONFIG"}
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(config_path), *args],
                          cwd=config_path.parent, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def rules_test(config_path: Path, *files: Path, code: int = 0) -> dict[str, tuple[str, dict[str, str]]]:
    """`faxgw rules test FILE...`: per file, its headline and the fields printed under it (the rules tried
    are left out: `rules_tried` reads them)."""
    result = faxgw(config_path, "rules", "test", *map(str, files))
    assert result.returncode == code, result.stderr
    assert result.stderr == ""
    shown: dict[str, tuple[str, dict[str, str]]] = {}
    current: dict[str, str] = {}
    in_rules = False
    for line in result.stdout.splitlines():
        if line.startswith("  rules tried"):
            in_rules = True
        elif line.startswith("  "):
            if not in_rules:
                key, _, value = line.strip().partition(":")
                current[key] = value.strip()
        else:
            in_rules = False
            name, _, headline = line.partition(": ")
            current = {}
            shown[name] = (headline, current)
    assert set(shown) == {str(f) for f in files}, result.stdout
    return shown


# --- each shipped layout ---------------------------------------------------------------------

EXPECTED = {
    "sandbox-busy.eml": ("greenfax-sandbox", {
        "result": "failed", "reason": "busy", "fax_number": "+12125551234", "pages": "0", "duration": "0",
        "cost": "0.00 USD", "reference_id": "8591334", "job_code": "FXAAAA22",
        "reported_at": "2026-11-27 01:02:03+00:00", "reported_at_raw": "2026-11-27 01:02:03 UTC",
        # the sandbox's domain is not trusted in this (production) config
        "trust": "untrusted (From domain sandbox.greenfax.localhost is not in status.trusted_sender_domains)",
    }),
    "plaintext-success.eml": ("greenfax-plaintext", {
        "result": "delivered", "reason": "-", "fax_number": "+12157018714", "pages": "2", "duration": "78",
        "cost": "0.20 USD", "reference_id": "8591400", "job_code": "FXBBBB33",
        # "EST (GMT-5)": the explicit offset wins over the zone abbreviation
        "reported_at": "2005-01-10 19:10:25+00:00", "reported_at_raw": "01/10/2005 02:10:25 PM EST (GMT-5)",
        "trust": "untrusted (dkim=fail: no valid signature aligned with greenfax.com)",  # a From alone: never
    }),
    "plaintext-busy-local-time.eml": ("greenfax-plaintext", {
        "result": "failed", "reason": "busy", "fax_number": "+13125550123", "pages": "0", "duration": "78",
        "cost": "0.00 USD", "reference_id": "8591401", "job_code": "FXDDDD55",
        # no zone written: the rule's America/New_York, summer time in July (UTC-4)
        "reported_at": "2026-07-04 13:00:00+00:00", "reported_at_raw": "07/04/2026 09:00:00 AM",
        "trust": "untrusted (dkim=fail: no valid signature aligned with greenfax.com)",  # a From alone: never
    }),
    "htmltable-busy.eml": ("greenfax-html-table", {
        "result": "failed", "reason": "busy", "fax_number": "+12157018714", "pages": "0", "duration": "0",
        "cost": "$0.00", "reference_id": "8591500", "job_code": "FXCCCC44",
        "reported_at": "2026-11-27 14:15:00+00:00", "reported_at_raw": "2026-11-27 09:15:00 -0500",
        "trust": "untrusted (dkim=fail: no valid signature aligned with greenfax.com)",  # a From alone: never
    }),
}


def test_rules_test_shows_the_rule_and_every_field_of_each_shipped_layout(tmp_path):
    """The samples as they are (CRLF), and saved with LF or a classic Mac's CR line endings."""
    files = [DATA / name for name in EXPECTED]
    for style, line_end in (("lf", b"\n"), ("cr", b"\r")):
        (tmp_path / style).mkdir()
        for name in EXPECTED:
            crlf = (DATA / name).read_bytes()
            assert crlf.count(b"\r\n") == crlf.count(b"\n") == crlf.count(b"\r") > 10, name
            files.append(tmp_path / style / name)
            files[-1].write_bytes(crlf.replace(b"\r\n", line_end))

    shown = rules_test(write_config(tmp_path), *files)

    for path in files:
        headline, fields = shown[str(path)]
        rule, expected = EXPECTED[path.name]
        assert headline.startswith(f"rule: {rule}: "), (path, headline)
        assert fields == expected, path


@pytest.mark.parametrize("result, reason", [("delivered", None), *OUTCOMES.values()])
def test_sandbox_layout_reads_every_outcome_the_sandbox_reports(result, reason):
    settings = config.validate({"sandbox": {"enabled": True}}, source="test", base=Path("/nonexistent"))
    status = StatusMail(settings, RulesInForce(mail=load_rules()))
    fax = SandboxFax(reference_id=8591999, number="13125550123", code="FX7K3M9Q", sender=ACCOUNT_SENDER,
                     envelope_sender="x", raw=b"", result=result, reason=reason, pages=3 if reason is None else 0,
                     received_at=datetime(2026, 11, 27, 1, 2, 3, tzinfo=UTC))

    verdict = status.understand(status_email(fax, settings.upstream.account_sender), channel=Channel.SMTP,
                                client="127.0.0.1")

    report = verdict.report
    assert (verdict.kind, report.rule, report.trusted) == ("rule", "greenfax-sandbox", True)
    assert (report.result, report.reason) == (Result(result), reason)
    assert (report.fax_number, report.job_code, report.reference_id) == ("+13125550123", "FX7K3M9Q", "8591999")
    assert (report.pages, report.duration) == (fax.pages, fax.pages * 26)
    assert report.reported_at == fax.received_at


def test_rules_test_says_why_no_rule_recognised_a_mail(tmp_path):
    invoice = tmp_path / "invoice.eml"
    invoice.write_bytes(b"From: GreenFax Billing <billing@greenfax.com>\r\nTo: faxes@office.example\r\n"
                        b"Subject: Your invoice for November\r\n\r\nAmount due: 12.00 USD\r\n")

    shown = rules_test(write_config(tmp_path), invoice, code=1)  # recognised by no rule: exit 1

    headline, fields = shown[str(invoice)]
    assert list(fields) == ["trust"]
    assert headline == (
        "unrecognised: no rule recognised it ("
        "greenfax-sandbox: sender 'billing@greenfax.com' matches none of ['^status@sandbox\\\\.greenfax\\\\.localhost$']; "
        "greenfax-plaintext: subject 'Your invoice for November' does not match "
        "'\\\\b(delivery|transmission) (report|notification)\\\\b'; "
        "greenfax-html-table: subject 'Your invoice for November' does not match '^fax status\\\\b')")


def test_rules_test_shows_a_result_no_mapping_understands(tmp_path):
    odd = tmp_path / "odd.eml"
    odd.write_text((DATA / "plaintext-success.eml").read_text().replace("SUCCESS", "PARTIALLY SENT (2 of 3)"))

    headline, fields = rules_test(write_config(tmp_path), odd)[str(odd)]

    assert headline.startswith("rule: greenfax-plaintext: ") and "result='PARTIALLY SENT (2 of 3)'" in headline
    assert (fields["result"], fields["reason"], fields["job_code"]) == ("-", "-", "FXBBBB33")


# --- the operator's rule files ------------------------------------------------------------------

GOOD_RULE = """
[[rule]]
name = "{name}"
senders = ['{sender}']
subject = '^Faxbericht'

[rule.fields]
job_code = {{ pattern = '^Auftrag:\\s*(FX[0-9A-Z]{{6}})' }}
fax_number = {{ pattern = '^Empfänger:\\s*([+0-9 ]+?)\\s*$' }}
result = {{ pattern = '^Ergebnis:\\s*(.+?)\\s*$' }}

[[rule.results]]
match = 'zugestellt'
result = "delivered"

[[rule.results]]
match = 'besetzt'
result = "failed"
reason = "busy"
"""

GERMAN_REPORT = ("From: Fax <{sender}>\r\nTo: faxes@office.example\r\nSubject: Faxbericht 4711\r\n"
                 "Content-Type: text/plain; charset=utf-8\r\n\r\n"
                 "Auftrag: FX7K3M9Q\r\nEmpfänger: +49 30 901820\r\nErgebnis: besetzt\r\n")


def test_an_operator_rule_adds_a_layout_and_one_of_the_same_name_replaces_the_shipped_rule(tmp_path):
    own = tmp_path / "rules" / "local.toml"
    own.parent.mkdir()
    own.write_text(GOOD_RULE.format(name="office-german", sender="@fax\\.example$")
                   + GOOD_RULE.format(name="greenfax-sandbox", sender="^status@sandbox\\.greenfax\\.localhost$"))
    german = tmp_path / "german.eml"
    german.write_bytes(GERMAN_REPORT.format(sender="bericht@fax.example").encode())
    replaced = tmp_path / "replaced.eml"
    replaced.write_bytes(GERMAN_REPORT.format(sender="status@sandbox.greenfax.localhost").encode())

    shown = rules_test(write_config(tmp_path, rule_files=[own]), german, replaced, DATA / "sandbox-busy.eml",
                       code=1)  # the last is recognised by no rule any more

    for path, rule in ((german, "office-german"), (replaced, "greenfax-sandbox")):
        headline, fields = shown[str(path)]
        assert headline.startswith(f"rule: {rule}: "), headline
        assert (fields["result"], fields["reason"], fields["fax_number"], fields["job_code"]) == (
            "failed", "busy", "+4930901820", "FX7K3M9Q")
    # The shipped greenfax-sandbox rule is gone: its own sample is no longer recognised, and the
    # rule of that name is listed once, with the operator's subject.
    headline, _fields = shown[str(DATA / "sandbox-busy.eml")]
    assert headline.startswith("unrecognised: ") and headline.count("greenfax-sandbox:") == 1
    assert "greenfax-sandbox: subject 'Fax to 12125551234 failed: busy [FXAAAA22]' does not match '^Faxbericht'" \
        in headline


BROKEN = [
    # what the file holds, what the error must say after "FILE: "
    ("[[rule]\nname = 'x'\n", "not valid TOML: "),
    (GOOD_RULE.format(name="r1", sender="(unclosed"),
     "rule r1: senders: not a valid regular expression '(unclosed': missing ), unterminated subpattern at position 0"),
    (GOOD_RULE.format(name="r2", sender="x").replace("(FX[0-9A-Z]{6})", "FX[0-9A-Z]{6}"),
     "rule r2: fields.job_code.pattern: the pattern '^Auftrag:\\\\s*FX[0-9A-Z]{6}' needs one capturing group"),
    (GOOD_RULE.format(name="r3", sender="x").replace("fax_number =", "fax_numbr ="),
     ("rule r3: fields: unknown field(s) fax_numbr; known: job_code, fax_number, result, reason, pages, duration,"
      " cost, reference_id, time")),
    (GOOD_RULE.format(name="r4", sender="x").replace('reason = "busy"', 'reason = "line_busy"'),
     ("rule r4: results.1.reason: reason 'line_busy' is not one of busy, no_answer, invalid_number,"
      " refused_by_service, bounced, other")),
    (GOOD_RULE.format(name="r5", sender="x").replace("result = {", "outcome = {"),
     "rule r5: fields: unknown field(s) outcome"),
    (GOOD_RULE.format(name="r6", sender="x").replace("senders =", "sender ="),
     "rule r6: sender: unknown key; allowed: name, description, senders, subject, timezone, required, fields,"
     " results, reasons"),
    (GOOD_RULE.format(name="r9", sender="x").replace("(FX[0-9A-Z]{6})", "(FX)([0-9A-Z]{6})"),
     "rule r9: fields.job_code.pattern: the pattern '^Auftrag:\\\\s*(FX)([0-9A-Z]{6})' has 2 capturing groups: keep"
     " one, make the others (?:...), or name the one to take (?P<value>...)"),
    (GOOD_RULE.format(name="r10", sender="x").replace("job_code = {{ pattern", "job_code = {{ sorces = [], pattern")
     .replace("job_code = { pattern", "job_code = { sorces = [], pattern"),
     "rule r10: fields.job_code.sorces: unknown key; allowed: pattern, sources, formats"),
    (GOOD_RULE.format(name="r11", sender="x").replace("^Ergebnis:\\s*(.+?)\\s*$' }",
                                                       "^Ergebnis:\\s*(.+?)\\s*$', sources = ['body'] }"),
     "rule r11: fields.result.sources: unknown source 'body'; expected subject, text, html, original.subject,"),
    (GOOD_RULE.format(name="r7", sender="x").replace("subject =", "timezone = 'Mars/Olympus'\nsubject ="),
     "rule r7: timezone: 'Mars/Olympus' is not an IANA time zone"),
    (GOOD_RULE.format(name="r8", sender="x").replace('result = "delivered"', 'result = "sent"'),
     "rule r8: results.0.result: Input should be 'delivered' or 'failed'"),
    ("[rules]\nname = 'x'\n", "unknown top-level key(s) ['rules']; rules go in [[rule]] tables"),
]


@pytest.mark.parametrize("text, problem", BROKEN, ids=[f"broken{n}" for n in range(len(BROKEN))])
def test_a_broken_operator_rule_file_stops_the_start_naming_file_rule_and_problem(tmp_path, text, problem):
    broken = tmp_path / "broken-rules.toml"
    broken.write_text(text)
    config_path = write_config(tmp_path, rule_files=[broken])

    for command in (("serve",), ("rules", "test", str(DATA / "sandbox-busy.eml"))):
        result = faxgw(config_path, *command)

        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"faxgw: error: {broken}: {problem}"), (command, line)
    assert not (tmp_path / "store").exists()  # serve stopped before it touched anything


def test_a_missing_operator_rule_file_is_a_start_up_error(tmp_path):
    missing = tmp_path / "nowhere.toml"
    result = faxgw(write_config(tmp_path, rule_files=[missing]), "serve")
    assert result.returncode == 1
    assert result.stderr.strip() == f"faxgw: error: {missing}: cannot read status rules: No such file or directory"


def test_load_rules_reports_the_first_broken_rule_of_several_files(tmp_path):
    good, bad = tmp_path / "a.toml", tmp_path / "b.toml"
    good.write_text(GOOD_RULE.format(name="fine", sender="x"))
    bad.write_text(GOOD_RULE.format(name="fine2", sender="x") + GOOD_RULE.format(name="bad", sender="x")
                   .replace("match = 'besetzt'", "match = '(besetzt'"))
    with pytest.raises(ConfigError) as caught:
        load_rules([good, bad])
    assert re.fullmatch(rf"{re.escape(str(bad))}: rule bad: results\.1\.match: not a valid regular expression"
                        r" '\(besetzt': .*", str(caught.value))
    assert [rule.name for rule in load_rules([good]).rules][-1] == "fine"


# --- what an operator can teach ---------------------------------------------------------------------

RETURNS_ORIGINAL = """
[[rule]]
name = "returns-original"
senders = ['@greenfax\\.com$']
subject = '^fax status\\b'

[rule.fields]
job_code = { pattern = '\\[(FX[0-9A-Z]{6})\\]', sources = ["original.subject"] }
reference_id = { pattern = '^(\\d+)$', sources = ["header.X-GreenFax-Job"] }
result = { pattern = '^(?:status|result):\\s*(?P<value>\\w+)\\s*$' }
reason = { pattern = '^reason\\s*\\n\\s*(.+?)\\s*$', sources = ["text"] }

[[rule.results]]
match = 'delivered'
result = "delivered"

[[rule.results]]
match = 'failed'
result = "failed"
reason = "other"

[[rule.reasons]]
match = 'line busy.*'
reason = "busy"
"""

# A layout the shipped greenfax-html-table rule recognises (sender and subject) but cannot read: no table.
ORIGINAL_ATTACHED = (
    "From: GreenFax <notifications@greenfax.com>\r\nTo: faxes@office.example\r\nSubject: Fax status\r\n"
    "X-GreenFax-Job: 8591777\r\nMessage-ID: <s1@greenfax.com>\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
    "--B\r\nContent-Type: text/plain\r\n\r\nResult: FAILED\r\n\r\nReason\r\n   Line busy, tried 3 times\r\n\r\n"
    "--B\r\nContent-Type: message/rfc822\r\n\r\n"
    "From: faxes@office.example\r\nTo: 12125551234@greenfax.com\r\nSubject: [FX7K3M9Q] Invoice 4711\r\n"
    "Message-ID: <FX7K3M9Q.abc@gw.test>\r\n\r\nPlease find the invoice attached.\r\n--B--\r\n").encode()


def test_a_rule_reads_the_returned_original_a_header_and_a_reason_written_apart(tmp_path):
    own = tmp_path / "own.toml"
    own.write_text(RETURNS_ORIGINAL)
    settings = config.validate({"sandbox": {"enabled": True}, "status": {"rule_files": [str(own)]}},
                               source="test", base=tmp_path)
    verdict = StatusMail(settings, RulesInForce(mail=load_rules(settings.status.rule_files))).understand(
        ORIGINAL_ATTACHED, channel=Channel.SMTP)

    assert (verdict.kind, verdict.report.rule) == ("rule", "returns-original")
    report = verdict.report
    assert (report.job_code, report.reference_id, report.result, report.reason) == (
        "FX7K3M9Q", "8591777", Result.FAILED, "busy")


def test_a_rule_that_recognises_but_reads_nothing_lets_the_next_rule_try_and_rules_test_shows_both(tmp_path):
    own = tmp_path / "own.toml"
    own.write_text(RETURNS_ORIGINAL)
    mail = tmp_path / "original.eml"
    mail.write_bytes(ORIGINAL_ATTACHED)

    result = faxgw(write_config(tmp_path, rule_files=[own]), "rules", "test", "--json", str(mail))

    assert result.returncode == 0, result.stderr
    (shown,) = json.loads(result.stdout)
    assert shown["kind"] == "rule" and shown["fields"]["job_code"] == "FX7K3M9Q"
    by_rule = {rule["name"]: rule for rule in shown["rules"]}
    assert by_rule["greenfax-html-table"] == {
        "name": "greenfax-html-table", "recognised": True, "used": False, "found": {},
        "why": "recognised, but found no result: the next rule tries"}
    assert by_rule["returns-original"]["used"] and by_rule["returns-original"]["found"]["reason"] == (
        "Line busy, tried 3 times")
    assert not by_rule["greenfax-sandbox"]["recognised"]
    text = faxgw(write_config(tmp_path, rule_files=[own]), "rules", "test", str(mail)).stdout
    assert "    greenfax-html-table: recognised, but found no result: the next rule tries\n" in text
    assert "    returns-original: used: the first rule that recognised the mail and found every required field" \
        in text


def test_rules_test_exits_1_when_no_rule_recognises_a_mail(tmp_path):
    stranger = tmp_path / "stranger.eml"
    stranger.write_bytes(b"From: a@b.example\r\nSubject: hello\r\n\r\nhi\r\n")
    result = faxgw(write_config(tmp_path), "rules", "test", "--json", str(DATA / "plaintext-success.eml"),
                   str(stranger))
    assert result.returncode == 1
    assert [entry["kind"] for entry in json.loads(result.stdout)] == ["rule", "unrecognised"]
