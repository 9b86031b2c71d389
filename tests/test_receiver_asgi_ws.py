"""ASGI adapter WebSockets: handshake by the adapter or by the sender, frames, close codes.

Clients are the ``websockets`` library (through a front that reads the head
and hands the connection over) and raw sockets with the project's client-side
codec where a test must send what no library would (bad frames).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from fdhandoff import websocket
from fdhandoff.receiver import Options
from fdhandoff.websocket import CloseCode, Opcode, encode_frame
from test_receiver_asgi_support import (
    IO_TIMEOUT,
    ASGIReceiver,
    MiniFront,
    ResponseReader,
    hand_over,
)

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "asgi.sock")


def ws_connect(url: str, **kwargs: Any) -> Any:
    return connect(url, proxy=None, open_timeout=IO_TIMEOUT, close_timeout=IO_TIMEOUT, **kwargs)


# --- apps -------------------------------------------------------------------------------------


class Events:
    """What the apps saw, for assertions from the test thread."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done = threading.Event()
        self.scopes: list[dict[str, Any]] = []


def echo_app(events: Events) -> Starlette:
    async def echo(ws: WebSocket) -> None:
        events.scopes.append(ws.scope)
        offered = ws.scope["subprotocols"]
        await ws.accept(subprotocol="echo.v1" if "echo.v1" in offered else None)
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    events.items.append(("disconnect", message["code"]))
                    return
                if message.get("text") is not None:
                    await ws.send_text(message["text"])
                else:
                    await ws.send_bytes(message["bytes"])
        finally:
            events.done.set()

    async def refuse(ws: WebSocket) -> None:
        await ws.close(code=1008)

    async def deny(ws: WebSocket) -> None:
        await ws.send_denial_response(PlainTextResponse("token required", status_code=401))

    async def crash_before(ws: WebSocket) -> None:
        raise RuntimeError("deliberate, before accept")

    async def silent(ws: WebSocket) -> None:
        return  # neither accepts nor refuses

    async def crash_after(ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()
        raise RuntimeError("deliberate, after accept")

    async def bye(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("bye")
        await ws.close(code=4000, reason="done here")

    async def headers(ws: WebSocket) -> None:
        await ws.accept(headers=[(b"x-room", b"42")])
        await ws.send_text("ok")
        await ws.receive()  # until the client leaves

    async def insist(ws: WebSocket) -> None:
        events.scopes.append(ws.scope)
        await ws.accept(subprotocol="echo.v1")  # whatever the scope says
        await ws.send_text("ok")
        await ws.receive()
        events.done.set()

    return Starlette(
        routes=[
            WebSocketRoute("/echo", echo),
            WebSocketRoute("/refuse", refuse),
            WebSocketRoute("/deny", deny),
            WebSocketRoute("/crash-before", crash_before),
            WebSocketRoute("/silent", silent),
            WebSocketRoute("/crash-after", crash_after),
            WebSocketRoute("/bye", bye),
            WebSocketRoute("/headers", headers),
            WebSocketRoute("/insist", insist),
        ]
    )


# --- with the websockets client -----------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_echo_with_the_websockets_client(sock_path: str, loop: str) -> None:
    events = Events()
    with ASGIReceiver(echo_app(events), sock_path, loop=loop), MiniFront(sock_path) as front:
        with ws_connect(front.ws_url + "/echo?room=1", subprotocols=["echo.v1"]) as ws:
            assert ws.subprotocol == "echo.v1"
            ws.send("hello")
            assert ws.recv(IO_TIMEOUT) == "hello"
            ws.send(b"\x00\x01binary")
            assert ws.recv(IO_TIMEOUT) == b"\x00\x01binary"
            big = os.urandom(300_000)
            ws.send(big)
            assert ws.recv(IO_TIMEOUT) == big
            ws.ping(b"are you there").wait(IO_TIMEOUT)  # answered by the adapter
        assert events.done.wait(IO_TIMEOUT)
    assert events.items == [("disconnect", 1000)]
    scope = events.scopes[0]
    assert scope["type"] == "websocket"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["scheme"] == "ws"
    assert scope["path"] == "/echo"
    assert scope["query_string"] == b"room=1"
    assert scope["subprotocols"] == ["echo.v1"]
    assert "websocket.http.response" in scope["extensions"]
    assert scope["extensions"]["fdhandoff"]["upgraded"] is False


def test_close_before_accept_gives_403(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(echo_app(Events()), sock_path), MiniFront(sock_path) as front:
        with pytest.raises(InvalidStatus) as caught:
            ws_connect(front.ws_url + "/refuse")
        assert caught.value.response.status_code == 403


def test_denial_response(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(echo_app(Events()), sock_path), MiniFront(sock_path) as front:
        with pytest.raises(InvalidStatus) as caught:
            ws_connect(front.ws_url + "/deny")
        assert caught.value.response.status_code == 401
        assert caught.value.response.body == b"token required"


def test_app_error_before_accept_gives_500(
    sock_path: str, no_fd_leak: None, caplog: pytest.LogCaptureFixture
) -> None:
    with ASGIReceiver(echo_app(Events()), sock_path), MiniFront(sock_path) as front:
        with pytest.raises(InvalidStatus) as caught:
            ws_connect(front.ws_url + "/crash-before")
        assert caught.value.response.status_code == 500
    assert "deliberate, before accept" in caplog.text


def test_app_error_after_accept_closes_with_1011(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(echo_app(Events()), sock_path), MiniFront(sock_path) as front:
        with ws_connect(front.ws_url + "/crash-after") as ws:
            ws.send("go")
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(IO_TIMEOUT)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1011


def test_app_closing_with_a_code_and_reason(sock_path: str, no_fd_leak: None) -> None:
    with ASGIReceiver(echo_app(Events()), sock_path), MiniFront(sock_path) as front:
        with ws_connect(front.ws_url + "/bye") as ws:
            assert ws.recv(IO_TIMEOUT) == "bye"
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(IO_TIMEOUT)
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4000, "done here")


def test_accept_with_headers(sock_path: str) -> None:
    with (
        ASGIReceiver(echo_app(Events()), sock_path),
        MiniFront(sock_path) as front,
        ws_connect(front.ws_url + "/headers") as ws,
    ):
        assert ws.response.headers["x-room"] == "42"
        assert ws.recv(IO_TIMEOUT) == "ok"


@pytest.mark.parametrize(("path", "warned"), [("/echo", False), ("/insist", True)])
def test_handshake_done_by_the_front(
    sock_path: str, caplog: pytest.LogCaptureFixture, path: str, warned: bool
) -> None:
    """HANDOFF_UPGRADED: accept writes nothing.  The scope offers only what the
    front's 101 named (here none), so an app choosing from it chooses what the
    client was told; one that insists on another is warned it cannot be sent."""
    events = Events()
    with (
        ASGIReceiver(echo_app(events), sock_path),
        MiniFront(sock_path, mode="websocket") as front,
        ws_connect(front.ws_url + path, subprotocols=["echo.v1"]) as ws,
    ):
        assert ws.subprotocol is None  # the front's 101 chose none
        if path == "/echo":
            ws.send("through the front")
            assert ws.recv(IO_TIMEOUT) == "through the front"
        else:
            assert ws.recv(IO_TIMEOUT) == "ok"
    assert events.done.wait(IO_TIMEOUT)
    scope = events.scopes[0]
    assert scope["subprotocols"] == []
    assert scope["extensions"]["fdhandoff"]["upgraded"] is True
    assert scope["extensions"]["fdhandoff"]["subprotocol"] is None
    assert "websocket.http.response" not in scope["extensions"]
    assert ("cannot be sent any more" in caplog.text) is warned


@pytest.mark.parametrize("route", ["/crash-before", "/silent", "/deny"])
def test_app_failing_before_accept_after_the_front_handshake_closes_with_1011(
    sock_path: str, route: str, no_fd_leak: None
) -> None:
    """The 101 is out: an HTTP 500 now would reach the client as frame bytes."""
    with (
        ASGIReceiver(echo_app(Events()), sock_path),
        MiniFront(sock_path, mode="websocket") as front,
        ws_connect(front.ws_url + route) as ws,
        pytest.raises(ConnectionClosed) as caught,
    ):
        ws.recv(IO_TIMEOUT)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 1011


def test_openresty_marker_handoff(sock_path: str) -> None:
    """OpenResty sends only 'X': the app sees a WebSocket scope for /."""
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            raise RuntimeError("websocket only")
        seen.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "X:" + message["text"]})

    with (
        ASGIReceiver(app, sock_path),
        MiniFront(sock_path, mode="openresty") as front,
        ws_connect(front.ws_url + "/anything") as ws,
    ):
        ws.send("hi")
        assert ws.recv(IO_TIMEOUT) == "X:hi"
    assert seen[0]["path"] == "/"
    assert seen[0]["extensions"]["fdhandoff"]["format"] == "byte"
    assert seen[0]["extensions"]["fdhandoff"]["marker"] == b"X"


def test_chat_between_two_clients(sock_path: str) -> None:
    room: set[WebSocket] = set()

    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        room.add(ws)
        try:
            async for text in ws.iter_text():
                for member in list(room):
                    await member.send_text(text)
        finally:
            room.discard(ws)

    app = Starlette(routes=[WebSocketRoute("/chat", chat)])
    with (
        ASGIReceiver(app, sock_path),
        MiniFront(sock_path) as front,
        ws_connect(front.ws_url + "/chat") as alice,
        ws_connect(front.ws_url + "/chat") as bob,
    ):
        deadline = time.monotonic() + IO_TIMEOUT
        while len(room) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        alice.send("hi bob")
        assert bob.recv(IO_TIMEOUT) == "hi bob"
        assert alice.recv(IO_TIMEOUT) == "hi bob"
        bob.send("hi alice")
        assert alice.recv(IO_TIMEOUT) == "hi alice"


# --- raw sockets: what no client library sends -------------------------------------------------

KEY = base64.b64encode(b"0123456789abcdef").decode()
UPGRADE = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
]


def client_frame(opcode: Opcode, payload: bytes) -> bytes:
    return encode_frame(opcode, payload, mask=os.urandom(4))


class RawClient:
    """A handed-over WebSocket client speaking through the project's client codec."""

    def __init__(self, path: str, target: str = "/", already_read: bytes = b"", **extra: str):
        self.sock = hand_over(path, "GET", target, UPGRADE, already_read, **extra)
        self.reader = ResponseReader(self.sock)
        self.codec = websocket.WebSocket(client=True, max_message_size=1 << 24)

    def handshake(self) -> int:
        response = self.reader.read(head_request=True)
        if response.status == 101:
            assert (
                response.header("sec-websocket-accept")
                == websocket.accept_key(KEY.encode()).decode()
            )
            if self.reader.buf:
                self.codec.receive_data(self.reader.buf)
        return response.status

    def event(self) -> Any:
        while True:
            event = self.codec.next_event()
            if event is not websocket.NEED_DATA:
                return event
            self.codec.receive_data(self.sock.recv(65536))

    def close(self) -> None:
        self.sock.close()


class EchoRecorder:
    """A bare ASGI WebSocket app: accepts, echoes, keeps what receive() returned.

    ``busy_for``: seconds spent elsewhere (not in receive()) after accepting.
    """

    def __init__(self, busy_for: float = 0.0) -> None:
        self.messages: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.busy = threading.Event()
        self.busy_for = busy_for

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            raise RuntimeError("websocket only")
        try:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            self.busy.set()
            if self.busy_for:
                await asyncio.sleep(self.busy_for)
            while True:
                message = await receive()
                self.messages.append(message)
                if message["type"] == "websocket.disconnect":
                    return
                await send({**message, "type": "websocket.send"})
        finally:
            self.done.set()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (encode_frame(Opcode.TEXT, b"unmasked"), CloseCode.PROTOCOL_ERROR),
        (client_frame(Opcode.TEXT, b"\xff\xfe not utf-8"), CloseCode.INVALID_DATA),
        (client_frame(Opcode.BINARY, b"x" * 2000), CloseCode.MESSAGE_TOO_BIG),
        (b"\x82\xff" + (1 << 62).to_bytes(8, "big") + b"mask", CloseCode.MESSAGE_TOO_BIG),
    ],
)
def test_bad_frame_closes_only_that_connection(
    sock_path: str, frame: bytes, code: int, no_fd_leak: None
) -> None:
    app = EchoRecorder()
    with ASGIReceiver(app, sock_path, Options(max_ws_message_size=1000)):
        good = RawClient(sock_path)
        bad = RawClient(sock_path)
        assert good.handshake() == 101
        assert bad.handshake() == 101
        bad.sock.sendall(frame)
        closing = bad.event()
        assert isinstance(closing, websocket.Close)
        assert closing.code == code
        assert bad.sock.recv(10) == b""  # and the connection is closed
        bad.close()
        # The other client goes on as if nothing happened.
        good.sock.sendall(client_frame(Opcode.TEXT, b"still here"))
        assert good.event() == websocket.Message("still here")
        good.sock.sendall(client_frame(Opcode.CLOSE, CloseCode.NORMAL.to_bytes(2, "big")))
        assert isinstance(good.event(), websocket.Close)
        good.close()
        assert app.done.wait(IO_TIMEOUT)
    disconnects = [m for m in app.messages if m["type"] == "websocket.disconnect"]
    assert sorted(m["code"] for m in disconnects) == sorted([int(code), 1000])


