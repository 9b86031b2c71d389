"""WebSocket on handed-off connections: the real `websockets` client, raw frames, bad clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.sync.client import connect

from fdhandoff import websocket
from fdhandoff.receiver import Channel, Handoff, Options, WebSocket
from fdhandoff.receiver import ws as ws_module
from fdhandoff.receiver.listeners import Bind
from fdhandoff.websocket import Opcode, accept_key, encode_frame
from handoff_receiver import read_exactly
from test_receiver_support import (
    MarkerSender,
    MiniFront,
    ReceiverThread,
    fd_count,
    front_headers,
    read_all,
    read_to_fin,
    read_until,
    send_payload,
    send_scgi,
    serve_process,
    split_response,
    tcp_pair,
)


async def echo(handoff: Handoff) -> None:
    ws = await handoff.websocket()
    ws.on_message = lambda ws, message: ws.send(message)


async def coroutine_echo(handoff: Handoff) -> None:
    ws = await handoff.websocket(subprotocol="chat.v1" if handoff.path == "/proto" else None)
    async for message in ws:
        await ws.send(message)
    ws.close()


async def stream_on_path(handoff: Handoff) -> None:
    """/sse: an event stream left open; anything else: a WebSocket echo."""
    if handoff.path == "/sse":
        (await handoff.sse()).send("ready")
        return
    await coroutine_echo(handoff)


def _url(front: MiniFront, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{front.port}{path}"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("handler", [echo, coroutine_echo])
def test_echo_with_the_websockets_client(
    tmp_path: Path, loop: str, handler: object, no_fd_leak: None
) -> None:
    path = str(tmp_path / "r.sock")
    receiver = ReceiverThread(handler, [Bind(path)], loop=loop)  # type: ignore[arg-type]
    with receiver, MiniFront(path) as front:
        with connect(_url(front), open_timeout=10, compression=None) as client:
            client.send("héllo")
            assert client.recv(timeout=10) == "héllo"
            client.send(b"\x00\x01binary")
            assert client.recv(timeout=10) == b"\x00\x01binary"
            big = os.urandom(300_000)
            client.send(big)
            assert client.recv(timeout=10) == big
            client.ping(b"p").wait(10)  # answered by the receiver's codec
        assert client.close_code == 1000


def test_subprotocol_is_negotiated(tmp_path: Path, no_fd_leak: None) -> None:
    path = str(tmp_path / "r.sock")
    with ReceiverThread(coroutine_echo, [Bind(path)]), MiniFront(path) as front:
        offers = ["other", "chat.v1"]
        with connect(_url(front, "/proto"), subprotocols=offers, open_timeout=10) as client:  # type: ignore[arg-type]
            assert client.subprotocol == "chat.v1"
            client.send("x")
            assert client.recv(timeout=10) == "x"


@pytest.mark.parametrize(
    ("agreed", "wanted", "warned"),
    [("chat.v1", "chat.v1", False), ("chat.v1", None, False), (None, "chat.v1", True)],
)
def test_subprotocol_agreed_by_the_front_is_the_one_in_force(
    tmp_path: Path,
    no_fd_leak: None,
    caplog: pytest.LogCaptureFixture,
    agreed: str | None,
    wanted: str | None,
    warned: bool,
) -> None:
    """After the front's 101 (HANDOFF_SUBPROTOCOL) the client knows one
    subprotocol: the WebSocket reports that one, and a handler asking for
    another is told it cannot be sent."""
    path = str(tmp_path / "r.sock")
    seen: list[str | None] = []

    async def handler(handoff: Handoff) -> None:
        ws = await handoff.websocket(subprotocol=wanted)
        seen.append(ws.subprotocol)
        ws.close()

    extra = {"HANDOFF_UPGRADED": "websocket"}
    if agreed is not None:
        extra["HANDOFF_SUBPROTOCOL"] = agreed
    with ReceiverThread(handler, [Bind(path)]), caplog.at_level(logging.WARNING):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/", **extra), server_side)
        # The client answers the handler's close frame, as RFC 6455 §5.5.1 asks.
        closing = read_exactly(client, 4)
        client.sendall(encode_frame(Opcode.CLOSE, closing[2:], mask=b"abcd"))
        read_to_fin(client)
        client.close()
    assert closing[:2] == b"\x88\x02"  # the handler's close frame, nothing before it
    assert seen == [agreed]
    assert ("cannot be sent any more" in caplog.text) is warned


class Chat:
    def __init__(self) -> None:
        self.room = Channel()

    async def __call__(self, handoff: Handoff) -> None:
        ws = await handoff.websocket()
        self.room.add(ws)
        ws.on_message = lambda ws, message: self.room.send(message)


def test_broadcast_and_one_bad_client_ends_alone(tmp_path: Path, no_fd_leak: None) -> None:
    """A frame header announcing 2^62 bytes gets 1009 and ends only that client."""
    chat = Chat()
    path = str(tmp_path / "r.sock")
    with (
        ReceiverThread(chat, [Bind(path)]) as receiver,
        MiniFront(path) as front,
        contextlib.ExitStack() as stack,
    ):
        clients = [stack.enter_context(connect(_url(front), open_timeout=10)) for _ in range(20)]
        deadline = time.monotonic() + 10
        while len(chat.room) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(chat.room) == 20
        clients[0].send("hello all")
        for c in clients:
            assert c.recv(timeout=10) == "hello all"

        bad = socket.create_connection(("127.0.0.1", front.port))
        key = base64.b64encode(os.urandom(16))
        bad.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        assert read_until(bad, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        # FIN+binary, masked, 64-bit length 2^62, mask key.
        bad.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 62) + b"abcd")
        rest = read_all(bad)
        bad.close()
        assert rest[0] == 0x88  # a close frame
        assert struct.unpack("!H", rest[2:4])[0] == 1009

        clients[5].send("still here")
        for c in clients:
            assert c.recv(timeout=10) == "still here"
        assert receiver.call(lambda: len(chat.room)) == 20
        for c in clients:
            c.close()
        deadline = time.monotonic() + 10
        while len(chat.room) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(chat.room) == 0


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (bytes([0x81, 0x05]) + b"hello", 1002),  # unmasked client frame
        (encode_frame(Opcode.TEXT, b"\xff\xfe", mask=b"abcd"), 1007),  # not UTF-8
        (encode_frame(Opcode.BINARY, b"x" * 2000, mask=b"abcd"), 1009),  # over the limit
        (bytes([0xF1, 0x80]) + b"abcd", 1002),  # RSV bits
    ],
)
def test_protocol_violations_get_their_close_code(
    tmp_path: Path, frame: bytes, code: int, no_fd_leak: None
) -> None:
    path = str(tmp_path / "r.sock")
    options = Options(max_ws_message_size=1000)
    with ReceiverThread(echo, [Bind(path)], options):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
        client.sendall(frame)
        rest = read_all(client)
        client.close()
    assert rest[0] == 0x88
    assert struct.unpack("!H", rest[2:4])[0] == code


def test_close_after_a_protocol_error_is_a_fin_not_a_reset(
    tmp_path: Path, no_fd_leak: None
) -> None:
    # Bytes the receiver never read (after the bad frame) would turn close()
    # into a reset, which can destroy the close frame in flight (RFC 1122
    # 4.2.2.13); the receiver reads them first so the connection ends with FIN.
    path = str(tmp_path / "r.sock")
    with ReceiverThread(echo, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
        client.sendall(bytes([0x81, 0x05]) + b"hello" + b"unread" * 100)
        data = read_to_fin(client)
        client.close()
    assert data[0] == 0x88
    assert struct.unpack("!H", data[2:4])[0] == 1002


def test_frames_sent_with_the_upgrade_are_not_lost(tmp_path: Path, no_fd_leak: None) -> None:
    """The fdhandoff front hands over what it read past the head; OpenResty lost it."""
    path = str(tmp_path / "r.sock")
    with ReceiverThread(echo, [Bind(path)]):
        client, server_side = tcp_pair()
        early = encode_frame(Opcode.TEXT, b"early", mask=b"wxyz")
        key = base64.b64encode(os.urandom(16)).decode()
        headers = front_headers(
            "GET",
            "/ws",
            [
                ("Host", "x"),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", key),
            ],
            early,
        )
        send_scgi(path, headers, server_side, early)
        data = read_until(client, b"early")
        client.sendall(encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"abcd"))
        data += read_all(client)
        client.close()
    head, _, frames = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols")
    assert frames.startswith(encode_frame(Opcode.TEXT, b"early"))
    assert frames.endswith(encode_frame(Opcode.CLOSE, b"\x03\xe8"))


@pytest.mark.parametrize("via", ["front-upgraded", "openresty-marker"])
def test_already_upgraded_connections(tmp_path: Path, via: str, no_fd_leak: None) -> None:
    path = str(tmp_path / "r.sock")
    with ReceiverThread(echo, [Bind(path)]):
        client, server_side = tcp_pair()
        hello = encode_frame(Opcode.TEXT, b"hi", mask=b"1234")
        if via == "front-upgraded":
            headers = front_headers("GET", "/ws", [], hello, HANDOFF_UPGRADED="websocket")
            send_scgi(path, headers, server_side, hello)
        else:
            sender = MarkerSender(path)
            sender.send(b"X", server_side)
            sender.close()
            client.sendall(hello)
        assert read_until(client, b"hi") == encode_frame(Opcode.TEXT, b"hi")  # no HTTP head
        client.sendall(encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"abcd"))
        assert read_all(client) == encode_frame(Opcode.CLOSE, b"\x03\xe8")
        client.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade")], 426),
        (
            [
                ("Host", "x"),
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "13"),
            ],
            400,
        ),
        ([("Host", "x")], 400),
    ],
)
def test_bad_upgrade_requests_are_answered(
    tmp_path: Path, headers: list[tuple[str, str]], status: int, no_fd_leak: None
) -> None:
    path = str(tmp_path / "r.sock")
    with ReceiverThread(echo, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/ws", headers), server_side)
        got, hdrs, _ = split_response(read_all(client))
        client.close()
    assert got == status
    if status == 426:
        assert hdrs["sec-websocket-version"] == "13"


def test_failing_callback_closes_with_1011(tmp_path: Path, no_fd_leak: None) -> None:
    async def handler(handoff: Handoff) -> None:
        ws = await handoff.websocket()

        def boom(ws: WebSocket, message: str | bytes) -> None:
            raise RuntimeError("application bug")

        ws.on_message = boom

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]), MiniFront(path) as front:
        with connect(_url(front), open_timeout=10) as client:
            client.send("x")
            with pytest.raises(WsClosed):
                client.recv(timeout=10)
        assert client.close_code == 1011


def test_server_close_handshake(tmp_path: Path, no_fd_leak: None) -> None:
    async def handler(handoff: Handoff) -> None:
        ws = await handoff.websocket()
        await ws.send("bye")
        ws.close(4000, "done")

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]), MiniFront(path) as front:
        with connect(_url(front), open_timeout=10) as client:
            assert client.recv(timeout=10) == "bye"
            with pytest.raises(WsClosed):
                client.recv(timeout=10)
        assert client.close_code == 4000
        assert client.close_reason == "done"


def test_apache_payload_handshake_with_the_key_from_the_payload(
    tmp_path: Path, no_fd_leak: None
) -> None:
    """mod_socket_handoff passes no request head: the application puts the key in its payload."""

    async def handler(handoff: Handoff) -> None:
        key = json.loads(handoff.payload)["key"]
        ws = await handoff.websocket(key=key)
        ws.on_message = lambda ws, message: ws.send(message)

    path = str(tmp_path / "a.sock")
    key = base64.b64encode(os.urandom(16)).decode()
    with ReceiverThread(handler, [Bind(path, socket.SOCK_SEQPACKET)]):
        client, server_side = tcp_pair()
        send_payload(path, json.dumps({"key": key}).encode(), server_side)
        head = read_until(client, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"Sec-WebSocket-Accept: " + accept_key(key.encode()) in head
        client.sendall(encode_frame(Opcode.TEXT, b"via apache", mask=b"abcd"))
        assert read_until(client, b"via apache").endswith(encode_frame(Opcode.TEXT, b"via apache"))
        client.close()


@pytest.mark.parametrize(
    "key", ["bogus", "", "dGhlIHNhbXBsZSBub25jZQ", "AAAAAAAAAAAAAAAAAAAAAAAAAA=="]
)
def test_apache_payload_key_that_is_not_base64_of_16_bytes_is_400(
    tmp_path: Path, key: str, no_fd_leak: None
) -> None:
    """RFC 6455 section 4.2.1 item 5: the key= path is held to the header's rule."""

    async def handler(handoff: Handoff) -> None:
        await handoff.websocket(key=key)

    path = str(tmp_path / "a.sock")
    with ReceiverThread(handler, [Bind(path, socket.SOCK_SEQPACKET)]):
        client, server_side = tcp_pair()
        send_payload(path, b"{}", server_side)
        status, _, body = split_response(read_all(client))
        client.close()
    assert status == 400
    assert b"is not base64 of 16 bytes" in body


