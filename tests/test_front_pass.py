"""Pass mode end to end: a real front subprocess, real curl, a receiver on fdhandoff.fdpass."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fdhandoff import scgi
from handoff_receiver import (
    FIXTURES_NGINX,
    FrontProcess,
    Handoff,
    TestReceiver,
    fronts_fixture,  # noqa: F401  (fixture)
    http_exchange,
    parse_response,
    read_available,
    receivers_fixture,  # noqa: F401  (fixture)
    respond,
    sockdir_fixture,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.timeout(120)

#: The start of a TLS ClientHello (RFC 8446 §5.1): what a client configured
#: for https:// sends to a plain port; no CR or LF in it.
CLIENT_HELLO = b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03" + bytes(range(0x40, 0x60))


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    path = shutil.which("curl")
    assert path is not None
    return subprocess.run(
        [path, "-sS", "--max-time", "20", *args], capture_output=True, timeout=60, check=False
    )


def names(pairs: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name for name, _ in pairs]


# --- what the receiver gets ------------------------------------------------------------------


def test_curl_get_with_query_scgi_description(
    require_tool: Callable[[str], str],
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    require_tool("curl")
    receiver = receivers()
    front = fronts(f"/fd=unix:{receiver.path}")
    host, port = front.host_port
    result = curl("-H", "X-Custom-Header: abc", f"{front.url}/fd/hello?x=1&y=two%20words")
    assert result.returncode == 0, result.stderr
    handoff = receiver.next()
    headers = handoff.headers
    assert headers[b"CONTENT_LENGTH"] == b"0"
    assert headers[b"SCGI"] == b"1+fd_pass"  # nginx's value: SCGI 1 with the fd attached
    assert headers[b"REMOTE_ADDR"] == b"127.0.0.1"
    assert headers[b"REQUEST_METHOD"] == b"GET"
    assert headers[b"REQUEST_URI"] == b"/fd/hello?x=1&y=two%20words"
    assert headers[b"QUERY_STRING"] == b"x=1&y=two%20words"
    assert headers[b"SERVER_ADDR"] == host.encode()
    assert headers[b"SERVER_PORT"] == str(port).encode()
    assert headers[b"SERVER_PROTOCOL"] == b"HTTP/1.1"
    assert headers[b"SERVER_NAME"] == b"127.0.0.1"
    assert headers[b"HANDOFF_ROUTE"] == b"/fd"
    assert headers[b"HTTP_X_CUSTOM_HEADER"] == b"abc"
    assert headers[b"HTTP_USER_AGENT"].startswith(b"curl/")
    # A superset of nginx fd_pass: its names, in its order, then ours.
    nginx_pairs, _ = scgi.decode(
        (FIXTURES_NGINX / "get-query.bin").read_bytes(), allow_duplicates=True
    )
    ours = names(handoff.pairs)
    assert [n for n in ours if n in set(names(nginx_pairs))] == names(nginx_pairs)
    assert ours[:9] == names(nginx_pairs)[:9]
    # The receiver's answer reached curl, and the socket has TCP_NODELAY.
    assert b'"REQUEST_URI": "/fd/hello?x=1&y=two%20words"' in result.stdout
    assert handoff.nodelay == 1
    assert handoff.peer_pid == front.proc.pid
    line = front.wait_for(r'"GET /fd/hello\?x=1&y=two%20words" route=/fd handed-off')
    assert line.string.split()[1].startswith("127.0.0.1:")


def test_curl_post_body_reaches_the_receiver(
    require_tool: Callable[[str], str],
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    require_tool("curl")
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    # The request nginx fd_pass lost its body on (post-form-body-swallowed.bin).
    result = curl("--data", "name=value&other=thing1", f"{front.url}/fd/upload?q=1")
    assert result.returncode == 0, result.stderr
    handoff = receiver.next()
    assert handoff.body == b"name=value&other=thing1"
    assert handoff.headers[b"CONTENT_LENGTH"] == b"0"
    assert handoff.headers[b"HTTP_CONTENT_LENGTH"] == b"23"
    assert b'"body": "name=value&other=thing1"' in result.stdout


def test_big_body_in_the_same_segment_as_the_head(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    body = bytes(range(256)) * 20  # 5120 bytes; nginx fd_pass kept 4032 of 5000
    request = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    status, _, _ = http_exchange(front, request)
    assert status == 200
    assert receiver.next().body == body


def test_pipelined_requests_survive(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    second = b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"
    receiver = receivers(extra_bytes=len(second))
    front = fronts(f"/=unix:{receiver.path}")
    first = b"POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    status, _, _ = http_exchange(front, first + second)
    assert status == 200
    handoff = receiver.next()
    assert handoff.headers[b"REQUEST_URI"] == b"/first"
    assert handoff.body == b"hello"
    assert handoff.extra == second  # still in the socket, for the receiver


def test_head_arriving_in_pieces_keeps_what_follows(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    request = b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
    with front.connect() as sock:
        # Split inside the terminator: "\r\n\r" then "\nbody".
        cut = request.index(b"\r\n\r\n") + 3
        for piece in (request[:5], request[5:cut], request[cut:]):
            sock.sendall(piece)
            time.sleep(0.15)
        status, _, _ = parse_response(read_until_closed(sock))
    assert status == 200
    handoff = receiver.next()
    assert handoff.headers[b"REQUEST_URI"] == b"/slow"
    assert handoff.body == b"body"


def read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_repeated_headers_are_merged_and_underscores_dropped(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    request = (
        b"GET /fd/dup%2Fpath?a=%20b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n"
        b"Cookie: c1=1\r\nCookie: c2=2\r\nX_A: sneaky\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\n"
    )
    status, _, _ = http_exchange(front, request)
    assert status == 200
    handoff = receiver.next()
    pairs = handoff.pairs
    assert len(set(names(pairs))) == len(pairs)  # unique names: valid SCGI
    assert handoff.headers[b"HTTP_X_A"] == b"1, 2"
    assert handoff.headers[b"HTTP_COOKIE"] == b"c1=1; c2=2"
    assert handoff.headers[b"HTTP_UPGRADE"] == b"websocket"
    # The order of first appearance, as in nginx's duplicate-headers.bin.
    http_names = [n for n in names(pairs) if n.startswith(b"HTTP_")]
    assert http_names == [
        b"HTTP_HOST",
        b"HTTP_X_A",
        b"HTTP_COOKIE",
        b"HTTP_UPGRADE",
        b"HTTP_CONNECTION",
    ]
    front.wait_for(r"dropped header\(s\) whose name is not letters, digits and '-': X_A")


def test_receiver_written_for_nginx_works_unchanged(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(mode="nginx")
    front = fronts(f"/fd=unix:{receiver.path}")
    body = b"x" * 3000
    request = b"POST /fd/up HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + body
    status, _, reply = http_exchange(front, request)
    assert status == 200
    handoff = receiver.next()
    assert handoff.headers[b"REQUEST_URI"] == b"/fd/up"
    assert handoff.body == body
    assert b'"SCGI": "1+fd_pass"' in reply


def test_ipv6_and_unix_listeners(
    require_tool: Callable[[str], str],
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    sockdir: Path,
) -> None:
    require_tool("curl")
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    receiver = receivers()
    listen_path = sockdir / "front.sock"
    config = f"""
