"""The HTTP face under abuse, against a real gateway and raw sockets: what a security review found.

- Connections are capped per listener and per client address, a request's
  head must arrive within `header_timeout`, an idle keep-alive connection is
  closed after `idle_timeout`, and HTTP never takes the descriptors SMTP
  intake needs (a real `faxgw serve` with a small RLIMIT_NOFILE).
- The error log is rate-limited (the filter alone, a real burst of
  refusals, and asyncio's "socket.accept() out of system resource").
- With `[http] api_token` set, /api/* needs it on loopback too.
- No Notify token in any log line; an oversized request line is a short 414,
  oversized headers a 431; HEAD never applies a report; a `since` too far
  back is a 400 (API) or a one-line error (CLI).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest
from conftest import codes_in, fax_message, free_port
from test_cli import faxgw, one_line_error
from peers.gatewayproc import wait_listening

from gateway import logs

pytestmark = pytest.mark.timeout(120)
TOKEN = "n0tify-t0ken-4711"
API_TOKEN = "api-s3cret-0815"
WAIT = 10  # seconds a test waits for the server to do something before it fails


# --- a raw HTTP client: what a slowloris, a scanner or a curious user sends ---------------------------


def port_of(gw, listener: str = "http") -> int:
    return gw.service.web.addresses[listener][0][1]


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/nosuch", *,
                  method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request on a kept-alive connection; its status and body."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gw.test", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    body = await reader.readexactly(length) if method != "HEAD" else b""
    return status, body


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection; fails if it keeps it open."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {WAIT}s") from None


async def exchange(port: int, data: bytes) -> tuple[int, bytes]:
    """Send `data` on a new connection; the status and all the server sent before closing."""
    reader, writer = await connect(port)
    writer.write(data)
    try:
        answer = await closed_by_server(reader)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


async def metrics(port: int, source: str = "127.0.0.1") -> str:
    reader, writer = await connect(port, source)
    try:
        status, body = await request(reader, writer, "/metrics")
    finally:
        writer.close()
    assert status == 200
    return body.decode()


def refused(gw, listener: str, reason: str) -> float:
    """faxgw_http_connections_refused_total{listener, reason} as the service counted it."""
    labels = {"listener": listener, "reason": reason}
    return gw.service.metrics.registry.get_sample_value("faxgw_http_connections_refused_total", labels) or 0


async def until_admitted(port: int) -> None:
    """Poll until a new connection is served again (the server has noticed the closed ones)."""
    for _ in range(WAIT * 20):
        reader, writer = await connect(port)
        try:
            status, _body = await request(reader, writer)
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            await asyncio.sleep(0.05)
        finally:
            writer.close()
    raise AssertionError("the listener never took a connection again")


# --- A: connection caps, timeouts, descriptors ------------------------------------------------------


@pytest.mark.parametrize("listener", ["http", "notify"])
async def test_a_listener_holds_at_most_max_connections(gateway, listener):
    gw = await gateway(http={"max_connections": 4, "max_connections_per_client": 100},
                       notify={"token": TOKEN, "listen": ["127.0.0.1:0"]})
    port = port_of(gw, listener)
    held = [await connect(port) for _ in range(4)]
    for reader, writer in held:
        assert (await request(reader, writer))[0] == 404  # served, and kept alive
    for _ in range(3):
        reader, writer = await connect(port)
        answer = await closed_by_server(reader)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503") or answer == b""
    assert refused(gw, listener, "listener") == 3
    # Closed connections make room again.
    for _reader, writer in held:
        writer.close()
    await until_admitted(port)


async def test_one_client_address_holds_at_most_max_connections_per_client(gateway, caplog):
    gw = await gateway(http={"max_connections_per_client": 3})
    port = port_of(gw)
    held = [await connect(port) for _ in range(3)]
    for reader, writer in held:
        assert (await request(reader, writer))[0] == 404
    reader, writer = await connect(port)
    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 503")
    writer.close()
    # Another address is another client.
    other = await connect(port, source="127.0.0.2")
    assert (await request(*other))[0] == 404
    text = await metrics(port, source="127.0.0.3")
    assert 'faxgw_http_connections_refused_total{listener="http",reason="client"} 1.0' in text
    assert 'faxgw_http_connections{listener="http"} 5.0' in text  # three, the other client's, this one
    assert "event=http-refused listener=http client=127.0.0.1 reason=client limit=3" in caplog.text
    for _reader, writer in [*held, other]:
        writer.close()


async def test_a_request_head_must_arrive_within_header_timeout(gateway):
    gw = await gateway(http={"header_timeout": 0.5, "idle_timeout": 60})
    port = port_of(gw)
    # Connected, but not a byte sent.
    reader, writer = await connect(port)
    assert await closed_by_server(reader) == b""
    writer.close()
    # Slowloris: a header line a byte at a time, never finished.
    reader, writer = await connect(port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw.test\r\n")
    trickled = 0
    while not reader.at_eof() and trickled < 200:
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.05)
        trickled += 1
    assert trickled < 200, "a head sent a byte at a time kept its connection for 10 s"
    writer.close()
    # A kept-alive connection with no request pending is idle, not late: it serves the next request.
    reader, writer = await connect(port)
    assert (await request(reader, writer))[0] == 404
    await asyncio.sleep(1.0)
    assert (await request(reader, writer))[0] == 404
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(gateway):
    gw = await gateway(http={"idle_timeout": 0.5})
    reader, writer = await connect(port_of(gw))
    assert (await request(reader, writer, "/healthz"))[0] == 200
    assert await closed_by_server(reader) == b""
    writer.close()


def serve_config(tmp_path: Path, **http: object) -> tuple[Path, int, int]:
    """A sandbox `faxgw serve` config on free ports: (path, SMTP port, HTTP port)."""
    smtp_port, http_port, sandbox_port = free_port(), free_port(), free_port()
    extra = "".join(f"{key} = {value}\n" for key, value in http.items())
    path = tmp_path / "faxgw.toml"
    path.write_text(f"""
