"""Listeners with ``proxy_protocol = true``: the client's address from a PROXY header.

Real HAProxy (``send-proxy``, ``send-proxy-v2``, ``send-proxy-v2-ssl`` after
terminating TLS) in front of a real front process, and raw clients for what a
balancer never sends: broken, missing, slow and split headers.  The test
receiver reports the SCGI description it got.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fdhandoff.proxyproto import V2_SIGNATURE
from handoff_receiver import (
    IO_TIMEOUT,
    FrontProcess,
    TestReceiver,
    parse_response,
    read_to_close,
    receivers_fixture,  # noqa: F401  (fixture)
    sockdir_fixture,  # noqa: F401  (fixture)
)
from test_front_auth import App, auth_config
from test_front_auth import app as app_fixture  # noqa: F401  (fixture, under this name)
from test_metrics import _free_port

pytestmark = pytest.mark.timeout(120)

REQUEST = b"GET /who?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n"


@contextmanager
def running(sockdir: Path, rest: str, *, proxy: bool = True) -> Iterator[FrontProcess]:
    """A front on 127.0.0.1:0, its listener requiring the PROXY header unless
    ``proxy`` is False; ``rest`` is the configuration's routes and tables."""
    config = sockdir / "front.toml"
    config.write_text(
        f'[[listen]]\naddress = "127.0.0.1:0"\nproxy_protocol = {str(proxy).lower()}\n{rest}'
    )
    front = FrontProcess(["--config", str(config)])
    try:
        yield front
    finally:
        front.stop()


def route_to(receiver: TestReceiver) -> str:
    return f'[[route]]\nprefix = "/"\nbackend = "unix:{receiver.path}"\n'


@pytest.fixture
def proxied_front(
    sockdir: Path, receivers: Callable[..., TestReceiver]
) -> Iterator[tuple[FrontProcess, TestReceiver]]:
    """A front whose only listener requires the PROXY header, routing to a test receiver."""
    receiver = receivers()
    timeouts = '[timeouts]\nhead = 1.0\n[metrics]\naddress = "127.0.0.1:0"\n'
    with running(sockdir, route_to(receiver) + timeouts) as front:
        yield front, receiver


