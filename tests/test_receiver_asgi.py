"""ASGI adapter: scopes, request bodies, responses and errors, with real Starlette apps.

Every test hands a real loopback TCP connection to the engine over a real
UNIX socket, in the format of the sender named by the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fdhandoff import scgi
from fdhandoff.receiver import Options
from fdhandoff.receiver.listeners import Bind
from test_receiver_asgi_support import ASGIReceiver, ResponseReader, hand_over, read_one
from test_receiver_support import (
    MarkerSender,
    dechunk,
    read_all,
    send_payload,
    send_scgi,
    tcp_pair,
)

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "asgi.sock")


# --- apps -------------------------------------------------------------------------------------


class Recorder:
    """A bare ASGI app: keeps every scope and message, answers with a short text."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        self.scopes.append(scope)
        while True:
            message = await receive()
            self.messages.append(message)
            if not message.get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.request")
        scope["state"]["touched"] = True  # must not leak into the next request's scope
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"got %d" % len(body)})


async def hello(request: Request) -> Response:
    return PlainTextResponse(f"hello {request.query_params.get('name', 'world')}")


async def upload(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"size": len(body), "sha256": hashlib.sha256(body).hexdigest()})


async def stream(request: Request) -> Response:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"part %d\n" % i
            await asyncio.sleep(0.01)

    return StreamingResponse(parts(), media_type="text/plain")


async def sse(request: Request) -> Response:
    async def events() -> AsyncIterator[str]:
        for i in range(3):
            yield f"data: token {i}\n\n"
            await asyncio.sleep(0.01)

    return StreamingResponse(events(), media_type="text/event-stream")


async def boom(request: Request) -> Response:
    raise RuntimeError("deliberate")


async def late_boom(request: Request) -> Response:
    async def parts() -> AsyncIterator[bytes]:
        yield b"first part\n"
        await asyncio.sleep(0.01)
        raise RuntimeError("deliberate, mid-stream")

    return StreamingResponse(parts())


async def bad_header(request: Request) -> Response:
    return PlainTextResponse("x", headers={"X-Split": "a\r\nInjected: yes"})


async def control_header(request: Request) -> Response:
    return PlainTextResponse("x", headers={"X-A": "a\x01b\x7f"})


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", hello),
            Route("/hello", hello),
            Route("/upload", upload, methods=["POST"]),
            Route("/stream", stream),
            Route("/sse", sse),
            Route("/boom", boom),
            Route("/late-boom", late_boom),
            Route("/bad-header", bad_header),
            Route("/control-header", control_header),
        ]
    )


# --- scope ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_http_scope_from_a_front_handoff(sock_path: str, loop: str) -> None:
    app = Recorder()
    with ASGIReceiver(app, sock_path, loop=loop):
        client = hand_over(
            sock_path,
            "GET",
            "/caf%C3%A9/a%2Fb?x=1&y=two%20words",
            [("X-Custom", "abc"), ("Cookie", "a=1; b=2")],
            HTTPS="on",
            HANDOFF_ROUTE="/caf",
            HANDOFF_DATA="opaque",
        )
        response = read_one(client)
        client.close()
    assert response.status == 200
    assert response.body == b"got 0"
    scope = app.scopes[0]
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "https"
    assert scope["path"] == "/café/a/b"
    assert scope["raw_path"] == b"/caf%C3%A9/a%2Fb"
    assert scope["query_string"] == b"x=1&y=two%20words"
    assert scope["root_path"] == ""
    assert scope["headers"] == [
        (b"host", b"test.local"),
        (b"x-custom", b"abc"),
        (b"cookie", b"a=1; b=2"),
    ]
    assert scope["client"] == ("127.0.0.1", 40000)
    assert scope["server"] == ("127.0.0.1", 8080)
    assert scope["extensions"]["fdhandoff"] == {
        "format": "scgi",
        "payload": b"opaque",
        "marker": b"",
        "route": "/caf",
        "upgraded": False,
        "subprotocol": None,
    }
    assert app.messages == [{"type": "http.request", "body": b"", "more_body": False}]


