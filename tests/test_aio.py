"""asyncio fd passing (fdhandoff.aio) on real sockets, under asyncio's own loop and uvloop."""

from __future__ import annotations

import array
import asyncio
import fcntl
import itertools
import os
import socket
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from fdhandoff import aio, fdpass, message, scgi
from fdhandoff.errors import FdPassError, ProtocolError
from fdhandoff.message import Format, HandoffReader, HandoffRecord

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

STREAM = socket.SOCK_STREAM
SEQPACKET = socket.SOCK_SEQPACKET
TYPES = {"stream": STREAM, "seqpacket": SEQPACKET}
WAIT = 10.0

# libuv opens a process-wide signal pipe the first time any uvloop loop is
# created and keeps it for the life of the process; create that once here so
# the fd-leak accounting of the first uvloop test does not count it.
uvloop.new_event_loop().close()

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,  # the default loop of this Python
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""
    factory = LOOPS[request.param]

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        async def checked() -> T:
            is_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
            assert is_uvloop is (request.param == "uvloop")
            return await asyncio.wait_for(coro, WAIT * 3)

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(checked())

    return runner


class Kit:
    """Real non-blocking sockets for one test, closed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self._dir = tmp_path
        self._count = itertools.count()
        self._open: list[socket.socket] = []

    def keep(self, *socks: socket.socket) -> None:
        self._open.extend(socks)

    def unix_pair(self, how: str, sock_type: int) -> tuple[socket.socket, socket.socket]:
        if how == "socketpair":
            sender, receiver = socket.socketpair(socket.AF_UNIX, sock_type)
        else:
            path = str(self._dir / f"a{next(self._count)}.sock")
            with socket.socket(socket.AF_UNIX, sock_type) as server:
                server.bind(path)
                server.listen(1)
                sender = socket.socket(socket.AF_UNIX, sock_type)
                sender.connect(path)
                receiver, _ = server.accept()
        sender.setblocking(False)
        receiver.setblocking(False)
        self.keep(sender, receiver)
        return sender, receiver

    def tcp(self) -> tuple[socket.socket, socket.socket]:
        """(accepted, client) loopback TCP connection; ``accepted`` is what gets passed."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=WAIT)
            accepted, _ = listener.accept()
        self.keep(accepted, client)
        return accepted, client

    def close(self) -> None:
        for sock in self._open:
            sock.close()


@pytest.fixture
def kit(no_fd_leak: None, tmp_path: Path) -> Iterator[Kit]:
    k = Kit(tmp_path)
    yield k
    k.close()


def assert_fully_closed(client: socket.socket) -> None:
    client.settimeout(WAIT)
    assert client.recv(1) == b""


def assert_same_connection(handed: socket.socket, client: socket.socket) -> None:
    assert handed.getpeername() == client.getsockname()
    handed.setblocking(True)
    handed.sendall(b"ping")
    client.settimeout(WAIT)
    assert client.recv(4) == b"ping"