def test_frames_sent_with_the_upgrade_request_are_kept(sock_path: str, no_fd_leak: None) -> None:
    """Frames that arrived with the head (read by the sender, or still in the socket)."""
    app = EchoRecorder()
    early = client_frame(Opcode.TEXT, b"first") + client_frame(Opcode.TEXT, b"second")
    with ASGIReceiver(app, sock_path):
        client = RawClient(sock_path, already_read=early[:9])
        client.sock.sendall(early[9:])
        assert client.handshake() == 101
        assert client.event() == websocket.Message("first")
        assert client.event() == websocket.Message("second")
        client.sock.sendall(client_frame(Opcode.CLOSE, b""))
        assert isinstance(client.event(), websocket.Close)
        client.close()
        assert app.done.wait(IO_TIMEOUT)
    assert [m.get("text") for m in app.messages[:2]] == ["first", "second"]
    assert app.messages[-1] == {"type": "websocket.disconnect", "code": 1005, "reason": ""}


def test_expect_100_continue_gets_100_before_the_101(sock_path: str, no_fd_leak: None) -> None:
    """RFC 9110 section 7.8: a server receiving Upgrade and Expect: 100-continue
    MUST send 100 (Continue) before the 101."""
    app = EchoRecorder()
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "GET", "/", [*UPGRADE, ("Expect", "100-continue")])
        reader = ResponseReader(client)
        interim = reader.read(head_request=True)
        assert interim.status == 100
        assert reader.read(head_request=True).status == 101
        codec = websocket.WebSocket(client=True)
        client.sendall(client_frame(Opcode.TEXT, b"hi"))
        if reader.buf:
            codec.receive_data(reader.buf)
        while (event := codec.next_event()) is websocket.NEED_DATA:
            codec.receive_data(client.recv(65536))
        assert event == websocket.Message("hi")
        client.close()
        assert app.done.wait(IO_TIMEOUT)


