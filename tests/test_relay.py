"""No open relay, proven (issue 5, section 2), and AUTH only over TLS or on a listener marked plaintext_auth.

The real intake is driven over SMTP with relay tricks and fax-number edge
cases, from an unauthenticated client on an allowed network and from an
authenticated client outside every allowed network: a 250 to RCPT comes
only for an address the fax rules accept, and what reaches the upstream
(the sandbox) and the store is only the number a good recipient named.
A hypothesis property test then sends generated RCPT addresses and checks
each 250 against `fax_rules()`, an independent statement of the rules.

The gateways of this module run in a thread of their own (with the
sandbox), so that the tests can use a plain blocking client (smtplib)
and hypothesis can drive them example by example; they are shared by the
module's tests and started once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import smtplib
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import phonenumbers
import pytest
from conftest import NUMBER, SandboxServer, codes_in, fax_message, settings_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberType

from gateway import config, store
from gateway.models import Recipient, Refusal
from gateway.outbound.passwords import hash_password
from gateway.outbound.policy import Policy
from gateway.rules import RulesInForce, load_addressing
from gateway.service import Service

SENDER = "erp@legacy.example"
FAX = f"{NUMBER}@greenfax.com"
USER, PASSWORD = "scanner", "correct horse battery staple"
NO_DAILY_LIMITS = {"sender": {"faxes_per_day": 0}}  # these tests send many faxes; limits are not their subject


# --- the gateways, in a thread of their own ---------------------------------------------------------


class LoopThread:
    """An event loop running in a daemon thread; `run()` waits for a coroutine's result there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay-gateways", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Gateways:
    """`open_port`: a gateway whose allowed network is loopback (clients need no AUTH).
    `auth_port`: one that allows no network of ours, with AUTH allowed without TLS (plaintext_auth)."""

    loop: LoopThread
    sandbox: SandboxServer
    open_gateway: Service
    auth_gateway: Service

    @property
    def open_port(self) -> int:
        return self.open_gateway.smtp_addresses[0][1]

    @property
    def auth_port(self) -> int:
        return self.auth_gateway.smtp_addresses[0][1]

    @contextlib.contextmanager
    def client(self, kind: str) -> Iterator[smtplib.SMTP]:
        """An SMTP session after EHLO: "unauthenticated" (allowed network) or "authenticated" (AUTH PLAIN)."""
        port = self.open_port if kind == "unauthenticated" else self.auth_port
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        client.command_encoding = "utf-8"  # the tests send non-ASCII on purpose
        try:
            client.ehlo("client.test")
            if kind == "authenticated":
                client.login(USER, PASSWORD)
            yield client
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
            client.close()

    def wait_for_fax(self, code: str, timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for fax in list(self.sandbox.faxes):
                if fax.code == code:
                    return fax
            time.sleep(0.02)
        raise AssertionError(f"{code} never reached the sandbox")

    def jobs(self, service: Service) -> list[dict[str, Any]]:
        conn = store.connect(service.settings.store.path, readonly=True)
        try:
            return [dict(row) for row in conn.execute("SELECT code, recipient, number FROM jobs")]
        finally:
            conn.close()


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    loop = LoopThread()
    sandbox = SandboxServer()
    loop.run(sandbox.start())
    open_settings = settings_for(tmp_path_factory.mktemp("open"), sandbox.port, limits=NO_DAILY_LIMITS)
    auth_settings = settings_for(
        tmp_path_factory.mktemp("auth"), sandbox.port, limits=NO_DAILY_LIMITS,
        smtp={"allowed_networks": ["10.0.0.0/8"], "users": {USER: hash_password(PASSWORD)},
              "plaintext_auth": ["127.0.0.1:0"]})
    services = [Service(open_settings), Service(auth_settings)]
    for service in services:
        loop.run(service.start())
    try:
        yield Gateways(loop, sandbox, *services)
    finally:
        for service in services:
            loop.run(service.stop())
        loop.run(sandbox.stop())
        loop.close()


# --- the fax rules, stated independently -------------------------------------------------------------

FAX_DOMAINS = {"greenfax.com": True, "fax.localhost": False}  # domain -> the number is written with its country code
REFUSED_TYPES = {getattr(PhoneNumberType, name) for name in
                 ("PREMIUM_RATE", "SHARED_COST", "VOIP", "PERSONAL_NUMBER", "UAN", "PAGER", "VOICEMAIL")}
REFUSED_COUNTRY_CODES = {870, 881, 882, 883}


def fax_rules(address: str) -> str | None:
    """The E.164 number if the shipped fax rules accept this RCPT address exactly as written, else None.

    `<digits with optional + and the separators - . />@<fax domain>`, in
    ASCII, a dot-string local part whose separators stand one at a time
    between digits, a valid number of the default region (US) that is not
    premium-rate, satellite or another refused kind.
    """
    match = re.fullmatch(r"(\+?[0-9]+(?:[./-][0-9]+)*)@([A-Za-z.]+)", address)
    if match is None or not address.isascii():
        return None
    local, domain = match[1], match[2]
    if domain.lower() not in FAX_DOMAINS or local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    digits = re.sub(r"[./-]", "", local)
    if FAX_DOMAINS[domain.lower()] and not digits.startswith("+"):
        digits = "+" + digits
    try:
        number = phonenumbers.parse(digits, "US")
    except phonenumbers.NumberParseException:
        return None
    if (not phonenumbers.is_valid_number(number) or number.country_code in REFUSED_COUNTRY_CODES
            or phonenumbers.number_type(number) in REFUSED_TYPES
            or phonenumbers.region_code_for_number(number) != "US"):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def test_the_independent_rules_agree_with_the_plain_cases():
    assert fax_rules(FAX) == f"+{NUMBER}"
    assert fax_rules("2125550123@fax.localhost") == "+12125550123"
    assert fax_rules("+1-312-555-0123@FAX.localhost") == "+13125550123"
    for refused in ("19005550123@greenfax.com", "442079460000@greenfax.com", "12125551234@greenfax.com.",
                    "12125551234.@greenfax.com", "12125551234@evil.example", "١٢١٢٥٥٥١٢٣٤@greenfax.com",
                    "-12125551234@greenfax.com", "1212-555-1234-@greenfax.com", "1212--5551234@greenfax.com"):
        assert fax_rules(refused) is None, refused


# --- relay tricks ---------------------------------------------------------------------------------------

TRICKS = [
    # percent hack
    "TO:<victim%evil.example@greenfax.com>",
    "TO:<12125551234%evil.example@greenfax.com>",
    "TO:<victim%evil.example@fax.localhost>",
    "TO:<12125551234%greenfax.com@evil.example>",
    # bang paths (UUCP)
    "TO:<evil.example!victim@greenfax.com>",
    "TO:<evil.example!12125551234@greenfax.com>",
    "TO:<12125551234!evil.example@fax.localhost>",
    "TO:<greenfax.com!12125551234>",
    # quoted local parts
    'TO:<"victim@evil.example"@greenfax.com>',
    'TO:<"12125551234@evil.example"@greenfax.com>',
    'TO:<"12125551234"@greenfax.com>',
    'TO:<"12125551234 "@greenfax.com>',
    'TO:<"victim"@evil.example>',
    "TO:<\\12125551234@greenfax.com>",
    # source routes
    "TO:<@greenfax.com:victim@evil.example>",
    "TO:<@greenfax.com,@fax.localhost:victim@evil.example>",
    "TO:<@evil.example:12125551234@greenfax.com>",
    # comments and spaces that aiosmtpd removes
    "TO:<(greenfax.com)victim@evil.example>",
    "TO:<12125551234@greenfax.com(evil.example)>",
    "TO:<12125551234@ greenfax.com>",
    # IP literals
    "TO:<12125551234@[127.0.0.1]>",
    "TO:<victim@[127.0.0.1]>",
    "TO:<12125551234@[IPv6:::1]>",
    "TO:<12125551234@[192.0.2.1]>",
    # trailing and stray dots
    "TO:<12125551234@greenfax.com.>",
    "TO:<12125551234@greenfax.com..>",
    "TO:<2125550123@fax.localhost.>",
    "TO:<12125551234.@greenfax.com>",
    "TO:<.12125551234@greenfax.com>",
    "TO:<1212..5551234@greenfax.com>",
    # other domains dressed up as ours
    "TO:<12125551234@greenfax.com.evil.example>",
    "TO:<12125551234@GREENFAX.COM.EVIL.EXAMPLE>",
    "TO:<12125551234@evil-greenfax.com>",
    "TO:<12125551234@sub.greenfax.com>",
    "TO:<12125551234@greenfax.com@evil.example>",
    "TO:<12125551234@evil.example@greenfax.com>",
    "TO:<12125551234@greenfaх.com>",  # a Cyrillic х
    "TO:<12125551234@xn--greenfa-qvf.com>",
    "TO:<12125551234@localhost>",
    "TO:<12125551234@gw.test>",
    "TO:<12125551234>",
    "TO:<postmaster>",
    "TO:<postmaster@gw.test>",
    "TO:<victim@evil.example>",
    "TO:<VICTIM@EVIL.EXAMPLE>",
    "TO:victim@evil.example",
    "TO:<victim@evil.example",
    # unicode and fullwidth digits
    "TO:<١٢١٢٥٥٥١٢٣٤@greenfax.com>",
    "TO:<１２１２５５５１２３４@greenfax.com>",
    "TO:<१२१२५५५१२३४@greenfax.com>",
    "TO:<1212555１２３４@greenfax.com>",
    "TO:<¹²¹²⁵⁵⁵¹²³⁴@greenfax.com>",
    # letters
    "TO:<1212555ABCD@greenfax.com>",
    "TO:<1-800-FLOWERS@greenfax.com>",
    "TO:<fax@greenfax.com>",
    "TO:<12125551234x@greenfax.com>",
    # too short, too long
    "TO:<1@greenfax.com>",
    "TO:<123@greenfax.com>",
    "TO:<+@greenfax.com>",
    "TO:<-@fax.localhost>",
    "TO:<1212555123@greenfax.com>",
    "TO:<121255512345@greenfax.com>",
    "TO:<1212555123456789012345@greenfax.com>",
    # premium-rate and other refused kinds
    "TO:<19002345678@greenfax.com>",
    "TO:<+1-900-234-5678@fax.localhost>",
    "TO:<900-234-5678@fax.localhost>",
    "TO:<15002345678@greenfax.com>",
    # satellite and international networks
    "TO:<881612345678@greenfax.com>",
    "TO:<+881612345678@greenfax.com>",
    "TO:<870301234567@greenfax.com>",
    "TO:<8823421234@greenfax.com>",
    "TO:<883510012345@greenfax.com>",
    # international forms (international faxes are off by default)
    "TO:<442079460000@greenfax.com>",
    "TO:<+442079460000@greenfax.com>",
    "TO:<+44-20-7946-0000@fax.localhost>",
    "TO:<011442079460000@fax.localhost>",
    "TO:<00442079460000@fax.localhost>",
    "TO:<0012125551234@greenfax.com>",
    "TO:<2125551234@greenfax.com>",  # no country code at greenfax.com: +212 (Morocco), not New York
]
KINDS = ["unauthenticated", "authenticated"]


@pytest.mark.parametrize("argument", TRICKS)
@pytest.mark.parametrize("kind", KINDS)
def test_relay_trick_is_refused_and_only_the_real_fax_goes_out(gateways, kind, argument):
    with gateways.client(kind) as client:
        assert client.mail(SENDER)[0] == 250
        code, text = client.docmd("RCPT", argument)
        assert code >= 500 or code in (421, 451, 452), f"{argument}: {code} {text!r}"
        assert code != 250
        # The same envelope goes on with a real fax: that number alone is sent, and stored.
        assert client.rcpt(FAX)[0] == 250
        code, reply = client.data(fax_message())
        assert code == 250, reply
    (job_code,) = codes_in(reply.decode())
    fax = gateways.wait_for_fax(job_code)
    assert fax.number == NUMBER
    service = gateways.open_gateway if kind == "unauthenticated" else gateways.auth_gateway
    jobs = [job for job in gateways.jobs(service) if job["code"] == job_code]
    assert jobs == [{"code": job_code, "recipient": FAX, "number": f"+{NUMBER}"}]


ACCEPTED = [
    # (RCPT argument, the number it names): odd case and the written forms the rules take.
    (f"TO:<{NUMBER}@GreenFax.COM>", f"+{NUMBER}"),
    (f"to:<{NUMBER}@greenfax.com>", f"+{NUMBER}"),
    (f"TO:<+{NUMBER}@greenfax.com>", f"+{NUMBER}"),
    ("TO:<1-212-555-1234@greenfax.com>", f"+{NUMBER}"),
    ("TO:<212.555.1234@FAX.LOCALHOST>", f"+{NUMBER}"),
    ("TO:<212/555-1234@fax.localhost>", f"+{NUMBER}"),
    (f"TO:{NUMBER}@greenfax.com", f"+{NUMBER}"),
]


@pytest.mark.parametrize("argument, number", ACCEPTED)
@pytest.mark.parametrize("kind", KINDS)
def test_addresses_the_rules_take_are_faxed_to_the_number_they_name(gateways, kind, argument, number):
    with gateways.client(kind) as client:
        assert client.mail(SENDER)[0] == 250
        code, text = client.docmd("RCPT", argument)
        assert (code, text.decode()) == (250, f"2.1.5 Fax recipient OK: {number}")
        code, reply = client.data(fax_message())
        assert code == 250, reply
    (job_code,) = codes_in(reply.decode())
    assert gateways.wait_for_fax(job_code).number == number.lstrip("+")


def test_an_unauthenticated_client_outside_the_allowed_networks_gets_nothing(gateways):
    with gateways.client("outside") as client:
        code, text = client.mail(SENDER)
        assert code == 550 and b"may not send faxes" in text
        for argument in (f"TO:<{FAX}>", "TO:<victim@evil.example>", "TO:<victim%evil.example@greenfax.com>"):
            assert client.docmd("RCPT", argument)[0] == 503
        assert client.docmd("DATA")[0] == 503


@pytest.mark.parametrize("kind", KINDS)
def test_the_null_sender_cannot_fax_or_relay(gateways, kind):
    with gateways.client(kind) as client:
        code, text = client.docmd("MAIL", "FROM:<>")
        assert (code, text.decode()) == (550, "5.7.1 The null sender <> cannot send faxes")
        for argument in (f"TO:<{FAX}>", "TO:<victim@evil.example>"):
            assert client.docmd("RCPT", argument)[0] == 503


@pytest.mark.parametrize("kind", KINDS)
def test_header_recipients_are_never_mailed(gateways, kind):
    """To, Cc and Bcc headers naming other people: only the envelope's fax number is used."""
    message = fax_message(to="victim@evil.example", extra_headers={
        "Cc": "other@evil.example, 13125550123@greenfax.com", "Bcc": "hidden@evil.example"})
    with gateways.client(kind) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(FAX)[0] == 250
        code, reply = client.data(message)
        assert code == 250, reply
    (job_code,) = codes_in(reply.decode())
    fax = gateways.wait_for_fax(job_code)
    assert fax.number == NUMBER
    head = fax.raw.split(b"\r\n\r\n", 1)[0].decode()
    assert re.search(rf"(?m)^To: {FAX}\r?$", head)
    assert not re.search(r"(?im)^(cc|bcc):", head)
    assert "evil.example" not in head.replace("Reply-To", "")
    assert not [f for f in gateways.sandbox.faxes if f.code == job_code and f.number != NUMBER]


def test_header_envelope_mismatch_the_other_way_is_refused(gateways):
    """A fax number in the To header does not make another envelope recipient a fax."""
    with gateways.client("unauthenticated") as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("victim@evil.example")[0] == 550
        assert client.docmd("DATA")[0] == 503


def test_every_job_in_the_stores_is_a_fax_the_rules_accept(gateways):
    """After the module's tests (and whatever order they ran in): no job names anything else."""
    for service in (gateways.open_gateway, gateways.auth_gateway):
        for job in gateways.jobs(service):
            assert fax_rules(job["recipient"]) == job["number"], job
    for fax in gateways.sandbox.faxes:
        assert re.fullmatch(r"[0-9]{7,15}", fax.number) and fax_rules(f"+{fax.number}@greenfax.com")


# --- generated RCPT addresses -------------------------------------------------------------------------

UNICODE_DIGITS = "٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹०१२३४५६७८९０１２３４５６７８９¹²³"
VALID = [NUMBER, "13125550123", "18002345678"]  # valid at greenfax.com and at fax.localhost alike
NUMBERS = VALID + ["2125550123", "3125550123", "19002345678", "15002345678", "881612345678", "870301234567",
                   "442079460000", "2125551234", "123", "1212555123456789"]
DOMAINS = ["greenfax.com", "GreenFax.COM", "fax.localhost", "FAX.localhost", "greenfax.com.", "fax.localhost.",
           "greenfax.com.evil.example", "evil.example", "[127.0.0.1]", "[IPv6:::1]", "localhost", "gw.test",
           "greenfax.co", "greenfaх.com", "sub.greenfax.com", "greenfax.com@evil.example", "greenfax.com>"]
PREFIXES = ["", "", "+", "+1", "00", "011", "evil.example!", "@evil.example:", '"', "victim%", "(x)", ".", "-", "/"]
SUFFIXES = ["", "", "%evil.example", "!evil", '"', ".", "-", "x", " ", "(x)", "@evil.example"]
WRAPPERS = ["<{}>"] * 5 + ["{}", " <{}>", "<{}", "<<{}>>", "<{} >"]


@st.composite
def written_numbers(draw: st.DrawFn, *, garble: bool) -> str:
    """A number as a person or a program writes it, with separators; garbled: with anything in it."""
    if garble:
        digits = draw(st.sampled_from(NUMBERS) | st.text("0123456789" + UNICODE_DIGITS + "ABCDEFGHIJKxyz",
                                                            min_size=1, max_size=18))
        separators = ["-", ".", "/", " ", "(", ")", "..", "+"]
    else:
        digits = draw(st.sampled_from(VALID * 3 + NUMBERS))
        separators = ["-", ".", "/"]
    out = [digits[0]]
    for char in digits[1:]:
        if draw(st.integers(0, 7)) == 0:
            out.append(draw(st.sampled_from(separators)))
        out.append(char)
    return "".join(out)


@st.composite
def rcpt_addresses(draw: st.DrawFn) -> str:
    """Near the accepted forms (a number at a fax domain), relay tricks, and anything at all."""
    kind = draw(st.sampled_from(["plain", "tricky", "anything"]))
    if kind == "plain":
        return draw(written_numbers(garble=False)) + "@" + draw(st.sampled_from(DOMAINS[:4]))
    if kind == "tricky":
        return (draw(st.sampled_from(PREFIXES)) + draw(written_numbers(garble=True)) + draw(st.sampled_from(SUFFIXES))
                + "@" + draw(st.sampled_from(DOMAINS)))
    return draw(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40))


