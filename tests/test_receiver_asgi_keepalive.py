"""ASGI adapter keep-alive: next requests read from the handed-off socket, pipelining, limits."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import fdhandoff.receiver.asgi as asgi_module
from fdhandoff.errors import ConfigError
from fdhandoff.httphead import HeadLimits
from fdhandoff.receiver import Options
from test_receiver_asgi_support import ASGIReceiver, MiniFront, ResponseReader, hand_over

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "asgi.sock")


class Counter:
    """The requests served, with the client address each one saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []
        self.background_done = threading.Event()

    def app(self) -> Starlette:
        async def echo(request: Request) -> Response:
            body = await request.body()
            self.seen.append((request.method, request.url.path, request.client))
            return PlainTextResponse(f"{request.method} {request.url.path} {len(body)}")

        async def ignore_body(request: Request) -> Response:
            return PlainTextResponse("not reading it")

        async def stream(request: Request) -> Response:
            async def parts() -> Any:
                for i in range(3):
                    yield f"{i};"

            return StreamingResponse(parts())

        async def slow_background() -> None:
            await asyncio.sleep(1.5)
            self.background_done.set()

        async def background(request: Request) -> Response:
            return PlainTextResponse("answered", background=BackgroundTask(slow_background))

        async def closing(request: Request) -> Response:
            return PlainTextResponse("bye", headers={"Connection": "close"})

        return Starlette(
            routes=[
                Route("/ignore", ignore_body, methods=["POST"]),
                Route("/stream", stream),
                Route("/background", background),
                Route("/closing", closing),
                Route("/{path:path}", echo, methods=["GET", "POST"]),
            ]
        )


@contextmanager
def answered_once(
    sock_path: str, counter: Counter
) -> Iterator[tuple[socket.socket, ResponseReader]]:
    """A handed-off connection whose first request (GET /ok) was answered 200:
    what the client sends next is read by the receiver itself."""
    with ASGIReceiver(counter.app(), sock_path):
        client = hand_over(sock_path, "GET", "/ok")
        reader = ResponseReader(client)
        assert reader.read().status == 200
        with client:
            yield client, reader