def test_client_vanishing_gives_1006(sock_path: str, no_fd_leak: None) -> None:
    app = EchoRecorder()
    with ASGIReceiver(app, sock_path):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        client.close()
        assert app.done.wait(IO_TIMEOUT)
    assert app.messages == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]


def test_app_reading_after_its_close_stops_waiting_for_a_silent_client(
    sock_path: str, no_fd_leak: None
) -> None:
    """An app that closes and reads on (the usual receive loop) gets 1006 once
    the client has not answered the close frame in time; the connection ends."""
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            raise RuntimeError("websocket only")
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4000})
        seen.append(await receive())
        done.set()

    with ASGIReceiver(app, sock_path, Options(linger_timeout=0.5), lifespan=False):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        assert client.event() == websocket.Close(4000, "")
        # The client keeps the connection open and never answers.
        assert done.wait(IO_TIMEOUT)
        assert client.sock.recv(10) == b""
        client.close()
    assert seen == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]


def test_fragmented_message_and_ping_between_fragments(sock_path: str) -> None:
    app = EchoRecorder()
    with ASGIReceiver(app, sock_path):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        mask = os.urandom(4)
        client.sock.sendall(
            encode_frame(Opcode.TEXT, b"frag", fin=False, mask=mask)
            + client_frame(Opcode.PING, b"p")
            + encode_frame(Opcode.CONTINUATION, b"mented", mask=mask)
        )
        assert client.event() == websocket.Pong(b"p")
        assert client.event() == websocket.Message("fragmented")
        client.close()
        assert app.done.wait(IO_TIMEOUT)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("Sec-WebSocket-Version", "8")], 426),
        ([("Sec-WebSocket-Key", "short")], 400),
    ],
)
def test_bad_handshake_is_refused_before_the_app(
    sock_path: str, headers: list[tuple[str, str]], status: int, no_fd_leak: None
) -> None:
    app = EchoRecorder()
    replaced = dict(UPGRADE)
    replaced.update(headers)
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "GET", "/", list(replaced.items()))
        response = ResponseReader(client).read()
        client.close()
    assert response.status == status
    if status == 426:
        assert response.header("sec-websocket-version") == "13"
    assert app.messages == []