@pytest.mark.parametrize("kind", KINDS)
def test_no_generated_address_outside_the_rules_is_accepted(gateways, kind):
    accepted: list[tuple[str, str]] = []  # (job code, E.164)
    sessions = []

    def session() -> smtplib.SMTP:
        if not sessions:
            context = gateways.client(kind)
            sessions.append((context, context.__enter__()))
        return sessions[-1][1]

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(address=rcpt_addresses(), wrapper=st.sampled_from(WRAPPERS))
    def check(address: str, wrapper: str) -> None:
        argument = "TO:" + wrapper.format(address)
        client = session()
        try:
            client.rset()
            client.command_encoding = "utf-8"  # smtplib's RSET sets it back to ASCII
            assert client.mail(SENDER)[0] == 250
            code, text = client.docmd("RCPT", argument)
            if code != 250:
                return
            number = fax_rules(address)
            assert number is not None and wrapper in ("<{}>", "{}", " <{}>"), f"{argument!r} accepted: {text!r}"
            assert text.decode() == f"2.1.5 Fax recipient OK: {number}"
            code, reply = client.data(fax_message())
            assert code == 250, reply
            (job_code,) = codes_in(reply.decode())
            accepted.append((job_code, number))
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            # Not a relay question (a command the gateway ended the session for); start a new one.
            context, _client = sessions.pop()
            context.__exit__(None, None, None)

    try:
        check()
    finally:
        for context, _client in sessions:
            context.__exit__(None, None, None)
    # What reached the upstream: each accepted address's own number, nothing else.
    for job_code, number in accepted:
        assert gateways.wait_for_fax(job_code).number == number.lstrip("+")
    assert len(accepted) >= 5, "the generator should reach the accepted forms too (about 50 expected)"


