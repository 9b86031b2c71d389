"""A receiver that keeps channels restarts: the front's requests keep working.

When a receiver process stops, the channels the front holds to it close.  A
request that reaches the front at that moment may find a channel that is
already closed; the front then sends the handoff again on a new connection
(nothing was sent: ``EPIPE``), so the client gets its answer, not a 503.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from fdhandoff import fdpass
from fdhandoff.message import CHANNEL_ACK, HandoffReader
from handoff_receiver import (
    FrontProcess,
    fronts_fixture,  # noqa: F401  (fixture)
    http_exchange,
    sockdir_fixture,  # noqa: F401  (fixture)
)

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class AckingReceiver:
    """Keeps every channel, answers each handoff and acknowledges it; ``stop``
    closes the listener and every channel at once, as a stopping receiver does."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = HandoffReader(conn.type)
        while True:
            try:
                got = fdpass.recv_handoff(conn, reader, timeout=30)
            except OSError:
                return
            if got is None:
                return
            record, client = got
            with client:
                client.sendall(ANSWER)
            assert record.channel
            try:
                conn.sendall(CHANNEL_ACK)
            except OSError:
                return

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        os.unlink(self.path)
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_requests_survive_a_receiver_restart(
    fronts: Callable[..., FrontProcess], sockdir: Path
) -> None:
    path = sockdir / "r.sock"
    first = AckingReceiver(path)
    front = fronts(f"/=unix:{path}")
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(5):
        assert http_exchange(front, request)[0] == 200
    assert first.accepted == 1  # one channel served them all
    first.stop()
    second = AckingReceiver(path)
    try:
        # Every request right after the restart is answered by the new
        # receiver: none gets a 503 from a channel to the old one.
        for _ in range(5):
            assert http_exchange(front, request)[0] == 200
        assert second.accepted >= 1
    finally:
        second.stop()


def test_send_on_a_channel_closed_meanwhile_asks_for_a_retry(no_fd_leak: None) -> None:
    """The race itself, made deterministic: the channel's receiver closes and
    the front sends before its event loop has seen the EOF."""
    import asyncio  # noqa: PLC0415

    from fdhandoff.front.handoff import Handoffs  # noqa: PLC0415

    taken: list[object] = []
    failed: list[tuple[object, str]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        handoffs = Handoffs(
            loop,
            5.0,
            taken=lambda f: taken.append(f.context),
            failed=lambda f, why: failed.append((f.context, why)),
            channels=4,
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        client, client_peer = socket.socketpair()
        try:
            link = handoffs.open(ours, "backend")
            assert handoffs.send(link, client, b"1:x,", "first")
            passed = fdpass.recv_fd(theirs, blocking=False)[1]
            assert passed is not None
            passed.close()
            theirs.sendall(CHANNEL_ACK)
            for _ in range(100):  # let the loop read the ACK
                await asyncio.sleep(0.01)
                if taken:
                    break
            assert taken == ["first"]
            assert handoffs.channel("backend") is link  # pooled, idle
            theirs.close()  # the receiver stops...
            second, second_peer = socket.socketpair()
            try:
                # ...and the front sends before it has seen the EOF.
                assert handoffs.send(link, second, b"1:y,", "second") is False
                assert failed == []  # nobody answered: the caller retries
                assert handoffs.channel("backend") is None  # the dead channel is gone
            finally:
                second.close()
                second_peer.close()
        finally:
            handoffs.close()
            client_peer.close()

    asyncio.run(scenario())