[[listen]]
address = "[::1]:0"
[[listen]]
address = "unix:{listen_path}"
[[route]]
prefix = "/"
backend = "unix:{receiver.path}"
"""
    front = FrontProcess(["--config", str(write(sockdir, config))])
    try:
        assert front.addresses[0].startswith("[::1]:")
        v6 = curl(f"http://{front.addresses[0]}/six")
        assert v6.returncode == 0, v6.stderr
        handoff = receiver.next()
        assert handoff.headers[b"REMOTE_ADDR"] == b"::1"
        assert handoff.headers[b"SERVER_ADDR"] == b"::1"
        local = curl("--unix-socket", str(listen_path), "http://localhost/local")
        assert local.returncode == 0, local.stderr
        handoff = receiver.next()
        assert handoff.headers[b"REMOTE_ADDR"] == b"unix:"
        assert handoff.headers[b"SERVER_ADDR"] == f"unix:{listen_path}".encode()
        assert handoff.nodelay is None  # a UNIX client socket
    finally:
        assert front.stop() == 0
    assert not listen_path.exists()  # removed on shutdown


def write(directory: Path, text: str) -> Path:
    path = directory / "front.toml"
    path.write_text(text)
    return path


# --- answers of the front's own --------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "why"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400, "malformed request head"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            400,
            "Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "Transfer-Encoding",
        ),
        (b"GET /../x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "above the root"),
        (b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n", 404, "no route for /nowhere"),
        (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "request line longer"),
        (
            b"GET /fd HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"v" * 40000 + b"\r\n\r\n",
            431,
            "request head larger than 32768",
        ),
        (
            b"GET /fd HTTP/1.1\r\nHost: a\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n",
            431,
            "more than 100 header lines",
        ),
        (b"GET /fd HTTP/2.0\r\nHost: a\r\n\r\n", 505, "only HTTP/1.1"),
        (b"GET /fd HTTP/3.0\r\nHost: a\r\n\r\n", 505, "only HTTP/1.1"),
        (b"GET /fd HTTP/0.9\r\nHost: a\r\n\r\n", 505, "only HTTP/1.1"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "HTTP/2 is not supported"),
        (b"GET  /fd HTTP/1.1\r\nHost: a\r\n\r\n", 400, "single spaces"),
        (b"\nGET /fd HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bare CR or LF"),
        (b"GET /fd HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400, "more than one Host"),
        (b"GET /fd HTTP/1.1\r\nHost: a%zz\r\n\r\n", 400, "malformed Host"),
        (b"GET /fd HTTP/1.1\r\nHost: h..x\r\n\r\n", 400, "empty label"),
        (b"GET /fd\r\n", 400, "not METHOD SP target SP HTTP/x.y"),  # HTTP/0.9: at once
        (b"GET /fd HTTP/1.1\r\nHost: a\r\nX: 1\r\n  folded\r\n\r\n", 400, "malformed"),
        (b"GET /fd HTTP/1.1\r\nHost: a\r\nX : 1\r\n\r\n", 400, "malformed"),
        (
            b"POST /fd HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
            400,
            "Content-Length",
        ),
        (
            b"POST /fd HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            "transfer coding b'gzip' is not implemented",
        ),
        (
            b"POST /fd HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "HTTP/1.0",
        ),
        (b"BREW /fd HTTP/1.1\r\nHost: a\r\n\r\n", 501, "not implemented"),
        (b"GET /fd HTTP/1.1\nHost: a\n\n", 400, "bare LF"),
        # Heads that can never become valid: 400 at once, not 408 after
        # timeouts.head (RFC 9112 §2.2 and §3), as nginx answers.
        (b"GET /fd HTTP/1.1\r\nHost: a\r\n\r\r\n", 400, "CR not followed by LF"),
        (b"GET /fd HTTP/1.1\r\nHost: a\r\n\r\rabc", 400, "CR not followed by LF"),
        (CLIENT_HELLO, 400, "TLS sent to a plain HTTP port: use http://"),
        (b"\x00\x01\x02", 400, "method is not a token"),
        (
            b"POST /fd HTTP/1.1\r\nHost: a\r\nContent-Length: 1" + b"0" * 18 + b"\r\n\r\n",
            400,
            "more than 18 digits",
        ),
    ],
)
def test_error_answers(
    no_fd_leak: None,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    request_bytes: bytes,
    status: int,
    why: str,
) -> None:
    receiver = receivers()
    front = fronts(f"/fd=unix:{receiver.path}")
    baseline = front.fd_count()
    got, headers, body = http_exchange(front, request_bytes)
    assert got == status
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert headers["date"].endswith(" GMT")  # RFC 9110 §6.6.1
    assert why in body.decode()
    front.wait_for(rf' {status} ".*{why}')
    assert receiver.handoffs.empty()
    assert front.settled_fd_count(baseline) == baseline


def test_head_timeout_answers_408(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}", config="[timeouts]\nhead = 0.5\n")
    baseline = front.fd_count()
    with front.connect() as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n")  # never finished
        status, _headers, body = parse_response(read_until_closed(sock))
    assert status == 408
    assert b"not complete within 0.5 s" in body
    front.wait_for(r'"GET /slow" route=- 408 "request head not complete')
    assert front.settled_fd_count(baseline) == baseline


def test_client_closing_inside_the_head(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    baseline = front.fd_count()
    with front.connect() as sock:
        sock.sendall(b"GET /gone HTTP/1.1\r\nHo")
        time.sleep(0.2)
    front.wait_for(r'"GET /gone" route=- closed "client closed inside the request head"')
    with front.connect():
        pass  # connected and closed without a byte: nothing to log, nothing left open
    assert front.settled_fd_count(baseline) == baseline


def test_backend_missing_answers_503(
    no_fd_leak: None, fronts: Callable[..., FrontProcess], sockdir: Path
) -> None:
    front = fronts(f"/=unix:{sockdir / 'absent.sock'}")
    baseline = front.fd_count()
    status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 503
    front.hid_detail(body, "socket file missing")
    front.wait_for(r"503 backend .*absent.sock: socket file missing")
    assert front.settled_fd_count(baseline) == baseline


def test_backend_refusing_answers_503(
    no_fd_leak: None, fronts: Callable[..., FrontProcess], sockdir: Path
) -> None:
    path = sockdir / "dead.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # bound, never listening: connect() is refused
    try:
        front = fronts(f"/=unix:{path}")
        baseline = front.fd_count()
        status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert status == 503
        front.hid_detail(body, "nobody listening")
        assert front.settled_fd_count(baseline) == baseline
    finally:
        dead.close()


def test_backend_backlog_full_answers_503_at_once(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(mode="backlog")
    front = fronts(f"/=unix:{receiver.path}", config="[timeouts]\nhandoff = 2.0\n")
    baseline = front.fd_count()
    clients = []
    for _ in range(4):  # listen(1) queues two connections; the rest find it full
        sock = front.connect()
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        clients.append(sock)
    started = time.monotonic()
    answers = [parse_response(read_until_closed(sock)) for sock in clients[::-1]]
    for sock in clients:
        sock.close()
    bodies = [body for _, _, body in answers]
    assert all(status == 503 for status, _, _ in answers)
    assert all(body == b"Service Unavailable\n" for body in bodies)
    front.wait_for("backlog full")
    # The ones that did get in the queue were never taken: 503 after the timeout.
    front.wait_for("did not take the connection within 2 s")
    assert time.monotonic() - started >= 1.0
    assert front.settled_fd_count(baseline) == baseline


def test_backend_not_reading_answers_503_after_the_handoff_timeout(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(mode="hold")
    front = fronts(f"/=unix:{receiver.path}", config="[timeouts]\nhandoff = 0.5\n")
    baseline = front.fd_count()
    status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 503
    front.hid_detail(body, "did not take the connection within 0.5 s")
    front.wait_for(r"503 receiver did not take the connection")
    assert front.settled_fd_count(baseline) == baseline


def test_backend_closing_without_reading_answers_503(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(mode="close")
    front = fronts(f"/=unix:{receiver.path}")
    baseline = front.fd_count()
    status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 503
    front.hid_detail(body, "receiver closed without taking the connection")
    assert front.settled_fd_count(baseline) == baseline


def test_receiver_keeping_its_end_open_still_counts_as_taken(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(mode="keep-open")
    front = fronts(f"/=unix:{receiver.path}")  # the default 1 s handoff timeout
    baseline = front.fd_count()
    status, _, body = http_exchange(front, b"GET /kept HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200  # the receiver answered; no 503 crossed it
    assert b'"REQUEST_URI": "/kept"' in body
    front.wait_for(r'"GET /kept" route=/ handed-off')
    assert front.settled_fd_count(baseline) == baseline


def test_no_fd_left_after_many_handoffs(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    baseline = front.fd_count()
    for index in range(50):
        status, _, _ = http_exchange(front, b"GET /n%d HTTP/1.1\r\nHost: a\r\n\r\n" % index)
        assert status == 200
    assert front.settled_fd_count(baseline) == baseline


def slow_answer(receiver: TestReceiver, handoff: Handoff, client: socket.socket) -> None:
    time.sleep(0.2)
    respond(client, {"uri": handoff.headers[b"REQUEST_URI"].decode()})


def test_sigterm_finishes_in_flight_requests_and_exits_0(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers(behaviour=slow_answer)
    front = fronts(f"/=unix:{receiver.path}")
    with front.connect() as sock:
        sock.sendall(b"GET /late HTTP/1.1\r\nHost: a\r\n")  # head not finished yet
        time.sleep(0.3)
        front.proc.send_signal(15)
        front.wait_for("shutting down")
        with pytest.raises(OSError):  # no new connections
            socket.create_connection(front.host_port, timeout=2).close()
        sock.sendall(b"\r\n")
        status, _, body = parse_response(read_until_closed(sock))
    assert status == 200
    assert b'"/late"' in body
    assert front.proc.wait(timeout=30) == 0
    front.wait_for("stopped")


def test_accept_survives_running_out_of_fds(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    import resource  # noqa: PLC0415

    def low_limit() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (40, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}", preexec=low_limit)
    hogs = []
    try:
        for _ in range(60):  # more connections than fds: each waits with half a head
            sock = front.connect()
            sock.sendall(b"GET /hog HTTP/1.1\r\n")
            hogs.append(sock)
        front.wait_for(r"accept on 127\.0\.0\.1:\d+: Too many open files; pausing accepts")
        time.sleep(1.0)  # ten pauses of 100 ms: still one line, not ten
        assert sum("Too many open files" in line for line in front.lines) == 1
    finally:
        for sock in hogs:
            sock.close()
    # Fds come back as the hogs go away; the front serves again.
    deadline = time.monotonic() + 20
    while True:
        status, _, _ = http_exchange(front, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200
    front.wait_for(r"accepting again after [\d.]+ s short of fds \(\d+ pauses\)")
    assert front.proc.poll() is None


def test_wildcard_listener_reports_the_address_connected_to(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}", listen="0.0.0.0:0")
    _, port = front.host_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /any HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, _ = parse_response(read_until_closed(sock))
    assert status == 200
    handoff = receiver.next()
    assert handoff.headers[b"SERVER_ADDR"] == b"127.0.0.1"
    assert handoff.headers[b"SERVER_PORT"] == str(port).encode()


# --- conformance probes ------------------------------------------------------------------


@pytest.mark.parametrize("blank", [b"\r\n", b"\r\n\r\n", b"\r\n\r\n\r\n"])
@pytest.mark.parametrize("pieces", [False, True])
def test_empty_lines_before_the_request_line_are_ignored(
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    blank: bytes,
    pieces: bool,
) -> None:
    # RFC 9112 §2.2.  CRLF CRLF first used to be taken for an empty head (400).
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    request = blank + b"POST /blank HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
    with front.connect() as sock:
        if pieces:
            for index in range(0, len(request), 3):
                sock.sendall(request[index : index + 3])
                time.sleep(0.01)
        else:
            sock.sendall(request)
        status, _, _ = parse_response(read_until_closed(sock))
    assert status == 200
    handoff = receiver.next()
    assert handoff.headers[b"REQUEST_URI"] == b"/blank"
    assert handoff.body == b"hi"


def test_http_1_0_is_handed_off_with_its_version(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    # RFC 9110 §6.2 / §15.6.6: 1.0 is a minor version of the major version we
    # implement, not a 505; the receiver learns it and answers in kind.
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    status, _, _ = http_exchange(front, b"GET /old HTTP/1.0\r\n\r\n")
    assert status == 200
    headers = receiver.next().headers
    assert headers[b"SERVER_PROTOCOL"] == b"HTTP/1.0"
    assert headers[b"REQUEST_URI"] == b"/old"
    assert b"HTTP_HOST" not in headers  # Host is optional in 1.0
    status, _, _ = http_exchange(front, b"GET /new HTTP/1.2\r\nHost: a\r\n\r\n")
    assert status == 200
    assert receiver.next().headers[b"SERVER_PROTOCOL"] == b"HTTP/1.1"


def test_values_lose_their_trailing_whitespace_and_ip_literals_their_nothing(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    status, _, _ = http_exchange(front, b"GET /ows HTTP/1.1\r\nHost: a \r\nX-A: b\r\n\r\n")
    assert status == 200
    headers = receiver.next().headers
    assert (headers[b"HTTP_HOST"], headers[b"HTTP_X_A"], headers[b"SERVER_NAME"]) == (
        b"a",
        b"b",
        b"a",
    )
    status, _, _ = http_exchange(front, b"GET http://[::1]:8/v6 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200
    headers = receiver.next().headers
    assert headers[b"HTTP_HOST"] == b"[::1]:8"
    assert headers[b"SERVER_NAME"] == b"[::1]"


def test_an_answer_to_head_has_no_body(
    no_fd_leak: None, receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = fronts(f"/fd=unix:{receiver.path}")
    baseline = front.fd_count()
    status, headers, body = http_exchange(front, b"HEAD /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 404
    assert body == b""  # RFC 9110 §9.3.2, RFC 9112 §6.3
    assert int(headers["content-length"]) > 0  # what a GET would get
    assert front.settled_fd_count(baseline) == baseline


def test_expect_100_continue_is_left_to_the_receiver(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    # The receiver reads the body, so it decides whether to send 100 Continue
    # (RFC 9110 §10.1.1); the front sends nothing before handing off.
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    request = b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    with front.connect() as sock:
        sock.sendall(request)
        assert read_available(sock, 0.3) == b""
        sock.sendall(b"ok")
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ")  # no 100 from the front in front of it
    handoff = receiver.next()
    assert handoff.headers[b"HTTP_EXPECT"] == b"100-continue"
    assert handoff.body == b"ok"


def test_options_asterisk_goes_where_the_root_goes(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    """RFC 9110 section 9.3.7: "OPTIONS *" is about the server, not a path;
    the route for "/" serves it (it used to be a 404), the target stays "*"."""
    receiver = receivers()
    front = fronts(f"/=unix:{receiver.path}")
    status, _, _ = http_exchange(front, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200
    handoff = receiver.next()
    assert handoff.headers[b"REQUEST_METHOD"] == b"OPTIONS"
    assert handoff.headers[b"REQUEST_URI"] == b"*"
    front.wait_for(r'"OPTIONS \*" route=/ handed-off')
    # With no route for "/", still no route.
    other = fronts(f"/fd=unix:{receiver.path}")
    status, _, body = http_exchange(other, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, body) == (404, b"no route for *\n")


def test_a_head_whose_description_receivers_would_refuse_is_431(
    receivers: Callable[..., TestReceiver], fronts: Callable[..., FrontProcess]
) -> None:
    """Under a raised max_head_size a head can be valid for the front yet make an
    SCGI block over the receivers' limit (the target is written twice): the
    front answers 431 itself rather than hand off what the receiver refuses."""
    receiver = receivers()
    config = "[limits]\nmax_head_size = 1048576\nmax_uri_length = 1048576\n"
    front = fronts(f"/=unix:{receiver.path}", config=config)
    query = b"q=" + b"x" * 200_000
    status, _, body = http_exchange(front, b"GET /big?%s HTTP/1.1\r\nHost: a\r\n\r\n" % query)
    assert status == 431, body
    status, _, _ = http_exchange(front, b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200