def test_nginx_duplicate_headers_are_kept_in_order(sock_path: str) -> None:
    app = Recorder()
    with ASGIReceiver(app, sock_path):
        client, server_side = tcp_pair()
        headers = [
            ("CONTENT_LENGTH", "0"),
            ("SCGI", "1+fd_pass"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "5555"),
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/dup?a=%20b"),
            ("SERVER_ADDR", "127.0.0.1"),
            ("SERVER_PORT", "18080"),
            ("QUERY_STRING", "a=%20b"),
            ("HTTP_HOST", "x"),
            ("HTTP_X_A", "1"),
            ("HTTP_X_A", "2"),
            ("HTTP_COOKIE", "c1=1"),
            ("HTTP_COOKIE", "c2=2"),
        ]
        send_scgi(sock_path, headers, server_side, allow_duplicates=True)
        assert read_one(client).status == 200
        client.close()
    scope = app.scopes[0]
    assert scope["scheme"] == "http"
    assert scope["headers"] == [
        (b"host", b"x"),
        (b"x-a", b"1"),
        (b"x-a", b"2"),
        (b"cookie", b"c1=1"),
        (b"cookie", b"c2=2"),
    ]
    assert scope["client"] == ("127.0.0.1", 5555)
    assert scope["extensions"]["fdhandoff"]["format"] == "scgi"


def test_lifespan_state_is_copied_into_each_request(sock_path: str) -> None:
    async def lifespan_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            scope["state"]["pool"] = "db-pool"
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await recorder(scope, receive, send)

    recorder = Recorder()
    with ASGIReceiver(lifespan_app, sock_path):
        for _ in range(2):
            client = hand_over(sock_path)
            assert read_one(client).status == 200
            client.close()
    first, second = recorder.scopes
    assert first["state"] == {"pool": "db-pool", "touched": True}
    assert second["state"] == {"pool": "db-pool", "touched": True}
    assert first["state"] is not second["state"]


# --- responses --------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_starlette_plain_response(sock_path: str, loop: str) -> None:
    with ASGIReceiver(starlette_app(), sock_path, loop=loop):
        client = hand_over(sock_path, "GET", "/hello?name=fd", [("Connection", "close")])
        data = read_all(client)
        client.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\ncontent-length: 8\r\n" in head
    assert b"\r\nDate: " in head
    assert b"\r\nConnection: close" in head
    assert body == b"hello fd"


def test_streaming_response_is_chunked(sock_path: str) -> None:
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(sock_path, "GET", "/stream")
        response = read_one(client)
        client.close()
    assert response.status == 200
    assert response.header("transfer-encoding") == "chunked"
    assert response.header("content-length") is None
    assert response.body == b"".join(b"part %d\n" % i for i in range(5))


def test_sse_with_a_streaming_response(sock_path: str) -> None:
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(sock_path, "GET", "/sse", [("Accept", "text/event-stream")])
        response = read_one(client)
        client.close()
    assert response.header("content-type") == "text/event-stream; charset=utf-8"
    assert response.body == b"data: token 0\n\ndata: token 1\n\ndata: token 2\n\n"


def test_sse_starlette_event_source(sock_path: str) -> None:
    import sse_starlette  # noqa: PLC0415 - a test extra, imported where it is used

    ended = threading.Event()

    async def events(request: Request) -> Response:
        async def generate() -> AsyncIterator[dict[str, str]]:
            try:
                for i in range(1000):
                    yield {"event": "token", "data": f"t{i}"}
                    await asyncio.sleep(0.02)
            finally:
                ended.set()

        return sse_starlette.EventSourceResponse(generate())

    app = Starlette(routes=[Route("/events", events)])
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "GET", "/events")
        data = b""
        while data.count(b"event: token") < 3:
            chunk = client.recv(4096)
            assert chunk
            data += chunk
        assert b"text/event-stream" in data
        assert b"data: t0" in data
        client.close()  # the app hears http.disconnect and stops its generator
        assert ended.wait(10)


def test_head_request_gets_no_body(sock_path: str) -> None:
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(sock_path, "HEAD", "/hello")
        reader = ResponseReader(client)
        response = reader.read(head_request=True)
        assert response.status == 200
        assert response.header("content-length") == "11"
        # Nothing follows the head, and the connection stays usable.
        client.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.read().body == b"hello world"
        client.close()