def test_apache_payload_key_with_surrounding_whitespace_is_trimmed(
    tmp_path: Path, no_fd_leak: None
) -> None:
    async def handler(handoff: Handoff) -> None:
        ws = await handoff.websocket(key=" dGhlIHNhbXBsZSBub25jZQ== \t")
        ws.close()

    path = str(tmp_path / "a.sock")
    with ReceiverThread(handler, [Bind(path, socket.SOCK_SEQPACKET)]):
        client, server_side = tcp_pair()
        send_payload(path, b"{}", server_side)
        head = read_until(client, b"\r\n\r\n")
        client.close()
    # RFC 6455 section 1.3's example: the accept of the key without its OWS.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head


@pytest.mark.parametrize("expect", ["100-continue", "100-Continue"])
def test_expect_100_continue_gets_100_before_the_101(
    tmp_path: Path, expect: str, no_fd_leak: None
) -> None:
    """RFC 9110 section 7.8: Upgrade with Expect: 100-continue, a 100 (Continue) first."""
    path = str(tmp_path / "r.sock")
    headers = [
        ("Host", "x"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Expect", expect),
    ]
    with ReceiverThread(echo, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/ws", headers), server_side)
        data = read_until(client, b"Sec-WebSocket-Accept")
        client.close()
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n")


def test_a_client_that_resets_ends_with_1006(tmp_path: Path, no_fd_leak: None) -> None:
    """RFC 6455 §7.1.5: no close frame (here a TCP reset) means close code 1006."""
    ended: list[int | None] = []

    async def handler(handoff: Handoff) -> None:
        ws = await handoff.websocket()
        ws.on_close = lambda ws: ended.append(ws.close_code)
        ws.on_message = lambda ws, message: ws.send(message)

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]), MiniFront(path) as front:
        sock = socket.create_connection(("127.0.0.1", front.port))
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        # SO_LINGER with a zero timeout: close() sends a RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.02)
    assert ended == [1006]