[http]
listen = ["127.0.0.1:{http_port}"]
{extra}
[smtp]
listen = ["127.0.0.1:{smtp_port}"]

[sandbox]
enabled = true
listen = ["127.0.0.1:{sandbox_port}"]
feed_listen = "127.0.0.1:0"
""")
    return path, smtp_port, http_port


def serve(config: Path, cwd: Path, *, nofile: tuple[int, int]) -> subprocess.Popen[bytes]:
    """`faxgw serve` as systemd would start it with LimitNOFILE=soft:hard."""
    return subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config), "serve"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    return err.decode()


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit in /proc")


async def test_serve_raises_its_soft_descriptor_limit_to_the_hard_one(tmp_path):
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config, smtp_port, _http_port = serve_config(tmp_path)
    proc = serve(config, tmp_path, nofile=(256, hard))
    try:
        await wait_listening(smtp_port, proc)
        assert open_files_limit(proc.pid) == (hard, hard)
    finally:
        log = stop(proc)
    assert f"event=fd-limit nofile={hard} " in log


async def test_http_connections_leave_descriptors_for_smtp_intake(tmp_path):
    """1,100 idle HTTP connections once took all 1,024 descriptors; SMTP intake and /healthz stopped."""
    config, smtp_port, http_port = serve_config(tmp_path, max_connections=1000, max_connections_per_client=1000,
                                                header_timeout=60, idle_timeout=60)
    proc = serve(config, tmp_path, nofile=(128, 128))  # HTTP may hold 64 of them
    held: list[asyncio.StreamWriter] = []
    served = refused = 0
    try:
        await wait_listening(smtp_port, proc)
        await wait_listening(http_port, proc)  # HTTP starts after SMTP intake
        for _ in range(120):
            reader, writer = await connect(http_port)
            held.append(writer)
            try:
                status, _body = await asyncio.wait_for(request(reader, writer), 2)
                served += status == 404
                refused += status == 503
            except (asyncio.IncompleteReadError, ConnectionError):
                refused += 1  # closed at once, the 503 lost to the reset
            except TimeoutError:
                pass  # neither served nor refused: the process is out of descriptors
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, start_tls=False, timeout=WAIT) as smtp:
            _errors, reply = await smtp.sendmail("erp@legacy.example", ["12125551234@greenfax.com"], fax_message())
        assert "queued as" in reply
        assert served == 64 and refused == 120 - 64
    finally:
        for writer in held:
            writer.close()
        log = stop(proc)
    assert "event=fd-limit nofile=128 http_connections=64" in log
    assert "Too many open files" not in log and "out of system resource" not in log
    # The refusals are logged, but rate-limited (logs.setup installs the filter).
    assert 1 <= log.count("event=http-refused") <= logs.RateLimit().burst


# --- A: the rate-limited error log ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self, limit: logs.RateLimit) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(limit)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()}")


@pytest.fixture
def limited(caplog):
    """A RateLimit (burst 5 per 60 s, on a clock the test moves) on a handler of the root logger."""
    caplog.set_level(logging.INFO)
    clock = Clock()
    handler = Lines(logs.RateLimit(burst=5, interval=60, clock=clock))
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler, clock
    root.removeHandler(handler)


def test_rate_limit_passes_a_burst_then_says_how_many_it_held_back(limited):
    handler, clock = limited
    log = logging.getLogger("faxgw.test")
    for n in range(25):
        logs.log_event(log, "disk-trouble", level=logging.ERROR, attempt=n)
        log.warning("descriptor %d is gone", n)  # one template: one kind, whatever the values
        logs.log_event(log, "accepted", n=n)  # INFO is the record of what was done: never held back
    lines = handler.lines
    assert sum("event=disk-trouble" in line for line in lines) == 5
    assert sum("descriptor" in line for line in lines) == 5
    assert sum("event=accepted" in line for line in lines) == 25
    clock.now += 61
    logs.log_event(log, "disk-trouble", level=logging.ERROR, attempt=99)
    summaries = [line for line in lines if "event=log-suppressed" in line]
    assert len(summaries) == 2
    assert any("message=disk-trouble count=20" in line for line in summaries)
    assert any('message="descriptor %d is gone" count=20' in line for line in summaries)
    assert lines[-1].endswith("attempt=99")  # the summaries come before the next line, which passes


async def test_rate_limit_holds_back_asyncios_accept_errors(limited):
    handler, clock = limited
    loop = asyncio.get_running_loop()
    for _ in range(50):  # asyncio's own report when accept() fails with EMFILE
        loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                     "exception": OSError(24, "Too many open files")})
    assert sum("out of system resource" in line for line in handler.lines) == 5
    clock.now += 61
    logging.getLogger("faxgw.test").warning("later")
    assert any(line.startswith("asyncio ") and "count=45" in line for line in handler.lines)


async def test_a_real_burst_of_refusals_is_rate_limited(gateway, limited):
    handler, clock = limited
    gw = await gateway(http={"max_connections_per_client": 1})
    port = port_of(gw)
    first = await connect(port)
    assert (await request(*first))[0] == 404
    for _ in range(300):
        reader, writer = await connect(port)
        await closed_by_server(reader)
        writer.close()
    assert sum("event=http-refused" in line for line in handler.lines) == 5
    assert refused(gw, "http", "client") == 300
    first[1].close()
    clock.now += 61
    logging.getLogger("faxgw.test").warning("later")
    assert any("message=http-refused count=295" in line for line in handler.lines)


def test_logs_setup_installs_the_rate_limit(tmp_path):
    code = ("import asyncio, logging\n"
            "from gateway import logs\n"
            "logs.setup('info')\n"
            "loop = asyncio.new_event_loop()\n"
            "for _ in range(200):\n"
            "    loop.call_exception_handler({'message': 'socket.accept() out of system resource',"
            " 'exception': OSError(24, 'Too many open files')})\n"
            "for n in range(200):\n"
            "    logging.getLogger('faxgw.intake').info('event=accepted n=%d', n)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 1 <= result.stderr.count("out of system resource") <= logs.RateLimit().burst
    assert result.stderr.count("event=accepted") == 200


# --- B: the API token on loopback ---------------------------------------------------------------------


async def test_the_api_token_is_required_on_loopback_too(gateway):
    gw = await gateway(http={"api_token": API_TOKEN})
    port = port_of(gw)
    reader, writer = await connect(port)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN},
                        {"Authorization": "Bearer \xe9\xe9"}):  # not ASCII: a wrong token, not a 500
            for path in ("/api/jobs", "/api/jobs/FX000000"):
                status, body = await request(reader, writer, path, headers=headers)
                assert status == 401 and b"code" not in body, (path, headers)
        assert (await request(reader, writer, "/api/jobs", headers={"Authorization": f"Bearer {API_TOKEN}"}))[0] \
            == 200
        # Health and metrics stay open (monitoring needs no token).
        assert (await request(reader, writer, "/healthz"))[0] == 200
        assert (await request(reader, writer, "/metrics"))[0] == 200
    finally:
        writer.close()


# --- C: no token in the log, short errors, HEAD, since ------------------------------------------------


async def test_an_overlong_request_line_gets_414_and_no_token_in_the_log(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await gateway(notify={"token": TOKEN})
    query = "result=success&userjobcode=" + "A" * 9000
    status, answer = await exchange(port_of(gw), f"GET /greenfax/notify/{TOKEN}?{query} HTTP/1.1\r\n"
                                                 f"Host: gw.test\r\n\r\n".encode())
    assert status == 414 and len(answer) < 400
    await asyncio.sleep(0.1)
    assert TOKEN not in caplog.text and "Traceback" not in caplog.text and "LineTooLong" not in caplog.text
    assert "status=414" in caplog.text


@pytest.mark.parametrize("headers", [
    f"X-Forwarded-For: {TOKEN}{'1' * 9000}\r\n",  # one header over the limit
    "".join(f"X-Header-{n}: {TOKEN}\r\n" for n in range(200)),  # too many headers
], ids=["long", "many"])
async def test_oversized_headers_get_431_and_no_value_in_the_log(gateway, caplog, headers):
    caplog.set_level(logging.DEBUG)
    gw = await gateway(notify={"token": TOKEN})
    status, answer = await exchange(port_of(gw), f"GET /healthz HTTP/1.1\r\nHost: gw.test\r\n{headers}\r\n"
                                                 .encode())
    assert status == 431 and len(answer) < 400
    await asyncio.sleep(0.1)
    assert TOKEN not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("path", [f"/GreenFax/Notify/{TOKEN}", f"/greenfax//notify/{TOKEN}",
                                  f"/greenfax/notify/{TOKEN}/more", f"/greenfax/notify/{TOKEN}%2Fmore"])
async def test_the_token_stays_out_of_the_log_however_the_path_is_spelt(gateway, caplog, path):
    caplog.set_level(logging.DEBUG)
    gw = await gateway(notify={"token": TOKEN})
    reader, writer = await connect(port_of(gw))
    try:
        assert (await request(reader, writer, f"{path}?result=success&userjobcode=FX000000"))[0] == 404
    finally:
        writer.close()
    await asyncio.sleep(0.1)
    assert "event=http" in caplog.text and TOKEN not in caplog.text


async def test_head_on_notify_is_405_and_changes_nothing(gateway):
    gw = await gateway(notify={"token": TOKEN})
    (code,) = codes_in((await gw.send()).message)
    await gw.wait_state(code, "submitted")
    reader, writer = await connect(port_of(gw))
    try:
        status, _ = await request(reader, writer, f"/greenfax/notify/{TOKEN}?result=success&userjobcode={code}",
                                  method="HEAD")
    finally:
        writer.close()
    assert status == 405
    job = gw.job(code)
    assert job["state"] == "submitted" and not [e for e in job["events"] if e["source"] == "notify"]


@pytest.mark.parametrize("since", ["99999999999d", "1" + "0" * 400, "9999-12-31T23:59:59-05:00",
                                   "0001-01-01T00:00:00+05:00", "0001-01-01"],
                         ids=["days", "infinite", "year-10000", "year-0", "year-1-local"])
async def test_a_since_beyond_the_calendar_is_a_400_naming_it(gateway, since):
    gw = await gateway()
    reader, writer = await connect(port_of(gw))
    try:
        status, body = await request(reader, writer, f"/api/jobs?since={since.replace('+', '%2B')}")
    finally:
        writer.close()
    assert status == 400 and b"since" in body and since.encode() in body


def test_faxgw_status_since_beyond_the_calendar_is_a_one_line_error(tmp_path):
    result = faxgw("status", "--since", "99999999999d", cwd=tmp_path)
    line = one_line_error(result)
    assert result.returncode == 2 and "--since" in line and "99999999999d" in line
