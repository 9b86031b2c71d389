"""Responses, streamed bodies and SSE: slow clients get everything, gone clients are noticed."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fdhandoff.receiver import Channel, ConnectionClosed, Handoff, Options, SSEStream
from fdhandoff.receiver.listeners import Bind
from test_receiver_support import (
    MarkerSender,
    ReceiverThread,
    dechunk,
    echo,
    front_headers,
    read_all,
    read_to_fin,
    read_until,
    send_payload,
    send_scgi,
    split_response,
    tcp_pair,
)

BIG = 50 * 1024 * 1024


def _slow_client() -> tuple[socket.socket, socket.socket]:
    client, server_side = tcp_pair()
    # Small windows on both sides so the receiver meets EAGAIN over and over.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    return client, server_side


def _read_slowly(client: socket.socket, pause_every: int = 4 * 1024 * 1024) -> bytes:
    """Read in small pieces, pausing every few MB: a client on a slow link."""
    client.settimeout(30)
    out = bytearray()
    mark = pause_every
    while True:
        data = client.recv(32 * 1024)
        if not data:
            return bytes(out)
        out += data
        if len(out) >= mark:
            time.sleep(0.2)
            mark += pause_every


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_50mb_response_reaches_a_slow_reader_over_a_nonblocking_fd(
    tmp_path: Path, loop: str, no_fd_leak: None
) -> None:
    """Apache hands over O_NONBLOCK fds; its example daemons lose data here."""
    body = hashlib.sha256(b"seed").digest() * (BIG // 32)

    async def handler(handoff: Handoff) -> None:
        await handoff.respond(200, [("Content-Type", "application/octet-stream")], body)

    path = str(tmp_path / "a.sock")
    with ReceiverThread(handler, [Bind(path, socket.SOCK_SEQPACKET)], loop=loop):
        client, server_side = _slow_client()
        send_payload(path, b"", server_side)
        status, headers, got = split_response(_read_slowly(client))
        client.close()
    assert status == 200
    assert headers["content-length"] == str(BIG)
    assert len(got) == BIG
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


def test_chunked_stream_to_slow_reader(tmp_path: Path, no_fd_leak: None) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB

    async def handler(handoff: Handoff) -> None:
        writer = await handoff.start_response(200, [("Content-Type", "text/plain")])
        for _ in range(160):  # 10 MiB
            await writer.write(piece)
        await writer.end()

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        client, server_side = _slow_client()
        send_scgi(path, front_headers(), server_side)
        status, headers, raw = split_response(_read_slowly(client, 1024 * 1024))
        client.close()
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert dechunk(raw) == piece * 160


def test_content_length_stream_and_http10_close_delimited(tmp_path: Path, no_fd_leak: None) -> None:
    async def handler(handoff: Handoff) -> None:
        length = 10 if handoff.path == "/cl" else None
        writer = await handoff.start_response(200, content_length=length)
        await writer.write(b"01234")
        await writer.write(b"56789")
        await writer.end()

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/cl"), server_side)
        status, headers, body = split_response(read_all(client))
        client.close()
        assert (status, headers["content-length"], body) == (200, "10", b"0123456789")

        client, server_side = tcp_pair()
        headers10 = [(n, "HTTP/1.0" if n == "SERVER_PROTOCOL" else v) for n, v in front_headers()]
        send_scgi(path, headers10, server_side)
        data = read_all(client)
        client.close()
        assert data.startswith(b"HTTP/1.0 200 OK\r\n")
        status, headers, body = split_response(data)
        assert "transfer-encoding" not in headers
        assert body == b"0123456789"


def test_head_request_gets_no_body(tmp_path: Path, no_fd_leak: None) -> None:
    async def handler(handoff: Handoff) -> None:
        await handoff.respond(200, [], b"hello")

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("HEAD", "/"), server_side)
        status, headers, body = split_response(read_all(client))
        client.close()
    assert (status, headers["content-length"], body) == (200, "5", b"")


async def stream_without_content(handoff: Handoff) -> None:
    """start_response() with the status in the path; writes a body regardless."""
    status = int(handoff.path.strip("/"))
    length = 4 if handoff.query_string == b"cl" else None
    writer = await handoff.start_response(status, [("X-A", "1")], content_length=length)
    await writer.write(b"body")
    await writer.end()


@pytest.mark.parametrize("target", ["/204", "/304", "/204?cl", "/304?cl", "/205", "/205?cl"])
def test_streamed_204_205_304_have_no_content(
    tmp_path: Path, target: str, no_fd_leak: None
) -> None:
    # RFC 9112 section 6.1: no Transfer-Encoding in a 204; RFC 9110 sections
    # 6.4.1, 15.3.5, 15.4.5: no content in a 204 or 304.
    path = str(tmp_path / "r.sock")
    with ReceiverThread(stream_without_content, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", target), server_side)
        data = read_all(client)
        client.close()
    status, headers, body = split_response(data)
    assert status == int(target[1:4])
    assert headers["x-a"] == "1"
    assert "transfer-encoding" not in headers
    # RFC 9110 section 15.3.6: no content in a 205 either, but RFC 9112
    # section 6.3 does not exempt it from framing: a zero length.
    assert headers.get("content-length") == ("0" if status == 205 else None)
    assert body == b""


def test_respond_refuses_content_in_a_205(tmp_path: Path, no_fd_leak: None) -> None:
    errors: list[str] = []

    async def handler(handoff: Handoff) -> None:
        if handoff.path == "/empty":
            await handoff.respond(205)
            return
        try:
            await handoff.respond(205, [], b"reset")
        except ValueError as exc:
            errors.append(str(exc))
            raise

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        answers = []
        for target in ("/empty", "/body"):
            client, server_side = tcp_pair()
            send_scgi(path, front_headers("GET", target), server_side)
            answers.append(split_response(read_all(client)))
            client.close()
    (status, headers, body), (refused, _, _) = answers
    assert (status, headers["content-length"], body) == (205, "0", b"")
    assert refused == 500
    assert errors == ["a 205 response has no body"]


_LINK = [("Link", "</a.css>; rel=preload")]
#: Each way to start an answer, with a given status.
_ANSWERS: dict[str, Callable[[Handoff, int], Awaitable[object]]] = {
    "respond": lambda handoff, status: handoff.respond(status, _LINK),
    "start_response": lambda handoff, status: handoff.start_response(status, _LINK),
    "sse": lambda handoff, status: handoff.sse(_LINK, status=status),
}


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        ("respond", 103, "respond() needs a final status, not the informational 103"),
        ("start_response", 103, "start_response() needs a final status, not the informational 103"),
        # After a 204/205/304 head a client reads no content: no event stream.
        *(
            ("sse", status, f"sse() needs a status with content, not {status}; to tell")
            for status in (101, 204, 205, 304)
        ),
    ],
)
def test_a_status_that_cannot_carry_the_answer_is_refused(
    tmp_path: Path, no_fd_leak: None, call: str, status: int, message: str
) -> None:
    errors: list[str] = []

    async def handler(handoff: Handoff) -> None:
        try:
            await _ANSWERS[call](handoff, status)
        except ValueError as exc:
            errors.append(str(exc))
            raise

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/"), server_side)
        answer, headers, _ = split_response(read_all(client))
        client.close()
    assert answer == 500  # the handler's error: nothing of the refused answer went out
    assert "link" not in headers
    assert len(errors) == 1
    assert errors[0].startswith(message)


@pytest.mark.parametrize(
    "framing",
    [("Content-Length", "5"), (b"transfer-encoding", b"chunked"), ("CONTENT-LENGTH", "9")],
)
def test_framing_set_by_the_handler_is_refused(
    tmp_path: Path, framing: tuple[str | bytes, str | bytes], no_fd_leak: None
) -> None:
    # The receiver frames every body itself; a handler's own Content-Length or
    # Transfer-Encoding would contradict it (RFC 9112 section 6), so respond()
    # raises and the client gets a clean 500 instead of a mis-framed answer.
    errors: list[str] = []

    async def handler(handoff: Handoff) -> None:
        try:
            await handoff.respond(200, [("X-A", "1"), framing], b"hello")
        except ValueError as exc:
            errors.append(str(exc))
            raise

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        for _ in range(2):  # the second time with the header names cached
            client, server_side = tcp_pair()
            send_scgi(path, front_headers("GET", "/"), server_side)
            status, headers, _ = split_response(read_all(client))
            client.close()
            assert status == 500
            assert "x-a" not in headers
    assert errors == ["Content-Length and Transfer-Encoding are set by the receiver"] * 2


_OLD_DATE = "Thu, 01 Jan 1970 00:00:00 GMT"
_CONNECTION_AND_DATE = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Date", _OLD_DATE),
    ("X-A", "1"),
]


async def connection_and_date(handoff: Handoff) -> None:
    if handoff.path == "/stream":
        writer = await handoff.start_response(200, _CONNECTION_AND_DATE)
        await writer.write(b"ok")
        await writer.end()
    elif handoff.path == "/sse":
        stream = await handoff.sse(_CONNECTION_AND_DATE)
        stream.close()
    else:
        await handoff.respond(200, _CONNECTION_AND_DATE, b"ok")


def _header_lines(data: bytes) -> list[str]:
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    return [line.partition(":")[0].lower() for line in head.split("\r\n")[1:]]


@pytest.mark.parametrize("target", ["/", "/stream", "/sse"])
def test_handler_date_wins_and_connection_fields_are_the_receivers(
    tmp_path: Path, target: str, no_fd_leak: None
) -> None:
    # RFC 9110 section 6.6.1: one Date (the handler's, as the ASGI adapter
    # keeps the app's); section 7.6.1: Connection and Keep-Alive are about
    # the connection, which ends after this answer.
    path = str(tmp_path / "r.sock")
    with ReceiverThread(connection_and_date, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", target), server_side)
        data = read_all(client)
        client.close()
    lines = _header_lines(data)
    assert lines.count("date") == 1
    assert lines.count("connection") == 1
    assert "keep-alive" not in lines
    _, headers, _ = split_response(data)
    assert (headers["date"], headers["connection"], headers["x-a"]) == (_OLD_DATE, "close", "1")


def test_client_that_never_reads_is_dropped_after_write_timeout(
    tmp_path: Path, no_fd_leak: None
) -> None:
    outcome: list[str] = []

    async def handler(handoff: Handoff) -> None:
        try:
            await handoff.respond(200, [], b"x" * (20 * 1024 * 1024))
        except ConnectionClosed as exc:
            outcome.append(str(exc))
            raise

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)], Options(write_timeout=1.0)):
        client, server_side = _slow_client()
        send_scgi(path, front_headers(), server_side)
        deadline = time.monotonic() + 20
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
    assert outcome and "write timeout" in outcome[0]


# --- SSE ------------------------------------------------------------------------------------


def test_sse_events_comments_and_retry(tmp_path: Path, no_fd_leak: None) -> None:
    async def handler(handoff: Handoff) -> None:
        stream = await handoff.sse(retry=1500)
        stream.send("line one\nline two\r\nline three", event="multi", id="7")
        stream.comment()
        stream.comment("keep-alive")
        await stream.send(b"bytes too")
        stream.close()

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        status, headers, body = split_response(read_all(client))
        client.close()
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert body == (
        b"retry: 1500\n\n"
        b"event: multi\nid: 7\ndata: line one\ndata: line two\ndata: line three\n\n"
        b":\n\n"
        b": keep-alive\n\n"
        b"data: bytes too\n\n"
    )


class Hub:
    """Handler keeping every SSE stream in a channel; no task per stream."""

    def __init__(self) -> None:
        self.channel = Channel()
        self.closed: list[SSEStream] = []
        self.handlers_done = 0

    async def __call__(self, handoff: Handoff) -> None:
        stream = await handoff.sse()
        stream.on_close = self.closed.append
        self.channel.add(stream)
        self.handlers_done += 1


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    assert predicate(), "condition not met in time"  # type: ignore[operator]


def test_sse_answers_head_with_the_head_only(tmp_path: Path, no_fd_leak: None) -> None:
    # RFC 9110 section 9.3.2: no content in the answer to HEAD, not even the
    # retry field; the stream ends once its head is written.
    channel = Channel()
    seen: list[object] = []

    async def handler(handoff: Handoff) -> None:
        stream = await handoff.sse(retry=500)
        channel.add(stream)
        seen.append(stream.closed)
        stream.send("one")  # fire and forget: goes nowhere
        try:
            await stream.send("two")
        except ConnectionClosed as exc:
            seen.append(type(exc))

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]) as runner:
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("HEAD", "/sse"), server_side)
        data = read_to_fin(client, timeout=5)  # FIN, not an open stream nor a reset
        client.close()
        assert runner.call(lambda: len(channel)) == 0
    status, headers, body = split_response(data)
    assert (status, headers["content-type"], body) == (200, "text/event-stream", b"")
    assert seen == [True, ConnectionClosed]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_channel_broadcast_and_departures(tmp_path: Path, loop: str, no_fd_leak: None) -> None:
    hub = Hub()
    path = str(tmp_path / "r.sock")
    with ReceiverThread(hub, [Bind(path)], loop=loop) as receiver:
        clients = []
        for _ in range(20):
            client, server_side = tcp_pair()
            send_scgi(path, front_headers("GET", "/events"), server_side)
            clients.append(client)
        _wait(lambda: len(hub.channel) == 20)
        for c in clients:
            read_until(c, b"\r\n\r\n")
        assert receiver.call(lambda: hub.channel.send("one", event="n")) == 20
        for c in clients:
            assert read_until(c, b"\n\n").endswith(b"event: n\ndata: one\n\n")
        # Five clients leave: their streams notice without any write.
        for c in clients[:5]:
            c.close()
        _wait(lambda: len(hub.channel) == 15 and len(hub.closed) == 5)
        assert all(s.closed for s in hub.closed)
        assert receiver.call(lambda: hub.channel.send("two")) == 15
        for c in clients[5:]:
            assert read_until(c, b"\n\n").endswith(b"data: two\n\n")
        receiver.call(hub.channel.close)
        for c in clients[5:]:
            assert read_all(c) == b""
            c.close()
    assert hub.handlers_done == 20


def test_slow_consumer_is_dropped_others_keep_receiving(tmp_path: Path, no_fd_leak: None) -> None:
    hub = Hub()
    path = str(tmp_path / "r.sock")
    options = Options(max_stream_buffer=256 * 1024)
    with ReceiverThread(hub, [Bind(path)], options) as receiver:
        stalled, server_side = _slow_client()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        reader, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        _wait(lambda: len(hub.channel) == 2)
        received = bytearray()
        stop = threading.Event()

        def drain() -> None:
            reader.settimeout(0.2)
            while not stop.is_set():
                try:
                    data = reader.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    return
                received.extend(data)

        thread = threading.Thread(target=drain)
        thread.start()
        event = "x" * 1000
        for _ in range(2000):  # 2 MB: far beyond the stalled client's windows
            receiver.call(lambda: hub.channel.send(event))
        _wait(lambda: len(hub.channel) == 1)
        assert len(hub.closed) == 1  # the stalled one was dropped
        _wait(lambda: received.count(b"data: ") == 2000, timeout=30)
        stop.set()
        thread.join()
        stalled.close()
        reader.close()


def test_one_large_write_then_small_ones_is_not_a_slow_consumer(
    tmp_path: Path, no_fd_leak: None
) -> None:
    """The cap bounds what piles up behind a client that does not read, not
    the size of one write: a 2 MiB event to a client not reading yet, then a
    heartbeat and a last event (a WebSocket pong or close frame behind a big
    message is the same case), all arrive."""
    big = "x" * (2 * 1024 * 1024)

    async def handler(handoff: Handoff) -> None:
        stream = await handoff.sse()
        stream.send(big)
        stream.comment("heartbeat")
        stream.send("end")
        stream.close()

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)], Options(max_stream_buffer=256 * 1024)):
        client, server_side = _slow_client()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        time.sleep(0.3)  # everything is queued before the client reads a byte
        client.settimeout(30)
        body = read_all(client).partition(b"\r\n\r\n")[2]
        client.close()
    assert body == b"data: " + big.encode() + b"\n\n: heartbeat\n\ndata: end\n\n"


def test_slow_consumer_cap_still_holds_after_a_large_write(
    tmp_path: Path, no_fd_leak: None
) -> None:
    """Behind that large write, small events may pile up to the cap, no more."""
    outcome: list[str] = []

    async def handler(handoff: Handoff) -> None:
        stream = await handoff.sse()
        stream.send("x" * (2 * 1024 * 1024))
        for _ in range(1000):  # 1 MB of small events behind it
            if stream.closed:
                outcome.append("dropped")
                return
            stream.send("y" * 1000)
        outcome.append("kept")

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)], Options(max_stream_buffer=256 * 1024)):
        client, server_side = _slow_client()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        _wait(lambda: outcome != [])
        client.close()
    assert outcome == ["dropped"]


def test_awaited_send_raises_once_the_client_left(tmp_path: Path, no_fd_leak: None) -> None:
    outcome: list[str] = []
    left = threading.Event()

    async def handler(handoff: Handoff) -> None:
        stream = await handoff.sse()
        await stream.send("first")
        while not left.is_set():
            await asyncio.sleep(0.02)
        try:
            for _ in range(1000):
                await stream.send("more")
                await asyncio.sleep(0.01)
        except ConnectionClosed:
            outcome.append("closed")

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        assert b"data: first" in read_until(client, b"data: first")
        client.close()
        left.set()
        _wait(lambda: outcome == ["closed"])


def test_sse_for_apache_payload_and_mod_proxy_fdpass(tmp_path: Path, no_fd_leak: None) -> None:
    async def handler(handoff: Handoff) -> None:
        stream = await handoff.sse()
        stream.send(handoff.payload or b"none")
        stream.close()

    seq = str(tmp_path / "a.sock")
    path = str(tmp_path / "b.sock")
    with ReceiverThread(handler, [Bind(seq, socket.SOCK_SEQPACKET), Bind(path)]):
        client, server_side = tcp_pair()
        send_payload(seq, b'{"prompt":"hi"}', server_side)
        assert read_all(client).endswith(b'\r\n\r\ndata: {"prompt":"hi"}\n\n')
        client.close()
        sender = MarkerSender(path)
        client, server_side = tcp_pair()
        sender.send(b"\x00", server_side)  # Apache already sent the head
        assert read_all(client) == b"data: none\n\n"
        client.close()
        sender.close()


def test_max_connections_pauses_accepting_until_one_ends(tmp_path: Path, no_fd_leak: None) -> None:
    hub = Hub()
    path = str(tmp_path / "r.sock")
    with ReceiverThread(hub, [Bind(path)], Options(max_connections=2)):
        first, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        second, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/events"), server_side)
        _wait(lambda: len(hub.channel) == 2)
        third, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/events"), server_side, wait=False)
        third.settimeout(1.0)
        with pytest.raises(TimeoutError):
            third.recv(100)  # waiting in the kernel, not refused
        first.close()
        assert read_until(third, b"\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
        _wait(lambda: len(hub.channel) == 2)
        second.close()
        third.close()


def test_max_connections_pauses_reading_a_channel(tmp_path: Path, no_fd_leak: None) -> None:
    """On a channel, --max-connections stops the reading of further handoffs
    (as it stops accepting): the third waits in the channel until one ends."""
    from fdhandoff import fdpass, scgi  # noqa: PLC0415
    from fdhandoff.message import CHANNEL_ACK  # noqa: PLC0415

    hub = Hub()
    path = str(tmp_path / "r.sock")
    with (
        ReceiverThread(hub, [Bind(path)], Options(max_connections=2)),
        socket.socket(socket.AF_UNIX) as conn,
    ):
        conn.connect(path)
        conn.settimeout(10)
        clients = []
        for _ in range(3):
            client, server_side = tcp_pair()
            message = scgi.encode(front_headers("GET", "/events", HANDOFF_CHANNEL="1"))
            fdpass.send_fd(conn, message, server_side.fileno())
            server_side.close()
            clients.append(client)
        acks = b""
        while len(acks) < 2:  # one send per flush: they may come one at a time
            more = conn.recv(2 - len(acks))
            assert more, "channel closed"
            acks += more
        assert acks == CHANNEL_ACK * 2
        _wait(lambda: len(hub.channel) == 2)
        conn.settimeout(1.0)
        with pytest.raises(TimeoutError):
            conn.recv(1)  # the third is not taken while two are live
        clients[0].close()
        conn.settimeout(10)
        assert conn.recv(1) == CHANNEL_ACK
        assert read_until(clients[2], b"\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
        for client in clients[1:]:
            client.close()


def test_channels_off_takes_one_handoff_and_closes(tmp_path: Path, no_fd_leak: None) -> None:
    """Options(channels=False) (the workers of --workers N): a channel offer is
    taken as one handoff, and the close, not an ACK, acknowledges it."""
    from fdhandoff import fdpass, scgi  # noqa: PLC0415

    hub = Hub()
    path = str(tmp_path / "r.sock")
    with (
        ReceiverThread(hub, [Bind(path)], Options(channels=False)),
        socket.socket(socket.AF_UNIX) as conn,
    ):
        conn.connect(path)
        conn.settimeout(10)
        client, server_side = tcp_pair()
        message = scgi.encode(front_headers("GET", "/events", HANDOFF_CHANNEL="1"))
        fdpass.send_fd(conn, message, server_side.fileno())
        server_side.close()
        assert conn.recv(1) == b""  # closed, no ACK
        assert read_until(client, b"\r\n\r\n").startswith(b"HTTP/1.1 200 OK")
        client.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_channel_closed_with_acknowledgements_unread_is_let_go_cleanly(
    tmp_path: Path, loop: str, no_fd_leak: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender that stops reading its acknowledgements fills the channel's
    buffer (one ACK byte per handoff); the receiver then waits to write the
    rest.  When the sender closes, that wait ends with the channel: nothing
    fires on the closed fd, and other handoffs are still served."""
    from fdhandoff import fdpass, scgi  # noqa: PLC0415

    path = str(tmp_path / "r.sock")
    message = scgi.encode(front_headers("GET", "/hello", HANDOFF_CHANNEL="1"))
    with ReceiverThread(echo, [Bind(path)], loop=loop):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            conn.settimeout(10)
            # One handoff at a time: one acknowledgement write each, until
            # the send buffer is full (a few hundred 1-byte writes).
            for _ in range(1500):
                client, server_side = socket.socketpair()
                fdpass.send_fd(conn, message, server_side.fileno())
                server_side.close()
                client.settimeout(10)
                assert read_all(client).startswith(b"HTTP/1.1 200 OK")
                client.close()
            assert unread_by(conn) == 0  # the receiver read every handoff
        time.sleep(0.3)  # the receiver sees the close
        assert _get_hello(path).startswith(b"HTTP/1.1 200 OK")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_handoffs_queued_when_the_sender_resets_the_channel_are_all_closed(
    tmp_path: Path, loop: str, no_fd_leak: None
) -> None:
    """A front that closes the channel with an acknowledgement unread resets it
    (unix(7): ECONNRESET for the peer); the handoffs it had sent are still in
    the receiver's queue with their fds.  The front gave up on them (it
    answered their clients 503, or died), so each is closed unanswered
    (test_receiver_abandoned.py), but every one of them must be read and
    closed: uvloop reports a readiness event carrying an error once and then
    stops watching the fd, and the receiver must not stop after the first of
    them and strand the others (and the connection) forever."""
    from fdhandoff import fdpass, scgi  # noqa: PLC0415
    from fdhandoff.message import CHANNEL_ACK  # noqa: PLC0415

    async def handler(handoff: Handoff) -> None:
        if handoff.path == "/block":
            time.sleep(0.5)  # holds the loop: the next handoffs queue up meanwhile
        await handoff.respond(200, [("Content-Type", "text/plain")], handoff.path.encode())

    path = str(tmp_path / "r.sock")
    with ReceiverThread(handler, [Bind(path)], loop=loop) as receiver:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(path)
        clients = []
        for target in ("/first", "/block", "/a", "/b", "/c"):
            client, server_side = tcp_pair()
            message = scgi.encode(front_headers("GET", target, HANDOFF_CHANNEL="1"))
            fdpass.send_fd(conn, message, server_side.fileno())
            server_side.close()
            clients.append((target, client))
            if target == "/first":  # its ACK stays unread: the close below resets
                assert read_all(client).endswith(b"/first")
                _wait(lambda: _pending(conn) >= 1)
                assert conn.recv(1, socket.MSG_PEEK) == CHANNEL_ACK
        conn.close()  # ACK bytes unread: a reset for the receiver
        # /block was read before the close, or not (a race): answered or
        # closed; the others were read after it, while /block held the loop.
        # read_to_fin: a client left stranded times out rather than reading b"".
        block = read_to_fin(clients[1][1], timeout=5)
        assert block == b"" or block.endswith(b"/block")
        for target, client in clients[2:]:
            assert read_to_fin(client, timeout=5) == b"", target
        for _, client in clients:
            client.close()
        _wait(lambda: receiver.receiver is not None and receiver.receiver.connections == 0)
        assert _get_hello(path).startswith(b"HTTP/1.1 200 OK")