def _open_stream(port: int, path: str) -> socket.socket:
    """A client whose WebSocket (``/ws``) or event stream (``/sse``) is open."""
    sock = socket.create_connection(("127.0.0.1", port))
    if path == "/sse":
        sock.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
        read_until(sock, b"data: ready\n\n")
    else:
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101")
    return sock


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("path", ["/ws", "/sse"])
def test_bytes_then_a_reset_end_the_stream(
    tmp_path: Path, loop: str, path: str, no_fd_leak: None
) -> None:
    """A client that sends a few bytes and resets before they are read.

    uvloop reports the readiness event carrying the reset once and then stops
    watching the fd: a stream that read only the bytes kept the connection,
    its fd and its handler until the receiver stopped.
    """
    sock_path = str(tmp_path / "r.sock")
    with (
        serve_process(
            "test_receiver_websocket:stream_on_path", [f"unix:{sock_path}"], "--loop", loop
        ) as proc,
        MiniFront(sock_path) as front,
    ):
        _open_stream(front.port, path).close()  # the process's lazily opened fds
        time.sleep(0.5)
        baseline = fd_count(proc.pid)
        for _ in range(5):
            sock = _open_stream(front.port, path)
            # Half a masked frame header, then a RST (SO_LINGER 0) right behind it.
            sock.sendall(b"\x81\x8a\x01\x02\x03")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        deadline = time.monotonic() + 5
        while fd_count(proc.pid) > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fd_count(proc.pid) <= baseline
        assert proc.poll() is None