def nonblocking_flag(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


def assert_no_callback(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, *, write: bool
) -> None:
    """No readiness callback is left registered for ``sock``.

    asyncio's remove_reader/remove_writer say whether one was registered;
    uvloop's always return None, so only the asyncio loop can be checked.
    """
    remove = loop.remove_writer if write else loop.remove_reader
    result = remove(sock.fileno())
    if not isinstance(loop, uvloop.Loop):
        assert result is False


# --- one fd --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["socketpair", "bound"])
@pytest.mark.parametrize("kind", TYPES)
def test_send_and_receive_one_fd(run: Run[Any], kit: Kit, how: str, kind: str) -> None:
    sender, receiver = kit.unix_pair(how, TYPES[kind])
    accepted, client = kit.tcp()

    async def main() -> tuple[bytes, socket.socket | None]:
        receiving = asyncio.ensure_future(aio.recv_fd(receiver))
        await asyncio.sleep(0.01)  # the receiver is waiting before anything is sent
        await aio.send_fd(sender, b"handoff", accepted.fileno())
        return await receiving

    data, handed = run(main())
    accepted.close()
    assert data == b"handoff" and handed is not None
    with handed:
        assert os.get_inheritable(handed.fileno()) is False
        assert nonblocking_flag(handed)  # asyncio default: non-blocking
        assert_same_connection(handed, client)
    assert_fully_closed(client)


@pytest.mark.parametrize("blocking", [True, False])
def test_received_fd_mode_whatever_the_sender_set(run: Run[Any], kit: Kit, blocking: bool) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()
    accepted.setblocking(blocking)  # the opposite of what the receiver asks for below

    async def main() -> socket.socket | None:
        await aio.send_fd(sender, b"X", accepted.fileno())
        _, handed = await aio.recv_fd(receiver, blocking=not blocking)
        return handed

    handed = run(main())
    assert handed is not None
    with handed:
        assert nonblocking_flag(handed) is blocking
        assert_same_connection(handed, client)


def test_partial_send_passes_the_fd_once(run: Run[Any], kit: Kit) -> None:
    sender, receiver = kit.unix_pair("bound", STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = bytes(itertools.islice(itertools.cycle(range(253)), 1 << 20))
    assert len(payload) > 8 * sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    accepted, client = kit.tcp()

    async def drain_slowly() -> tuple[list[bytes], list[tuple[int, socket.socket]]]:
        chunks: list[bytes] = []
        fds: list[tuple[int, socket.socket]] = []
        total = 0
        while total < len(payload):
            data, fd_sock = await aio.recv_fd(receiver, 8192)
            assert data
            if fd_sock is not None:
                fds.append((len(chunks), fd_sock))
            chunks.append(data)
            total += len(data)
            await asyncio.sleep(0.0005)
        return chunks, fds

    async def main() -> tuple[list[bytes], list[tuple[int, socket.socket]]]:
        draining = asyncio.ensure_future(drain_slowly())
        await aio.send_fd(sender, payload, accepted.fileno())
        return await draining

    chunks, fds = run(main())
    for _, sock in fds:
        kit.keep(sock)
    assert len(chunks) > 1
    assert b"".join(chunks) == payload
    assert [index for index, _ in fds] == [0]
    with pytest.raises(BlockingIOError):
        fdpass.recv_fd_nowait(receiver)
    accepted.close()
    assert_same_connection(fds[0][1], client)
    fds[0][1].close()
    assert_fully_closed(client)


# --- recv_handoff in every format ------------------------------------------------------------


def test_recv_handoff_scgi(run: Run[Any], kit: Kit) -> None:
    sender, receiver = kit.unix_pair("bound", STREAM)
    accepted, client = kit.tcp()
    capture = (Path(__file__).parent / "fixtures" / "nginx-fd-pass" / "get-query.bin").read_bytes()

    async def main() -> tuple[HandoffRecord, socket.socket] | None:
        receiving = asyncio.ensure_future(aio.recv_handoff(receiver))
        await aio.send_fd(sender, capture[:3], accepted.fileno())
        await asyncio.sleep(0.02)
        sender.sendall(capture[3:])
        return await receiving

    got = run(main())
    accepted.close()
    assert got is not None
    record, handed = got
    with handed:
        assert record.format is Format.SCGI
        assert record.headers == scgi.decode(capture)[0]
        assert_same_connection(handed, client)
    assert_fully_closed(client)


def test_recv_handoff_payload_records(run: Run[Any], kit: Kit) -> None:
    sender, receiver = kit.unix_pair("bound", SEQPACKET)
    payloads = [b"", b'{"user_id":12345}', b"x" * message.MAX_PAYLOAD_SIZE]
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 212992 // 2)
    pairs = [kit.tcp() for _ in payloads]

    async def main() -> list[tuple[HandoffRecord, socket.socket] | None]:
        reader = HandoffReader(SEQPACKET)
        results = []
        for payload, (accepted, _) in zip(payloads, pairs, strict=True):
            await aio.send_fd(sender, message.encode_payload(payload), accepted.fileno())
            accepted.close()
            results.append(await aio.recv_handoff(receiver, reader))
        sender.close()
        results.append(await aio.recv_handoff(receiver, reader))
        return results

    results = run(main())
    assert results[-1] is None
    for payload, (_, client), got in zip(payloads, pairs, results, strict=False):
        assert got is not None
        record, handed = got
        with handed:
            assert record == HandoffRecord(Format.PAYLOAD, payload=payload)
            assert_same_connection(handed, client)
        assert_fully_closed(client)


@pytest.mark.parametrize("marker", [b"\x00", b"X", b"\x01"])
def test_recv_handoff_byte_markers(run: Run[Any], kit: Kit, marker: bytes) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    pairs = [kit.tcp() for _ in range(3)]

    async def main() -> list[tuple[HandoffRecord, socket.socket] | None]:
        for accepted, _ in pairs:
            await aio.send_fd(sender, message.encode_byte(marker), accepted.fileno())
            accepted.close()
        sender.close()
        reader = HandoffReader(STREAM)
        return [await aio.recv_handoff(receiver, reader) for _ in range(len(pairs) + 1)]

    results = run(main())
    assert results[-1] is None
    for (_, client), got in zip(pairs, results, strict=False):
        assert got is not None
        record, handed = got
        with handed:
            assert record == HandoffRecord(Format.BYTE, marker=marker)
            assert_same_connection(handed, client)
        assert_fully_closed(client)


def test_recv_handoff_plain_scgi(run: Run[Any], kit: Kit) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    body = b"b" * 5000
    data = scgi.encode([("SCGI", "1"), ("REQUEST_METHOD", "POST")], body)

    async def main() -> tuple[HandoffRecord, socket.socket] | None:
        receiving = asyncio.ensure_future(aio.recv_handoff(receiver))
        sender.sendall(data[:40])
        await asyncio.sleep(0.02)
        sender.sendall(data[40:])
        return await receiving

    got = run(main())
    assert got is not None
    record, conn = got
    assert conn is receiver and record.format is Format.PLAIN_SCGI
    assert scgi.header_value(record.headers, b"REQUEST_METHOD") == b"POST"
    conn.setblocking(True)
    conn.settimeout(WAIT)
    rest = b""
    while len(rest) < record.remaining:
        rest += conn.recv(65536)
    assert record.body + rest == body


# --- cancellation and timeouts: the received fd is closed --------------------------------------


def test_cancel_after_the_fd_arrived_closes_it(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()

    async def main() -> None:
        reader = HandoffReader(STREAM)
        task = asyncio.ensure_future(aio.recv_handoff(receiver, reader))
        await aio.send_fd(sender, b"24:CONTENT_", accepted.fileno())
        accepted.close()
        for _ in range(1000):  # until the fd and the first bytes were taken in
            if reader.format is not None:
                break
            await asyncio.sleep(0.005)
        assert reader.format is Format.SCGI
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert_fully_closed(client)


def test_timeout_after_the_fd_arrived_closes_it(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()

    async def main() -> None:
        await aio.send_fd(sender, b"24:CONTENT_", accepted.fileno())
        accepted.close()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await aio.recv_handoff(receiver)

    run(main())
    assert_fully_closed(client)


def test_cancel_while_waiting_leaves_the_socket_usable(
    run: Run[Any], kit: Kit, no_fd_leak: None
) -> None:
    sender, receiver = kit.unix_pair("socketpair", SEQPACKET)
    accepted, client = kit.tcp()

    async def main() -> tuple[bytes, socket.socket | None]:
        waiting = asyncio.ensure_future(aio.recv_fd(receiver))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert_no_callback(asyncio.get_running_loop(), receiver, write=False)
        receiving = asyncio.ensure_future(aio.recv_fd(receiver))
        await aio.send_fd(sender, b"{}", accepted.fileno())
        return await receiving

    data, handed = run(main())
    accepted.close()
    assert data == b"{}" and handed is not None
    with handed:
        assert_same_connection(handed, client)


# --- error paths ---------------------------------------------------------------------------------


def raw_send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    assert sock.sendmsg([data], rights) == len(data)


@pytest.mark.parametrize("count", [2, 9])
@pytest.mark.parametrize("kind", TYPES)
def test_extra_fds_closed(run: Run[Any], kit: Kit, kind: str, count: int, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", TYPES[kind])
    accepted, client = kit.tcp()
    copies = [os.dup(accepted.fileno()) for _ in range(count)]
    raw_send_fds(sender, b"X", copies)
    for fd in copies:
        os.close(fd)
    accepted.close()
    with pytest.raises(FdPassError):
        run(aio.recv_handoff(receiver))
    assert_fully_closed(client)


def test_truncated_record_closes_the_fd(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", SEQPACKET)
    accepted, client = kit.tcp()
    fdpass.send_fd(sender, b"p" * 100, accepted.fileno(), timeout=WAIT)
    accepted.close()
    with pytest.raises(FdPassError, match="truncated"):
        run(aio.recv_fd(receiver, 10))
    assert_fully_closed(client)


def test_nothing_to_receive_times_out(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    _, receiver = kit.unix_pair("socketpair", STREAM)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await aio.recv_fd(receiver)

    run(main())


def test_non_socket_fd_closed(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", SEQPACKET)
    read_end, write_end = os.pipe()
    try:
        fdpass.send_fd(sender, b"{}", read_end, timeout=WAIT)
        os.close(read_end)
        with pytest.raises(FdPassError, match="not a socket"):
            run(aio.recv_handoff(receiver))
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
    finally:
        os.close(write_end)


def test_peer_closes_mid_message(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("bound", STREAM)
    accepted, client = kit.tcp()
    fdpass.send_fd(sender, scgi.encode([("SCGI", "1")], b"abc")[:-1], accepted.fileno())
    accepted.close()
    sender.close()
    with pytest.raises(ProtocolError, match="closed inside"):
        run(aio.recv_handoff(receiver))
    assert_fully_closed(client)


@pytest.mark.parametrize(("kind", "data"), [("seqpacket", b"{}"), ("stream", b"X")])
def test_no_fd_where_one_is_required(
    run: Run[Any], kit: Kit, kind: str, data: bytes, no_fd_leak: None
) -> None:
    sender, receiver = kit.unix_pair("socketpair", TYPES[kind])
    sender.send(data)
    with pytest.raises(ProtocolError, match="0 fds"):
        run(aio.recv_handoff(receiver))


def test_second_fd_inside_scgi(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    first, client1 = kit.tcp()
    second, client2 = kit.tcp()
    data = scgi.encode([("SCGI", "1")])
    fdpass.send_fd(sender, data[:5], first.fileno())
    fdpass.send_fd(sender, data[5:], second.fileno())
    first.close()
    second.close()
    with pytest.raises(ProtocolError, match="second fd"):
        run(aio.recv_handoff(receiver))
    assert_fully_closed(client1)
    assert_fully_closed(client2)


def test_send_to_closed_peer(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()
    receiver.close()
    with pytest.raises(BrokenPipeError):
        run(aio.send_fd(sender, b"X", accepted.fileno()))
    assert_same_connection(accepted, client)


def test_oversized_seqpacket_record(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, _ = kit.unix_pair("socketpair", SEQPACKET)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 212992 // 2)
    accepted, _ = kit.tcp()
    with pytest.raises(FdPassError):
        run(aio.send_fd(sender, b"p" * (message.MAX_PAYLOAD_SIZE + 1), accepted.fileno()))


# --- readiness helpers ---------------------------------------------------------------------------


def test_wait_readable_and_writable(run: Run[Any], kit: Kit) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(aio.wait_readable(receiver))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        loop.call_later(0.01, sender.send, b"r")
        await waiting
        assert_no_callback(loop, receiver, write=False)  # gone once the wait is over
        assert receiver.recv(1) == b"r"
        while True:  # fill the sender until it would block
            try:
                sender.send(b"w" * 4096)
            except BlockingIOError:
                break
        writable = asyncio.ensure_future(aio.wait_writable(sender))
        await asyncio.sleep(0.02)
        assert not writable.done()
        while True:
            try:
                receiver.recv(65536)
            except BlockingIOError:
                break
        await writable
        assert_no_callback(loop, sender, write=True)

    run(main())


def test_send_without_data_is_refused(run: Run[Any], kit: Kit, no_fd_leak: None) -> None:
    sender, _ = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()
    with pytest.raises(ValueError, match="at least one data byte"):
        run(aio.send_fd(sender, b"", accepted.fileno()))
    assert_same_connection(accepted, client)


def test_a_second_waiter_on_one_socket_is_refused(run: Run[Any], kit: Kit) -> None:
    # One readiness callback per fd and direction: a second waiter would
    # replace the first, which would then never wake.
    sender, receiver = kit.unix_pair("socketpair", STREAM)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(aio.wait_readable(receiver))
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="already waiting"):
            await aio.wait_readable(receiver)
        sender.send(b"r")
        await asyncio.wait_for(first, WAIT)
        assert_no_callback(loop, receiver, write=False)
        await asyncio.wait_for(aio.wait_readable(receiver), WAIT)  # free again

    run(main())