def test_payload_only_handoff_reaches_the_app_as_get_root(sock_path: str, no_fd_leak: None) -> None:
    app = Recorder()
    payload = b'{"user_id":12345,"prompt":"hi"}'
    with ASGIReceiver(app, Bind.parse(f"unix-seqpacket:{sock_path}")):
        client, server_side = tcp_pair()
        server_side_port = server_side.getsockname()[1]
        send_payload(sock_path, payload, server_side)
        data = read_all(client)
        client.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"got 0")
    scope = app.scopes[0]
    assert scope["method"] == "GET"
    assert scope["path"] == "/"
    assert scope["headers"] == [(b"x-handoff-data", payload)]
    assert scope["extensions"]["fdhandoff"]["format"] == "payload"
    assert scope["extensions"]["fdhandoff"]["payload"] == payload
    # No description: the addresses come from the socket itself.
    assert scope["server"] == ("127.0.0.1", server_side_port)
    assert scope["client"][0] == "127.0.0.1"


def test_mod_proxy_fdpass_marker_gets_the_body_only(sock_path: str, no_fd_leak: None) -> None:
    """Apache sent the head already (marker \\x00): only the app's body is written."""
    with ASGIReceiver(starlette_app(), sock_path):
        sender = MarkerSender(sock_path)
        client, server_side = tcp_pair()
        sender.send(b"\x00", server_side)
        data = read_all(client)
        client.close()
        sender.close()
    assert data == b"hello world"


def test_other_marker_gets_a_whole_response(sock_path: str, no_fd_leak: None) -> None:
    """fd-pass's \\x01 marker: nothing describes the request, the answer is complete."""
    with ASGIReceiver(starlette_app(), sock_path):
        sender = MarkerSender(sock_path)
        client, server_side = tcp_pair()
        sender.send(b"\x01", server_side)
        data = read_all(client)
        client.close()
        sender.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nhello world")


def test_plain_scgi_answers_cgi_style(sock_path: str, no_fd_leak: None) -> None:
    """nginx scgi_pass / Apache mod_proxy_scgi: no fd, the answer goes back on the UNIX socket."""
    body = b"x" * 70000
    headers = [
        ("CONTENT_LENGTH", str(len(body))),
        ("SCGI", "1"),
        ("REQUEST_METHOD", "POST"),
        ("REQUEST_URI", "/upload"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("CONTENT_TYPE", "application/octet-stream"),
        ("HTTP_HOST", "x"),
    ]
    with (
        ASGIReceiver(starlette_app(), sock_path),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn,
    ):
        conn.connect(sock_path)
        conn.sendall(scgi.encode(headers, body))
        data = read_all(conn)
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"Status: 200 OK\r\n")
    assert b"Connection" not in head
    assert json.loads(answer) == {"size": 70000, "sha256": hashlib.sha256(body).hexdigest()}


def test_plain_scgi_stream_is_unbuffered_and_close_delimited(
    sock_path: str, no_fd_leak: None
) -> None:
    headers = [
        ("CONTENT_LENGTH", "0"),
        ("SCGI", "1"),
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", "/stream"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
    ]
    with (
        ASGIReceiver(starlette_app(), sock_path),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn,
    ):
        conn.connect(sock_path)
        conn.sendall(scgi.encode(headers, b""))
        data = read_all(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"Status: 200 OK\r\n")
    assert b"X-Accel-Buffering: no" in head
    assert b"Transfer-Encoding" not in head
    assert body == b"".join(b"part %d\n" % i for i in range(5))


# --- request bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_content_length_body_already_read_and_still_in_the_socket(
    sock_path: str, loop: str
) -> None:
    body = bytes(range(256)) * 400  # 102400 bytes
    with ASGIReceiver(starlette_app(), sock_path, loop=loop):
        client = hand_over(
            sock_path,
            "POST",
            "/upload",
            [("Content-Length", str(len(body)))],
            already_read=body[:3000],
        )
        client.sendall(body[3000:])
        response = read_one(client)
        client.close()
    assert response.status == 200
    assert json.loads(response.body) == {
        "size": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }


def test_chunked_body_already_read_and_in_the_socket(sock_path: str) -> None:
    app = Recorder()
    wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n" + b"4000\r\n" + b"z" * 0x4000 + b"\r\n0\r\n\r\n"
    with ASGIReceiver(app, sock_path):
        client = hand_over(
            sock_path,
            "POST",
            "/c",
            [("Transfer-Encoding", "chunked")],
            already_read=wire[:9],
        )
        client.sendall(wire[9:])
        response = read_one(client)
        client.close()
    assert response.body == b"got %d" % (11 + 0x4000)
    received = b"".join(m["body"] for m in app.messages)
    assert received == b"hello world" + b"z" * 0x4000
    assert app.messages[-1]["more_body"] is False
    assert all(m["type"] == "http.request" for m in app.messages)


