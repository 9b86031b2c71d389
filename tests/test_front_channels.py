"""Channels between the real front and receivers that keep them, or not.

The front (a real ``fdhandoff front`` subprocess) offers a channel on every
new UNIX connection (``HANDOFF_CHANNEL=1``); what the receiver does tells the
outcome of each handoff (docs/protocol.md): ACK bytes = taken in order, EOF =
the rest taken, ECONNRESET = the rest not taken (503, or a WebSocket close
1013 after a 101), silence = settled at ``timeouts.handoff`` by what the
receiver read, any other byte on a channel = the channel is closed.

The receivers here are written by hand on fdhandoff.fdpass (the project's
receiver is another role), each UNIX connection served by a thread running a
*behaviour*: a well-behaved channel receiver, a receiver written for nginx
fd_pass (one handoff, close), and receivers that misbehave in each way the
front must survive.  The last test puts the project's own receiver behind the
front.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.client import connect

from fdhandoff import fdpass, scgi
from fdhandoff.message import CHANNEL_ACK, CHANNEL_HEADER, Format, HandoffReader, HandoffRecord
from handoff_receiver import (
    IO_TIMEOUT,
    FrontProcess,
    fronts_fixture,  # noqa: F401  (fixture)
    http_exchange,
    parse_response,
    respond,
    sockdir_fixture,  # noqa: F401  (fixture)
)
from test_receiver_asgi_e2e import ReceiverProcess
from test_receiver_support import output_of, serve_process

pytestmark = pytest.mark.timeout(180)


def get(target: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode()


# --- a receiver to script -----------------------------------------------------------------------


class Stop(Exception):
    """The receiver is being closed: a behaviour unwinds."""


@dataclass(frozen=True)
class Seen:
    """One handoff a receiver read: on which UNIX connection (accept order) and what."""

    conn: int
    record: HandoffRecord

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.record.headers)

    @property
    def uri(self) -> str:
        return self.headers[b"REQUEST_URI"].decode()


#: What runs for each accepted UNIX connection: (receiver, its index, the connection).
Behaviour = Callable[["FakeReceiver", int, socket.socket], None]
#: What answers one handed-off client: (receiver, connection index, record, client).
Handler = Callable[["FakeReceiver", int, HandoffRecord, socket.socket], None]


def answer_json(rx: FakeReceiver, index: int, record: HandoffRecord, client: socket.socket) -> None:
    """200 with JSON saying which UNIX connection the handoff came on."""
    headers = dict(record.headers)
    channel = headers.get(CHANNEL_HEADER)
    respond(
        client,
        {
            "conn": index,
            "uri": headers[b"REQUEST_URI"].decode(),
            "channel": None if channel is None else channel.decode(),
        },
    )


def ws_echo(rx: FakeReceiver, index: int, record: HandoffRecord, client: socket.socket) -> None:
    """Echo text messages as ``<conn>:<text>`` until the client closes (RFC 6455 server side,
    started OPEN: the front answered the handshake)."""
    protocol = ServerProtocol(state=State.OPEN)
    client.settimeout(IO_TIMEOUT)
    while protocol.state is State.OPEN:
        data = client.recv(65536)
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        for event in protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                protocol.send_text(b"%d:%s" % (index, event.data))
        for out in protocol.data_to_send():
            if out:
                client.sendall(out)
        if not data:
            break


class FakeReceiver:
    """A UNIX listener whose connections are served by ``behaviour``, one thread each.

    Behaviours use the verbs below (take, ack, serve, wait_readable, ...);
    tests look at what was seen and at the connections still open.  ``close``
    wakes every thread (``Stop``, or EOF for a thread inside recvmsg) and
    closes everything.
    """

    __test__ = False

    def __init__(self, path: Path, behaviour: Behaviour, handler: Handler = answer_json) -> None:
        self.path = str(path)
        self.behaviour = behaviour
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.seen: list[Seen] = []
        self.errors: list[BaseException] = []
        self.events: list[str] = []
        #: Acknowledgements are held back until this many handoffs were seen.
        self.hold_acks_until = 0
        #: A go-ahead some behaviours wait for.
        self.release = threading.Event()
        self._pending_acks: dict[socket.socket, int] = {}
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    # --- machinery ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self.listener, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            conn, _ = self.listener.accept()
            with self._cond:
                index = len(self.conns)
                self.conns.append(conn)
                self._cond.notify_all()
            self._spawn(self._serve, index, conn)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._cond:
            self._threads.append(thread)
        thread.start()

    def _serve(self, index: int, conn: socket.socket) -> None:
        try:
            self.behaviour(self, index, conn)
        except Stop:
            pass
        except BaseException as exc:  # reported by check(), never swallowed
            if not self._stopping.is_set():
                self.errors.append(exc)
        finally:
            self.close_conn(conn)

    def _handle(self, index: int, record: HandoffRecord, client: socket.socket) -> None:
        try:
            self.handler(self, index, record, client)
        except BaseException as exc:
            if not self._stopping.is_set():
                self.errors.append(exc)
        finally:
            client.close()

    # --- verbs for behaviours --------------------------------------------------------------------

    def take(
        self, index: int, conn: socket.socket, reader: HandoffReader
    ) -> tuple[HandoffRecord, socket.socket] | None:
        """The next handoff on ``conn`` (None: the front closed it between handoffs)."""
        got = fdpass.recv_handoff(conn, reader)  # close() wakes it with a shutdown
        if got is not None:
            if self._stopping.is_set():
                got[1].close()
                raise Stop
            self.note(index, got[0])
        return got

    def note(self, index: int, record: HandoffRecord) -> None:
        with self._cond:
            self.seen.append(Seen(index, record))
            self._cond.notify_all()
            if len(self.seen) >= self.hold_acks_until:
                self._flush_acks()

    def ack(self, conn: socket.socket) -> None:
        """One CHANNEL_ACK for ``conn``, now or once ``hold_acks_until`` handoffs were seen."""
        with self._cond:
            self._pending_acks[conn] = self._pending_acks.get(conn, 0) + 1
            if len(self.seen) >= self.hold_acks_until:
                self._flush_acks()

    def _flush_acks(self) -> None:
        for conn, count in self._pending_acks.items():
            if conn.fileno() != -1:
                conn.sendall(CHANNEL_ACK * count)
        self._pending_acks.clear()

    def serve(self, index: int, record: HandoffRecord, client: socket.socket) -> None:
        """Answer the client in a thread of its own, as a receiver's task would."""
        self._spawn(self._handle, index, record, client)

    def close_conn(self, conn: socket.socket) -> None:
        with self._cond:
            conn.close()
            self._cond.notify_all()

    def wait_readable(self, sock: socket.socket) -> None:
        """Until ``sock`` has bytes or EOF."""
        ready, _, _ = select.select([sock, self._wake_r], [], [], IO_TIMEOUT * 3)
        if self._wake_r in ready:
            raise Stop
        assert ready, "nothing arrived"

    def wait_for_eof(self, index: int, conn: socket.socket) -> None:
        """Until the front closes ``conn`` (a byte arriving instead is an error)."""
        self.wait_readable(conn)
        assert conn.recv(1) == b"", "the front sent more instead of closing"
        self.event(f"conn {index} closed by the front")

    def wait_release(self) -> None:
        self.release.wait()
        if self._stopping.is_set():
            raise Stop

    def wait_stopping(self) -> None:
        self._stopping.wait()
        raise Stop

    def event(self, what: str) -> None:
        with self._cond:
            self.events.append(what)
            self._cond.notify_all()

    # --- what tests look at --------------------------------------------------------------------

    @property
    def accepted(self) -> int:
        return len(self.conns)

    def open_conns(self) -> list[int]:
        """Indexes of the UNIX connections still open (the front's live links to us)."""
        with self._cond:
            return [i for i, conn in enumerate(self.conns) if conn.fileno() != -1]

    def wait_until(self, check: Callable[[], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: check() or bool(self.errors), IO_TIMEOUT * 2):
                raise AssertionError(f"{what}; seen {self.seen}, events {self.events}")
        self.check()

    def wait_open(self, count: int) -> list[int]:
        def settled() -> bool:
            return sum(conn.fileno() != -1 for conn in self.conns) == count

        self.wait_until(settled, f"{count} UNIX connection(s) open")
        return self.open_conns()

    def wait_event(self, what: str) -> None:
        self.wait_until(lambda: what in self.events, f"no event {what!r}")

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def hang_up(self) -> None:
        """Close every UNIX connection from our side (what a receiver does when it stops)."""
        with self._cond:
            for conn in self.conns:
                if conn.fileno() != -1:
                    conn.shutdown(socket.SHUT_RDWR)  # the behaviour then sees EOF and returns
        self.wait_open(0)

    def close(self) -> None:
        self._stopping.set()
        self.release.set()
        self._wake_w.close()  # every select() on _wake_r wakes up
        self._acceptor.join(timeout=10)
        with self._cond:
            for conn in self.conns:
                if conn.fileno() != -1:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
        while True:
            with self._cond:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                break
            for thread in alive:
                thread.join(timeout=IO_TIMEOUT)
                assert not thread.is_alive(), "a receiver thread did not stop"
        for conn in self.conns:
            conn.close()
        self.listener.close()
        self._wake_r.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@pytest.fixture(name="receivers")
def receivers_fixture(sockdir: Path) -> Iterator[Callable[..., FakeReceiver]]:
    made: list[FakeReceiver] = []

    def make(behaviour: Behaviour, handler: Handler = answer_json) -> FakeReceiver:
        rx = FakeReceiver(sockdir / f"r{len(made)}.sock", behaviour, handler)
        made.append(rx)
        return rx

    yield make
    for rx in made:
        rx.close()
    for rx in made:
        rx.check()


# --- behaviours ---------------------------------------------------------------------------------


def channel_receiver(rx: FakeReceiver, index: int, conn: socket.socket) -> None:
    """A receiver that keeps channels: ACK every channel handoff, read the next from
    the same connection; one without HANDOFF_CHANNEL=1 is the last (closing is its
    acknowledgement)."""
    reader = HandoffReader(conn.type)
    while (got := rx.take(index, conn, reader)) is not None:
        record, client = got
        if record.channel:
            rx.ack(conn)
        else:
            rx.close_conn(conn)
        rx.serve(index, record, client)
        if not record.channel:
            return


def legacy_receiver(rx: FakeReceiver, index: int, conn: socket.socket) -> None:
    """What a receiver written for nginx fd_pass does: ONE recvmsg, decode, close the
    UNIX connection (its only acknowledgement), serve.  It never writes an ACK."""
    data, client = fdpass.recv_fd(conn, timeout=IO_TIMEOUT)
    assert client is not None, "no fd came with the first recvmsg"
    client.setblocking(True)
    pairs, body = scgi.decode(data)  # the front's description is canonical SCGI
    rx.close_conn(conn)
    record = HandoffRecord(Format.SCGI, headers=pairs, body=body)
    rx.note(index, record)
    rx.serve(index, record, client)


def acking_everything(rx: FakeReceiver, index: int, conn: socket.socket) -> None:
    """ACK the handoff even when no channel was offered, and keep the connection
    open: whether it stays open is then up to the front."""
    got = rx.take(index, conn, HandoffReader(conn.type))
    assert got is not None
    rx.ack(conn)
    rx.serve(index, *got)
    rx.wait_for_eof(index, conn)


Special = Callable[[FakeReceiver, socket.socket, HandoffReader], None]


def after_acking(acked: int, special: Special) -> Behaviour:
    """The first connection behaves for ``acked`` handoffs, then does ``special``;
    later connections are well-behaved channels."""

    def behaviour(rx: FakeReceiver, index: int, conn: socket.socket) -> None:
        if index > 0:
            channel_receiver(rx, index, conn)
            return
        reader = HandoffReader(conn.type)
        for _ in range(acked):
            got = rx.take(index, conn, reader)
            assert got is not None
            rx.ack(conn)
            rx.serve(index, *got)
        special(rx, conn, reader)

    return behaviour


def close_with_the_next_unread(rx: FakeReceiver, conn: socket.socket, _: HandoffReader) -> None:
    """Wait for the next handoff's bytes, then close without reading them (a RST)."""
    rx.wait_readable(conn)
    rx.event("closing with a handoff unread")


def refuse_further_handoffs(rx: FakeReceiver, conn: socket.socket, _: HandoffReader) -> None:
    """Shut the reading side (sends to it fail with EPIPE) without closing: the
    front sees no EOF, the channel looks idle and healthy."""
    conn.shutdown(socket.SHUT_RD)
    rx.event("reading side shut")
    rx.wait_stopping()


def read_without_acking(rx: FakeReceiver, conn: socket.socket, reader: HandoffReader) -> None:
    """Read the next handoff but neither ACK nor close; answer its client only once
    the front has settled and closed the connection, so a 503 would come first."""
    got = rx.take(0, conn, reader)
    assert got is not None
    rx.wait_for_eof(0, conn)
    rx.serve(0, *got)


def never_read(rx: FakeReceiver, conn: socket.socket, _: HandoffReader) -> None:
    """Stop reading: the next handoff stays in the socket buffer."""
    rx.wait_stopping()


def garbage_when_idle(rx: FakeReceiver, conn: socket.socket, reader: HandoffReader) -> None:
    """Once told to, write a byte other than ACK on the idle channel; the front must close it."""
    rx.wait_release()
    conn.sendall(b"?")
    rx.wait_for_eof(0, conn)


def garbage_instead_of_ack(rx: FakeReceiver, conn: socket.socket, reader: HandoffReader) -> None:
    """Read the next handoff and write '?' instead of its ACK; once the front has
    closed the channel, serve that client all the same (it was read: taken)."""
    got = rx.take(0, conn, reader)
    assert got is not None
    conn.sendall(b"?")
    rx.wait_for_eof(0, conn)
    rx.serve(0, *got)


# --- helpers ------------------------------------------------------------------------------------


def fetch(front: FrontProcess, target: str) -> tuple[int, bytes]:
    status, _, body = http_exchange(front, get(target))
    return status, body


def fetch_json(front: FrontProcess, target: str) -> dict[str, Any]:
    status, body = fetch(front, target)
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)  # all of it: no 503 after the answer
    assert answer["uri"] == target
    return answer