def _pending(conn: socket.socket) -> int:
    """Bytes waiting to be read on ``conn`` (FIONREAD, unix(7))."""
    import array  # noqa: PLC0415
    import fcntl  # noqa: PLC0415
    import termios  # noqa: PLC0415

    count = array.array("i", [0])
    fcntl.ioctl(conn.fileno(), termios.FIONREAD, count)
    return count[0]


def _get_hello(path: str) -> bytes:
    client, server_side = tcp_pair()
    send_scgi(path, front_headers("GET", "/hello"), server_side)
    try:
        return read_all(client)
    finally:
        client.close()


def unread_by(conn: socket.socket) -> int:
    """Bytes we sent on ``conn`` that the peer has not read (SIOCOUTQ, unix(7))."""
    import array  # noqa: PLC0415
    import fcntl  # noqa: PLC0415
    import termios  # noqa: PLC0415

    count = array.array("i", [0])
    fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, count)
    return count[0]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_handoffs_finished_by_a_channels_first_read_all_start_at_once(
    tmp_path: Path, loop: str, split: bool, no_fd_leak: None
) -> None:
    """A channel's first description sent in two parts (a partial sendmsg,
    the fd with the first part) lets one read finish it and bring the whole
    next handoff, fd included (unix(7)).  Both are answered and acknowledged
    at once, with nothing more arriving on the channel to wake the reader."""
    from fdhandoff import fdpass, scgi  # noqa: PLC0415
    from fdhandoff.message import CHANNEL_ACK  # noqa: PLC0415

    path = str(tmp_path / "r.sock")
    first = scgi.encode(front_headers("GET", "/one", HANDOFF_CHANNEL="1"))
    second = scgi.encode(front_headers("GET", "/two", HANDOFF_CHANNEL="1"))
    one, one_server = tcp_pair()
    two, two_server = tcp_pair()
    with ReceiverThread(echo, [Bind(path)], loop=loop), socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        if split:
            fdpass.send_fd(conn, first[:10], one_server.fileno())
            conn.sendall(first[10:])
        else:
            fdpass.send_fd(conn, first, one_server.fileno())
        fdpass.send_fd(conn, second, two_server.fileno())
        one_server.close()
        two_server.close()
        assert read_all(one, timeout=3).endswith(b"GET /one 0\n")
        assert read_all(two, timeout=3).endswith(b"GET /two 0\n")
        conn.settimeout(3)
        acks = b""
        while len(acks) < 2:
            more = conn.recv(2)
            assert more, "channel closed"
            acks += more
        assert acks == CHANNEL_ACK * 2
    one.close()
    two.close()


