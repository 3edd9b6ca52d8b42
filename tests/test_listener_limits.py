"""The SMTP listeners under abuse: the status listener's own limits, header caps, junk commands, session life.

The status listener takes mail from anyone on the internet, so it gets the
fax listener's protections and more: a cap on recipients, a size suited to
status mail, caps on the header, connections and messages per client, and
only an excerpt kept of mail no rule knows. Every session, on any
listener, is closed after too many NOOPs and after its maximum lifetime.
"""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest
from conftest import ACCOUNT_SENDER, NUMBER, fax_message, free_port
from test_status_smtp import Client, connect, query  # noqa: F401 - connect is a fixture

pytestmark = pytest.mark.timeout(90)
SENDER = "erp@legacy.example"


async def status_only(gateway, **status):
    port = free_port()
    gw = await gateway(status={"listen": [f"127.0.0.1:{port}"], **status})
    return gw, port


async def test_status_listener_caps_recipients(gateway, connect):
    gw, port = await status_only(gateway, max_recipients=3)
    client = await connect(port)
    assert (await client.command("MAIL FROM:<>")).startswith("250")
    for _ in range(3):
        assert await client.command(f"RCPT TO:<{ACCOUNT_SENDER}>") == "250 2.1.5 Status address OK"
    assert await client.command(f"RCPT TO:<{ACCOUNT_SENDER}>") == (
        "452 4.5.3 Too many recipients in one message (limit 3); send the rest in another message")


async def test_status_listener_has_a_size_limit_suited_to_status_mail(gateway, connect):
    gw, port = await status_only(gateway, max_message_size="64KiB")
    client = await connect(port)
    ehlo = await client.command("EHLO greenfax-mx.test")
    assert "250-SIZE 65536" in ehlo  # what this listener advertises: the status mail's limit
    assert await client.command("MAIL FROM:<> SIZE=100000") == (
        "552 5.3.4 Message size 100000 exceeds the limit of 65536 bytes")
    assert (await client.command("MAIL FROM:<>")).startswith("250")
    assert (await client.command(f"RCPT TO:<{ACCOUNT_SENDER}>")).startswith("250")
    big = b"From: x@junk.example\r\nSubject: junk\r\n\r\n" + (b"y" * 998 + b"\r\n") * 100
    assert await client.data(big) == "552 5.3.4 Message exceeds the limit of 65536 bytes"
    assert query(gw, "SELECT COUNT(*) FROM reports")[0][0] == 0


@pytest.mark.parametrize("listener", ["fax", "status"])
async def test_a_header_of_too_many_lines_is_refused_before_anything_parses_it(gateway, connect, listener):
    gw, port = await status_only(gateway, max_message_size="20MiB")
    client = await connect(gw.port if listener == "fax" else port)
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
    rcpt = f"{NUMBER}@greenfax.com" if listener == "fax" else ACCOUNT_SENDER
    assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("250")
    header = b"".join(b"X-H%d: v\r\n" % n for n in range(2000))
    assert await client.data(header + b"Subject: x\r\n\r\nbody\r\n") == (
        "552 5.3.4 Message header exceeds the limit of 1000 lines; send a shorter header")
    assert (await client.command("RSET")) == "250 OK"
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
    assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("250")
    long_header = b"X-Long: " + b"a" * 990 + b"\r\n"
    assert await client.data(long_header * 300 + b"\r\nbody\r\n") == (
        "552 5.3.4 Message header exceeds the limit of 262144 bytes; send a shorter header")


async def test_concurrent_mails_of_header_lines_keep_memory_bounded(gateway):
    """Eight sessions sending 1.9 MiB of header lines each: refused unparsed, the process barely grows."""
    gw, port = await status_only(gateway)
    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    header = b"".join(b"X-Junk-%07d: x\r\n" % n for n in range(100_000))[: 1_900_000]
    header = header[: header.rfind(b"\r\n") + 2]

    async def one() -> str:
        client = await Client.connect(port)
        try:
            assert (await client.command("MAIL FROM:<>")).startswith("250")
            assert (await client.command(f"RCPT TO:<{ACCOUNT_SENDER}>")).startswith("250")
            return await client.data(header + b"\r\nbody\r\n")
        finally:
            await client.close()

    replies = await asyncio.gather(*(one() for _ in range(8)))
    assert set(replies) == {"552 5.3.4 Message header exceeds the limit of 262144 bytes; send a shorter header"}
    grown = process.memory_info().rss - before
    assert grown < 150 * 2**20, f"the gateway grew by {grown / 2**20:.0f} MiB"