def handed_off(front: FrontProcess, target: str, route: str = "/", upgraded: bool = False) -> None:
    """Wait for the access-log line that says the front counted the handoff as taken
    (after an ACK: the channel is idle again, ready for the next request)."""
    status = "101 handed-off" if upgraded else "handed-off"
    front.wait_for(rf'"GET {re.escape(target)}" route={re.escape(route)} {status}')


def no_503_for(front: FrontProcess, target: str) -> None:
    assert not [line for line in front.lines if f'"GET {target}"' in line and " 503 " in line]


def concurrent_fetch(front: FrontProcess, targets: list[str]) -> list[dict[str, Any]]:
    """Send every request before reading any answer."""
    socks = [front.connect() for _ in targets]
    try:
        for sock, target in zip(socks, targets, strict=True):
            sock.sendall(get(target))
        answers = []
        for sock in socks:
            sock.settimeout(IO_TIMEOUT * 2)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            status, _, body = parse_response(data)
            assert status == 200, body
            answers.append(json.loads(body))
        return answers
    finally:
        for sock in socks:
            sock.close()


def config(*, channels: int | None = None, handoff: float | None = None, ws: str = "") -> str:
    text = ""
    if channels is not None:
        text += f"[limits]\nchannels = {channels}\n"
    if handoff is not None:
        text += f"[timeouts]\nhandoff = {handoff}\n"
    if ws:
        text += f'[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{ws}"\n'
    return text