def test_continue_with_runs_after_the_handler_in_its_task(
    tmp_path: Path, no_fd_leak: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Handoff.continue_with: the rest of a detached connection runs once the
    handler returned, in the same task; a failing one is logged; a handler
    that fails after leaving one gets its 500 and the continuation never runs."""
    path = str(tmp_path / "r.sock")
    seen: list[str] = []

    async def serve_detached(sock: socket.socket, task: asyncio.Task[Any] | None) -> None:
        seen.append("continuation")
        assert asyncio.current_task() is task  # no new task
        sock.setblocking(True)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        sock.close()
        if task is not None and task.get_name() == "fail":
            raise RuntimeError("deliberate, in the continuation")

    async def handler(handoff: Handoff) -> None:
        if handoff.path == "/late-failure":
            handoff.continue_with(serve_detached(handoff.detach(), None))
            raise RuntimeError("deliberate, after continue_with")
        task = asyncio.current_task()
        if handoff.path == "/fail" and task is not None:
            task.set_name("fail")
        handoff.continue_with(serve_detached(handoff.detach(), task))
        with pytest.raises(RuntimeError, match="already called"):
            handoff.continue_with(serve_detached(handoff.socket, task))
        seen.append("handler returns")

    with caplog.at_level(logging.ERROR), ReceiverThread(handler, [Bind(path)]):
        for target in ("/ok", "/fail"):
            client, server_side = tcp_pair()
            send_scgi(path, front_headers("GET", target), server_side)
            assert read_all(client).endswith(b"\r\n\r\nok")
            client.close()
        assert seen == ["handler returns", "continuation"] * 2
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/late-failure"), server_side)
        # The socket went with detach(): the engine cannot answer 500 on it,
        # and the continuation was closed unstarted.
        assert read_all(client) == b""
        client.close()
    assert seen == ["handler returns", "continuation"] * 2
    assert any("continuation of a handler failed" in r.message for r in caplog.records)
    assert any("handler failed" in r.message for r in caplog.records)


def _failing_after_handing_over(kind: str) -> tuple[Any, Any]:
    """Handlers (asyncio, sync) that hand the connection to a stream, then raise."""

    async def handler(handoff: Handoff) -> None:
        if kind == "sse":
            stream = await handoff.sse()
            await stream.send("first")
        else:
            await handoff.websocket()
        raise RuntimeError("deliberate, after handing over")

    def sync_handler(handoff: Any) -> None:
        if kind == "sse":
            handoff.sse().send("first")
        else:
            handoff.websocket()
        raise RuntimeError("deliberate, after handing over")

    return handler, sync_handler


@pytest.mark.parametrize("flavour", ["asyncio", "sync"])
@pytest.mark.parametrize("kind", ["sse", "websocket"])
def test_a_handler_failing_after_handing_over_ends_its_stream(
    tmp_path: Path, flavour: str, kind: str, no_fd_leak: None
) -> None:
    """Nothing feeds the stream any more: an SSE client must see the end (an
    EventSource reconnects only then), a WebSocket client a close 1011."""
    from fdhandoff.websocket import Opcode, encode_frame  # noqa: PLC0415
    from test_receiver_support import SyncReceiverThread  # noqa: PLC0415

    path = str(tmp_path / "r.sock")
    handler, sync_handler = _failing_after_handing_over(kind)
    running = (
        ReceiverThread(handler, [Bind(path)])
        if flavour == "asyncio"
        else SyncReceiverThread(sync_handler, [Bind(path)])
    )
    extra = {"HANDOFF_UPGRADED": "websocket"} if kind == "websocket" else {}
    with running:
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/s", **extra), server_side)
        data = b""
        if kind == "websocket":
            data = read_until(client, b"internal error", timeout=5)
            # The client answers the close frame (RFC 6455 section 5.5.1).
            client.sendall(encode_frame(Opcode.CLOSE, b"\x03\xf3", mask=b"abcd"))
        data += read_to_fin(client, timeout=5)
        client.close()
    if kind == "sse":
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"data: first\n\n")
    else:
        assert data.startswith(encode_frame(Opcode.CLOSE, b"\x03\xf3internal error"))  # 1011


def test_a_head_request_to_an_endless_stream_ends_when_the_client_leaves(
    tmp_path: Path, no_fd_leak: None
) -> None:
    """HEAD gets the head only, so no write would notice the client leaving:
    the writer looks, and the handler's next write raises ConnectionClosed."""
    path = str(tmp_path / "r.sock")
    ended = threading.Event()

    async def endless(handoff: Handoff) -> None:
        writer = await handoff.start_response(200, [("Content-Type", "text/plain")])
        try:
            while True:
                await writer.write(b"tick\n")
                await asyncio.sleep(0.02)
        finally:
            ended.set()

    with ReceiverThread(endless, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("HEAD", "/feed"), server_side)
        head = read_until(client, b"\r\n\r\n", timeout=5)
        assert head.startswith(b"HTTP/1.1 200")
        client.close()
        assert ended.wait(5), "the handler still writes to a client that left"