@pytest.mark.parametrize("kept_alive", [False, True])
@pytest.mark.parametrize(
    ("framing", "content"),
    [
        (("Content-Length", "5"), b"hello"),
        (("Transfer-Encoding", "chunked"), b"5\r\nhello\r\n0\r\n\r\n"),
    ],
)
def test_upgrade_request_with_content_is_400(
    sock_path: str,
    no_fd_leak: None,
    kept_alive: bool,
    framing: tuple[str, str],
    content: bytes,
) -> None:
    """RFC 9110 §7.8, §9.3.1: the client's content is HTTP, not the first
    WebSocket frames (as it was read once the 101 had gone): the upgrade is
    refused, on a handed-off request and on a later one alike."""
    scopes: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return  # none: the adapter goes on without it
        scopes.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body"})
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})

    with ASGIReceiver(app, sock_path, lifespan=False):
        if kept_alive:
            client = hand_over(sock_path, "GET", "/page")
            reader = ResponseReader(client)
            assert reader.read().status == 204
            head = "".join(f"{name}: {value}\r\n" for name, value in [*UPGRADE, framing])
            client.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n" + head.encode() + b"\r\n")
        else:
            client = hand_over(sock_path, "GET", "/live", [*UPGRADE, framing])
            reader = ResponseReader(client)
        client.sendall(content)
        response = reader.read()
        assert reader.closed()
        client.close()
    assert response.status == 400
    assert b"upgrade request with content" in response.body
    assert scopes == (["http"] if kept_alive else [])