def _upgraded_client(path: str) -> socket.socket:
    """A loopback client whose connection the front already upgraded."""
    client, server_side = tcp_pair()
    send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
    return client


def _exchange(path: str, *frames: bytes) -> bytes:
    """Send ``frames`` in one write on an upgraded connection; all the receiver sent back."""
    client = _upgraded_client(path)
    client.sendall(b"".join(frames))
    data = read_all(client)
    client.close()
    return data


@pytest.mark.parametrize("failure", ["raises", "answers nothing"])
def test_handler_failing_after_the_senders_101_closes_with_1011(
    tmp_path: Path, failure: str, no_fd_leak: None
) -> None:
    """The client reads frames after the sender's 101: no HTTP 500 for it."""

    async def handler(handoff: Handoff) -> None:
        if failure == "raises":
            raise RuntimeError("deliberate, before websocket()")

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        client = _upgraded_client(path)
        data = read_all(client)
        client.close()
    assert data == encode_frame(Opcode.CLOSE, b"\x03\xf3")  # 1011


def test_pong_for_a_ping_between_fragments_goes_before_the_echo(
    tmp_path: Path, no_fd_leak: None
) -> None:
    """The ping arrives before the message is complete, so its pong must leave
    first (Autobahn 5.6-5.8 check the order): a callback answering the message
    must not overtake the queued pong."""
    path = str(tmp_path / "r.sock")
    with ReceiverThread(echo, [Bind(path)]):
        data = _exchange(
            path,
            encode_frame(Opcode.TEXT, b"frag", fin=False, mask=b"abcd"),
            encode_frame(Opcode.PING, b"ping", mask=b"efgh"),
            encode_frame(Opcode.CONTINUATION, b"ment", mask=b"ijkl"),
            encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"mnop"),
        )
    assert data == (
        encode_frame(Opcode.PONG, b"ping")
        + encode_frame(Opcode.TEXT, b"fragment")
        + encode_frame(Opcode.CLOSE, b"\x03\xe8")
    )