@pytest.mark.parametrize("expect", ["100-continue", "foo, 100-continue"])
def test_expect_100_continue_is_answered_before_the_body_is_read(
    sock_path: str, expect: str
) -> None:
    # Expect is a list (RFC 9110 section 10.1.1): other members do not hide it.
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(
            sock_path,
            "POST",
            "/upload",
            [("Content-Length", "5"), ("Expect", expect)],
        )
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(b"hello")
        response = read_one(client)
        client.close()
    assert json.loads(response.body)["size"] == 5


def test_body_over_the_limit_gets_413(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(starlette_app(), sock_path, Options(max_body_size=1000)):
        client = hand_over(sock_path, "POST", "/upload", [("Transfer-Encoding", "chunked")])
        client.sendall(b"800\r\n" + b"a" * 0x800 + b"\r\n")
        response = read_one(client)
        assert response.status == 413
        assert response.header("connection") == "close"
        assert ResponseReader(client).closed()
        client.close()


def test_stalled_body_gets_408(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(starlette_app(), sock_path, Options(body_timeout=0.5)):
        client = hand_over(sock_path, "POST", "/upload", [("Content-Length", "100")])
        client.sendall(b"only ten b")
        response = read_one(client)
        client.close()
    assert response.status == 408


def test_malformed_chunked_body_gets_400(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(sock_path, "POST", "/upload", [("Transfer-Encoding", "chunked")])
        client.sendall(b"zz\r\nhello\r\n")
        response = read_one(client)
        client.close()
    assert response.status == 400


def test_conflicting_framing_is_refused_before_the_app(sock_path: str, no_fd_leak: None) -> None:
    app = Recorder()
    with ASGIReceiver(app, sock_path):
        client = hand_over(
            sock_path,
            "POST",
            "/x",
            [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        )
        response = read_one(client)
        client.close()
    assert response.status == 400
    assert app.scopes == []


def test_client_leaving_inside_the_body_gives_http_disconnect(
    sock_path: str, no_fd_leak: None
) -> None:
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("http only")
        while True:
            message = await receive()
            seen.append(message)
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        done.set()
        try:
            await send({"type": "http.response.start", "status": 200})
            await send({"type": "http.response.body", "body": b"late"})
        except OSError:
            seen.append({"type": "send raised OSError"})

    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "POST", "/", [("Content-Length", "1000")])
        client.sendall(b"a" * 100)
        time.sleep(0.2)
        client.close()
        assert done.wait(10)
    assert seen[0] == {"type": "http.request", "body": b"a" * 100, "more_body": True}
    assert seen[1] == {"type": "http.disconnect"}
    assert seen[2] == {"type": "send raised OSError"}


@pytest.mark.parametrize("path", ["/upload", "/raw-returns"])
def test_client_half_closing_inside_the_body_gets_400(
    sock_path: str, path: str, no_fd_leak: None
) -> None:
    """RFC 9112 section 8: an incomplete request is the client's error, whether
    the app raises on http.disconnect (Starlette) or returns without answering."""

    async def raw(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            while (await receive())["type"] != "http.disconnect":
                pass

    app = starlette_app() if path == "/upload" else raw
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "POST", path, [("Content-Length", "1000")])
        client.sendall(b"a" * 100)
        client.shutdown(socket.SHUT_WR)
        reader = ResponseReader(client)
        assert reader.read().status == 400
        assert reader.closed()
        client.close()


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_app_exception_before_the_response_gives_500(
    sock_path: str, loop: str, no_fd_leak: None, caplog: pytest.LogCaptureFixture
) -> None:
    with ASGIReceiver(starlette_app(), sock_path, loop=loop):
        client = hand_over(sock_path, "GET", "/boom")
        reader = ResponseReader(client)
        response = reader.read()
        assert reader.closed()
        client.close()
    assert response.status == 500  # Starlette's own answer, then the connection closes
    assert "RuntimeError: deliberate" in caplog.text


def test_app_exception_mid_stream_closes_the_connection(
    sock_path: str, no_fd_leak: None, caplog: pytest.LogCaptureFixture
) -> None:
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(sock_path, "GET", "/late-boom")
        data = read_all(client)
        client.close()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"first part\n" in data
    assert not data.endswith(b"0\r\n\r\n")  # no last chunk: the client can tell
    assert "deliberate, mid-stream" in caplog.text


def test_header_injection_from_the_app_is_refused(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(sock_path, "GET", "/bad-header")
        data = read_all(client)
        client.close()
    assert data.startswith(b"HTTP/1.1 500 ")
    assert b"Injected" not in data


def test_control_characters_from_the_app_are_refused(sock_path: str, no_fd_leak: None) -> None:
    # RFC 9110 section 5.5: a field value is VCHAR, obs-text, SP and HTAB.
    with ASGIReceiver(starlette_app(), sock_path):
        client = hand_over(sock_path, "GET", "/control-header")
        data = read_all(client)
        client.close()
    assert data.startswith(b"HTTP/1.1 500 ")
    assert b"\x01" not in data
    assert b"\x7f" not in data


def test_app_returning_without_a_response_gives_500(sock_path: str, no_fd_leak: None) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await receive()

    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path)
        response = read_one(client)
        client.close()
    assert response.status == 500


@pytest.mark.parametrize("split", [False, True])
def test_app_breaking_its_content_length(sock_path: str, split: bool, no_fd_leak: None) -> None:
    """Caught before anything is written: 500; after: the connection is cut."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if split:
            await send({"type": "http.response.body", "body": b"short", "more_body": True})
            await send({"type": "http.response.body", "body": b"then too long"})
        else:
            await send({"type": "http.response.body", "body": b"short"})

    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path)
        data = read_all(client)
        client.close()
    if split:
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert data.endswith(b"\r\n\r\nshort")
    else:
        assert data.startswith(b"HTTP/1.1 500 ")


# --- the client going away ------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_client_disconnect_while_streaming(sock_path: str, loop: str, no_fd_leak: None) -> None:
    """The app watching receive() gets http.disconnect; its send() then raises OSError."""
    events: list[str] = []
    finished = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("http only")
        assert (await receive())["more_body"] is False

        async def watch() -> None:
            events.append((await receive())["type"])

        watcher = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200})
        try:
            for _ in range(500):
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
                await asyncio.sleep(0.02)
                if watcher.done():
                    break
            events.append("stopped streaming")
            await send({"type": "http.response.body", "body": b"more", "more_body": True})
        except OSError:
            events.append("send raised OSError")
        finally:
            finished.set()

    with ASGIReceiver(app, sock_path, loop=loop):
        client = hand_over(sock_path)
        assert b"tick" in client.recv(4096)
        client.close()
        assert finished.wait(15)
    assert events == ["http.disconnect", "stopped streaming", "send raised OSError"]


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_then_a_reset_give_http_disconnect(
    sock_path: str, loop: str, no_fd_leak: None
) -> None:
    """A client that sends bytes (a pipelined request) and resets before they are read.

    uvloop reports the readiness event carrying the reset once and then stops
    watching the fd: reading only the bytes, the app waiting for
    http.disconnect never got it, and the connection stayed open.
    """
    events: list[str] = []
    finished = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("http only")
        assert (await receive())["more_body"] is False
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"waiting", "more_body": True})
        events.append((await receive())["type"])
        finished.set()

    with ASGIReceiver(app, sock_path, loop=loop) as receiver:
        client = hand_over(sock_path)
        assert b"waiting" in client.recv(4096)
        time.sleep(0.1)  # the app waits in receive()
        # Both arrive while the loop is busy, so one readiness event reports them.
        assert receiver.loop is not None
        receiver.loop.call_soon_threadsafe(time.sleep, 0.3)
        time.sleep(0.05)
        client.sendall(b"GET /next HTTP/1.1\r\n")
        # SO_LINGER with a zero timeout: close() sends a RST instead of a FIN.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert finished.wait(5)
    assert events == ["http.disconnect"]


def test_streaming_response_stops_when_the_client_leaves(sock_path: str, no_fd_leak: None) -> None:
    """Starlette's StreamingResponse (spec 2.4) stops at the first send after the client left."""
    closed = threading.Event()

    async def endless(request: Request) -> Response:
        async def ticks() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"tick\n" * 1000
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

        return StreamingResponse(ticks())

    app = Starlette(routes=[Route("/", endless)])
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path)
        assert client.recv(4096)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # RST
        assert closed.wait(15)


# --- slow clients -----------------------------------------------------------------------------


def big_stream_app(total: int, piece: int) -> Starlette:
    async def big(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            block = hashlib.sha256(b"seed").digest() * (piece // 32)
            for _ in range(total // piece):
                yield block

        return StreamingResponse(parts(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/", big)])


@pytest.mark.parametrize("sender", ["scgi", "payload"])
def test_big_stream_reaches_a_slow_reader(sock_path: str, sender: str) -> None:
    """30 MB through small windows; Apache's fds are O_NONBLOCK: every byte must arrive."""
    total, piece = 30 * 1024 * 1024, 1024 * 1024
    expected = hashlib.sha256(b"seed").digest() * (total // 32)
    bind = Bind(sock_path) if sender == "scgi" else Bind.parse(f"unix-seqpacket:{sock_path}")
    with ASGIReceiver(big_stream_app(total, piece), bind):
        client, server_side = tcp_pair()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        if sender == "scgi":
            headers = [
                ("CONTENT_LENGTH", "0"),
                ("SCGI", "1"),
                ("REQUEST_METHOD", "GET"),
                ("REQUEST_URI", "/"),
                ("HTTP_HOST", "x"),
            ]
            send_scgi(sock_path, headers, server_side)
        else:
            send_payload(sock_path, b"", server_side)
        client.settimeout(30)
        data = bytearray()
        while True:
            chunk = client.recv(32 * 1024)
            if not chunk:
                break
            data += chunk
            if len(data) % (4 * 1024 * 1024) < 32 * 1024:
                time.sleep(0.05)  # a slow link now and then
            if sender == "scgi" and data.endswith(b"0\r\n\r\n"):
                break
        client.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if sender == "scgi":
        assert b"Transfer-Encoding: chunked" in head
        body = dechunk(body)
    else:
        assert b"Connection: close" in head  # close-delimited: the client's version is unknown
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()


def test_client_not_reading_is_dropped_after_the_write_timeout(
    sock_path: str, no_fd_leak: None
) -> None:
    outcome: list[str] = []
    done = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("http only")
        await send({"type": "http.response.start", "status": 200})
        try:
            for _ in range(10_000):
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            outcome.append("all sent?")
        except OSError as exc:
            outcome.append(type(exc).__name__)
        finally:
            done.set()

    with ASGIReceiver(app, sock_path, Options(write_timeout=0.5)):
        client = hand_over(sock_path)  # and never read
        assert done.wait(30)
        client.close()
    assert outcome == ["ConnectionClosed"]


def test_polling_is_disconnected_while_streaming(sock_path: str, no_fd_leak: None) -> None:
    """Starlette's is_disconnected() cancels its receive() at once: the watch must survive it."""
    polls: list[bool] = []
    stopped = threading.Event()

    async def polling(request: Request) -> Response:
        async def ticks() -> AsyncIterator[bytes]:
            try:
                while True:
                    gone = await request.is_disconnected()
                    polls.append(gone)
                    if gone:
                        return
                    yield b"tick\n"
                    await asyncio.sleep(0.02)
            finally:
                stopped.set()

        return StreamingResponse(ticks())

    app = Starlette(routes=[Route("/", polling)])
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path)
        data = b""
        while data.count(b"tick") < 5:
            data += client.recv(4096)
        client.shutdown(socket.SHUT_WR)  # EOF: the client is done
        assert stopped.wait(10)
        client.close()
    assert polls[0] is False
    assert polls[-1] is True


def test_a_head_request_to_an_endless_asgi_stream_ends_when_the_client_leaves(
    sock_path: str, no_fd_leak: None
) -> None:
    """HEAD gets the head only: no write notices the client leaving, so send()
    looks, and raises once it has left (an endless StreamingResponse, curl -I)."""
    ended = threading.Event()
    raised: list[BaseException] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while True:
                await send({"type": "http.response.body", "body": b"tick", "more_body": True})
                await asyncio.sleep(0.02)
        except OSError as exc:  # the ASGI spec's "client is gone"
            raised.append(exc)
        finally:
            ended.set()

    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "HEAD", "/feed")
        reader = ResponseReader(client)
        assert reader.read(head_request=True).status == 200
        client.close()
        assert ended.wait(10), "the app still streams to a client that left"
    assert raised