# --- a listener that takes status mail too -----------------------------------------------------------------

STATUS_TRICKS = [
    "TO:<victim@evil.example>", "TO:<fax-bounce%evil.example@gw.office.example>", "TO:<@gw.office.example:victim@evil.example>",
    "TO:<faxes@office.example.evil.example>", 'TO:<"victim@evil.example"@office.example>', "TO:<victim@[127.0.0.1]>",
]


async def test_a_status_listener_keeps_status_mail_and_relays_nothing(gateway, sandbox):
    """Anyone may send to the status addresses (GreenFax, bounces from <>): such mail is read, never forwarded."""
    gw = await gateway(status={"listen": ["127.0.0.1:0"]})

    def session() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
            client.ehlo("mx.evil.example")
            answers = [client.docmd("MAIL", "FROM:<>")]
            answers += [client.docmd("RCPT", argument) for argument in STATUS_TRICKS]
            answers.append(client.docmd("RCPT", f"TO:<{FAX}>"))  # a fax needs a sender that may fax
            answers.append(client.docmd("RCPT", "TO:<fax-bounce+FX7K3M9Q%evil.example@gw.office.example>"))
            answers.append(client.data(b"From: mailer-daemon@evil.example\r\nSubject: hello\r\n\r\nforward me\r\n"))
        return answers

    mail, *tricks, fax, status, data = await asyncio.to_thread(session)
    assert mail[0] == 250
    assert all(code >= 500 for code, _text in tricks), tricks
    assert fax == (550, b"5.7.1 The null sender <> cannot send faxes")
    assert status[0] == 250 and b"Status address OK" in status[1]
    assert data[0] == 250 and b"Kept for review" in data[1]
    await asyncio.sleep(0.3)
    assert sandbox.faxes == [] and sandbox.handler.notices == []
    conn = store.connect(gw.store_path, readonly=True)
    try:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    finally:
        conn.close()