def _exchange(front: FrontProcess, data: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.socket() as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.bind((source, 0))
        sock.connect(front.host_port)
        sock.sendall(data)
        return read_to_close(sock, reset_ok=True)


def _description(receiver: TestReceiver) -> dict[bytes, bytes]:
    return receiver.next().headers


def _metric(front: FrontProcess, name: str) -> str:
    found = front.wait_for(r"metrics on http://(\S+):(\d+)/metrics")
    host, port = found.group(1), found.group(2)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
        text = read_to_close(sock).decode()
    return "\n".join(line for line in text.splitlines() if name in line)


# --- raw clients -----------------------------------------------------------------------------


def test_v1_header_names_the_client(proxied_front: tuple[FrontProcess, TestReceiver]) -> None:
    front, receiver = proxied_front
    answer = _exchange(front, b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n" + REQUEST)
    assert parse_response(answer)[0] == 200
    seen = _description(receiver)
    assert (seen[b"REMOTE_ADDR"], seen[b"REMOTE_PORT"]) == (b"192.0.2.10", b"56324")
    assert b"HTTPS" not in seen
    assert seen[b"REQUEST_URI"] == b"/who?x=1"
    # The access log shows the client, not the balancer.
    front.wait_for(re.escape('192.0.2.10:56324 "GET /who?x=1"'))


def test_v2_header_with_client_tls_makes_the_request_https(
    proxied_front: tuple[FrontProcess, TestReceiver],
) -> None:
    front, receiver = proxied_front
    addresses = socket.inet_pton(socket.AF_INET6, "2001:db8::7") + bytes(16) + b"\x04\xd2\x01\xbb"
    ssl_tlv = b"\x20\x00\x05\x01\x00\x00\x00\x00"
    block = addresses + ssl_tlv
    header = V2_SIGNATURE + b"\x21\x21" + len(block).to_bytes(2, "big") + block
    assert parse_response(_exchange(front, header + REQUEST))[0] == 200
    seen = _description(receiver)
    assert (seen[b"REMOTE_ADDR"], seen[b"REMOTE_PORT"]) == (b"2001:db8::7", b"1234")
    # The scheme the client used; KTLS_RX is about the socket, which is plain.
    assert seen[b"HTTPS"] == b"on"
    assert b"KTLS_RX" not in seen


def test_v2_local_keeps_the_connection_address(
    proxied_front: tuple[FrontProcess, TestReceiver],
) -> None:
    front, receiver = proxied_front
    header = V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL: the balancer's health check
    assert parse_response(_exchange(front, header + REQUEST, source="127.0.0.9"))[0] == 200
    assert _description(receiver)[b"REMOTE_ADDR"] == b"127.0.0.9"


def test_bytes_after_the_header_stay_for_the_receiver(
    sockdir: Path, receivers: Callable[..., TestReceiver]
) -> None:
    """Header, request, body and a pipelined request in one segment: the front
    reads exactly the header and the head, the rest stays in the socket."""
    receiver = receivers(extra_bytes=len(REQUEST))
    with running(sockdir, route_to(receiver)) as front:
        body = b"x" * 5000
        post = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
        data = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80\r\n" + post + body + REQUEST
        assert parse_response(_exchange(front, data))[0] == 200
        seen = receiver.next()
        assert seen.body == body
        assert seen.extra == REQUEST
        assert seen.headers[b"CONTENT_LENGTH"] == b"0"


def test_a_header_arriving_byte_by_byte(proxied_front: tuple[FrontProcess, TestReceiver]) -> None:
    front, receiver = proxied_front
    header = b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 8080\r\n"
    with socket.create_connection(front.host_port, timeout=IO_TIMEOUT) as sock:
        for byte in header:
            sock.send(bytes([byte]))
            time.sleep(0.005)
        sock.sendall(REQUEST)
        assert parse_response(read_to_close(sock))[0] == 200
    assert _description(receiver)[b"REMOTE_ADDR"] == b"2001:db8::1"


BAD = [
    (REQUEST, "no PROXY protocol header: the connection starts b'GET /who?x=1 HTT'"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 80\r\n" + REQUEST, "invalid port b'99999'"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 80\n" + REQUEST, "ends with a bare LF or CR"),
    (b"PROXY " + b"A" * 200, "without CRLF in its first 107 bytes"),
    (V2_SIGNATURE + b"\x21\x11\x00\x04abcd" + REQUEST, "the addresses need 12"),
    (V2_SIGNATURE + b"\x22\x11\x00\x00" + REQUEST, "unknown command 2"),
]


@pytest.mark.parametrize(("data", "why"), BAD)
def test_a_bad_header_closes_the_connection_without_an_answer(
    proxied_front: tuple[FrontProcess, TestReceiver], data: bytes, why: str
) -> None:
    front, receiver = proxied_front
    baseline = front.fd_count()
    assert _exchange(front, data) == b""  # the specification allows no answer
    front.wait_for(r"127\.0\.0\.1:\d+: .*" + re.escape(why) + "; connection closed")
    assert front.fd_count_within(baseline) <= baseline
    assert 'proxy_protocol_failures_total{reason="invalid"} 1' in _metric(
        front, "proxy_protocol_failures_total"
    )
    assert receiver.handoffs.empty()


def test_an_unfinished_header_is_closed_at_the_head_timeout(
    proxied_front: tuple[FrontProcess, TestReceiver],
) -> None:
    front, _ = proxied_front
    baseline = front.fd_count()
    with socket.create_connection(front.host_port, timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1 192")
        started = time.monotonic()
        assert read_to_close(sock, reset_ok=True) == b""
        waited = time.monotonic() - started
    assert 0.8 < waited < 5, waited  # timeouts.head = 1.0, counted from the accept
    front.wait_for("no complete PROXY protocol header within 1 s; connection closed")
    assert front.fd_count_within(baseline) <= baseline
    assert 'reason="timeout"} 1' in _metric(front, "proxy_protocol_failures_total")


def test_a_client_closing_inside_the_header(
    proxied_front: tuple[FrontProcess, TestReceiver],
) -> None:
    front, _ = proxied_front
    baseline = front.fd_count()
    with socket.create_connection(front.host_port, timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"PROXY TCP4 ")
        time.sleep(0.1)
    front.wait_for("client closed inside the PROXY protocol header; connection closed")
    assert front.fd_count_within(baseline) <= baseline


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 80\r\n", 501),  # an unknown method, PROXY
        (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12), 400),
    ],
)
def test_a_header_on_a_plain_listener_is_a_bad_request(
    sockdir: Path, receivers: Callable[..., TestReceiver], header: bytes, expected: int
) -> None:
    """A balancer sending headers to a listener that does not expect them is
    noticed at once: 400, never a request routed under the balancer's address."""
    receiver = receivers()
    with running(sockdir, route_to(receiver), proxy=False) as front:
        status, _, _ = parse_response(_exchange(front, header + REQUEST))
    assert status == expected
    assert receiver.handoffs.empty()


def test_auth_mode_forwards_the_proxied_client(
    sockdir: Path,
    app_fixture: type[App],  # noqa: F811  (the fixture imported above)
) -> None:
    """X-Forwarded-For names the client the header gave, and X-Forwarded-Proto
    the scheme it used to the balancer (v2 PP2_TYPE_SSL)."""
    with running(sockdir, auth_config(app_fixture, sockdir)) as front:
        addresses = bytes([192, 0, 2, 50, 192, 0, 2, 1]) + b"\x13\x88\x01\xbb"
        block = addresses + b"\x20\x00\x05\x01\x00\x00\x00\x00"
        header = V2_SIGNATURE + b"\x21\x11" + len(block).to_bytes(2, "big") + block
        request = b"GET /app/plain HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n"
        status, _, body = parse_response(_exchange(front, header + request))
        assert (status, body) == (201, b"from the app: ")
        seen = app_fixture.seen[-1]["headers"]
        assert isinstance(seen, dict)
        assert seen["X-Forwarded-For"] == "10.9.9.9, 192.0.2.50"
        assert seen["X-Forwarded-Proto"] == "https"


