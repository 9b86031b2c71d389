"""ASGI connections and the engine: --max-connections, the gauge, head deadlines, shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import fdhandoff.receiver.asgi as asgi_module
from fdhandoff.receiver import Options
from test_receiver_asgi_support import ASGIReceiver, ResponseReader, hand_over
from test_receiver_support import front_headers, send_scgi, tcp_pair

WS_HEADERS = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "asgi.sock")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/sse``: one event, then held until the client leaves; ``/ws``: an idle
    WebSocket; anything else: a short text answer (kept alive)."""
    if scope["type"] == "lifespan":
        return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    if scope["path"] == "/sse":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _live(receiver: ASGIReceiver) -> int:
    return int(receiver.call(lambda: receiver.receiver.connections))  # type: ignore[union-attr]


def _gauge(receiver: ASGIReceiver) -> bytes:
    text: bytes = receiver.call(lambda: receiver.receiver.metrics.render())  # type: ignore[union-attr]
    line = next(x for x in text.splitlines() if x.startswith(b"fdhandoff_receiver_connections "))
    return line.split()[1]


def _wait_live(receiver: ASGIReceiver, count: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _live(receiver) == count:
            return True
        time.sleep(0.02)
    return False


def _read_event(client: socket.socket) -> bytes:
    data = b""
    while b"data: 1" not in data:
        more = client.recv(4096)
        assert more, f"closed before the first event: {data!r}"
        data += more
    return data


def test_asgi_connections_count_towards_max_connections(
    sock_path: str, no_fd_leak: None
) -> None:
    with ASGIReceiver(app, sock_path, Options(max_connections=2)) as receiver:
        first = hand_over(sock_path, "GET", "/sse")
        second = hand_over(sock_path, "GET", "/sse")
        _read_event(first)
        _read_event(second)
        assert _live(receiver) == 2
        assert _gauge(receiver) == b"2"
        # A third handoff waits in the kernel: the receiver is at its limit.
        third, server_side = tcp_pair()
        third.settimeout(0.7)
        sender = threading.Thread(
            target=send_scgi,
            args=(sock_path, front_headers("GET", "/sse", [("Host", "x")]), server_side),
        )
        sender.start()
        with pytest.raises(TimeoutError):
            third.recv(4096)
        first.close()  # a slot frees: the third one is taken
        third.settimeout(10)
        _read_event(third)
        sender.join(10)
        assert _wait_live(receiver, 2)
        second.close()
        third.close()
        assert _wait_live(receiver, 0)


def test_kept_alive_and_websocket_connections_are_counted_until_closed(
    sock_path: str, no_fd_leak: None
) -> None:
    with ASGIReceiver(app, sock_path) as receiver:
        plain = hand_over(sock_path, "GET", "/plain")
        assert ResponseReader(plain).read().body == b"ok"
        ws = hand_over(sock_path, "GET", "/ws", WS_HEADERS)
        assert ResponseReader(ws).read().status == 101
        assert _live(receiver) == 2  # idle between requests, and an idle WebSocket
        plain.close()
        assert _wait_live(receiver, 1)
        ws.close()
        assert _wait_live(receiver, 0)
        assert _gauge(receiver) == b"0"


def test_shutdown_counts_asgi_connections(
    sock_path: str, caplog: pytest.LogCaptureFixture, no_fd_leak: None
) -> None:
    caplog.set_level(logging.INFO, logger="fdhandoff")
    receiver = ASGIReceiver(app, sock_path, Options(grace=0.3)).start()
    client = hand_over(sock_path, "GET", "/sse")
    _read_event(client)
    receiver.stop()
    assert "stopping: 1 connections live" in caplog.text
    client.close()


@pytest.mark.parametrize(
    "trickle",
    [b"GET /slow HTTP/1.1\r\nX-Slow: " + b"a" * 200, b"\r\n" * 100],
    ids=["header", "empty-lines"],
)
def test_head_timeout_is_a_deadline_for_the_whole_head(
    sock_path: str, trickle: bytes, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    """One byte every 0.1 s never stalls a read for HEAD_TIMEOUT; the head still ends in 408."""
    monkeypatch.setattr(asgi_module, "HEAD_TIMEOUT", 1.0)
    with ASGIReceiver(app, sock_path):
        client = hand_over(sock_path, "GET", "/ok")
        reader = ResponseReader(client)
        assert reader.read().status == 200
        stop = threading.Event()

        def send_slowly() -> None:
            for byte in trickle:
                if stop.wait(0.1):
                    return
                try:
                    client.send(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=send_slowly)
        started = time.monotonic()
        sender.start()
        try:
            answer = reader.read()
        finally:
            stop.set()
            sender.join(10)
        assert answer.status == 408
        assert time.monotonic() - started < 5
        assert reader.closed()
        client.close()


def test_idle_keepalive_connections_close_at_once_when_stopping(
    sock_path: str, no_fd_leak: None
) -> None:
    """Between requests a connection has nothing to finish; a request in flight does."""

    async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            await asyncio.sleep(1.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    receiver = ASGIReceiver(slow_app, sock_path, Options(grace=8)).start()
    idle = hand_over(sock_path, "GET", "/quick")
    idle_reader = ResponseReader(idle)
    assert idle_reader.read().body == b"done"
    busy = hand_over(sock_path, "GET", "/slow")
    time.sleep(0.2)  # the slow request is in the app now
    stopper = threading.Thread(target=receiver.stop)
    started = time.monotonic()
    stopper.start()
    try:
        assert idle_reader.closed(timeout=0.8), "an idle connection waited for the grace period"
        answer = ResponseReader(busy).read()
        assert answer.body == b"done"  # finished within the grace
        assert answer.header("connection") == "close"
        stopper.join(10)
        assert time.monotonic() - started < 4
    finally:
        stopper.join(30)
        idle.close()
        busy.close()


async def body_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, then answers with its length."""
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%d" % size})


@pytest.mark.parametrize("expect", [False, True])
def test_announced_body_over_the_limit_is_413_at_once(
    sock_path: str, expect: bool, no_fd_leak: None
) -> None:
    """RFC 9110 section 15.5.14: a Content-Length over --max-body-size is
    answered 413 from the head alone, without a 100 Continue and without
    waiting for a body the client has no reason to send."""
    options = Options(max_body_size=1000)
    headers = [("Content-Length", "1001")] + ([("Expect", "100-continue")] if expect else [])
    with ASGIReceiver(body_app, sock_path, options):
        client = hand_over(sock_path, "POST", "/up", headers)
        reader = ResponseReader(client, timeout=3.0)
        answer = reader.read()
        assert answer.status == 413
        assert answer.header("connection") == "close"
        client.close()
        # At the limit the body is read and served as usual.
        client = hand_over(sock_path, "POST", "/up", [("Content-Length", "1000")], b"x" * 1000)
        answer = ResponseReader(client).read()
        assert (answer.status, answer.body) == (200, b"1000")
        client.close()