# --- the rules alone, without aiosmtpd in front -----------------------------------------------------------
# aiosmtpd refuses some forms itself (a domain ending in a dot, "a@b@c"), so the
# tests above cannot show that the policy would refuse them too: these do.

POLICY = Policy(config.sandbox_settings(), RulesInForce(load_addressing()))


@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(address=rcpt_addresses())
def test_the_policy_alone_accepts_only_what_the_rules_say(address):
    result = POLICY.classify_recipient(address)
    if isinstance(result, Recipient):
        assert result.number.e164 == fax_rules(address), address


@pytest.mark.parametrize("address", [
    f"{NUMBER}@greenfax.com.", f"{NUMBER}@greenfax.com..", "2125550123@fax.localhost.", f"{NUMBER}@greenfax.com@evil.example",
    f"{NUMBER}.@greenfax.com", f".{NUMBER}@greenfax.com", "1212..5551234@greenfax.com", f"{NUMBER}@GREENFAX.COM\u0000",
    f"{NUMBER}@greenfax.com\u200b", f"{NUMBER}\u00a0@greenfax.com", "2125550123@fax.localhost\n",
])
def test_the_policy_refuses_forms_aiosmtpd_would_stop_first(address):
    assert isinstance(POLICY.classify_recipient(address), Refusal), address