@pytest.mark.parametrize("handler", [echo, coroutine_echo])
def test_messages_before_the_clients_close_are_answered(
    tmp_path: Path, handler: object, no_fd_leak: None
) -> None:
    """Autobahn 7.1.1: a message and a close frame in one write.  The message
    came first, so the application may still answer it (RFC 6455 section
    5.5.1 lets the close reply wait for the message being sent); a coroutine
    that reads it from the queue must not find the connection already gone."""
    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):  # type: ignore[arg-type]
        data = _exchange(
            path,
            encode_frame(Opcode.TEXT, b"one", mask=b"abcd"),
            encode_frame(Opcode.BINARY, b"two", mask=b"efgh"),
            encode_frame(Opcode.CLOSE, b"\x03\xe8bye", mask=b"ijkl"),
        )
    assert data == (
        encode_frame(Opcode.TEXT, b"one")
        + encode_frame(Opcode.BINARY, b"two")
        + encode_frame(Opcode.CLOSE, b"\x03\xe8")
    )


def test_close_reply_waits_for_a_callback_set_late(tmp_path: Path, no_fd_leak: None) -> None:
    """Messages queued before ``on_message`` was set are delivered (and
    answered) before the reply to a close frame that followed them."""

    async def late(handoff: Handoff) -> None:
        ws = await handoff.websocket()
        await asyncio.sleep(0.3)  # the client's frames arrive meanwhile
        ws.on_message = lambda ws, message: ws.send(message)

    path = str(tmp_path / "r.sock")
    with ReceiverThread(late, [Bind(path)]):
        data = _exchange(
            path,
            encode_frame(Opcode.TEXT, b"early", mask=b"abcd"),
            encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"efgh"),
        )
    assert data == encode_frame(Opcode.TEXT, b"early") + encode_frame(Opcode.CLOSE, b"\x03\xe8")