async def test_status_listener_limits_connections_per_client(gateway, connect):
    gw, port = await status_only(gateway, max_connections_per_client=2)
    first, second = await connect(port), await connect(port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        greeting = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
        assert greeting == ("421 4.7.0 Limit of 2 concurrent connections for client 127.0.0.1 reached;"
                            " resets when one of them closes")
        assert await reader.read() == b""  # closed
    finally:
        writer.close()
    await first.close()
    await asyncio.sleep(0.1)
    third = await connect(port)  # one closed: room again
    assert (await third.command("NOOP")).startswith("250")
    assert (await second.command("NOOP")).startswith("250")
    # The fax listener counts apart, with its own limit.
    assert (await (await connect(gw.port)).command("NOOP")).startswith("250")


async def test_status_listener_limits_messages_per_minute_per_client(gateway, connect):
    gw, port = await status_only(gateway, max_messages_per_minute=3)
    client = await connect(port)
    junk = b"From: x@junk.example\r\nSubject: junk\r\n\r\nnot a status mail\r\n"
    for n in range(3):
        assert (await client.mail("", [ACCOUNT_SENDER], junk + b"%d\r\n" % n)).startswith("250 2.0.0 Kept"), n
    reply = await client.mail("", [ACCOUNT_SENDER], junk)
    assert reply.startswith("451 4.7.1 Limit of 3 status mails per minute for client 127.0.0.1 reached; resets at ")
    assert query(gw, "SELECT COUNT(*) FROM reports")[0][0] == 3


async def test_a_trusted_network_is_not_held_to_a_strangers_rate(gateway, connect):
    """GreenFax's own servers (trusted_networks) send every status mail: no per-client limits for them."""
    gw, port = await status_only(gateway, max_messages_per_minute=2, max_connections_per_client=1,
                                 trusted_networks=["127.0.0.0/8"])
    clients = [await connect(port), await connect(port)]
    junk = b"From: x@junk.example\r\nSubject: junk\r\n\r\nnot a status mail\r\n"
    for n in range(4):
        reply = await clients[n % 2].mail("", [ACCOUNT_SENDER], junk + b"%d\r\n" % n)
        assert reply.startswith("250 2.0.0 Kept"), (n, reply)


async def test_mail_no_rule_knows_is_kept_as_an_excerpt(gateway, connect):
    gw, port = await status_only(gateway, review_excerpt="4KiB")
    client = await connect(port)
    junk = b"From: x@junk.example\r\nSubject: junk\r\n\r\n" + b"junk junk junk junk\r\n" * 50_000  # 1 MiB
    assert (await client.mail("", [ACCOUNT_SENDER], junk)).startswith("250 2.0.0 Kept for review")
    (raw,) = query(gw, "SELECT raw FROM reports")[0]
    assert len(raw) < 4096 + 100 and raw.startswith("From: x@junk.example\r\n")
    assert raw.endswith(" more bytes not kept: status.review_excerpt]\n")


# --- every session ----------------------------------------------------------------------------


async def test_too_many_noops_close_the_session_and_a_message_resets_the_count(gateway, connect):
    gw = await gateway(smtp={"max_junk_commands": 5})
    client = await connect(gw.port)
    for _ in range(4):
        assert (await client.command("NOOP")).startswith("250")
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
    assert (await client.command(f"RCPT TO:<{NUMBER}@greenfax.com>")).startswith("250")
    assert (await client.data(fax_message())).startswith("250 2.0.0 queued as")
    for _ in range(5):  # the accepted message started the count again
        assert (await client.command("RSET")).startswith("250")
    assert await client.command("NOOP") == (
        "421 4.7.0 Too many NOOP, RSET, VRFY or HELP commands (5) without a message; closing")
    assert await client.reader.read() == b""


async def test_a_session_past_its_lifetime_is_closed_at_its_next_command(gateway, connect):
    gw = await gateway(smtp={"max_session_time": 1})
    client = await connect(gw.port)
    assert (await client.command("NOOP")).startswith("250")
    await asyncio.sleep(1.2)
    assert await client.command("NOOP") == "421 4.4.2 Session longer than 1 s; closing, connect again to go on"
    assert await client.reader.read() == b""
    fresh = await connect(gw.port)
    assert (await fresh.command("QUIT")).startswith("221")


async def test_status_listener_caps_connections_from_all_clients_together(gateway, connect):
    gw, port = await status_only(gateway, max_connections=2)
    await connect(port)
    opened = []
    try:
        for client, expected in (("127.0.0.2", "220 "), ("127.0.0.3", "421 4.3.2 Too many connections to this"
                                                                      " gateway right now; try again in a few")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(client, 0))
            opened.append(writer)
            assert (await asyncio.wait_for(reader.readline(), 10)).decode().startswith(expected), client
    finally:
        for writer in opened:
            writer.close()


async def test_no_auth_on_a_status_only_listener(gateway, connect):
    gw, port = await status_only(gateway)
    client = await connect(port)
    assert "AUTH" not in await client.command("EHLO greenfax-mx.test")
    assert await client.command("AUTH PLAIN AGZheABzZWNyZXQ=") == (
        "502 5.5.1 AUTH is not offered on this listener: it takes status mail only")


async def test_refusals_end_a_session_at_the_hard_error_limit(gateway, connect):
    gw = await gateway(smtp={"soft_error_limit": 100, "hard_error_limit": 4})
    client = await connect(gw.port)
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
    for n in range(3):
        assert (await client.command(f"RCPT TO:<nobody{n}@evil.example>")).startswith("550 5.7.1 Relay denied")
    assert (await client.command("RCPT TO:<nobody@evil.example>")).startswith("550 5.7.1 Relay denied")
    assert await client.reply() == "421 4.7.0 Too many errors (4) without a message; closing"
    assert await client.reader.read() == b""


async def test_an_mx_sending_rset_between_status_mails_is_not_cut_off(gateway, connect):
    port = free_port()
    gw = await gateway(status={"listen": [f"127.0.0.1:{port}"]}, smtp={"max_junk_commands": 2})
    client = await connect(port)
    junk = b"From: x@junk.example\r\nSubject: junk\r\n\r\nnot a status mail\r\n"
    for n in range(4):
        assert (await client.mail("", [ACCOUNT_SENDER], junk + b"%d\r\n" % n)).startswith("250"), n
        assert (await client.command("RSET")).startswith("250"), n