def test_no_unicode_case_folding_reaches_a_fax_domain():
    """KELVIN SIGN lower-cases to an ASCII k: a local fax domain with a k must not be reached through it."""
    rules = load_addressing({"recipients": {"local_fax_domains": ["fax.work.example"]}})
    policy = Policy(config.sandbox_settings(), RulesInForce(rules))
    assert isinstance(policy.classify_recipient("2125550123@fax.work.example"), Recipient)
    assert "\u212a".lower() == "k"
    refusal = policy.classify_recipient("2125550123@fax.wor\u212a.example")
    assert isinstance(refusal, Refusal) and refusal.reply.code == 553
    assert refusal.reply.text.isascii() and "\\u212a" in refusal.reply.text


# --- AUTH only over TLS, except on listeners marked plaintext_auth ---------------------------------


async def test_auth_is_refused_in_plain_text_on_unmarked_listeners_only(gateway, sandbox):
    """Two plain-text listeners, one of them marked plaintext_auth: AUTH is offered and taken there alone."""
    users = {USER: hash_password(PASSWORD)}
    gw = await gateway(smtp={"listen": ["127.0.0.1:0", "127.0.0.2:0"], "plaintext_auth": ["127.0.0.2:0"],
                             "allowed_networks": ["10.0.0.0/8"], "users": users})
    (plain_host, plain_port), (marked_host, marked_port) = gw.service.smtp_addresses
    assert (plain_host, marked_host) == ("127.0.0.1", "127.0.0.2")

    def session(host: str, port: int) -> tuple[list[str], tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP(host, port, timeout=10) as client:
            _code, features = client.ehlo("client.test")
            auth = client.docmd("AUTH", "PLAIN " + _plain(USER, PASSWORD))
            mail = client.mail(SENDER)
        return features.decode().splitlines(), auth, mail

    features, auth, mail = await asyncio.to_thread(session, plain_host, plain_port)
    assert not [line for line in features if line.startswith("AUTH")]
    assert auth == (538, b"5.7.11 Encryption required for requested authentication mechanism")
    assert mail[0] == 550  # still not logged in: outside the allowed networks
    features, auth, mail = await asyncio.to_thread(session, marked_host, marked_port)
    assert "AUTH LOGIN PLAIN" in features
    assert auth == (235, b"2.7.0 Authentication successful")
    assert mail == (250, b"2.1.0 Sender OK")


def _plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()
