"""The sync flavour: same names, blocking calls, one thread per connection."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed as WsClosed
from websockets.sync.client import connect

from fdhandoff import scgi
from fdhandoff.receiver import Options
from fdhandoff.receiver.listeners import Bind
from fdhandoff.receiver.sync import Channel, ConnectionClosed, Handoff, WebSocket
from fdhandoff.receiver.sync import engine as sync_engine
from fdhandoff.receiver.sync.streams import recv_within
from fdhandoff.websocket import Opcode, encode_frame
from handoff_receiver import read_exactly
from test_receiver_support import (
    MiniFront,
    SyncReceiverThread,
    front_headers,
    read_all,
    read_to_fin,
    read_until,
    send_payload,
    send_scgi,
    split_response,
    tcp_pair,
)


def echo(handoff: Handoff) -> None:
    if handoff.path == "/raise":
        raise RuntimeError("boom")
    body = handoff.read_body()
    answer = f"{handoff.format.value} ".encode() + body
    handoff.respond(200, [("Content-Type", "text/plain")], answer)


def test_respond_and_body_in_every_format(tmp_path: Path, no_fd_leak: None) -> None:
    path = str(tmp_path / "r.sock")
    seq = str(tmp_path / "a.sock")
    with SyncReceiverThread(echo, [Bind(path), Bind(seq, socket.SOCK_SEQPACKET)]):
        client, server_side = tcp_pair()
        headers = front_headers("POST", "/p", [("Content-Length", "10")], b"01234")
        send_scgi(path, headers, server_side, b"01234")
        client.sendall(b"56789")
        assert split_response(read_all(client))[2] == b"scgi 0123456789"
        client.close()

        client, server_side = tcp_pair()
        send_payload(seq, b'{"x":1}', server_side)
        assert split_response(read_all(client))[2] == b"payload "
        client.close()

        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            request = [("SCGI", "1"), ("REQUEST_METHOD", "POST"), ("REQUEST_URI", "/")]
            conn.sendall(scgi.encode(request, b"abc"))
            answer = read_all(conn)
        assert answer.startswith(b"Status: 200 OK\r\n")
        assert answer.endswith(b"plain-scgi abc")

        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/raise"), server_side)
        assert split_response(read_all(client))[0] == 500
        client.close()


def test_big_response_to_a_slow_reader(tmp_path: Path, no_fd_leak: None) -> None:
    body = hashlib.sha256(b"x").digest() * (20 * 1024 * 1024 // 32)

    def handler(handoff: Handoff) -> None:
        handoff.respond(200, [], body)

    path = str(tmp_path / "a.sock")
    with SyncReceiverThread(handler, [Bind(path, socket.SOCK_SEQPACKET)]):
        client, server_side = tcp_pair()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        send_payload(path, b"", server_side)  # O_NONBLOCK fd, as Apache passes it
        client.settimeout(30)
        got = bytearray()
        while data := client.recv(32 * 1024):
            got += data
            if len(got) % (4 * 1024 * 1024) < 32 * 1024:
                time.sleep(0.1)
        client.close()
    assert split_response(bytes(got))[2] == body


def sync_stream_without_content(handoff: Handoff) -> None:
    if handoff.path == "/103":
        handoff.start_response(103)  # raises ValueError: the engine answers 500
    status = int(handoff.path.strip("/"))
    length = 4 if handoff.query_string == b"cl" else None
    writer = handoff.start_response(status, [("X-A", "1")], content_length=length)
    writer.write(b"body")
    writer.end()


@pytest.mark.parametrize("target", ["/204", "/304", "/204?cl", "/304?cl", "/205", "/103"])
def test_streamed_204_205_304_have_no_content_and_1xx_is_refused(
    tmp_path: Path, target: str, no_fd_leak: None
) -> None:
    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(sync_stream_without_content, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", target), server_side)
        status, headers, body = split_response(read_all(client))
        client.close()
    if target == "/103":
        assert status == 500
        return
    assert status == int(target[1:4])
    assert headers["x-a"] == "1"
    assert "transfer-encoding" not in headers
    assert headers.get("content-length") == ("0" if status == 205 else None)
    assert body == b""


class SyncHub:
    def __init__(self) -> None:
        self.channel = Channel()
        self.ready = threading.Semaphore(0)

    def __call__(self, handoff: Handoff) -> None:
        stream = handoff.sse()
        self.channel.add(stream)
        self.ready.release()


def test_sse_channel_from_another_thread(tmp_path: Path, no_fd_leak: None) -> None:
    hub = SyncHub()
    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(hub, [Bind(path)]):
        clients = []
        for _ in range(5):
            client, server_side = tcp_pair()
            send_scgi(path, front_headers("GET", "/events"), server_side)
            clients.append(client)
        for _ in range(5):
            assert hub.ready.acquire(timeout=10)
        assert hub.channel.send("tick", event="t") == 5
        for c in clients:
            assert read_until(c, b"\n\n").endswith(b"event: t\ndata: tick\n\n")
        clients[0].close()
        time.sleep(0.2)
        # The departed client is noticed when writing to it fails.
        deadline = time.monotonic() + 10
        while len(hub.channel) == 5 and time.monotonic() < deadline:
            hub.channel.send("again")
            time.sleep(0.05)
        assert len(hub.channel) == 4
        hub.channel.close()
        for c in clients[1:]:
            assert b"data: again" in read_all(c)
            c.close()


def test_sse_answers_head_with_the_head_only(tmp_path: Path, no_fd_leak: None) -> None:
    seen: list[object] = []

    def handler(handoff: Handoff) -> None:
        stream = handoff.sse(retry=500)
        seen.append(stream.closed)
        try:
            stream.send("one")
        except ConnectionClosed as exc:
            seen.append(type(exc))

    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("HEAD", "/sse"), server_side)
        data = read_to_fin(client, timeout=5)  # FIN, not an open stream nor a reset
        client.close()
    status, headers, body = split_response(data)
    assert (status, headers["content-type"], body) == (200, "text/event-stream", b"")
    assert seen == [True, ConnectionClosed]


def test_handler_date_wins_and_connection_fields_are_the_receivers(
    tmp_path: Path, no_fd_leak: None
) -> None:
    old = "Thu, 01 Jan 1970 00:00:00 GMT"
    given = [("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("Date", old)]

    def handler(handoff: Handoff) -> None:
        handoff.respond(200, given, b"ok")

    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/"), server_side)
        data = read_all(client)
        client.close()
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    names = [line.partition(":")[0].lower() for line in head.split("\r\n")[1:]]
    assert (names.count("date"), names.count("connection"), "keep-alive" in names) == (1, 1, False)
    _, headers, body = split_response(data)
    assert (headers["date"], headers["connection"], body) == (old, "close", b"ok")


def ws_echo(handoff: Handoff) -> None:
    ws = handoff.websocket()
    for message in ws:
        ws.send(message)


def test_websocket_echo_and_bad_frame(tmp_path: Path, no_fd_leak: None) -> None:
    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(ws_echo, [Bind(path)], Options(max_ws_message_size=1000)):
        with MiniFront(path) as front:
            with connect(f"ws://127.0.0.1:{front.port}/ws", open_timeout=10) as client:
                client.send("hello")
                assert client.recv(timeout=10) == "hello"
                client.send(b"\x01\x02")
                assert client.recv(timeout=10) == b"\x01\x02"
            assert client.close_code == 1000
        client_sock, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
        client_sock.sendall(encode_frame(Opcode.BINARY, b"x" * 2000, mask=b"abcd"))
        rest = read_all(client_sock)
        client_sock.close()
        assert rest[:1] == b"\x88"
        assert int.from_bytes(rest[2:4], "big") == 1009


def test_sync_websocket_reports_the_subprotocol_the_front_agreed(
    tmp_path: Path, no_fd_leak: None
) -> None:
    seen: list[str | None] = []

    def handler(handoff: Handoff) -> None:
        ws = handoff.websocket(subprotocol="other")  # too late: the 101 said chat.v1
        seen.append(ws.subprotocol)
        ws.send(ws.subprotocol or "")
        ws.close()

    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(handler, [Bind(path)]):
        client_sock, server_side = tcp_pair()
        headers = front_headers(
            "GET", "/", HANDOFF_UPGRADED="websocket", HANDOFF_SUBPROTOCOL="chat.v1"
        )
        send_scgi(path, headers, server_side)
        first = read_exactly(client_sock, 9)
        client_sock.close()
    assert first == b"\x81\x07chat.v1"
    assert seen == ["chat.v1"]


@pytest.mark.parametrize("failure", ["raises", "answers nothing"])
def test_handler_failing_after_the_senders_101_closes_with_1011(
    tmp_path: Path, failure: str, no_fd_leak: None
) -> None:
    """The client reads frames after the sender's 101: no HTTP 500 for it."""

    def handler(handoff: Handoff) -> None:
        if failure == "raises":
            raise RuntimeError("deliberate, before websocket()")

    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(handler, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
        data = read_all(client)
        client.close()
    assert data == encode_frame(Opcode.CLOSE, b"\x03\xf3")  # 1011


def test_close_after_a_protocol_error_is_a_fin_not_a_reset(
    tmp_path: Path, no_fd_leak: None
) -> None:
    # As in the asyncio flavour: bytes never read after the bad frame would
    # turn close() into a reset that can destroy the close frame in flight.
    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(ws_echo, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
        # Unmasked, then more than one read of the receiver (64 KiB) behind it.
        client.sendall(bytes([0x81, 0x05]) + b"hello" + b"unread" * 17000)
        data = read_to_fin(client)
        client.close()
    assert data[:1] == b"\x88"
    assert int.from_bytes(data[2:4], "big") == 1002


def test_websocket_closed_from_another_thread(tmp_path: Path, no_fd_leak: None) -> None:
    sockets: list[WebSocket] = []
    got: list[Any] = []

    def handler(handoff: Handoff) -> None:
        ws = handoff.websocket()
        sockets.append(ws)
        got.extend(ws)  # blocks until the connection ends

    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(handler, [Bind(path)]), MiniFront(path) as front:
        with connect(f"ws://127.0.0.1:{front.port}/ws", open_timeout=10) as client:
            client.send("one")
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)
            sockets[0].close(4001, "bye")  # from this thread, while the handler receives
            with pytest.raises(WsClosed):
                client.recv(timeout=10)
        assert client.close_code == 4001
        assert got == ["one"]
        with pytest.raises(ConnectionClosed):
            sockets[0].send("late")


def _channel_handoff(conn: socket.socket, target: str) -> socket.socket:
    """Hand a new client over on ``conn`` as the front does on a channel; the client end."""
    from fdhandoff import fdpass  # noqa: PLC0415

    client, server_side = tcp_pair()
    headers = front_headers("GET", target, HANDOFF_CHANNEL="1")
    with server_side:
        fdpass.send_fd(conn, scgi.encode(headers), server_side.fileno())
    return client


def test_channel_acknowledged_and_closed_at_stop(tmp_path: Path, no_fd_leak: None) -> None:
    """Three handoffs on one channel: three answers, three ACK bytes, and the
    stop does not wait out the grace period for the idle channel."""
    from fdhandoff.message import CHANNEL_ACK  # noqa: PLC0415

    path = str(tmp_path / "r.sock")
    receiver = SyncReceiverThread(echo, [Bind(path)], Options(grace=30.0))
    with receiver, socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        conn.settimeout(10)
        for n in range(3):
            client = _channel_handoff(conn, f"/{n}")
            assert split_response(read_all(client))[0] == 200
            client.close()
            assert conn.recv(1) == CHANNEL_ACK
        started = time.monotonic()
        receiver.stop_event.set()
        receiver.thread.join(20)
        assert time.monotonic() - started < 5.0, "an idle channel held up the stop"
        assert conn.recv(1) == b""  # the receiver closed its end


def test_declined_channel_is_one_handoff_per_connection(tmp_path: Path, no_fd_leak: None) -> None:
    """A worker of --workers N declines channels: it takes the handoff and
    closes the connection (the acknowledgement of a receiver without channels),
    so the front keeps opening connections and the kernel spreads them."""
    from fdhandoff.receiver.runner import _for_worker  # noqa: PLC0415

    options = _for_worker(Options(), 1)
    assert options.channels is False
    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(echo, [Bind(path)], options), socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        conn.settimeout(10)
        client = _channel_handoff(conn, "/")
        assert conn.recv(1) == b""  # closed, no ACK
        assert split_response(read_all(client))[0] == 200
        client.close()


def test_the_clients_close_reply_after_a_protocol_error_meets_no_reset(
    tmp_path: Path, no_fd_leak: None
) -> None:
    """RFC 6455 section 7.1.1 (the server closes the TCP connection first)
    and 5.5.1 (the client answers a close frame): FIN right behind the failing
    close frame, but the socket reads on until the client's FIN.  Closed
    outright, it answered the reply with a reset (RFC 1122 4.2.2.13) that can
    destroy the close frame before the client read it (seen here as EPIPE)."""
    path = str(tmp_path / "r.sock")
    with SyncReceiverThread(ws_echo, [Bind(path)]):
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/", HANDOFF_UPGRADED="websocket"), server_side)
        client.sendall(encode_frame(Opcode.TEXT, b"\xff", mask=b"abcd"))
        data = read_to_fin(client)  # the server closed first
        client.sendall(encode_frame(Opcode.CLOSE, data[2:4], mask=b"efgh"))
        time.sleep(0.3)
        error = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        client.close()
    assert data[:1] == b"\x88"
    assert int.from_bytes(data[2:4], "big") == 1007
    assert error == 0, os.strerror(error)


class Blocker:
    """A handler that holds its thread until released, answering afterwards."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, handoff: Handoff) -> None:
        self.entered.release()
        self.release.wait(30)
        handoff.respond(200, [], b"late")


def _hand_over_without_waiting(path: str) -> tuple[socket.socket, socket.socket]:
    """(client, UNIX connection): a handoff the receiver may not have taken yet."""
    from fdhandoff import fdpass  # noqa: PLC0415

    client, server_side = tcp_pair()
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    fdpass.send_fd(conn, scgi.encode(front_headers("GET", "/")), server_side.fileno(), timeout=10)
    server_side.close()
    return client, conn


def test_stop_at_max_connections_with_a_handoff_queued(tmp_path: Path, no_fd_leak: None) -> None:
    """Every slot busy and one more sender waiting: the stop still ends
    after the grace period.  Accepting used to take the connection first and
    then wait for a slot without looking at the stop, for as long as the
    handler kept it."""
    handler = Blocker()
    path = str(tmp_path / "r.sock")
    receiver = SyncReceiverThread(handler, [Bind(path)], Options(max_connections=1, grace=0.5))
    with receiver:
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/"), server_side)
        assert handler.entered.acquire(timeout=10)
        queued, conn = _hand_over_without_waiting(path)
        time.sleep(0.5)
        started = time.monotonic()
        receiver.stop_event.set()
        receiver.thread.join(10)
        stopped = not receiver.thread.is_alive()
        handler.release.set()
        assert stopped, "the receiver did not stop"
        assert time.monotonic() - started < 5.0
        for sock in (client, queued, conn):
            sock.close()


def test_stop_waits_once_for_all_blocked_handlers(tmp_path: Path, no_fd_leak: None) -> None:
    """After the grace period the remaining threads share one last wait;
    they used to get one each, so ten stuck handlers held the stop ten times
    as long."""
    handler = Blocker()
    path = str(tmp_path / "r.sock")
    receiver = SyncReceiverThread(handler, [Bind(path)], Options(grace=0.5))
    clients = []
    try:
        with receiver:
            for _ in range(6):
                client, server_side = tcp_pair()
                send_scgi(path, front_headers("GET", "/"), server_side)
                clients.append(client)
            for _ in range(6):
                assert handler.entered.acquire(timeout=10)
            started = time.monotonic()
            receiver.stop_event.set()
            receiver.thread.join(20)
            assert time.monotonic() - started < 3.5
    finally:
        handler.release.set()
        for client in clients:
            client.close()


def test_channel_is_served_at_max_connections_one(tmp_path: Path, no_fd_leak: None) -> None:
    """A channel's reader is not a connection: it used to keep its slot and
    wait for another one for each handoff, so with --max-connections 1 no
    handoff on a channel was ever served or acknowledged."""
    from fdhandoff.message import CHANNEL_ACK  # noqa: PLC0415

    path = str(tmp_path / "r.sock")
    receiver = SyncReceiverThread(echo, [Bind(path)], Options(max_connections=1))
    with receiver, socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        conn.settimeout(10)
        for n in range(3):
            client = _channel_handoff(conn, f"/{n}")
            assert conn.recv(1) == CHANNEL_ACK
            assert split_response(read_all(client))[0] == 200
            client.close()


def test_silent_connections_hold_no_thread(
    tmp_path: Path,
    no_fd_leak: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """UNIX connections that send nothing wait in the accepting thread, not in
    a connection thread each: with every slot's worth of them open, a handoff
    is still served at once, and they are closed after handoff_timeout.
    Each used to take a thread for the whole timeout, so as many silent
    connections as there are threads (512) stalled every sender."""
    monkeypatch.setattr(sync_engine, "DEFAULT_MAX_THREADS", 2)
    path = str(tmp_path / "r.sock")
    options = Options(handoff_timeout=1.5)
    silent = []
    with SyncReceiverThread(echo, [Bind(path)], options):
        for _ in range(2):
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(path)
            silent.append(conn)
        time.sleep(0.3)  # accepted by now
        started = time.monotonic()
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/"), server_side)
        status = split_response(read_all(client))[0]
        served_in = time.monotonic() - started
        client.close()
        for conn in silent:
            conn.settimeout(5)
            assert conn.recv(1) == b""  # closed by the receiver
            conn.close()
    assert status == 200
    assert served_in < 1.0  # not after the silent ones' 1.5 s
    assert caplog.text.count("sent no complete handoff within 1.5 s") == 2


def test_recv_within_stays_on_its_connection_when_another_thread_closes_it() -> None:
    """A reader waits on one connection; another thread closes that socket and
    a new connection takes its fd number: the reader must never return the
    new connection's bytes."""
    ours, peer = socket.socketpair()
    ours.settimeout(5)  # as every socket of the sync flavour
    number = ours.fileno()
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(recv_within(ours, 100, 1.5))
        except OSError as exc:  # TimeoutError included
            outcome.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.2)
    ours.close()
    other, other_peer = socket.socketpair()
    with other, other_peer, peer:
        reused = number in (other.fileno(), other_peer.fileno())
        other_peer.sendall(b"another client's bytes")
        other.sendall(b"another client's bytes")
        thread.join(10)
    assert reused, "the fd number was not reused: the test proves nothing"
    assert outcome and not isinstance(outcome[0], bytes), outcome