def test_proxy_protocol_is_read_again_on_reload(
    sockdir: Path, receivers: Callable[..., TestReceiver]
) -> None:
    """A reload turns the requirement on for new connections of a kept listener."""
    receiver = receivers()
    port = _free_port()
    config = sockdir / "front.toml"
    text = (
        f'[[listen]]\naddress = "127.0.0.1:{port}"\nproxy_protocol = {{}}\n'
        f'[[route]]\nprefix = "/"\nbackend = "unix:{receiver.path}"\n'
    )
    config.write_text(text.format("false"))
    front = FrontProcess(["--config", str(config)])
    try:
        assert parse_response(_exchange(front, REQUEST))[0] == 200
        config.write_text(text.format("true"))
        front.proc.send_signal(signal.SIGHUP)
        front.wait_for("configuration reloaded")
        header = b"PROXY TCP4 192.0.2.3 192.0.2.4 5 6\r\n"
        assert parse_response(_exchange(front, header + REQUEST))[0] == 200
        assert receiver.next().headers[b"REMOTE_ADDR"] == b"127.0.0.1"
        assert receiver.next().headers[b"REMOTE_ADDR"] == b"192.0.2.3"
        # The requirement holds now: a request without a header is dropped.
        assert _exchange(front, REQUEST) == b""
    finally:
        front.stop()


# --- real HAProxy ---------------------------------------------------------------------------


@pytest.fixture
def haproxy(
    require_tool: Callable[[str], str],
    proxied_front: tuple[FrontProcess, TestReceiver],
    sockdir: Path,
) -> Iterator[dict[str, int]]:
    """HAProxy in TCP mode: v1, v2, and TLS terminated then v2 with PP2_TYPE_SSL."""
    binary = require_tool("haproxy")
    openssl = require_tool("openssl")
    front, _ = proxied_front
    host, port = front.host_port
    pem = sockdir / "haproxy.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(sockdir / "k.pem"), "-out", str(sockdir / "c.pem"),
         "-subj", "/CN=localhost", "-days", "1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    pem.write_bytes((sockdir / "c.pem").read_bytes() + (sockdir / "k.pem").read_bytes())
    ports = {"v1": _free_port(), "v2": _free_port(), "tls": _free_port()}
    config = sockdir / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 64\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n"
        f"listen v1\n  bind 127.0.0.1:{ports['v1']}\n"
        f"  server front {host}:{port} send-proxy\n"
        f"listen v2\n  bind [::1]:{ports['v2']}\n"
        f"  server front {host}:{port} send-proxy-v2\n"
        f"listen tls\n  bind 127.0.0.1:{ports['tls']} ssl crt {pem}\n"
        f"  server front {host}:{port} send-proxy-v2-ssl\n"
    )
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + IO_TIMEOUT
        for name, listen in (("v1", "127.0.0.1"), ("v2", "::1"), ("tls", "127.0.0.1")):
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                try:
                    socket.create_connection((listen, ports[name]), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "haproxy did not start"
                    time.sleep(0.05)
        yield ports
    finally:
        proc.terminate()
        proc.wait(IO_TIMEOUT)


def _through(address: tuple[str, int], *, tls: bool = False) -> tuple[bytes, tuple[str, int]]:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    raw = socket.socket(family)
    raw.settimeout(IO_TIMEOUT)
    raw.connect(address)
    local = raw.getsockname()[:2]
    sock: socket.socket = raw
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(raw, server_hostname="localhost")
    with sock:
        sock.sendall(REQUEST)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data, local


@pytest.mark.parametrize(
    ("name", "host", "https"),
    [("v1", "127.0.0.1", False), ("v2", "::1", False), ("tls", "127.0.0.1", True)],
)
def test_haproxy_names_the_client(
    haproxy: dict[str, int],
    proxied_front: tuple[FrontProcess, TestReceiver],
    name: str,
    host: str,
    https: bool,
) -> None:
    """send-proxy (v1), send-proxy-v2 from an IPv6 client, and TLS terminated
    by HAProxy then send-proxy-v2-ssl: the client's own address and port, and
    HTTPS=on (without KTLS_RX: the front's socket is plain) for the last."""
    front, receiver = proxied_front
    answer, local = _through((host, haproxy[name]), tls=https)
    assert parse_response(answer)[0] == 200
    seen = _description(receiver)
    assert (seen[b"REMOTE_ADDR"], seen[b"REMOTE_PORT"]) == (host.encode(), b"%d" % local[1])
    assert seen.get(b"HTTPS") == (b"on" if https else None)
    assert b"KTLS_RX" not in seen
    client = f"[{host}]" if ":" in host else host
    front.wait_for(re.escape(f'{client}:{local[1]} "GET /who?x=1"'))