# --- (a) one channel for many requests -----------------------------------------------------------


def test_sequential_requests_share_one_channel(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    rx = receivers(channel_receiver)
    front = fronts(f"/=unix:{rx.path}")
    baseline = front.fd_count()
    for n in range(20):
        answer = fetch_json(front, f"/seq/{n}")
        assert answer["conn"] == 0
        assert answer["channel"] == "1"
        handed_off(front, f"/seq/{n}")
    assert rx.accepted == 1
    assert [s.uri for s in rx.seen] == [f"/seq/{n}" for n in range(20)]
    assert all(s.headers[CHANNEL_HEADER] == b"1" and s.record.channel for s in rx.seen)
    # The channel is the only thing the front keeps, on purpose.
    assert rx.open_conns() == [0]
    assert front.settled_fd_count(baseline + 1) == baseline + 1
    # The receiver closes it (as it does when it stops): the front lets it go,
    # and the next request opens a new one.
    rx.hang_up()
    assert front.settled_fd_count(baseline) == baseline
    assert fetch_json(front, "/after")["conn"] == 1
    no_503_for(front, "/after")


def test_front_shutdown_closes_its_idle_channels(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    rx = receivers(channel_receiver)
    front = fronts(f"/=unix:{rx.path}")
    fetch_json(front, "/one")
    handed_off(front, "/one")
    assert rx.open_conns() == [0]
    assert front.stop() == 0
    rx.wait_open(0)  # the front closed the channel: the receiver saw EOF


# --- (b) concurrency and the channel limit -------------------------------------------------------


def test_concurrent_requests_keep_at_most_the_channel_limit(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    clients, limit = 6, 2
    rx = receivers(channel_receiver)
    front = fronts(f"/=unix:{rx.path}", config=config(channels=limit))
    baseline = front.fd_count()
    # No ACK until every handoff arrived: no connection is a confirmed channel
    # while they are sent, so each request opens its own.
    rx.hold_acks_until = clients
    first = concurrent_fetch(front, [f"/a/{n}" for n in range(clients)])
    assert sorted(a["conn"] for a in first) == list(range(clients))
    # Once acknowledged, `limit` of them are kept as channels, the rest closed.
    kept = rx.wait_open(limit)
    assert front.settled_fd_count(baseline + limit) == baseline + limit
    # Again, with every channel busy until all are in: the handoffs queue on the
    # channels kept, no new connection is opened.
    rx.hold_acks_until = 2 * clients
    second = concurrent_fetch(front, [f"/b/{n}" for n in range(clients)])
    assert {a["conn"] for a in second} == set(kept)
    assert rx.accepted == clients
    assert rx.wait_open(limit) == kept
    assert front.settled_fd_count(baseline + limit) == baseline + limit
    rx.hang_up()
    assert front.settled_fd_count(baseline) == baseline


# --- (c) receivers written for nginx fd_pass -----------------------------------------------------


def test_a_receiver_that_never_acks_gets_one_connection_per_request(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    rx = receivers(legacy_receiver)
    front = fronts(f"/=unix:{rx.path}")
    baseline = front.fd_count()
    count = 30
    for n in range(count):
        answer = fetch_json(front, f"/legacy/{n}")
        assert answer["conn"] == n
        assert answer["channel"] == "1"  # offered every time, never taken up
    assert rx.accepted == count
    assert rx.wait_open(0) == []
    assert front.settled_fd_count(baseline) == baseline
    for n in range(count):
        handed_off(front, f"/legacy/{n}")


# --- (d) a channel closed with a handoff unread ---------------------------------------------------


def test_channel_closed_with_a_handoff_unread_answers_503(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    rx = receivers(after_acking(1, close_with_the_next_unread))
    front = fronts(f"/=unix:{rx.path}")
    baseline = front.fd_count()
    assert fetch_json(front, "/d/1")["conn"] == 0
    handed_off(front, "/d/1")
    status, body = fetch(front, "/d/2")  # went on the channel, never read
    assert status == 503
    front.hid_detail(body, "receiver closed without taking the connection")
    front.wait_for(r'"GET /d/2" route=/ 503 "receiver closed without taking the connection')
    # The next request gets a new connection, and the front keeps it as a channel.
    assert fetch_json(front, "/d/3")["conn"] == 1
    assert [s.uri for s in rx.seen] == ["/d/1", "/d/3"]
    assert rx.wait_open(1) == [1]
    assert front.settled_fd_count(baseline + 1) == baseline + 1


@pytest.mark.parametrize("mode", ["pass", "websocket"])
def test_a_channel_found_dead_at_send_time_is_replaced_without_a_503(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
    mode: str,
) -> None:
    """The receiver shut its reading side: the front sees no EOF, the channel
    looks idle, and only its sendmsg fails (EPIPE, nothing sent).  The handoff
    goes again on a new connection; the dead channel is not used again."""
    if mode == "pass":
        rx = receivers(after_acking(1, refuse_further_handoffs))
        front = fronts(f"/=unix:{rx.path}")
    else:
        rx = receivers(after_acking(1, refuse_further_handoffs), ws_echo)
        front = fronts(config=config(ws=rx.path))
    baseline = front.fd_count()

    def exchange(n: int) -> int:
        """Request number ``n``; which UNIX connection it came on."""
        if mode == "pass":
            conn: int = fetch_json(front, f"/s/{n}")["conn"]
            handed_off(front, f"/s/{n}")
            return conn
        url = f"ws://{front.addresses[0]}/ws/{n}"
        with connect(url, proxy=None, compression=None, open_timeout=IO_TIMEOUT) as ws:
            ws.send("hi")
            conn_text, _, text = ws.recv(timeout=IO_TIMEOUT).partition(":")
            assert text == "hi"
        handed_off(front, f"/ws/{n}", route="/ws", upgraded=True)
        return int(conn_text)

    assert exchange(1) == 0
    rx.wait_event("reading side shut")
    assert exchange(2) == 1
    assert exchange(3) == 1
    assert [s.uri.rsplit("/", 1)[1] for s in rx.seen] == ["1", "2", "3"]
    assert not [line for line in front.lines if " 503 " in line or "1013" in line]
    # Connection 0 is still open on our side, no longer on the front's.
    assert rx.open_conns() == [0, 1]
    assert front.settled_fd_count(baseline + 1) == baseline + 1


# --- (e) silence: settled at the handoff deadline by what was read --------------------------------


def after_warm_up(
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
    acked: int,
    behaviour: Special,
) -> tuple[FakeReceiver, FrontProcess, int]:
    """A receiver that acknowledges ``acked`` handoffs, then behaves as
    ``behaviour``; a front with a 0.5 s handoff timeout that has sent those
    ``acked``; and the front's fd count before them."""
    rx = receivers(after_acking(acked, behaviour))
    front = fronts(f"/=unix:{rx.path}", config=config(handoff=0.5))
    baseline = front.fd_count()
    for n in range(acked):
        fetch_json(front, f"/e/{n}")
        handed_off(front, f"/e/{n}")
    return rx, front, baseline


@pytest.mark.parametrize("acked", [0, 1], ids=["first-handoff", "confirmed-channel"])
def test_read_but_never_acknowledged_counts_as_taken_at_the_deadline(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
    acked: int,
) -> None:
    rx, front, baseline = after_warm_up(receivers, fronts, acked, read_without_acking)
    # The receiver answers only after the front closed the connection, so the
    # client's bytes tell the front's verdict: a 503 would arrive first.
    answer = fetch_json(front, "/e/silent")
    assert answer["conn"] == 0
    handed_off(front, "/e/silent")
    no_503_for(front, "/e/silent")
    assert "conn 0 closed by the front" in rx.events
    assert fetch_json(front, "/e/next")["conn"] == 1
    assert rx.wait_open(1) == [1]
    assert front.settled_fd_count(baseline + 1) == baseline + 1


@pytest.mark.parametrize("acked", [0, 1], ids=["first-handoff", "confirmed-channel"])
def test_neither_read_nor_acknowledged_answers_503_at_the_deadline(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
    acked: int,
) -> None:
    _, front, baseline = after_warm_up(receivers, fronts, acked, never_read)
    status, body = fetch(front, "/e/unread")
    assert status == 503
    front.hid_detail(body, "receiver did not take the connection within 0.5 s")
    # The front gave up on that connection; the next request gets a new one.
    assert fetch_json(front, "/e/next")["conn"] == 1
    handed_off(front, "/e/next")
    # Connection 0 is still open on our side (never read) but not on the front's.
    assert front.settled_fd_count(baseline + 1) == baseline + 1


#: A receiver busy elsewhere: it reads a handoff this long after it arrived,
#: well inside the handoff timeout below.
BUSY = 0.6
SLOW_HANDOFF_TIMEOUT = 1.0


def busy_channel_receiver(rx: FakeReceiver, index: int, conn: socket.socket) -> None:
    """A channel receiver that gets to each handoff BUSY seconds after it arrived."""
    reader = HandoffReader(conn.type)
    while True:
        rx.wait_readable(conn)
        time.sleep(BUSY)  # models the receiver's load, not a synchronisation
        got = rx.take(index, conn, reader)
        if got is None:
            return
        rx.ack(conn)
        rx.serve(index, *got)


def test_a_slow_request_head_leaves_the_receiver_its_whole_handoff_timeout(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    rx = receivers(busy_channel_receiver)
    front = fronts(f"/=unix:{rx.path}", config=config(handoff=SLOW_HANDOFF_TIMEOUT))
    # A quick head: the busy receiver takes it in time.
    assert fetch_json(front, "/quick")["conn"] == 0
    handed_off(front, "/quick")
    # A head that takes longer than the handoff timeout (still far inside the
    # 10 s head timeout); the receiver is as quick to take it as before.
    with front.connect() as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n")
        time.sleep(SLOW_HANDOFF_TIMEOUT * 1.5)  # models a slow client
        sock.sendall(b"\r\n")
        sock.settimeout(IO_TIMEOUT)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status, _, body = parse_response(data)
    assert status == 200, body
    assert json.loads(body)["conn"] == 0


#: A receiver working through a queue: each handoff takes it this long, so the
#: last of QUEUED waits well past the handoff timeout for its turn.
STEP = 0.3
QUEUED = 5
QUEUE_HANDOFF_TIMEOUT = 0.5


def one_at_a_time_receiver(rx: FakeReceiver, index: int, conn: socket.socket) -> None:
    """A channel receiver that takes one handoff every STEP seconds."""
    reader = HandoffReader(conn.type)
    while (got := rx.take(index, conn, reader)) is not None:
        time.sleep(STEP)  # models the receiver's work per handoff
        rx.ack(conn)
        rx.serve(index, *got)


def test_a_queue_on_a_working_channel_is_not_cut_off_by_the_deadline(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    # The handoff timeout detects a receiver that takes nothing; one that keeps
    # acknowledging gets its whole queue, however long it is (a connect burst).
    rx = receivers(one_at_a_time_receiver)
    front = fronts(f"/=unix:{rx.path}", config=config(channels=1, handoff=QUEUE_HANDOFF_TIMEOUT))
    assert fetch_json(front, "/q/warm")["conn"] == 0  # the channel is confirmed
    handed_off(front, "/q/warm")
    assert STEP * QUEUED > 2 * QUEUE_HANDOFF_TIMEOUT  # the last waits past its deadline
    answers = concurrent_fetch(front, [f"/q/{n}" for n in range(QUEUED)])
    assert {a["conn"] for a in answers} == {0}
    for n in range(QUEUED):
        no_503_for(front, f"/q/{n}")


# --- (f) a byte other than ACK on a channel ------------------------------------------------------


@pytest.mark.parametrize("special", [garbage_when_idle, garbage_instead_of_ack])
def test_a_byte_other_than_ack_closes_the_channel(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
    special: Special,
) -> None:
    rx = receivers(after_acking(1, special))
    front = fronts(f"/=unix:{rx.path}")
    baseline = front.fd_count()
    assert fetch_json(front, "/f/1")["conn"] == 0
    handed_off(front, "/f/1")
    if special is garbage_when_idle:
        rx.release.set()
    else:
        # Read, then the wrong byte: settled at once, and what was read is taken.
        assert fetch_json(front, "/f/read")["conn"] == 0
        no_503_for(front, "/f/read")
    rx.wait_event("conn 0 closed by the front")
    front.wait_for("other than acknowledgements on a channel; closing it")
    assert fetch_json(front, "/f/2")["conn"] == 1
    assert rx.wait_open(1) == [1]
    assert front.settled_fd_count(baseline + 1) == baseline + 1


# --- (g) channels turned off ---------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", [channel_receiver, acking_everything])
def test_channels_off_means_no_offer_and_one_connection_per_request(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
    behaviour: Behaviour,
) -> None:
    rx = receivers(behaviour)
    front = fronts(f"/=unix:{rx.path}", config=config(channels=0))
    baseline = front.fd_count()
    count = 5
    for n in range(count):
        answer = fetch_json(front, f"/g/{n}")
        assert answer["conn"] == n
        assert answer["channel"] == "0"  # no offer, but the front waits for the close
    assert rx.accepted == count
    assert all(s.headers[CHANNEL_HEADER] == b"0" and not s.record.channel for s in rx.seen)
    # Even a receiver that acknowledges is not kept: the front closes each connection.
    assert rx.wait_open(0) == []
    if behaviour is acking_everything:
        closed = {f"conn {n} closed by the front" for n in range(count)}
        assert len(rx.events) == count and set(rx.events) == closed
    assert front.settled_fd_count(baseline) == baseline


# --- (h) WebSocket mode over a channel -----------------------------------------------------------


def test_websocket_sessions_over_one_channel(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    rx = receivers(channel_receiver, ws_echo)
    front = fronts(config=config(ws=rx.path))
    baseline = front.fd_count()
    for n in range(5):
        with connect(
            f"ws://{front.addresses[0]}/ws/{n}",
            proxy=None,
            compression=None,
            open_timeout=IO_TIMEOUT,
        ) as ws:
            ws.send(f"hello {n}")
            assert ws.recv(timeout=IO_TIMEOUT) == f"0:hello {n}"
        handed_off(front, f"/ws/{n}", route="/ws", upgraded=True)
    assert rx.accepted == 1
    for seen in rx.seen:
        assert seen.headers[b"HANDOFF_UPGRADED"] == b"websocket"
        assert seen.headers[CHANNEL_HEADER] == b"1"
    assert front.settled_fd_count(baseline + 1) == baseline + 1
    rx.hang_up()
    assert front.settled_fd_count(baseline) == baseline


def test_websocket_handoff_lost_on_a_closed_channel_gets_close_1013(
    no_fd_leak: None,
    receivers: Callable[..., FakeReceiver],
    fronts: Callable[..., FrontProcess],
) -> None:
    rx = receivers(after_acking(1, close_with_the_next_unread), ws_echo)
    front = fronts(config=config(ws=rx.path))
    url = f"ws://{front.addresses[0]}/ws"
    with connect(f"{url}/1", proxy=None, compression=None, open_timeout=IO_TIMEOUT) as ws:
        ws.send("one")
        assert ws.recv(timeout=IO_TIMEOUT) == "0:one"
    handed_off(front, "/ws/1", route="/ws", upgraded=True)
    # The 101 is sent before the handoff; the failure then becomes a close frame.
    with (
        connect(f"{url}/2", proxy=None, compression=None, open_timeout=IO_TIMEOUT) as ws,
        pytest.raises(ConnectionClosedError) as closed,
    ):
        ws.recv(timeout=IO_TIMEOUT)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1013
    front.wait_for(r'"GET /ws/2" route=/ws 101 closed-1013')
    with connect(f"{url}/3", proxy=None, compression=None, open_timeout=IO_TIMEOUT) as ws:
        ws.send("three")
        assert ws.recv(timeout=IO_TIMEOUT) == "1:three"


# --- the project's receiver behind the front -----------------------------------------------------


def test_real_receiver_keeps_one_channel_and_its_exit_gives_clean_503s(
    no_fd_leak: None, fronts: Callable[..., FrontProcess], sockdir: Path
) -> None:
    path = str(sockdir / "real.sock")
    with serve_process("test_receiver_support:echo", [f"unix:{path}"]) as proc:
        receiver = ReceiverProcess(proc, proc.log_path, path)  # type: ignore[arg-type]
        front = fronts(f"/=unix:{path}")
        baseline = front.fd_count()
        for n in range(20):
            status, body = fetch(front, f"/real/{n}")
            assert (status, body) == (200, b"scgi GET /real/%d 0\n" % n)
            handed_off(front, f"/real/{n}")
        assert receiver.channel_count() == 1
        assert front.settled_fd_count(baseline + 1) == baseline + 1
        # A client arrives while the front is frozen, then the receiver stops:
        # whichever the front notices first when it resumes, the closed channel
        # or the request, the client gets a 503, not a hang.
        front.proc.send_signal(signal.SIGSTOP)
        try:
            with front.connect() as late:
                late.sendall(get("/late"))
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
                front.proc.send_signal(signal.SIGCONT)
                late.settimeout(IO_TIMEOUT)
                data = b""
                while chunk := late.recv(65536):
                    data += chunk
        finally:
            front.proc.send_signal(signal.SIGCONT)
        status, _, body = parse_response(data)
        assert status == 503, body
        # Nobody listens any more: 503 at once, and the front holds nothing.
        assert fetch(front, "/after")[0] == 503
        assert front.settled_fd_count(baseline) == baseline


def test_real_receiver_never_runs_a_request_the_front_answered_503(
    no_fd_leak: None, fronts: Callable[..., FrontProcess], sockdir: Path
) -> None:
    """A handler stalls the receiver's event loop past the front's handoff
    timeout: the front answers the request queued meanwhile 503 and closes
    the connection.  When the receiver gets to that handoff it must not run
    it: the client was told it failed, and may retry it."""
    path = str(sockdir / "real.sock")
    ran = sockdir / "ran.txt"
    ran.touch()
    with serve_process(
        "test_receiver_support:record_or_block", [f"unix:{path}"], env={"RECORD_TO": str(ran)}
    ) as proc:
        front = fronts(f"/=unix:{path}", config=config(handoff=0.3))
        assert fetch(front, "/warm")[0] == 200
        blocked: list[tuple[int, bytes]] = []
        thread = threading.Thread(target=lambda: blocked.append(fetch(front, "/block")))
        thread.start()
        deadline = time.monotonic() + IO_TIMEOUT
        while "/block" not in ran.read_text():
            assert time.monotonic() < deadline, "the receiver never ran /block"
            time.sleep(0.01)
        status, body = fetch(front, "/item/1")
        assert status == 503, body
        thread.join(IO_TIMEOUT)
        assert blocked == [(200, b"scgi GET /block 0\n")]
        # The receiver reads on: the next request is served on a new connection.
        assert fetch(front, "/after") == (200, b"scgi GET /after 0\n")
        assert ran.read_text().split() == ["/warm", "/block", "/after"]
        log = output_of(proc)
        assert "handoff of GET /item/1 read after its sender closed the connection" in log