def test_close_reply_is_not_held_forever_by_unread_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    """An application that stops reading does not keep the client's close
    frame unanswered: the reply goes after CLOSE_TIMEOUT."""
    monkeypatch.setattr(ws_module, "CLOSE_TIMEOUT", 0.3)
    ended: list[int | None] = []

    async def reads_one(handoff: Handoff) -> None:
        ws = await handoff.websocket()
        ws.on_close = lambda ws: ended.append(ws.close_code)
        await ws.receive()  # and never again

    path = str(tmp_path / "r.sock")
    with ReceiverThread(reads_one, [Bind(path)]):
        client = _upgraded_client(path)
        client.sendall(
            encode_frame(Opcode.TEXT, b"1", mask=b"abcd")
            + encode_frame(Opcode.TEXT, b"2", mask=b"abcd")
            + encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"efgh")
        )
        started = time.monotonic()
        data = read_all(client)
        waited = time.monotonic() - started
        client.close()
    assert data == encode_frame(Opcode.CLOSE, b"\x03\xe8")
    assert 0.2 < waited < 5
    assert ended == [1000]


@pytest.mark.parametrize("handler", [echo, coroutine_echo])
def test_messages_before_a_protocol_error_are_answered(
    tmp_path: Path, handler: object, no_fd_leak: None
) -> None:
    """Autobahn 3.2, 4.1.3, 5.15: a valid message then a bad frame in one
    write.  The message was whole before the violation: it is answered, then
    the failing close frame is sent, in the coroutine style too."""
    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):  # type: ignore[arg-type]
        data = _exchange(
            path,
            encode_frame(Opcode.TEXT, b"fine", mask=b"abcd"),
            encode_frame(Opcode.TEXT, b"bad", mask=b"efgh", rsv=2),
            encode_frame(Opcode.PING, b"", mask=b"ijkl"),
        )
    assert data.startswith(encode_frame(Opcode.TEXT, b"fine") + b"\x88")
    assert struct.unpack("!H", data[8:10])[0] == 1002


@pytest.mark.parametrize("handler", [echo, coroutine_echo])
@pytest.mark.parametrize(
    ("first", "then", "code"),
    [
        # A violation: the client answers the failing close frame (section 5.5.1).
        (encode_frame(Opcode.TEXT, b"\xff", mask=b"abcd"), None, 1007),
        # The client's close, then a frame it should not send (Autobahn 7.1.3).
        (
            encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"abcd"),
            encode_frame(Opcode.PING, b"late", mask=b"efgh"),
            1000,
        ),
    ],
    ids=["answer-to-a-violation", "frame-after-the-clients-close"],
)
def test_what_the_client_sends_after_our_last_close_frame_meets_no_reset(
    tmp_path: Path,
    handler: object,
    first: bytes,
    then: bytes | None,
    code: int,
    no_fd_leak: None,
) -> None:
    """RFC 6455 section 7.1.1: the server closes the TCP connection first, so
    the FIN comes right behind our last close frame; but the socket stays
    readable until the client's FIN.  Closed outright, it answered the
    client's close reply with a reset (RFC 1122 4.2.2.13), which can destroy
    the close frame before the client read it; the client sees it as EPIPE."""
    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):  # type: ignore[arg-type]
        client = _upgraded_client(path)
        client.sendall(first)
        data = read_to_fin(client)  # the server closed first
        reply = encode_frame(Opcode.CLOSE, data[2:4], mask=b"ijkl")
        client.sendall(reply if then is None else then)
        time.sleep(0.3)
        error = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        client.close()
    assert data[:1] == b"\x88"
    assert struct.unpack("!H", data[2:4])[0] == code
    assert error == 0, os.strerror(error)


def test_a_client_that_never_closes_its_side_is_closed_after_the_linger_timeout(
    tmp_path: Path, no_fd_leak: None
) -> None:
    ended: list[float] = []

    async def handler(handoff: Handoff) -> None:
        ws = await handoff.websocket()
        ws.on_close = lambda ws: ended.append(time.monotonic())

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)], Options(linger_timeout=0.3)):
        client = _upgraded_client(path)
        client.sendall(encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"abcd"))
        assert read_to_fin(client) == encode_frame(Opcode.CLOSE, b"\x03\xe8")
        fin = time.monotonic()
        deadline = fin + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.02)
        client.close()
    assert ended
    assert 0.2 < ended[0] - fin < 5