def test_wss_scheme_and_upgrade_after_a_kept_alive_request(sock_path: str) -> None:
    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body"})
            return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})

    with ASGIReceiver(app, sock_path, lifespan=False):
        client = hand_over(sock_path, "GET", "/page", HTTPS="on")
        reader = ResponseReader(client)
        assert reader.read().status == 204
        client.sendall(
            b"GET /live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert reader.read(head_request=True).status == 101
        codec = websocket.WebSocket(client=True)
        if reader.buf:
            codec.receive_data(reader.buf)
        while (event := codec.next_event()) is websocket.NEED_DATA:
            codec.receive_data(client.recv(100))
        assert event == websocket.Close(1000, "")
        client.close()
    scopes = [s for s in scopes if s["type"] != "lifespan"]
    assert [s["type"] for s in scopes] == ["http", "websocket"]
    assert scopes[1]["scheme"] == "wss"
    assert scopes[1]["path"] == "/live"


def test_shutdown_closes_open_websockets_with_1001(sock_path: str) -> None:
    app = EchoRecorder()
    receiver = ASGIReceiver(app, sock_path, Options(grace=0.2)).start()
    try:
        client = RawClient(sock_path)
        assert client.handshake() == 101
    finally:
        receiver.stop()
    event = client.event()
    client.close()
    assert event == websocket.Close(1001, "")


def test_slow_reader_gets_every_message(sock_path: str) -> None:
    """Writes wait for the kernel: nothing is lost, pongs go between whole messages."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            raise RuntimeError("websocket only")
        await receive()
        await send({"type": "websocket.accept"})

        async def pinged() -> None:
            while (await receive())["type"] != "websocket.disconnect":
                pass

        reader = asyncio.ensure_future(pinged())
        for i in range(200):
            await send({"type": "websocket.send", "bytes": bytes([i]) * 100_000})
        await send({"type": "websocket.send", "text": "end"})
        await reader

    with ASGIReceiver(app, sock_path, lifespan=False):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        for _ in range(20):
            client.sock.sendall(client_frame(Opcode.PING, b"x"))
        time.sleep(0.5)  # not reading: the receiver's writes wait for the kernel
        got: list[bytes] = []
        pongs = 0
        ended = False
        while not ended or pongs < 20:
            event = client.event()
            if isinstance(event, websocket.Pong):
                pongs += 1
            elif event == websocket.Message("end"):
                ended = True
            else:
                assert isinstance(event, websocket.Message)
                got.append(event.data)  # type: ignore[arg-type]
        client.sock.sendall(client_frame(Opcode.CLOSE, b""))
        assert isinstance(client.event(), websocket.Close)
        client.close()
    assert pongs == 20
    assert [m[:1] for m in got] == [bytes([i]) for i in range(200)]
    assert all(m == m[:1] * 100_000 for m in got)


def test_close_after_a_protocol_error_is_a_fin_not_a_reset(
    sock_path: str, no_fd_leak: None
) -> None:
    """Client bytes the adapter never read (past the bad frame, more than one
    read) would turn close() into a reset, which can destroy the close frame
    in flight (RFC 1122 4.2.2.13, RFC 6455 section 7.1.1); they are read and
    dropped first so that the connection ends with FIN, as on the native path."""
    app = EchoRecorder()
    with ASGIReceiver(app, sock_path):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        client.sock.sendall(encode_frame(Opcode.TEXT, b"unmasked") + b"unread" * 25_000)
        data = b""
        while chunk := client.sock.recv(65536):  # ConnectionResetError fails the test
            data += chunk
        client.close()
        assert app.done.wait(IO_TIMEOUT)
    assert data[:1] == b"\x88"
    assert int.from_bytes(data[2:4], "big") == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("first", "then", "code"),
    [
        # A violation: the client answers the failing close frame (section 5.5.1).
        (client_frame(Opcode.TEXT, b"\xff"), None, CloseCode.INVALID_DATA),
        # The client's close, then a frame it should not send (Autobahn 7.1.3).
        (
            client_frame(Opcode.CLOSE, CloseCode.NORMAL.to_bytes(2, "big")),
            client_frame(Opcode.PING, b"late"),
            CloseCode.NORMAL,
        ),
    ],
    ids=["answer-to-a-violation", "frame-after-the-clients-close"],
)
def test_what_the_client_sends_after_our_last_close_frame_meets_no_reset(
    sock_path: str, first: bytes, then: bytes | None, code: int, no_fd_leak: None
) -> None:
    """RFC 6455 section 7.1.1: the server closes the TCP connection first (FIN
    right behind our last close frame), but reads on until the client's FIN.
    Closed outright, the socket answered the client's close reply with a
    reset (RFC 1122 4.2.2.13) that can destroy the close frame before the
    client read it; the client sees it as EPIPE."""
    app = EchoRecorder()
    with ASGIReceiver(app, sock_path):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        client.sock.sendall(first)
        data = b""
        while chunk := client.sock.recv(65536):  # the server closed first
            data += chunk
        client.sock.sendall(client_frame(Opcode.CLOSE, data[2:4]) if then is None else then)
        time.sleep(0.3)
        error = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        client.close()
        assert app.done.wait(IO_TIMEOUT)
    assert data[:1] == b"\x88"
    assert int.from_bytes(data[2:4], "big") == code
    assert error == 0, os.strerror(error)


# --- while the app is not in receive() ---------------------------------------------------------


class Pusher:
    """A push feed: accepts, then only sends (never awaits receive()) until send fails."""

    def __init__(self) -> None:
        self.sent = 0
        self.ended: BaseException | None = None
        self.done = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            for n in range(200):
                await send({"type": "websocket.send", "text": f"tick {n}"})
                self.sent += 1
                await asyncio.sleep(0.05)
        except Exception as exc:  # the server's "client is gone" (ASGI spec: an OSError)
            self.ended = exc
        finally:
            self.done.set()


@pytest.mark.parametrize("loop", LOOPS)
def test_an_app_that_only_sends_still_answers_pings_and_the_close(
    sock_path: str, loop: str, no_fd_leak: None
) -> None:
    """RFC 6455 sections 5.5.2 and 5.5.1: a Pong for each Ping, a close frame for
    the client's, as soon as practical, even when the app never calls receive()."""
    app = Pusher()
    with ASGIReceiver(app, sock_path, loop=loop):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        client.sock.sendall(client_frame(Opcode.PING, b"are you there"))
        while isinstance(event := client.event(), websocket.Message):
            pass  # ticks sent before the pong
        assert event == websocket.Pong(b"are you there")
        client.sock.sendall(client_frame(Opcode.CLOSE, CloseCode.NORMAL.to_bytes(2, "big")))
        while isinstance(event := client.event(), websocket.Message):
            pass
        assert event == websocket.Close(CloseCode.NORMAL, "")
        assert client.sock.recv(10) == b""
        client.close()
        assert app.done.wait(IO_TIMEOUT)
    assert app.ended is not None  # its next send after the close failed


@pytest.mark.parametrize("count", [2, 40], ids=["few", "over-the-held-limit"])
def test_messages_read_while_the_app_was_busy_are_all_answered_before_the_close(
    sock_path: str, count: int, no_fd_leak: None
) -> None:
    """Messages, then the client's close frame, while the app is elsewhere: the
    messages are held for receive() (beyond HELD_LIMIT reading pauses), the
    close reply waits until the app has read and answered them."""
    app = EchoRecorder(busy_for=0.5)
    with ASGIReceiver(app, sock_path):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        assert app.busy.wait(IO_TIMEOUT)
        frames = [client_frame(Opcode.TEXT, b"m%d" % n) for n in range(count)]
        client.sock.sendall(b"".join(frames))
        client.sock.sendall(client_frame(Opcode.CLOSE, CloseCode.NORMAL.to_bytes(2, "big")))
        echoes = [client.event() for _ in range(count)]
        assert echoes == [websocket.Message(f"m{n}") for n in range(count)]
        assert client.event() == websocket.Close(CloseCode.NORMAL, "")
        client.close()
        assert app.done.wait(IO_TIMEOUT)
    assert app.messages[-1] == {"type": "websocket.disconnect", "code": 1000, "reason": ""}


def test_a_close_held_behind_messages_is_answered_when_the_app_never_reads(
    sock_path: str, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    import fdhandoff.receiver.asgi_ws as asgi_ws  # noqa: PLC0415

    monkeypatch.setattr(asgi_ws, "CLOSE_TIMEOUT", 0.3)
    app = Pusher()
    with ASGIReceiver(app, sock_path):
        client = RawClient(sock_path)
        assert client.handshake() == 101
        client.sock.sendall(client_frame(Opcode.TEXT, b"unread"))
        client.sock.sendall(client_frame(Opcode.CLOSE, CloseCode.NORMAL.to_bytes(2, "big")))
        started = time.monotonic()
        while isinstance(event := client.event(), websocket.Message):
            pass
        assert event == websocket.Close(CloseCode.NORMAL, "")
        assert 0.2 < time.monotonic() - started < IO_TIMEOUT
        client.close()
        assert app.done.wait(IO_TIMEOUT)
