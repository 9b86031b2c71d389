"""Auth mode: the application decides (X-Socket-Handoff), the front checks and hands off.

The application is a real HTTP/1.1 server in a thread; the daemons are test
receivers in Apache's SEQPACKET format and in SCGI.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fdhandoff import fdpass
from handoff_receiver import (
    FrontProcess,
    Handoff,
    TestReceiver,
    fronts_fixture,  # noqa: F401  (fixture)
    http_exchange,
    parse_response,
    read_exactly,
    read_to_close,
    receivers_fixture,  # noqa: F401  (fixture)
    respond,
    sockdir_fixture,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.timeout(120)


class App(BaseHTTPRequestHandler):
    """The application: what it answers depends on the path."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, object]]  # set on the subclass per test
    daemon_path = ""
    big_payload = b""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.handle_request()

    def do_POST(self) -> None:
        self.handle_request()

    def handle_request(self) -> None:
        body = self._body()
        self.seen.append(
            {"path": self.path, "headers": dict(self.headers.items()), "body": body.decode()}
        )
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        if name == "handoff":
            self._answer(
                200,
                {"X-Socket-Handoff": self.daemon_path, "X-Handoff-Data": '{"user_id":12345}'},
                b"dropped: the daemon answers",
            )
        elif name == "nodata":
            self._answer(200, {"X-Socket-Handoff": self.daemon_path}, b"")
        elif name == "bigdata":
            self._answer(
                200,
                {"X-Socket-Handoff": self.daemon_path, "X-Handoff-Data": self.big_payload.decode()},
                b"",
            )
        elif name.startswith("path="):
            self._answer(200, {"X-Socket-Handoff": name[5:].replace("%2F", "/")}, b"")
        elif name == "slow":
            time.sleep(1.5)
            self._answer(200, {}, b"late")
        elif name == "hopbyhop":
            # RFC 9110 section 7.6.1: X-Hop is hop-by-hop, named by Connection,
            # and so are these, named or not.
            hop = {"Proxy-Connection": "keep-alive", "TE": "trailers", "Upgrade": "h2c"}
            self._answer(200, {"Connection": "X-Hop", "X-Hop": "1", "X-End": "2", **hop}, b"ok")
        elif name == "earlyhints":
            self.send_response_only(103)
            self.send_header("Link", "</style.css>; rel=preload")
            self.send_header("X-Handoff-Data", "must-not-leak")
            self.end_headers()
            self._answer(200, {}, b"ok")
        elif name == "switching":
            self.send_response_only(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
        elif name == "gzipped":
            body = gzip.compress(b"hello")
            self.send_response(200)
            self.send_header("Transfer-Encoding", "gzip, chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        elif name == "nocontent":
            self._answer(204, {}, b"")  # with a Content-Length: 0 a 204 must not have
        elif name == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Handoff-Data", "secret")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        else:
            self._answer(
                201, {"X-Handoff-Data": "must-not-leak", "X-App": "yes"}, b"from the app: " + body
            )


@pytest.fixture
def app(sockdir: Path) -> Iterator[type[App]]:
    handler = type("TestApp", (App,), {"seen": [], "daemon_path": str(sockdir / "daemon.sock")})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # server_close() waits for the handler threads, so none outlives the test
    # holding a socket (the slow handler sleeps past the front's timeout).
    server.daemon_threads = False
    server.block_on_close = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.port = server.server_address[1]  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


def payload_echo(receiver: TestReceiver, handoff: Handoff, client: socket.socket) -> None:
    if receiver.extra_bytes:
        handoff.extra = read_exactly(client, receiver.extra_bytes)
    respond(
        client,
        {
            "payload": handoff.record.payload.decode(),
            "headers": {k.decode(): v.decode() for k, v in handoff.headers.items()},
            "extra": handoff.extra.decode(),
        },
    )


def auth_config(app: type[App], sockdir: Path, **route: str) -> str:
    lines = [
        "[[route]]",
        'prefix = "/app"',
        'mode = "auth"',
        f'upstream = "http://127.0.0.1:{app.port}"',  # type: ignore[attr-defined]
        f'allowed_prefix = "{sockdir}"',
    ]
    lines += [f'{key} = "{value}"' for key, value in route.items()]
    return "\n".join(lines) + "\n"


def warm_fd_count(front: FrontProcess, path: bytes = b"/app/warmup") -> int:
    """The front's fd count after one auth request: the event loop opens one fd
    of its own (libuv's reserve, on /dev/null) the first time it connects out."""
    http_exchange(front, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
    time.sleep(0.2)
    return front.fd_count()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    path = shutil.which("curl")
    assert path is not None
    return subprocess.run(
        [path, "-sS", "-i", "--max-time", "20", *args],
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_apache_format_handoff_reaches_an_unchanged_daemon(
    require_tool: Callable[[str], str],
    app: type[App],
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    require_tool("curl")
    daemon = receivers("daemon.sock", sock_type=socket.SOCK_SEQPACKET, behaviour=payload_echo)
    front = fronts(config=auth_config(app, sockdir))
    baseline = warm_fd_count(front)
    result = curl("-H", "X-Socket-Handoff: /etc/passwd", f"{front.url}/app/handoff?prompt=hi")
    assert result.returncode == 0, result.stderr
    assert b'"payload": "{\\"user_id\\":12345}"' in result.stdout
    assert b"dropped" not in result.stdout  # the application's response never left
    assert b"X-Socket-Handoff" not in result.stdout
    handoff = daemon.next()
    assert handoff.record.payload == b'{"user_id":12345}'
    seen = app.seen[-1]
    assert seen["path"] == "/app/handoff?prompt=hi"
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert "X-Socket-Handoff" not in headers  # what the client sent never went upstream
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["Connection"] == "close"
    front.wait_for(r'"GET /app/handoff\?prompt=hi" route=/app handed-off')
    assert front.settled_fd_count(baseline) == baseline


def test_absent_payload_is_apaches_single_nul(
    app: type[App],
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    daemon = receivers("daemon.sock", sock_type=socket.SOCK_SEQPACKET, behaviour=payload_echo)
    front = fronts(config=auth_config(app, sockdir))
    status, _, _ = http_exchange(front, b"GET /app/nodata HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200
    assert daemon.next().record.payload == b""  # b"\x00" on the wire, decoded as "none"


def test_scgi_format_handoff_with_body_and_pipelined_request(
    app: type[App],
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    pipelined = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    daemon = receivers("daemon.sock", behaviour=payload_echo, extra_bytes=len(pipelined))
    front = fronts(config=auth_config(app, sockdir, handoff_format="scgi"))
    request = (
        b"POST /app/handoff HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
        + pipelined
    )
    status, _, body = http_exchange(front, request)
    assert status == 200
    handoff = daemon.next()
    assert handoff.headers[b"HANDOFF_DATA"] == b'{"user_id":12345}'
    assert handoff.headers[b"REQUEST_URI"] == b"/app/handoff"
    assert handoff.headers[b"CONTENT_LENGTH"] == b"0"
    assert handoff.extra == pipelined  # the body went upstream; what follows stayed
    # The body is gone, so nothing describes it: a receiver written for nginx
    # would otherwise wait for 11 bytes, or take the next request as the body.
    assert b"HTTP_CONTENT_LENGTH" not in handoff.headers
    assert b"HTTP_TRANSFER_ENCODING" not in handoff.headers
    assert app.seen[-1]["body"] == "hello world"
    assert json.loads(body)["extra"] == pipelined.decode()


def test_response_relayed_without_the_handoff_headers(
    require_tool: Callable[[str], str],
    app: type[App],
    sockdir: Path,
    fronts: Callable[..., FrontProcess],
) -> None:
    require_tool("curl")
    front = fronts(config=auth_config(app, sockdir))
    baseline = warm_fd_count(front)
    result = curl("--data-binary", "posted", f"{front.url}/app/plain")
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 Created")
    assert b"X-App: yes" in head
    assert b"must-not-leak" not in head
    assert b"Connection: close" in head
    assert body == b"from the app: posted"
    front.wait_for(r'"POST /app/plain" route=/app relayed 201')
    # A chunked response is relayed verbatim, minus X-Handoff-Data.
    chunked = curl("--raw", f"{front.url}/app/chunked")
    head, _, body = chunked.stdout.partition(b"\r\n\r\n")
    assert b"secret" not in head
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert front.settled_fd_count(baseline) == baseline


def test_chunked_request_body_and_expect_continue(
    require_tool: Callable[[str], str],
    app: type[App],
    sockdir: Path,
    fronts: Callable[..., FrontProcess],
) -> None:
    require_tool("curl")
    front = fronts(config=auth_config(app, sockdir))
    result = curl(
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "x" * 5000,
        f"{front.url}/app/plain",
    )
    assert result.returncode == 0, result.stderr
    assert b"100 Continue" in result.stdout
    assert result.stdout.endswith(b"from the app: " + b"x" * 5000)
    headers = app.seen[-1]["headers"]
    assert isinstance(headers, dict)
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Expect" not in headers


def make_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(path))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    "case", ["symlink", "outside", "dotdot", "not-a-socket", "relative", "loop", "too-long"]
)
def test_handoff_path_checks_answer_403(
    no_fd_leak: None,
    app: type[App],
    sockdir: Path,
    fronts: Callable[..., FrontProcess],
    case: str,
) -> None:
    allowed = sockdir / "allowed"
    outside = sockdir / "outside"
    allowed.mkdir()
    outside.mkdir()
    secret = make_socket(outside / "secret.sock")
    try:
        if case == "symlink":  # the hole in mod_socket_handoff: a link inside, a socket outside
            (allowed / "link.sock").symlink_to(outside / "secret.sock")
            target = str(allowed / "link.sock")
            why = "resolves to"
        elif case == "outside":
            target, why = str(outside / "secret.sock"), "outside allowed_prefix"
        elif case == "dotdot":
            target, why = f"{allowed}/../outside/secret.sock", "outside allowed_prefix"
        elif case == "not-a-socket":
            (allowed / "file").write_text("x")
            target, why = str(allowed / "file"), "is not a socket"
        elif case == "loop":  # never a socket: the application's error, not a 503
            (allowed / "loop").symlink_to(allowed / "loop")
            target, why = str(allowed / "loop"), "symbolic links"
        elif case == "too-long":
            target, why = f"{allowed}/{'x' * 300}.sock", "too long"
        else:
            target, why = "relative.sock", "is not an absolute path"
        config = auth_config(app, sockdir).replace(f'"{sockdir}"', f'"{allowed}"')
        front = fronts(config=config)
        baseline = warm_fd_count(front)
        encoded = target.replace("/", "%2F").encode()
        status, _, body = http_exchange(
            front, b"GET /app/path=%s HTTP/1.1\r\nHost: a\r\n\r\n" % encoded
        )
        assert status == 403
        front.hid_detail(body, why)
        front.wait_for(rf'403 ".*{why}')
        assert front.settled_fd_count(baseline) == baseline
    finally:
        secret.close()


def test_upstream_down_is_502(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on it now
    config = (
        f'[[route]]\nprefix = "/app"\nmode = "auth"\nupstream = "http://127.0.0.1:{port}"\n'
        f'allowed_prefix = "{sockdir}"\n'
    )
    front = fronts(config=config)
    baseline = warm_fd_count(front)
    status, _, body = http_exchange(front, b"GET /app/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 502
    assert body == b"Bad Gateway\n"  # the upstream's address is for the log only
    front.wait_for(r"502 upstream http://127\.0\.0\.1:\d+")
    assert front.settled_fd_count(baseline) == baseline


def test_upstream_timeout_is_504(
    no_fd_leak: None, app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    front = fronts(config=auth_config(app, sockdir) + "[timeouts]\nupstream = 0.5\n")
    baseline = warm_fd_count(front)
    status, _, body = http_exchange(front, b"GET /app/slow HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 504
    front.hid_detail(body, "no response within 0.5 s")
    assert front.settled_fd_count(baseline) == baseline


def _one_shot_app(listener: socket.socket, daemon: Path) -> threading.Thread:
    """An application on a UNIX socket that names ``daemon`` for one request."""

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nX-Socket-Handoff: %s\r\nX-Handoff-Data: hi\r\n"
                b"Content-Length: 0\r\n\r\n" % str(daemon).encode()
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_unix_upstream_and_missing_daemon(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    # An application on a UNIX socket that names a daemon which is not there: 503.
    app_path = sockdir / "app.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(app_path))
    listener.listen()
    missing = sockdir / "gone.sock"
    thread = _one_shot_app(listener, missing)
    try:
        config = _unix_app_config(app_path, sockdir)
        front = fronts(config=config)
        status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert status == 503
        front.hid_detail(body, "gone.sock")
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("handoff_format", ["apache", "scgi"])
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # Apache's limit (212960 bytes), as documented, with no [limits] at
        # all: the response head carrying it must fit max_response_head_size.
        (b"p" * 212960, b"p" * 212960),
        # RFC 9110 §5.5: a field value excludes leading and trailing
        # whitespace; whitespace inside it is kept.
        (b" \t a b \t ", b"a b"),
    ],
    ids=["largest", "whitespace"],
)
def test_payload_reaches_the_daemon_as_apache_passes_it(
    no_fd_leak: None,
    app: type[App],
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    handoff_format: str,
    payload: bytes,
    expected: bytes,
) -> None:
    apache = handoff_format == "apache"
    sock_type = socket.SOCK_SEQPACKET if apache else socket.SOCK_STREAM
    daemon = receivers("daemon.sock", sock_type=sock_type, behaviour=payload_echo)
    app.big_payload = payload
    front = fronts(config=auth_config(app, sockdir, handoff_format=handoff_format))
    status, _, body = http_exchange(front, b"GET /app/bigdata HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200, body
    handoff = daemon.next()
    assert (handoff.record.payload if apache else handoff.headers[b"HANDOFF_DATA"]) == expected


@pytest.mark.parametrize("size", [212961, 213000])
def test_oversize_payload_is_500(
    no_fd_leak: None,
    app: type[App],
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    size: int,
) -> None:
    receivers("daemon.sock", sock_type=socket.SOCK_SEQPACKET, behaviour=payload_echo)
    app.big_payload = b"p" * size  # Apache's limit is 212960
    front = fronts(config=auth_config(app, sockdir))  # the default limits
    baseline = warm_fd_count(front)
    status, _, body = http_exchange(front, b"GET /app/bigdata HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 500
    front.hid_detail(body, "larger than 212960")
    assert front.settled_fd_count(baseline) == baseline


def test_request_body_over_the_limit_is_413(
    no_fd_leak: None, app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    front = fronts(config=auth_config(app, sockdir) + "[limits]\nmax_body_size = 10\n")
    status, _, _ = http_exchange(
        front, b"POST /app/x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
    )
    assert status == 413
    assert app.seen == []


def test_daemon_restarting_is_tried_again_before_503(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    # A daemon whose socket exists but does not listen yet (a restart): as
    # mod_socket_handoff, the front tries again after 10 and 20 ms.
    app_path, daemon_path = sockdir / "app.sock", sockdir / "daemon.sock"
    with (
        socket.socket(socket.AF_UNIX) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as daemon,
    ):
        listener.bind(str(app_path))
        listener.listen()
        daemon.bind(str(daemon_path))  # ECONNREFUSED until listen()
        app = _one_shot_app(listener, daemon_path)
        config = _unix_app_config(app_path, sockdir)
        front = fronts(config=config)
        with front.connect() as client:
            client.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            app.join(timeout=10)
            time.sleep(0.005)  # the front's first connect is refused by now
            daemon.listen()
            daemon.settimeout(10)
            conn, _ = daemon.accept()
            with conn:
                payload, handed = fdpass.recv_fd(conn, timeout=10)
            assert payload == b"hi" and handed is not None
            with handed:
                handed.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            client.settimeout(10)
            data = read_to_close(client)
            status, _, _ = parse_response(data)
        assert status == 204


def test_daemon_missing_after_retries_is_503(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    app_path = sockdir / "app.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(app_path))
        listener.listen()
        app = _one_shot_app(listener, sockdir / "never.sock")
        config = _unix_app_config(app_path, sockdir)
        front = fronts(config=config)
        started = time.monotonic()
        status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        elapsed = time.monotonic() - started
        app.join(timeout=10)
    assert status == 503
    assert elapsed >= 0.03  # 10 + 20 ms of retries first
    front.hid_detail(body, "never.sock")


def test_http_1_0_client_gets_no_chunked_body_and_no_100(
    app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    front = fronts(config=auth_config(app, sockdir))
    # RFC 9112 §6.1: a chunked body must not go to an HTTP/1.0 client; the
    # relay closes after the response, so the decoded body ends with the close.
    status, headers, body = http_exchange(front, b"GET /app/chunked HTTP/1.0\r\n\r\n")
    assert status == 200
    assert "transfer-encoding" not in headers
    assert headers["connection"] == "close"
    assert body == b"hello world"
    # RFC 9110 §10.1.1: 100-continue in an HTTP/1.0 request is ignored.
    request = b"POST /app/plain HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
    status, _, body = http_exchange(front, request)
    assert status == 201
    assert body == b"from the app: hi"


@pytest.mark.parametrize(
    "expect", [b"Expect: 100-continue, foo\r\n", b"Expect: foo\r\nExpect: 100-Continue\r\n"]
)
def test_100_continue_among_other_expectations_is_answered(
    app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess], expect: bytes
) -> None:
    """Expect is a list (RFC 9110 section 10.1.1), over one line or several:
    the front sends 100 before it waits for the body it forwards."""
    front = fronts(config=auth_config(app, sockdir))
    with front.connect() as sock:
        sock.sendall(
            b"POST /app/plain HTTP/1.1\r\nHost: a\r\n" + expect + b"Content-Length: 2\r\n\r\n"
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hi")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 201") and data.endswith(b"from the app: hi")


def test_relayed_response_loses_hop_by_hop_fields_and_a_204_its_length(
    app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    front = fronts(config=auth_config(app, sockdir))
    status, headers, body = http_exchange(front, b"GET /app/hopbyhop HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, body) == (200, b"ok")
    assert "x-hop" not in headers  # named by the application's Connection: hop-by-hop
    assert not {"proxy-connection", "te", "upgrade"} & set(headers)
    assert headers["x-end"] == "2"
    assert headers["connection"] == "close"
    assert headers["content-length"] == "2"
    status, headers, body = http_exchange(front, b"GET /app/nocontent HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, body) == (204, b"")
    assert "content-length" not in headers  # RFC 9110 section 8.6
    assert "transfer-encoding" not in headers


def test_interim_answers_reach_1_1_clients_only(
    app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """RFC 9110 section 15.2: a proxy forwards the 1xx it did not ask for, never
    to an HTTP/1.0 client; the handoff fields are dropped from it too."""
    front = fronts(config=auth_config(app, sockdir))
    status, headers, rest = http_exchange(front, b"GET /app/earlyhints HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 103
    assert headers["link"] == "</style.css>; rel=preload"
    assert "x-handoff-data" not in headers
    assert parse_response(rest)[0::2] == (200, b"ok")
    status, _, body = http_exchange(front, b"GET /app/earlyhints HTTP/1.0\r\n\r\n")
    assert (status, body) == (200, b"ok")


def test_transfer_coding_other_than_chunked_reaches_only_1_1_clients(
    app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """RFC 9112 section 6.1: an HTTP/1.0 client gets no Transfer-Encoding; chunked
    is undone for it, gzip cannot be without changing the content."""
    front = fronts(config=auth_config(app, sockdir))
    status, headers, body = http_exchange(front, b"GET /app/gzipped HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, headers["transfer-encoding"]) == (200, "gzip, chunked")
    size, _, rest = body.partition(b"\r\n")
    assert gzip.decompress(rest[: int(size, 16)]) == b"hello"
    status, _, body = http_exchange(front, b"GET /app/gzipped HTTP/1.0\r\n\r\n")
    assert (status, body) == (502, b"Bad Gateway\n")
    front.wait_for("transfer coding 'gzip' for an HTTP/1.0 client")


def test_upstream_switching_protocols_unasked_is_502(
    app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    front = fronts(config=auth_config(app, sockdir))
    status, _, _ = http_exchange(
        front,
        b"GET /app/switching HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
    )
    assert status == 502
    front.wait_for("101 Switching Protocols to a request without Upgrade")


@pytest.mark.parametrize(
    "body",
    [
        b"5;a\x00\r\nhello\r\n0\r\n\r\n",  # NUL in a chunk extension
        b"5 \r\nhello\r\n0\r\n\r\n",  # whitespace after the size, no extension
        b"5\r\nhello\r\n0\r\nX: 1\r\n folded\r\n\r\n",  # obs-fold in the trailers
    ],
)
def test_malformed_chunked_request_body_is_400(
    no_fd_leak: None,
    app: type[App],
    sockdir: Path,
    fronts: Callable[..., FrontProcess],
    body: bytes,
) -> None:
    """The front refuses what the receiver refuses (RFC 9112 section 7.1): the
    two never disagree on where a chunked body ends."""
    front = fronts(config=auth_config(app, sockdir))
    baseline = warm_fd_count(front)
    request = b"POST /app/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    status, headers, text = http_exchange(front, request)
    assert status == 400
    assert headers["connection"] == "close"
    assert b"malformed chunked body" in text
    front.wait_for(r'"POST /app/x" route=/app 400 "malformed chunked body')
    assert not [seen for seen in app.seen if seen["path"] == "/app/x"]  # no request completed
    assert front.settled_fd_count(baseline) == baseline


def test_client_connection_option_cannot_strip_framing_or_host(
    no_fd_leak: None, app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """Connection naming Content-Length must not unframe the forwarded body:
    the application would read the body as a second, smuggled request."""
    front = fronts(config=auth_config(app, sockdir))
    baseline = warm_fd_count(front)
    smuggled = b"GET /app/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    request = (
        b"POST /app/plain HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, Host, X-Hop\r\n"
        b"X-Hop: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
    )
    status, _, body = http_exchange(front, request)
    assert (status, body) == (201, b"from the app: " + smuggled)
    seen = app.seen[-1]
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["Content-Length"] == str(len(smuggled))
    assert headers["Host"] == "a"
    assert "X-Hop" not in headers  # the fields a client may name are still dropped
    assert [s["path"] for s in app.seen if s["path"] == "/app/smuggled"] == []
    assert front.settled_fd_count(baseline) == baseline


def test_header_names_a_cgi_server_would_confuse_are_not_forwarded(
    no_fd_leak: None, app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """The rule of pass mode (and nginx's proxy defaults): names with anything
    but letters, digits and "-" stay behind.  An application behind a
    CGI-style server would read X_Forwarded_Proto as HTTP_X_FORWARDED_PROTO,
    beside the X-Forwarded-Proto the front sets."""
    front = fronts(config=auth_config(app, sockdir))
    status, _, _ = http_exchange(
        front,
        b"GET /app/plain HTTP/1.1\r\nHost: a\r\nX_Forwarded_Proto: https\r\n"
        b"X.Forwarded.For: 203.0.113.9\r\nX-Kept: 1\r\n\r\n",
    )
    assert status == 201
    headers = app.seen[-1]["headers"]
    assert isinstance(headers, dict)
    assert (headers["X-Forwarded-Proto"], headers["X-Kept"]) == ("http", "1")
    assert "X_Forwarded_Proto" not in headers
    assert "X.Forwarded.For" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    front.wait_for(
        "dropped header\\(s\\) whose name is not letters, digits and '-': "
        "X_Forwarded_Proto, X.Forwarded.For"
    )


def _auth_route(upstream: str, sockdir: Path, extra: str = "") -> str:
    """An auth route for everything, to the application at ``upstream``."""
    return (
        f'[[route]]\nprefix = "/"\nmode = "auth"\nupstream = "{upstream}"\n'
        f'allowed_prefix = "{sockdir}"\n{extra}'
    )


def _unix_app_config(app_path: Path, sockdir: Path, extra: str = "") -> str:
    """An auth route for everything, to the application at ``app_path``."""
    return _auth_route(f"unix:{app_path}", sockdir, extra)


@contextlib.contextmanager
def _app_listener(
    transport: str, sockdir: Path, extra: str = ""
) -> Iterator[tuple[socket.socket, str]]:
    """A listening socket for an application, UNIX or TCP, and the config of
    an auth route for everything to it."""
    with socket.socket(socket.AF_UNIX if transport == "unix" else socket.AF_INET) as listener:
        if transport == "unix":
            listener.bind(str(sockdir / "app.sock"))
            upstream = f"unix:{sockdir / 'app.sock'}"
        else:
            listener.bind(("127.0.0.1", 0))
            upstream = f"http://127.0.0.1:{listener.getsockname()[1]}"
        listener.listen(64)
        yield listener, _auth_route(upstream, sockdir, extra)


def _raw_app(
    listener: socket.socket,
    answer: Callable[[socket.socket], None],
    received: list[bytes] | None = None,
) -> threading.Thread:
    """An application on a UNIX socket that reads one request head and runs
    ``answer``; what it read with the head goes to ``received``."""

    def serve() -> None:
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
            if received is not None:
                received.append(data)
            with contextlib.suppress(OSError):
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_interim_answers_do_not_extend_the_response_head_timeout(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """timeouts.upstream bounds the wait for the final head: an application
    sending one 100 Continue after another cannot hold the client forever."""

    def endless_interim(conn: socket.socket) -> None:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.2)

    with _app_listener("unix", sockdir, "[timeouts]\nupstream = 1\n") as (listener, config):
        app = _raw_app(listener, endless_interim)
        front = fronts(config=config)
        baseline = front.fd_count()
        started = time.monotonic()
        status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        elapsed = time.monotonic() - started
        app.join(timeout=10)
    assert status == 504
    assert elapsed < 3  # not the 6 s the application keeps going
    front.hid_detail(body, "no response within 1 s")
    # the upstream connection is closed; the loop's own reserve fd may have appeared
    assert front.fd_count_within(baseline + 1) <= baseline + 1


def test_client_taking_nothing_of_a_relayed_body_is_logged_plainly(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    size = 32 * 1024 * 1024

    def big_body(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * 65536
        for _ in range(size // len(block)):
            conn.sendall(block)

    with _app_listener("unix", sockdir, "[timeouts]\nupstream = 0.5\n") as (listener, config):
        app = _raw_app(listener, big_body)
        front = fronts(config=config)
        with front.connect() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            front.wait_for(r'"GET /big" route=/ closed "client took nothing within 0\.5 s"')
        app.join(timeout=10)


@pytest.mark.parametrize(
    "codings",
    [
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: xchunked\r\n",
    ],
)
def test_response_whose_final_coding_is_not_chunked_is_relayed_to_the_close(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess], codings: bytes
) -> None:
    """RFC 9112 section 6.3: chunked that is not the final coding, over two
    lines or as the end of another coding's name, leaves the body to end at
    the close, and the client reads it so: the front must not cut it as
    chunked (it would fail on the first line and cut the answer short)."""
    body = b"not a chunk-size line\r\nwhatever the coding made of it"

    def close_delimited(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + codings + b"\r\n" + body)

    with _app_listener("unix", sockdir) as (listener, config):
        app = _raw_app(listener, close_delimited)
        front = fronts(config=config)
        with front.connect() as client:
            client.settimeout(10)
            client.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            answer = read_to_close(client)
        app.join(timeout=10)
    head, _, relayed = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert relayed == body
    front.wait_for(r'"GET /x" route=/ relayed 200')


@pytest.mark.parametrize("piecewise", [False, True])
def test_handoff_fields_in_relayed_trailers_never_reach_the_client(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess], piecewise: bool
) -> None:
    """X-Socket-Handoff and X-Handoff-Data never reach the client, from the
    trailer section of a chunked body either (RFC 9112 section 7.1.2); the
    chunks and the other trailer fields are relayed as sent, whether the
    trailer arrives in one write or byte by byte."""
    body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n"
    trailer = (
        b"X-Handoff-Data: secret\r\nX-Checksum: 42\r\n"
        b"x-socket-handoff: /run/other.sock\r\nX-Tail: end\r\n\r\n"
    )

    def chunked_with_trailers(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        )
        if not piecewise:
            conn.sendall(body + trailer)
            return
        for byte in body + trailer:
            conn.sendall(bytes([byte]))
            time.sleep(0.002)

    with _app_listener("unix", sockdir) as (listener, config):
        app = _raw_app(listener, chunked_with_trailers)
        front = fronts(config=config)
        baseline = front.fd_count()
        status, headers, relayed = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        app.join(timeout=10)
    assert (status, headers["transfer-encoding"]) == (200, "chunked")
    assert relayed == body + b"X-Checksum: 42\r\nX-Tail: end\r\n\r\n"
    # the upstream connection is closed; the loop's own reserve fd may have appeared
    assert front.fd_count_within(baseline + 1) <= baseline + 1


@pytest.mark.parametrize(
    ("app_date", "hop_by_hop"),
    [(None, False), (b"Sun, 06 Nov 1994 08:49:37 GMT", False), (b"x", True)],
)
def test_relayed_response_has_exactly_one_date(
    no_fd_leak: None,
    sockdir: Path,
    fronts: Callable[..., FrontProcess],
    app_date: bytes | None,
    hop_by_hop: bool,
) -> None:
    """RFC 9110 §6.6.1: a response forwarded without Date gets the front's;
    one that has a Date keeps it, alone (unless its Connection names Date,
    which makes it hop-by-hop and dropped).  An interim 103 is relayed as sent."""
    date_line = b"" if app_date is None else b"Date: " + app_date + b"\r\n"
    if hop_by_hop:
        date_line += b"Connection: Date\r\n"

    def answer(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 401 Unauthorized\r\n" + date_line + b"Content-Length: 2\r\n\r\nno"
        )

    with _app_listener("unix", sockdir) as (listener, config):
        app = _raw_app(listener, answer)
        front = fronts(config=config)
        with front.connect() as client:
            client.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            client.settimeout(10)
            data = read_to_close(client)
        app.join(timeout=10)
    interim, _, final = data.partition(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 103 ") and b"Date:" not in interim
    head, _, body = final.partition(b"\r\n\r\n")
    dates = [line[6:] for line in head.split(b"\r\n") if line.lower().startswith(b"date: ")]
    assert head.startswith(b"HTTP/1.1 401 ") and body == b"no"
    assert len(dates) == 1
    if app_date is not None and not hop_by_hop:
        assert dates[0] == app_date
    else:
        sent = email.utils.parsedate_to_datetime(dates[0].decode())
        assert abs(sent.timestamp() - time.time()) < 5


def _uploading_client(front: FrontProcess, size: int) -> tuple[socket.socket, threading.Thread]:
    """A client sending a POST of ``size`` bytes from a thread, whatever happens to it."""
    client = front.connect()
    client.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)

    def upload() -> None:
        block = b"u" * 65536
        with contextlib.suppress(OSError):
            for _ in range(size // len(block)):
                client.sendall(block)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    return client, thread


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("then", ["close", "hold"])
def test_answer_before_the_whole_body_is_relayed(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess], transport: str, then: str
) -> None:
    """An application that answers (413 here) without reading a large body, and
    then closes or stops reading, has its answer relayed at once: not a 502
    for the failed upload, nor a 504 after timeouts.upstream.  The client's
    unread body is drained while the front lingers, so the answer is not lost
    to a reset either (RFC 9112 section 9.6)."""
    released = threading.Event()

    def early(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\n"
            b"too large"
        )
        if then == "hold":  # the connection stays open and unread
            released.wait(20)

    size = 6 * 1024 * 1024
    with _app_listener(transport, sockdir, "[timeouts]\nupstream = 8\n") as (listener, config):
        app = _raw_app(listener, early)
        front = fronts(config=config)
        baseline = front.fd_count()
        started = time.monotonic()
        client, uploader = _uploading_client(front, size)
        with client:
            client.settimeout(10)
            data = read_to_close(client, reset_ok=True)
            elapsed = time.monotonic() - started
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)  # ends the uploader's sendall
        released.set()
        uploader.join(timeout=10)
        app.join(timeout=10)
    status, headers, body = parse_response(data)
    assert (status, body, headers["connection"]) == (413, b"too large", "close")
    assert elapsed < 4  # at once, not after the 8 s of timeouts.upstream
    front.wait_for(r'"POST /upload" route=/ relayed 413')
    # the upstream connection is closed; the loop's own reserve fd may have appeared
    assert front.fd_count_within(baseline + 1) <= baseline + 1


def test_upload_cut_by_an_application_that_never_answers_is_502(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """Closing without an answer in the middle of the body stays a 502, told plainly."""
    with _app_listener("unix", sockdir) as (listener, config):
        app = _raw_app(listener, lambda conn: None)  # reads the head, closes
        front = fronts(config=config)
        client, uploader = _uploading_client(front, 6 * 1024 * 1024)
        with client:
            client.settimeout(10)
            data = read_to_close(client, reset_ok=True)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)  # ends the uploader's sendall
        uploader.join(timeout=10)
        app.join(timeout=10)
    status, _, body = parse_response(data)
    assert status == 502
    assert b"upstream" not in body  # the reason is for the log only
    # The upload fails, or the end of the application's data is seen first.
    front.wait_for(r"/upload: 502 .*(closed before a complete response head|connection failed)")


def test_early_handoff_answer_waits_for_the_body(
    no_fd_leak: None,
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    """An X-Socket-Handoff answer sent before the application has read the body
    is acted on once the body has gone to it: the daemon gets the client with
    nothing of the body left in the socket, only what the client sends next."""
    daemon = sockdir / "daemon.sock"
    receivers("daemon.sock", sock_type=socket.SOCK_SEQPACKET, behaviour=payload_echo)
    body = b"b" * (4 * 1024 * 1024)
    got: list[int] = []
    received: list[bytes] = []

    def answer_then_read(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nX-Socket-Handoff: %s\r\nX-Handoff-Data: early\r\n"
            b"Content-Length: 0\r\n\r\n" % bytes(daemon)
        )
        time.sleep(0.3)  # the answer is with the front well before the body is read
        total = len(received[0].partition(b"\r\n\r\n")[2])
        while total < len(body) and (chunk := conn.recv(65536)):
            total += len(chunk)
        got.append(total)

    with _app_listener("unix", sockdir) as (listener, config):
        app = _raw_app(listener, answer_then_read, received)
        front = fronts(config=config)
        with front.connect() as client:
            client.sendall(
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            client.settimeout(10)
            data = read_to_close(client)
        app.join(timeout=10)
    assert got == [len(body)]
    status, _, echoed = parse_response(data)
    assert status == 200
    assert json.loads(echoed)["payload"] == "early"


@pytest.mark.parametrize("field", ["X-Socket-Handoff", "X-Handoff-Data"])
def test_handoff_field_sent_twice_is_502(
    no_fd_leak: None,
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    fronts: Callable[..., FrontProcess],
    field: str,
) -> None:
    """Two values of a handoff field leave no way to tell which the application
    meant: nothing is handed off on a guess, the client gets a 502."""
    daemon = sockdir / "daemon.sock"
    receiver = receivers("daemon.sock", sock_type=socket.SOCK_SEQPACKET, behaviour=payload_echo)
    fields = {"X-Socket-Handoff": str(daemon), "X-Handoff-Data": "one"}
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    lines += f"{field}: {fields[field]}\r\n"

    def answer(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\n{lines}Content-Length: 0\r\n\r\n".encode())

    with _app_listener("unix", sockdir) as (listener, config):
        app = _raw_app(listener, answer)
        front = fronts(config=config)
        baseline = front.fd_count()
        status, _, body = http_exchange(front, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        app.join(timeout=10)
    assert status == 502
    front.hid_detail(body, f"the application sent {field} more than once")
    assert receiver.handoffs.empty()
    assert front.fd_count_within(baseline + 1) <= baseline + 1


def test_upstream_named_by_host_name(
    no_fd_leak: None, app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """An upstream given by name is looked up, each address tried in turn
    (``localhost`` may list ::1 first, where nobody listens here)."""
    config = auth_config(app, sockdir).replace("127.0.0.1", "localhost")
    assert "http://localhost:" in config
    front = fronts(config=config)
    status, _, body = http_exchange(
        front, b"POST /app/plain HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nnamed"
    )
    assert (status, body) == (201, b"from the app: name")


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_answer_arriving_as_the_upload_ends_is_never_lost(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess], transport: str
) -> None:
    """The application answers as soon as it has read the body, so its answer
    arrives just as the front's last write of the body completes.  The read
    of the head under way then must go on: stopped and started again, it
    could drop what it had already taken off the socket (a 502)."""
    rounds = 150
    body = b"b" * 300_000
    request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with _app_listener(transport, sockdir) as (listener, config):
        listener.settimeout(10)

        def serve() -> None:
            for _ in range(rounds):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    # The whole request read, as a server does before its
                    # application looks at it: the answer then leaves just as
                    # the front's last write of the body completes.
                    data = b""
                    while len(data) < len(request) and (chunk := conn.recv(65536)):
                        data += chunk
                    conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")

        app = threading.Thread(target=serve, daemon=True)
        app.start()
        front = fronts(config=config)
        statuses = []
        for _ in range(rounds):
            try:
                statuses.append(http_exchange(front, request)[0])
            except AssertionError:
                statuses.append(0)
        app.join(timeout=10)
    assert statuses == [413] * rounds, "\n".join(front.lines[-40:])


@pytest.mark.parametrize("chunked", [False, True])
def test_early_answer_reaches_a_client_that_sends_its_whole_body_first(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess], chunked: bool
) -> None:
    """A client that reads nothing until it has sent its whole body (Python's
    http.client) gets an early answer, large body included: the front drops
    the rest of the upload while it relays, as nginx does, instead of the two
    waiting on each other until a timeout, or a reset cutting the answer."""
    answer_body = b"a" * (1024 * 1024)

    def early(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(answer_body)
            + answer_body
        )

    size = 6 * 1024 * 1024
    if chunked:
        piece = b"u" * 65536
        upload = b"%x\r\n%s\r\n" % (len(piece), piece) * (size // len(piece)) + b"0\r\n\r\n"
        framing = b"Transfer-Encoding: chunked"
    else:
        upload = b"u" * size
        framing = b"Content-Length: %d" % size
    with _app_listener("unix", sockdir, "[timeouts]\nupstream = 8\n") as (listener, config):
        app = _raw_app(listener, early)
        front = fronts(config=config)
        baseline = front.fd_count()
        started = time.monotonic()
        with front.connect() as client:
            client.settimeout(10)
            client.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n\r\n" + upload)
            data = read_to_close(client)
        elapsed = time.monotonic() - started
        app.join(timeout=10)
    status, _, body = parse_response(data)
    assert (status, len(body)) == (401, len(answer_body))
    assert body == answer_body
    assert elapsed < 5
    front.wait_for(r'"POST /up" route=/ relayed 401')
    assert front.fd_count_within(baseline + 1) <= baseline + 1


def test_early_answer_ends_soon_after_the_client_stops_sending(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """A client that stops its upload on seeing the answer is not held for
    timeouts.body: the drop ends after timeouts.linger without bytes, so an
    answer delimited by the close (no Content-Length) ends in time."""

    def early(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\nno upload for you")

    with _app_listener("unix", sockdir, "[timeouts]\nlinger = 0.5\n") as (listener, config):
        app = _raw_app(listener, early)
        front = fronts(config=config)
        started = time.monotonic()
        with front.connect() as client:
            client.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
            client.sendall(b"u" * 1000)  # and no more
            client.settimeout(10)
            data = read_to_close(client)
        elapsed = time.monotonic() - started
        app.join(timeout=10)
    status, _, body = parse_response(data)
    assert (status, body) == (403, b"no upload for you")
    assert elapsed < 3  # the linger of 0.5 s twice at most, not the 30 s of timeouts.body


def test_body_already_received_goes_out_with_the_head(
    no_fd_leak: None, sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """Body bytes that came with the head reach the application in the same
    write: one that answers on the head alone has them already, and its
    close does not meet them arriving later (a reset cutting its answer)."""
    body = b"b" * 1000
    firsts: list[bytes] = []

    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    with _app_listener("unix", sockdir) as (listener, config):
        app = _raw_app(listener, answer, firsts)
        front = fronts(config=config)
        request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n" + body
        status = http_exchange(front, request)[0]
        app.join(timeout=10)
    assert status == 204
    assert firsts[0].endswith(b"\r\n\r\n" + body)


def test_http_1_0_request_without_host_reaches_the_application_with_one(
    app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """It goes upstream as HTTP/1.1, which must carry Host (RFC 9112 section
    3.2): the address the client reached, as nginx's proxy_pass sends."""
    front = fronts(config=auth_config(app, sockdir))
    status, _, body = http_exchange(front, b"GET /app/plain HTTP/1.0\r\n\r\n")
    assert (status, body) == (201, b"from the app: ")
    host, port = front.host_port
    assert app.seen[-1]["headers"]["Host"] == f"{host}:{port}"


@pytest.mark.parametrize("status", [b"099", b"000", b"600", b"999"])
def test_a_status_outside_100_to_599_is_502(
    sockdir: Path, fronts: Callable[..., FrontProcess], status: bytes
) -> None:
    """RFC 9112 section 4: three digits; RFC 9110 section 15: 100-599."""

    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\nok" % status)

    with _app_listener("unix", sockdir) as (listener, config):
        front = fronts(config=config)
        thread = _raw_app(listener, answer)
        code, _, body = http_exchange(front, b"GET /odd HTTP/1.1\r\nHost: a\r\n\r\n")
        thread.join(10)
    assert code == 502
    front.hid_detail(body, "not in 100-599")


def test_apache_daemon_reading_to_eof_gets_it_right_after_the_record(
    no_fd_leak: None, app: type[App], sockdir: Path, fronts: Callable[..., FrontProcess]
) -> None:
    """Apache closes after its sendmsg; the front half-closes (it still waits
    for the daemon's close): a daemon that reads until EOF is not held up."""
    daemon = make_socket(sockdir / "daemon.sock")
    waited: list[float] = []

    def serve() -> None:
        daemon.settimeout(10)
        conn, _ = daemon.accept()
        with conn:
            conn.settimeout(10)
            data, client = fdpass.recv_fd(conn, blocking=True, timeout=10)
            assert data == b'{"user_id":12345}' and client is not None
            started = time.monotonic()
            assert conn.recv(1) == b""  # EOF after the one record
            waited.append(time.monotonic() - started)
            with client:
                client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndaemon")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        front = fronts(config=auth_config(app, sockdir))
        status, _, body = http_exchange(front, b"GET /app/handoff HTTP/1.1\r\nHost: a\r\n\r\n")
        thread.join(10)
    finally:
        daemon.close()
    assert (status, body) == (200, b"daemon")
    assert waited and waited[0] < 0.5  # not the front's 1 s handoff timeout