def test_a_client_behind_in_reading_gets_every_echo_and_the_close_after_a_violation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    """The echoes and the failing close frame wait in the write backlog while
    the client, which reads nothing yet, sends more.  Those bytes must not
    reach the failed codec (it raises its violation again, from the reader
    callback), and closing once the backlog is written must not reset the
    connection: the reset destroyed everything the client had not read yet."""
    path = str(tmp_path / "r.sock")
    with ReceiverThread(echo, [Bind(path)]):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up fast
            client.connect(listener.getsockname())
            server_side, _ = listener.accept()
        send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
        client.settimeout(10)
        for _ in range(6):
            client.sendall(encode_frame(Opcode.BINARY, b"x" * 65536, mask=b"abcd"))
        client.sendall(bytes([0x81, 0x05]) + b"hello")  # unmasked: 1002
        time.sleep(0.2)
        client.sendall(b"sent after the violation" * 10)
        time.sleep(0.2)
        data = read_to_fin(client)  # a reset fails the test
        client.close()
    codec = websocket.WebSocket(client=True)
    codec.receive_data(data)
    events = []
    while (event := codec.next_event()) is not websocket.NEED_DATA:
        events.append(event)
        if isinstance(event, websocket.Close):
            break
    assert events[:6] == [websocket.Message(b"x" * 65536)] * 6
    assert isinstance(events[6], websocket.Close)
    assert events[6].code == 1002
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


#: A client's FIN right behind its last frames (``printf ... | nc -N``).
HALF_CLOSE_CASES = {
    "close": (
        [
            encode_frame(Opcode.TEXT, b"hello", mask=b"abcd"),
            encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"efgh"),
        ],
        encode_frame(Opcode.TEXT, b"hello"),  # then the close reply, 1000
    ),
    "violation": (
        [encode_frame(Opcode.TEXT, b"before", mask=b"abcd"), b"\x83\x80efgh"],  # opcode 3
        encode_frame(Opcode.TEXT, b"before"),  # then the failing close frame, 1002
    ),
}


@pytest.mark.parametrize("handler", [echo, coroutine_echo], ids=["callback", "coroutine"])
@pytest.mark.parametrize("case", HALF_CLOSE_CASES)
def test_a_fin_behind_the_clients_last_frames_loses_no_answer(
    tmp_path: Path, handler: object, case: str, no_fd_leak: None
) -> None:
    """A FIN ends only the client's sending side (RFC 9293 section 3.6): the
    messages before its close frame (or its violation) are still answered,
    and our close frame still goes (RFC 6455 sections 5.5.1, 7.1.7)."""
    frames, expected = HALF_CLOSE_CASES[case]
    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):  # type: ignore[arg-type]
        client = _upgraded_client(path)
        client.sendall(b"".join(frames))
        client.shutdown(socket.SHUT_WR)
        data = read_to_fin(client, timeout=5)
        client.close()
    assert data.startswith(expected)
    close = data[len(expected) :]
    assert close[:1] == b"\x88" and close[2:4] == (b"\x03\xe8" if case == "close" else b"\x03\xea")


def test_a_fin_behind_a_close_does_not_cut_a_large_echo(tmp_path: Path, no_fd_leak: None) -> None:
    """The echo waits in user space (the client reads slowly): the FIN that
    followed the client's close frame must not drop it, nor the close reply."""
    path = str(tmp_path / "r.sock")
    big = bytes(range(256)) * 16384  # 4 MiB
    with ReceiverThread(echo, [Bind(path)]):
        client = _upgraded_client(path)
        client.sendall(
            encode_frame(Opcode.BINARY, big, mask=b"abcd")
            + encode_frame(Opcode.CLOSE, b"\x03\xe8", mask=b"efgh")
        )
        client.shutdown(socket.SHUT_WR)
        time.sleep(0.3)  # let the receiver meet the FIN with the echo still queued
        data = read_to_fin(client, timeout=10)
        client.close()
    assert data == encode_frame(Opcode.BINARY, big) + encode_frame(Opcode.CLOSE, b"\x03\xe8")
