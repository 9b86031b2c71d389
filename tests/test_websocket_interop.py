"""The WebSocket codec against the real `websockets` library: its sans-IO protocol
objects both ways, then its asyncio client over a real 127.0.0.1 socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator

import httptools
import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.protocol import Protocol
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from fdhandoff.errors import ProtocolError
from fdhandoff.websocket import (
    NEED_DATA,
    Close,
    Event,
    Message,
    Ping,
    Pong,
    State,
    WebSocket,
    WebSocketProtocolError,
    check_upgrade,
    error_response,
    handshake_response,
    parse_subprotocols,
)

BIG = os.urandom(300_000)


def drain(ws: WebSocket) -> list[Event]:
    events: list[Event] = []
    while (event := ws.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        events.append(event)
    return events


def feed_in_chunks(ws: WebSocket, data: bytes, size: int) -> list[Event]:
    events: list[Event] = []
    for start in range(0, len(data), size):
        ws.receive_data(data[start : start + size])
        events += drain(ws)
    return events


def ws_client() -> ClientProtocol:
    return ClientProtocol(parse_uri("ws://127.0.0.1/"), state=WsState.OPEN, max_size=None)


def ws_server() -> ServerProtocol:
    return ServerProtocol(state=WsState.OPEN, max_size=None)


def sent(protocol: Protocol) -> bytes:
    return b"".join(protocol.data_to_send())


def frames(protocol: Protocol, data: bytes) -> list[tuple[WsOpcode, bytes, bool]]:
    protocol.receive_data(data)
    events = protocol.events_received()
    assert all(isinstance(e, Frame) for e in events)
    return [(e.opcode, bytes(e.data), e.fin) for e in events]  # type: ignore[union-attr]


def send_mixed(peer: Protocol) -> list[Event]:
    """Make the websockets peer send a mix of frames; return the events they mean."""
    peer.send_text("héllo".encode())
    peer.send_binary(BIG)
    peer.send_text(b"frag", fin=False)
    peer.send_ping(b"between")
    peer.send_continuation("mënt".encode(), fin=False)
    peer.send_continuation(b"", fin=True)
    peer.send_binary(b"")
    peer.send_close(1000, "bye")
    return [
        Message("héllo"),
        Message(BIG),
        Ping(b"between"),
        Message("fragmënt"),
        Message(b""),
        Close(1000, "bye"),
    ]


@pytest.mark.parametrize("chunk", [1 << 30, 4096, 7, 1])
def test_websockets_client_to_our_server(chunk: int) -> None:
    peer = ws_client()
    expected = send_mixed(peer)
    data = sent(peer)
    server = WebSocket()
    if chunk == 1:  # byte by byte, except inside the big payload
        head, middle, tail = data[:2000], data[2000:-200], data[-200:]
        events = feed_in_chunks(server, head, 1)
        events += feed_in_chunks(server, middle, len(middle))
        events += feed_in_chunks(server, tail, 1)
    else:
        events = feed_in_chunks(server, data, chunk)
    assert events == expected
    assert server.state is State.CLOSED
    # our automatic replies are what websockets expects: the pong, then the close
    assert frames(peer, server.data_to_send()) == [
        (WsOpcode.PONG, b"between", True),
        (WsOpcode.CLOSE, b"\x03\xe8", True),
    ]
    assert peer.close_rcvd is not None
    assert peer.close_rcvd.code == 1000


def test_our_client_to_websockets_server() -> None:
    client = WebSocket(client=True)
    peer = ws_server()
    data = (
        client.send_message("héllo")
        + client.send_message(BIG)
        + client.send_ping(b"p")
        + client.send_close(1001, "going")
    )
    assert frames(peer, data) == [
        (WsOpcode.TEXT, "héllo".encode(), True),
        (WsOpcode.BINARY, BIG, True),
        (WsOpcode.PING, b"p", True),
        (WsOpcode.CLOSE, b"\x03\xe9going", True),
    ]
    assert peer.state is WsState.CLOSING
    # its pong and close reply come back through our client
    client.receive_data(sent(peer))
    assert drain(client) == [Pong(b"p"), Close(1001, "going")]  # websockets echoes the reason
    assert client.state is State.CLOSED


def test_websockets_server_to_our_client() -> None:
    peer = ws_server()
    expected = send_mixed(peer)
    client = WebSocket(client=True)
    assert feed_in_chunks(client, sent(peer), 1000) == expected
    assert frames(peer, client.data_to_send()) == [
        (WsOpcode.PONG, b"between", True),
        (WsOpcode.CLOSE, b"\x03\xe8", True),
    ]


def test_our_server_to_websockets_client() -> None:
    server = WebSocket()
    peer = ws_client()
    data = (
        server.send_message("tëxt")
        + server.send_message(BIG)
        + server.send_pong(b"unsolicited")
        + server.send_close(1012, "restart")
    )
    assert frames(peer, data) == [
        (WsOpcode.TEXT, "tëxt".encode(), True),
        (WsOpcode.BINARY, BIG, True),
        (WsOpcode.PONG, b"unsolicited", True),
        (WsOpcode.CLOSE, b"\x03\xf4restart", True),
    ]
    server.receive_data(sent(peer))
    assert drain(server) == [Close(1012, "restart")]


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda p: p.send_text(b"\xff\xfe not utf-8"), 1007),
        (lambda p: p.send_binary(bytes(1024 * 1024 + 1)), 1009),
        (lambda p: p.send_frame(Frame(WsOpcode.CONT, b"x")), 1002),
    ],
)
def test_violations_reach_websockets_as_close_codes(send: object, code: int) -> None:
    peer = ws_client()
    send(peer)  # type: ignore[operator]
    server = WebSocket()
    server.receive_data(sent(peer))
    with pytest.raises(WebSocketProtocolError) as info:
        drain(server)
    assert info.value.close_code == code
    peer.receive_data(server.data_to_send())
    peer.events_received()
    assert peer.close_rcvd is not None
    assert peer.close_rcvd.code == code


# --- real sockets: the websockets asyncio client against a codec-driven server ----------------


def parse_head(raw: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    class Sink:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    sink = Sink()
    parser = httptools.HttpRequestParser(sink)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(raw)
    return parser.get_method(), parser.get_http_version().encode(), sink.headers


async def echo_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upgrade, then echo every message; the way a receiver drives the codec."""
    try:
        method, version, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        try:
            key = check_upgrade(method, version, headers)
        except ProtocolError as exc:
            writer.write(error_response(exc))
            return
        offered = parse_subprotocols(headers)
        writer.write(handshake_response(key, subprotocol=b"chat" if b"chat" in offered else None))
        ws = WebSocket()
        while ws.state is not State.CLOSED:
            data = await reader.read(65536)
            ws.receive_data(data)
            try:
                while (event := ws.next_event()) is not NEED_DATA:
                    if isinstance(event, Message) and ws.state is State.OPEN:
                        writer.write(ws.send_message(event.data))
            except ProtocolError:
                pass  # the close frame is in data_to_send()
            writer.write(ws.data_to_send())
            await writer.drain()
            if ws.error is not None or not data:
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    server = await asyncio.start_server(echo_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/chat"
    finally:
        server.close()
        await server.wait_closed()


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_fd_leak")
def test_real_websockets_client_echo_fragments_ping_close() -> None:
    async def main() -> None:
        async with echo_server() as uri:
            async with connect(uri, subprotocols=[Subprotocol("chat")], proxy=None) as conn:
                assert conn.subprotocol == "chat"
                await conn.send("héllo")
                assert await conn.recv() == "héllo"
                await conn.send(BIG)
                assert await conn.recv() == BIG
                await conn.send(["frag", "mënt", "ed"])  # an iterable is sent as fragments
                assert await conn.recv() == "fragmënted"
                latency = await asyncio.wait_for(await conn.ping(b"probe"), 30)
                assert latency >= 0
                await conn.close(1001, "leaving")
            assert conn.close_code == 1001

    run(main())


@pytest.mark.usefixtures("no_fd_leak")
def test_real_websockets_client_gets_1009_for_oversized_message() -> None:
    async def main() -> None:
        async with echo_server() as uri:
            async with connect(uri, proxy=None, max_size=None) as conn:
                await conn.send(bytes(1024 * 1024 + 1))
                with pytest.raises(ConnectionClosedError) as info:
                    await conn.recv()
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1009

    run(main())


@pytest.mark.usefixtures("no_fd_leak")
def test_real_websockets_client_gets_400_for_a_second_version_header() -> None:
    async def main() -> None:
        async with echo_server() as uri:
            with pytest.raises(InvalidStatus) as info:
                async with connect(
                    uri, proxy=None, additional_headers={"Sec-WebSocket-Version": "8"}
                ):
                    pass
            response = info.value.response
            assert response.status_code == 400
            assert b"more than one Sec-WebSocket-Version" in response.body

    run(main())


@pytest.mark.usefixtures("no_fd_leak")
def test_old_version_gets_426_naming_13_over_a_socket() -> None:
    async def main() -> None:
        async with echo_server() as uri:

            def request() -> bytes:
                with raw_connection(uri) as sock:
                    sock.sendall(UPGRADE.replace(b"Version: 13", b"Version: 8"))
                    return read_until_eof(sock)

            reply = await asyncio.get_running_loop().run_in_executor(None, request)
        lines = reply.partition(b"\r\n\r\n")[0].split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 426 Upgrade Required"
        assert b"Sec-WebSocket-Version: 13" in lines

    run(main())


@contextlib.contextmanager
def raw_connection(uri: str) -> Iterator[socket.socket]:
    host, port = uri.removeprefix("ws://").split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    try:
        yield sock
    finally:
        sock.close()


UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def read_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.usefixtures("no_fd_leak")
def test_huge_header_in_the_upgrade_segment_is_refused_and_nothing_else_breaks() -> None:
    # The 2^62-byte header that took the Go daemon down, sent in the same
    # segment as the upgrade request: the connection gets 1009, a second
    # connection opened meanwhile keeps working.
    async def main() -> None:
        async with echo_server() as uri:
            loop = asyncio.get_running_loop()
            async with connect(uri, proxy=None) as other:

                def attack() -> bytes:
                    with raw_connection(uri) as sock:
                        sock.sendall(UPGRADE + b"\x82\xff" + (1 << 62).to_bytes(8, "big"))
                        return read_until_eof(sock)

                reply = await loop.run_in_executor(None, attack)
                await other.send("still here")
                assert await other.recv() == "still here"
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        client = WebSocket(client=True)
        client.receive_data(rest)
        (close,) = drain(client)
        assert isinstance(close, Close)
        assert close.code == 1009

    run(main())


@pytest.mark.usefixtures("no_fd_leak")
def test_frames_sent_with_the_upgrade_request_are_not_lost() -> None:
    async def main() -> None:
        async with echo_server() as uri:
            client = WebSocket(client=True)
            first = client.send_message("early") + client.send_close()

            def exchange() -> bytes:
                with raw_connection(uri) as sock:
                    sock.sendall(UPGRADE + first)
                    return read_until_eof(sock)

            reply = await asyncio.get_running_loop().run_in_executor(None, exchange)
            _, _, rest = reply.partition(b"\r\n\r\n")
            client.receive_data(rest)
            assert drain(client) == [Message("early"), Close(1000, "")]

    run(main())