@pytest.mark.parametrize("loop", LOOPS)
def test_three_sequential_requests_on_one_connection(sock_path: str, loop: str) -> None:
    counter = Counter()
    with ASGIReceiver(counter.app(), sock_path, loop=loop):
        client = hand_over(sock_path, "GET", "/one")
        reader = ResponseReader(client)
        first = reader.read()
        client.sendall(b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        second = reader.read()
        client.sendall(b"GET /three?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        third = reader.read()
        client.close()
    assert [r.body for r in (first, second, third)] == [
        b"GET /one 0",
        b"POST /two 3",
        b"GET /three 0",
    ]
    assert all(r.header("connection") is None for r in (first, second, third))
    assert [s[2] for s in counter.seen] == [("127.0.0.1", 40000)] * 3


@pytest.mark.parametrize("loop", LOOPS)
def test_pipelined_requests_in_the_socket(sock_path: str, loop: str) -> None:
    counter = Counter()
    with ASGIReceiver(counter.app(), sock_path, loop=loop):
        client = hand_over(sock_path, "POST", "/a", [("Content-Length", "2")])
        client.sendall(
            b"hi"
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nxyz\r\n0\r\n\r\n"
            b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        reader = ResponseReader(client)
        bodies = [reader.read().body for _ in range(5)]
        assert reader.closed()
        client.close()
    assert bodies == [b"POST /a 2", b"GET /b 0", b"0;1;2;", b"POST /c 3", b"GET /d 0"]


def test_pipelined_requests_already_read_by_the_sender(sock_path: str) -> None:
    """What the front read past the head (TLS) may hold the body and the next requests."""
    counter = Counter()
    already = b"body!GET /next HTTP/1.1\r\nHost: x\r\n\r\nGET /last HTTP/1.1\r\nHost: x\r\n\r\n"
    with ASGIReceiver(counter.app(), sock_path):
        client = hand_over(
            sock_path, "POST", "/first", [("Content-Length", "5")], already_read=already
        )
        reader = ResponseReader(client)
        bodies = [reader.read().body for _ in range(3)]
        client.close()
    assert bodies == [b"POST /first 5", b"GET /next 0", b"GET /last 0"]


def test_empty_lines_between_requests_are_ignored(sock_path: str) -> None:
    with ASGIReceiver(Counter().app(), sock_path):
        client = hand_over(sock_path, "POST", "/a", [("Content-Length", "1")])
        client.sendall(b"x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = ResponseReader(client)
        assert [reader.read().body for _ in range(2)] == [b"POST /a 1", b"GET /b 0"]
        client.close()


def test_http10_request_after_a_kept_alive_one_is_served_and_ends_it(
    sock_path: str, no_fd_leak: None
) -> None:
    """RFC 9112 section 9.3: an HTTP/1.0 request (no keep-alive) is answered
    close-delimited, and the connection ends after it; the status line says
    HTTP/1.1, the version the server implements (RFC 9110 section 2.5)."""
    counter = Counter()
    with ASGIReceiver(counter.app(), sock_path):
        client = hand_over(sock_path, "GET", "/a")
        reader = ResponseReader(client)
        assert reader.read().status == 200
        client.sendall(b"GET /stream HTTP/1.0\r\n\r\n")
        last = reader.read()
        assert last.status == 200
        assert last.header("transfer-encoding") is None
        assert last.body == b"0;1;2;"
        assert reader.closed()
        client.close()


@pytest.mark.parametrize(
    "body",
    [
        b"5;a\x00\r\nhello\r\n0\r\n\r\n",  # NUL in a chunk extension
        b" 5\r\nhello\r\n0\r\n\r\n",  # whitespace before the size
        b"5\r\nhello\r\n0\r\nNo-Colon\r\n\r\n",  # a trailer that is no field line
        b"5\r\nhello\r\n0\r\nX: 1\r\n folded\r\n\r\n",  # obs-fold in the trailers
    ],
)
def test_malformed_chunked_body_is_400_and_what_follows_is_not_served(
    sock_path: str, body: bytes, no_fd_leak: None
) -> None:
    """The front (auth mode) refuses these bodies: so does the receiver, and
    the request behind one is never taken for a request (RFC 9112 section 7.1)."""
    counter = Counter()
    with answered_once(sock_path, counter) as (client, reader):
        client.sendall(
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + body
            + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = reader.read()
        assert answer.status == 400
        assert answer.header("connection") == "close"
        assert reader.closed()
        client.close()
    assert [s[1] for s in counter.seen] == ["/ok"]


def test_upgrade_in_an_http10_request_is_ignored(sock_path: str, no_fd_leak: None) -> None:
    """RFC 9110 section 7.8: a server MUST ignore Upgrade in an HTTP/1.0
    request; the front hands it off as a plain request, and it is served as one."""
    counter = Counter()
    with answered_once(sock_path, counter) as (client, reader):
        client.sendall(
            b"GET /plain HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = reader.read()
        assert (answer.status, answer.body) == (200, b"GET /plain 0")
        assert reader.closed()
        client.close()
        # The first request of a handoff too (the front passed it on).
        client = hand_over(
            sock_path,
            "GET",
            "/first",
            [("Connection", "Upgrade"), ("Upgrade", "websocket")],
            SERVER_PROTOCOL="HTTP/1.0",
        )
        answer = ResponseReader(client).read()
        assert (answer.status, answer.body) == (200, b"GET /first 0")
        client.close()


def test_empty_lines_split_across_reads_before_a_next_request(sock_path: str) -> None:
    with ASGIReceiver(Counter().app(), sock_path):
        client = hand_over(sock_path, "GET", "/a")
        reader = ResponseReader(client)
        assert reader.read().status == 200
        for piece in (b"\r", b"\n\r", b"\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"):
            client.sendall(piece)
            time.sleep(0.02)
        assert reader.read().body == b"GET /b 0"
        client.close()


def test_client_connection_close_is_honoured(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(Counter().app(), sock_path):
        client = hand_over(sock_path, "GET", "/a")
        reader = ResponseReader(client)
        assert reader.read().header("connection") is None
        client.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        last = reader.read()
        assert last.header("connection") == "close"
        assert reader.closed()
        client.close()


def test_app_connection_close_is_honoured(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(Counter().app(), sock_path):
        client = hand_over(sock_path, "GET", "/closing")
        reader = ResponseReader(client)
        response = reader.read()
        assert response.body == b"bye"
        assert response.header("connection") == "close"
        assert reader.closed()
        client.close()


def test_http10_request_is_answered_close_delimited(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(Counter().app(), sock_path):
        client = hand_over(sock_path, "GET", "/stream", SERVER_PROTOCOL="HTTP/1.0")
        reader = ResponseReader(client)
        response = reader.read()
        client.close()
    assert response.header("transfer-encoding") is None
    assert response.header("connection") == "close"
    assert response.body == b"0;1;2;"


def test_idle_keepalive_connection_is_closed_after_the_timeout(
    sock_path: str, no_fd_leak: None
) -> None:
    with ASGIReceiver(Counter().app(), sock_path, keepalive_timeout=0.3):
        client = hand_over(sock_path, "GET", "/a")
        reader = ResponseReader(client)
        assert reader.read().status == 200
        started = time.monotonic()
        assert reader.closed(timeout=10)
        assert time.monotonic() - started < 8
        client.close()


@pytest.mark.parametrize("where", ["adapter", "receiver options"])
def test_keepalive_off(sock_path: str, no_fd_leak: None, where: str) -> None:
    """Off by the adapter's own argument, or by the receiver's options
    (``--keepalive-timeout 0``) when the adapter leaves it to them."""
    if where == "adapter":
        receiver = ASGIReceiver(Counter().app(), sock_path, keepalive_timeout=0)
    else:
        receiver = ASGIReceiver(Counter().app(), sock_path, Options(keepalive_timeout=0))
    with receiver:
        client = hand_over(sock_path, "GET", "/a")
        reader = ResponseReader(client)
        assert reader.read().header("connection") == "close"
        assert reader.closed()
        client.close()


def test_the_receivers_head_limits_bound_a_next_request(sock_path: str, no_fd_leak: None) -> None:
    limits = HeadLimits(max_head_size=2048, max_uri_length=256, max_headers=4)
    with ASGIReceiver(Counter().app(), sock_path, Options(head_limits=limits)):
        client = hand_over(sock_path, "GET", "/a")
        reader = ResponseReader(client)
        assert reader.read().status == 200
        client.sendall(b"GET /" + b"x" * 300 + b" HTTP/1.1\r\nHost: test.local\r\n\r\n")
        assert reader.read().status == 414
        assert reader.closed()
        client.close()


def test_unread_body_ends_the_connection(sock_path: str, no_fd_leak: None) -> None:
    """The app answered without reading a body still on its way: no next request."""
    with ASGIReceiver(Counter().app(), sock_path):
        client = hand_over(sock_path, "POST", "/ignore", [("Content-Length", "100000")])
        reader = ResponseReader(client)
        response = reader.read()
        client.sendall(b"a" * 1000)
        assert response.body == b"not reading it"
        assert reader.closed()
        client.close()


@pytest.mark.parametrize("expect", [False, True])
def test_unread_body_response_says_connection_close(
    sock_path: str, expect: bool, no_fd_leak: None
) -> None:
    """The connection ends after an answer that left the body unread: its head says so.

    Without ``Connection: close`` a client takes the connection as persistent
    (RFC 9112 section 9.3) and loses the next request it sends on it.
    """
    headers = [("Content-Length", "5")]
    if expect:
        headers.append(("Expect", "100-continue"))
    with (
        ASGIReceiver(Counter().app(), sock_path),
        hand_over(sock_path, "POST", "/ignore", headers) as client,
    ):
        reader = ResponseReader(client)
        response = reader.read()
        assert response.body == b"not reading it"
        assert response.header("connection") == "close"
        assert reader.closed()


def test_body_read_by_the_app_keeps_the_connection(sock_path: str, no_fd_leak: None) -> None:
    with (
        ASGIReceiver(Counter().app(), sock_path),
        hand_over(sock_path, "POST", "/read", [("Content-Length", "5")]) as client,
    ):
        client.sendall(b"hello")
        response = ResponseReader(client).read()
        assert response.body == b"POST /read 5"
        assert response.header("connection") is None


def test_background_task_does_not_hold_the_next_request(sock_path: str) -> None:
    counter = Counter()
    with ASGIReceiver(counter.app(), sock_path):
        client = hand_over(sock_path, "GET", "/background")
        reader = ResponseReader(client)
        assert reader.read().body == b"answered"
        client.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.read().body == b"GET /after 0"
        assert not counter.background_done.is_set()  # still sleeping
        assert counter.background_done.wait(10)
        client.sendall(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.read().body == b"GET /later 0"
        client.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),  # bare LF
        # A bare LF before the request line too, as the front refuses it: a
        # head is judged the same whichever server reads it.
        (b"\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        # What the front refuses before routing, refused here too: the next
        # request never passes the front (RFC 3986 sections 2.1 and 5.2.4).
        (b"GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /a%00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /a/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1" + b"0" * 18 + b"\r\n\r\n", 400),
        # Empty lines count towards the head's size, as at the front.
        (b"\r\n" * 17000 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (
            b"\r\n" * 16000 + b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"v" * 900 + b"\r\n\r\n",
            431,
        ),
        (b"GET /" + b"a" * 8200 + b"\r\n", 414),
        (b"GET /\r\n", 400),  # HTTP/0.9: refused when its line ends
        # Never valid, so answered at once rather than 408 after HEAD_TIMEOUT
        # (RFC 9112 sections 2.2 and 3): a bare CR, a TLS ClientHello.
        (b"GET /x HTTP/1.1\r\nHost: x\r\n\r\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: x\r\n\r\rabc", 400),
        (b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03" + bytes(range(0x40, 0x60)), 400),
    ],
)
def test_bad_next_request_is_answered_and_closed(
    sock_path: str, request_bytes: bytes, status: int, no_fd_leak: None
) -> None:
    counter = Counter()
    with answered_once(sock_path, counter) as (client, reader):
        client.sendall(request_bytes)
        answer = reader.read()
        assert answer.status == status
        assert answer.header("connection") == "close"
        assert reader.closed()
        client.close()
    assert [s[1] for s in counter.seen] == ["/ok"]


def test_trickled_head_gets_408(
    sock_path: str, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    monkeypatch.setattr(asgi_module, "HEAD_TIMEOUT", 0.5)
    with answered_once(sock_path, Counter()) as (client, reader):
        client.sendall(b"GET /slow HTTP/1.1\r\nHo")
        assert reader.read().status == 408
        assert reader.closed()
        client.close()


def test_client_closing_inside_a_next_head(sock_path: str, no_fd_leak: None) -> None:
    with answered_once(sock_path, Counter()) as (client, _):
        client.sendall(b"GET /half HTTP/1.1\r\n")
        client.close()
        time.sleep(0.2)


def test_handoff_decided_by_an_auth_application_serves_one_request(
    sock_path: str, no_fd_leak: None
) -> None:
    """HANDOFF_DATA (the front's auth mode): the body went to the application, and the
    next request must pass the front's check again, so it is not read here."""
    counter = Counter()
    with ASGIReceiver(counter.app(), sock_path):
        client = hand_over(
            sock_path, "POST", "/decided", [("Content-Length", "11")], HANDOFF_DATA='{"u":1}'
        )
        client.sendall(b"GET /sneaky HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = ResponseReader(client)
        response = reader.read()
        assert response.body == b"POST /decided 0"
        assert response.header("connection") == "close"
        assert reader.closed()
        client.close()
    assert [s[1] for s in counter.seen] == ["/decided"]


@pytest.mark.parametrize("loop", LOOPS)
def test_many_clients_pipelining_mixed_requests(sock_path: str, loop: str) -> None:
    """30 connections at once, each with 10 pipelined GETs, POSTs and streams, in order."""
    rng = random.Random(7)
    errors: list[str] = []

    def client(front: MiniFront, number: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", front.port), timeout=30) as sock:
                wire, expected = b"", []
                for i in range(10):
                    kind = rng.choice(("get", "post", "stream"))
                    if kind == "get":
                        wire += b"GET /c%d/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (number, i)
                        expected.append(b"GET /c%d/%d 0" % (number, i))
                    elif kind == "post":
                        size = rng.randrange(0, 200_000)
                        wire += b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                        wire += b"u" * size
                        expected.append(b"POST /up %d" % size)
                    else:
                        wire += b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
                        expected.append(b"0;1;2;")
                sock.sendall(wire)
                reader = ResponseReader(sock, timeout=30)
                got = [reader.read().body for _ in expected]
                if got != expected:
                    errors.append(f"client {number}: {got!r}")
        except Exception as exc:  # collected, asserted below
            errors.append(f"client {number}: {exc!r}")

    with ASGIReceiver(Counter().app(), sock_path, loop=loop), MiniFront(sock_path) as front:
        threads = [threading.Thread(target=client, args=(front, n)) for n in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert front.handed == 30


def test_a_205_sends_no_content_and_the_connection_goes_on(
    sock_path: str, no_fd_leak: None
) -> None:
    # RFC 9110 section 15.3.6: the app's body is not sent; Content-Length: 0
    # tells the client where the 205 ends, and the next request follows.
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/reset":
            headers = [(b"content-length", b"5")]
            await send({"type": "http.response.start", "status": 205, "headers": headers})
            await send({"type": "http.response.body", "body": b"reset"})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"next"})

    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "GET", "/reset")
        reader = ResponseReader(client)
        first = reader.read()
        client.sendall(b"GET /next HTTP/1.1\r\nHost: test.local\r\n\r\n")
        second = reader.read()
        client.close()
    assert (first.status, first.header("content-length"), first.body) == (205, "0", b"")
    assert (second.status, second.body) == (200, b"next")


def test_header_names_the_front_drops_are_dropped_from_later_requests(
    sock_path: str, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    """``X_A`` would reach a CGI-minded app as ``HTTP_X_A``, the name of ``X-A``:
    the front drops such names from the first request (nginx's defaults), and
    later requests, read here, lose them too, with the same log line."""
    seen: list[list[bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append([name for name, _ in scope["headers"]])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    caplog.set_level("INFO", logger="fdhandoff.receiver.asgi")
    with ASGIReceiver(app, sock_path), hand_over(sock_path, "GET", "/first") as client:
        reader = ResponseReader(client)
        assert reader.read().status == 200
        client.sendall(
            b"GET /second HTTP/1.1\r\nHost: x\r\nX_A: spoofed\r\nX.B: 1\r\nX-A: real\r\n\r\n"
        )
        assert reader.read().status == 200
    assert seen[1] == [b"host", b"x-a"]
    assert "dropped header(s) whose name is not letters, digits and '-': X_A, X.B" in caplog.text


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"HEAD /x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"HEAD /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"HEAD /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"HEAD /x HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ],
)
def test_bad_next_head_request_is_answered_without_a_body(
    sock_path: str, request_bytes: bytes, status: int, no_fd_leak: None
) -> None:
    """RFC 9110 section 9.3.2: the answer to HEAD is the head a GET would get,
    Content-Length included, and no content (as the front's own answers)."""
    with answered_once(sock_path, Counter()) as (client, reader):
        client.sendall(request_bytes)
        answer = reader.read(head_request=True)
        assert answer.status == status
        assert int(answer.header("content-length") or 0) > 0
        assert answer.body == b""
        assert reader.closed()  # and nothing after the head
        assert reader.buf == b""
        client.close()


def test_bad_next_request_answer_names_the_problem_and_the_request(
    sock_path: str, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    caplog.set_level("INFO", logger="fdhandoff.access")
    with answered_once(sock_path, Counter()) as (client, reader):
        client.sendall(b"GET /missing-host HTTP/1.1\r\n\r\n")
        answer = reader.read()
        assert answer.status == 400
        assert answer.body == b"missing Host header\n"
        assert int(answer.header("content-length") or 0) == len(answer.body)
        assert answer.header("date") is not None
        assert reader.closed()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if r.name == "fdhandoff.access"]
        if any('"GET /missing-host" 400' in line for line in lines):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"no access line for the refused request: {lines}")


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 86400.5])
def test_a_keepalive_timeout_out_of_range_is_refused(value: float) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # never called
        raise AssertionError

    with pytest.raises(ConfigError, match="between 0 and 86400 seconds"):
        asgi_module.ASGIAdapter(app, keepalive_timeout=value)


@pytest.mark.parametrize(
    "expect",
    [b"Expect: 100-continue, foo\r\n", b"Expect: foo\r\nExpect: 100-Continue\r\n"],
    ids=["list", "two-lines"],
)
def test_a_next_request_expecting_100_continue_in_a_list_gets_it(
    sock_path: str, expect: bytes, no_fd_leak: None
) -> None:
    """Expect is a list (RFC 9110 section 10.1.1: #expectation): 100-continue
    among other members, or on another line, still asks for the interim answer."""
    with (
        ASGIReceiver(Counter().app(), sock_path),
        hand_over(sock_path, "GET", "/first") as client,
    ):
        reader = ResponseReader(client)
        assert reader.read().body == b"GET /first 0"
        client.sendall(
            b"POST /read HTTP/1.1\r\nHost: x\r\n" + expect + b"Content-Length: 5\r\n\r\n"
        )
        client.settimeout(5)
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(b"hello")
        assert reader.read().body == b"POST /read 5"
