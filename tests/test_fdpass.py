"""fd passing over real UNIX sockets (fdhandoff.fdpass).

Every test runs on real kernel objects: socketpairs and UNIX sockets bound in
a temporary directory, SOCK_STREAM and SOCK_SEQPACKET, and the fd handed over
is a real loopback TCP connection whose client end tells whether every copy
of the passed fd was closed (it then reads EOF).
"""

from __future__ import annotations

import array
import errno
import fcntl
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdhandoff import fdpass, message, scgi
from fdhandoff.errors import FdPassError, ProtocolError
from fdhandoff.message import Format, HandoffReader, HandoffRecord

STREAM = socket.SOCK_STREAM
SEQPACKET = socket.SOCK_SEQPACKET
TYPES = {"stream": STREAM, "seqpacket": SEQPACKET}
HOW = ("socketpair", "bound")
WAIT = 10.0  # generous: the machine is small and shared


class Kit:
    """Creates real sockets for one test and closes whatever is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self._dir = tmp_path
        self._count = itertools.count()
        self._open: list[socket.socket] = []

    def keep(self, *socks: socket.socket) -> None:
        self._open.extend(socks)

    def unix_pair(self, how: str, sock_type: int) -> tuple[socket.socket, socket.socket]:
        """(sender, receiver): connected AF_UNIX sockets of ``sock_type``."""
        if how == "socketpair":
            sender, receiver = socket.socketpair(socket.AF_UNIX, sock_type)
        else:
            path = str(self._dir / f"h{next(self._count)}.sock")
            with socket.socket(socket.AF_UNIX, sock_type) as server:
                server.bind(path)
                server.listen(1)
                sender = socket.socket(socket.AF_UNIX, sock_type)
                sender.connect(path)
                receiver, _ = server.accept()
        self.keep(sender, receiver)
        return sender, receiver

    def tcp(self) -> tuple[socket.socket, socket.socket]:
        """(accepted, client): a real loopback TCP connection; pass ``accepted``."""
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
    """Sockets for the test, closed afterwards; then no fd may remain (no_fd_leak)."""
    k = Kit(tmp_path)
    yield k
    k.close()


def assert_fully_closed(client: socket.socket) -> None:
    """The client end reads EOF: no copy of the passed fd is open anywhere."""
    client.settimeout(WAIT)
    assert client.recv(1) == b""


def assert_same_connection(handed: socket.socket, client: socket.socket) -> None:
    assert handed.getpeername() == client.getsockname()
    handed.sendall(b"ping")
    client.settimeout(WAIT)
    assert client.recv(4) == b"ping"


def nonblocking_flag(sock: socket.socket) -> bool:
    return bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


def raw_send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """What a misbehaving sender does: several fds in one message."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    assert sock.sendmsg([data], rights) == len(data)


# --- one message, one fd ------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", TYPES)
def test_one_message_with_exactly_one_fd(kit: Kit, how: str, kind: str, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair(how, TYPES[kind])
    accepted, client = kit.tcp()
    fdpass.send_fd(sender, b"handoff", accepted.fileno(), timeout=WAIT)
    accepted.close()  # the sender's copy: from now on the receiver owns the connection
    data, handed = fdpass.recv_fd(receiver, timeout=WAIT)
    assert data == b"handoff"
    assert handed is not None
    with handed:
        assert handed.type == STREAM and handed.family == socket.AF_INET
        assert os.get_inheritable(handed.fileno()) is False  # MSG_CMSG_CLOEXEC
        assert fcntl.fcntl(handed.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert_same_connection(handed, client)
    assert_fully_closed(client)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("sender_nonblocking", [True, False])
@pytest.mark.parametrize("blocking", [True, False])
def test_received_fd_in_the_requested_blocking_mode(
    kit: Kit, kind: str, sender_nonblocking: bool, blocking: bool
) -> None:
    sender, receiver = kit.unix_pair("socketpair", TYPES[kind])
    accepted, client = kit.tcp()
    accepted.setblocking(not sender_nonblocking)
    assert nonblocking_flag(accepted) is sender_nonblocking
    fdpass.send_fd(sender, b"\x00", accepted.fileno(), timeout=WAIT)
    data, handed = fdpass.recv_fd(receiver, blocking=blocking, timeout=WAIT)
    assert data == b"\x00"
    assert handed is not None
    kit.keep(handed)
    # O_NONBLOCK lives on the shared open file description: the flag the
    # kernel reports, not just Python's idea of it, must match the request.
    assert nonblocking_flag(handed) is (not blocking)
    assert handed.gettimeout() == (None if blocking else 0.0)
    assert_same_connection(handed, client)


def test_wrap_fd_sets_the_mode_and_owns_the_fd(kit: Kit, no_fd_leak: None) -> None:
    accepted, client = kit.tcp()
    accepted.setblocking(False)
    sock = fdpass.wrap_fd(os.dup(accepted.fileno()), blocking=True)
    assert not nonblocking_flag(sock) and sock.gettimeout() is None
    sock.close()
    sock = fdpass.wrap_fd(os.dup(accepted.fileno()), blocking=False)
    assert nonblocking_flag(sock) and sock.gettimeout() == 0.0
    sock.close()
    assert_same_connection(accepted, client)


def test_data_without_fd_is_returned_with_none(kit: Kit) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    sender.sendall(b"abc")
    assert fdpass.recv_fd(receiver, timeout=WAIT) == (b"abc", None)
    sender.close()
    assert fdpass.recv_fd(receiver, timeout=WAIT) == (b"", None)  # EOF


def test_an_fd_needs_at_least_one_data_byte(kit: Kit, no_fd_leak: None) -> None:
    sender, _ = kit.unix_pair("socketpair", STREAM)
    accepted, _ = kit.tcp()
    with pytest.raises(ValueError, match="data byte"):
        fdpass.send_fd_nowait(sender, b"", accepted.fileno())


# --- partial sends: the fd travels once ------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_partial_send_completes_without_sending_the_fd_twice(
    kit: Kit, how: str, no_fd_leak: None
) -> None:
    sender, receiver = kit.unix_pair(how, STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = bytes(itertools.islice(itertools.cycle(range(251)), 1 << 20))
    assert len(payload) > 8 * sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    accepted, client = kit.tcp()

    received: list[bytes] = []
    fds: list[tuple[int, socket.socket]] = []  # (index of the read, socket)
    failure: list[BaseException] = []

    def drain_slowly() -> None:
        try:
            total = 0
            while total < len(payload):
                data, fd_sock = fdpass.recv_fd(receiver, 8192, timeout=WAIT)
                assert data, "EOF before the whole message"
                if fd_sock is not None:
                    fds.append((len(received), fd_sock))
                received.append(data)
                total += len(data)
                time.sleep(0.0005)
        except BaseException as exc:
            failure.append(exc)

    reader = threading.Thread(target=drain_slowly)
    reader.start()
    fdpass.send_fd(sender, payload, accepted.fileno(), timeout=60)
    reader.join(60)
    assert not reader.is_alive()
    assert failure == []
    assert len(received) > 1  # it really arrived in pieces
    assert b"".join(received) == payload
    assert [index for index, _ in fds] == [0]  # one fd, on the first bytes
    with pytest.raises(BlockingIOError):
        fdpass.recv_fd_nowait(receiver)  # nothing left, no stray fd
    handed = fds[0][1]
    accepted.close()
    with handed:
        assert_same_connection(handed, client)
    assert_fully_closed(client)


# --- malformed ancillary data ------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("count", [9, 20])
def test_ctrunc_closes_every_fd(kit: Kit, kind: str, count: int, no_fd_leak: None) -> None:
    assert count > fdpass.MAX_FDS_PER_MESSAGE
    sender, receiver = kit.unix_pair("socketpair", TYPES[kind])
    accepted, client = kit.tcp()
    copies = [os.dup(accepted.fileno()) for _ in range(count)]
    raw_send_fds(sender, b"x", copies)
    for fd in copies:
        os.close(fd)
    accepted.close()
    with pytest.raises(FdPassError, match="truncated"):
        fdpass.recv_fd(receiver, timeout=WAIT)
    assert_fully_closed(client)


def test_ctrunc_at_the_open_files_limit_says_so() -> None:
    """At EMFILE the kernel cannot install the fd and sets MSG_CTRUNC (cmsg(3));
    the error must not blame the sender for sending too many fds."""
    script = """
import array, os, resource, socket
from fdhandoff import fdpass
from fdhandoff.errors import FdPassError
a, b = socket.socketpair()
payload, peer = socket.socketpair()
rights = array.array("i", [payload.fileno()]).tobytes()
a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
used = len(os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, hard))
spare = []
try:
    while True:
        spare.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    fdpass.recv_fd_nowait(b)
except FdPassError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
    )
    assert "open-files limit" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("kind", TYPES)
def test_two_fds_in_one_message_closes_both(kit: Kit, kind: str, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", TYPES[kind])
    first, client1 = kit.tcp()
    second, client2 = kit.tcp()
    raw_send_fds(sender, b"X", [first.fileno(), second.fileno()])
    first.close()
    second.close()
    with pytest.raises(FdPassError, match="2 fds"):
        fdpass.recv_fd(receiver, timeout=WAIT)
    assert_fully_closed(client1)
    assert_fully_closed(client2)


def test_two_fds_through_recv_handoff(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", SEQPACKET)
    first, client1 = kit.tcp()
    second, client2 = kit.tcp()
    raw_send_fds(sender, b"{}", [first.fileno(), second.fileno()])
    first.close()
    second.close()
    with pytest.raises(FdPassError):
        fdpass.recv_handoff(receiver, timeout=WAIT)
    assert_fully_closed(client1)
    assert_fully_closed(client2)


def test_msg_trunc_closes_the_fd(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", SEQPACKET)
    accepted, client = kit.tcp()
    fdpass.send_fd(sender, b"p" * 100, accepted.fileno(), timeout=WAIT)
    accepted.close()
    with pytest.raises(FdPassError, match="truncated"):
        fdpass.recv_fd(receiver, 10, timeout=WAIT)
    assert_fully_closed(client)


def test_non_socket_fd_is_closed(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    read_end, write_end = os.pipe()
    try:
        fdpass.send_fd(sender, b"\x01", read_end, timeout=WAIT)
        os.close(read_end)
        with pytest.raises(FdPassError, match="not a socket") as info:
            fdpass.recv_fd(receiver, timeout=WAIT)
        assert info.value.errno == errno.ENOTSOCK
        # The received read end was closed: no reader is left for the pipe.
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
    finally:
        os.close(write_end)


def test_non_socket_fd_through_recv_handoff(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", SEQPACKET)
    read_end, write_end = os.pipe()
    try:
        fdpass.send_fd(sender, b"{}", read_end, timeout=WAIT)
        os.close(read_end)
        with pytest.raises(FdPassError):
            fdpass.recv_handoff(receiver, timeout=WAIT)
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
    finally:
        os.close(write_end)


def test_wrap_fd_closes_a_non_socket(no_fd_leak: None) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(FdPassError):
            fdpass.wrap_fd(read_end)
        with pytest.raises(OSError) as info:
            os.fstat(read_end)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(write_end)


# --- missing fds, second fds, peers that go away ---------------------------------------------


def test_payload_record_without_fd(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", SEQPACKET)
    sender.send(b'{"user_id":1}')
    with pytest.raises(ProtocolError, match="0 fds"):
        fdpass.recv_handoff(receiver, timeout=WAIT)


def test_byte_marker_without_fd(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    sender.send(b"X")
    with pytest.raises(ProtocolError, match="0 fds"):
        fdpass.recv_handoff(receiver, timeout=WAIT)


@pytest.mark.parametrize("how", HOW)
def test_second_fd_inside_an_scgi_handoff(kit: Kit, how: str, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair(how, STREAM)
    first, client1 = kit.tcp()
    second, client2 = kit.tcp()
    data = scgi.encode([("SCGI", "1"), ("REQUEST_METHOD", "GET")])
    fdpass.send_fd(sender, data[:10], first.fileno(), timeout=WAIT)
    fdpass.send_fd(sender, data[10:], second.fileno(), timeout=WAIT)
    first.close()
    second.close()
    with pytest.raises(ProtocolError, match="second fd"):
        fdpass.recv_handoff(receiver, timeout=WAIT)
    assert_fully_closed(client1)
    assert_fully_closed(client2)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("cut", [1, 5, 30, -1])
def test_peer_closes_mid_message(kit: Kit, how: str, cut: int, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair(how, STREAM)
    accepted, client = kit.tcp()
    data = scgi.encode([("SCGI", "1")], b"already read")
    fdpass.send_fd(sender, data[:cut], accepted.fileno(), timeout=WAIT)
    accepted.close()
    sender.close()
    with pytest.raises(ProtocolError, match="closed inside"):
        fdpass.recv_handoff(receiver, timeout=WAIT)
    assert_fully_closed(client)


def test_send_to_a_closed_peer_leaves_the_fd_with_the_caller(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()
    receiver.close()
    with pytest.raises(BrokenPipeError):
        fdpass.send_fd(sender, b"X", accepted.fileno(), timeout=WAIT)
    assert_same_connection(accepted, client)  # still ours, still working


# --- would-block and timeouts ------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_nothing_to_receive(kit: Kit, kind: str, no_fd_leak: None) -> None:
    _, receiver = kit.unix_pair("socketpair", TYPES[kind])
    with pytest.raises(BlockingIOError):
        fdpass.recv_fd_nowait(receiver)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fdpass.recv_fd(receiver, timeout=0.2)
    assert time.monotonic() - started >= 0.15
    with pytest.raises(TimeoutError):
        fdpass.recv_fd(receiver, timeout=0)
    with pytest.raises(TimeoutError):
        fdpass.recv_handoff(receiver, timeout=0.2)


def test_timeout_with_a_half_received_handoff_closes_the_fd(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()
    fdpass.send_fd(sender, b"24:CONTENT_", accepted.fileno(), timeout=WAIT)
    accepted.close()
    with pytest.raises(TimeoutError):
        fdpass.recv_handoff(receiver, timeout=0.3)
    assert_fully_closed(client)


def fill(sock: socket.socket) -> int:
    """Write until the socket would block; return how many bytes went in."""
    total = 0
    chunk = b"f" * 4096
    while True:
        try:
            total += fdpass.send_fd_nowait(sock, chunk, None)
        except BlockingIOError:
            return total


def test_send_would_block(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    accepted, client = kit.tcp()
    queued = fill(sender)
    with pytest.raises(BlockingIOError):
        fdpass.send_fd_nowait(sender, b"X", accepted.fileno())
    with pytest.raises(TimeoutError):
        fdpass.send_fd(sender, b"X", accepted.fileno(), timeout=0.2)
    # Neither attempt passed the fd: draining finds only the filler bytes.
    got = 0
    while got < queued:
        data, fd_sock = fdpass.recv_fd(receiver, timeout=WAIT)
        assert fd_sock is None
        got += len(data)
    assert got == queued
    with pytest.raises(BlockingIOError):
        fdpass.recv_fd_nowait(receiver)
    assert_same_connection(accepted, client)


# --- SEQPACKET record sizes: Apache's largest payload -----------------------------------------

APACHE_SNDBUF = 212992  # Linux default wmem: Apache's payload limit is this - 32


@pytest.fixture
def apache_pair(kit: Kit) -> tuple[socket.socket, socket.socket]:
    sender, receiver = kit.unix_pair("bound", SEQPACKET)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, APACHE_SNDBUF // 2)  # kernel doubles
    assert sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == APACHE_SNDBUF
    return sender, receiver


def test_largest_apache_payload_arrives_whole(
    kit: Kit, apache_pair: tuple[socket.socket, socket.socket], no_fd_leak: None
) -> None:
    sender, receiver = apache_pair
    accepted, client = kit.tcp()
    payload = bytes(itertools.islice(itertools.cycle(b'{"k":"0123456789"}'), 212960))
    assert len(payload) == message.MAX_PAYLOAD_SIZE
    fdpass.send_fd(sender, message.encode_payload(payload), accepted.fileno(), timeout=WAIT)
    accepted.close()
    got = fdpass.recv_handoff(receiver, timeout=WAIT)
    assert got is not None
    record, handed = got
    with handed:
        assert record == HandoffRecord(Format.PAYLOAD, payload=payload)
        assert_same_connection(handed, client)


def test_oversized_seqpacket_record_is_emsgsize(
    kit: Kit, apache_pair: tuple[socket.socket, socket.socket], no_fd_leak: None
) -> None:
    sender, receiver = apache_pair
    accepted, client = kit.tcp()
    too_big = b"p" * (message.MAX_PAYLOAD_SIZE + 1)
    with pytest.raises(FdPassError) as info:
        fdpass.send_fd_nowait(sender, too_big, accepted.fileno())
    assert info.value.errno == errno.EMSGSIZE
    with pytest.raises(FdPassError) as info:
        fdpass.send_fd(sender, too_big, accepted.fileno(), timeout=WAIT)
    assert info.value.errno == errno.EMSGSIZE
    with pytest.raises(BlockingIOError):
        fdpass.recv_fd_nowait(receiver)  # nothing was sent, no fd in flight
    assert_same_connection(accepted, client)


# --- SO_PEERCRED -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", TYPES)
def test_peer_credentials_of_this_process(kit: Kit, how: str, kind: str) -> None:
    sender, receiver = kit.unix_pair(how, TYPES[kind])
    expected = fdpass.PeerCredentials(os.getpid(), os.getuid(), os.getgid())
    assert fdpass.peer_credentials(receiver) == expected
    assert fdpass.peer_credentials(sender) == expected


def test_peer_credentials_name_the_connecting_process(tmp_path: Path) -> None:
    path = str(tmp_path / "cred.sock")
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({path!r})\n"
        "s.sendall(str(os.getpid()).encode())\n"
        "s.recv(1)\n"
    )
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        server.settimeout(WAIT * 3)
        child = subprocess.Popen([sys.executable, "-c", code])
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(WAIT)
                child_pid = int(conn.recv(32))
                creds = fdpass.peer_credentials(conn)
                conn.sendall(b".")
        finally:
            child.wait(WAIT * 3)
    assert child_pid == child.pid != os.getpid()
    assert creds == fdpass.PeerCredentials(child.pid, os.getuid(), os.getgid())


# --- recv_handoff in every format --------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_recv_handoff_scgi_with_already_read_bytes(kit: Kit, how: str, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair(how, STREAM)
    accepted, client = kit.tcp()
    already = b"POST body bytes the front had read"
    data = message.encode_scgi([("SCGI", "1"), ("REQUEST_METHOD", "POST")], already)
    fdpass.send_fd(sender, data + b"relay", accepted.fileno(), timeout=WAIT)
    accepted.close()
    reader = HandoffReader(STREAM)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    record, handed = got
    with handed:
        assert record.format is Format.SCGI
        assert record.headers == [
            (b"CONTENT_LENGTH", b"%d" % len(already)),
            (b"SCGI", b"1"),
            (b"REQUEST_METHOD", b"POST"),
        ]
        assert record.body == already
        assert reader.trailing_data == b"relay"
        assert_same_connection(handed, client)
    assert_fully_closed(client)


@pytest.mark.parametrize("how", HOW)
def test_recv_handoff_payload_records_on_a_persistent_connection(
    kit: Kit, how: str, no_fd_leak: None
) -> None:
    sender, receiver = kit.unix_pair(how, SEQPACKET)
    payloads = [b"", b'{"user_id":12345,"prompt":"hi"}', b"7", b"\x00\x00"]
    clients = []
    for payload in payloads:  # all queued before the first is read
        accepted, client = kit.tcp()
        fdpass.send_fd(sender, message.encode_payload(payload), accepted.fileno(), timeout=WAIT)
        accepted.close()
        clients.append(client)
    reader = HandoffReader(SEQPACKET)
    for payload, client in zip(payloads, clients, strict=True):
        got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
        assert got is not None
        record, handed = got
        with handed:
            assert record == HandoffRecord(Format.PAYLOAD, payload=payload)
            assert_same_connection(handed, client)
        assert_fully_closed(client)
    sender.close()
    assert fdpass.recv_handoff(receiver, reader, timeout=WAIT) is None


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("marker", [b"\x00", b"X", b"\x01"])
def test_recv_handoff_byte_markers_on_a_persistent_connection(
    kit: Kit, how: str, marker: bytes, no_fd_leak: None
) -> None:
    sender, receiver = kit.unix_pair(how, STREAM)
    clients = []
    for _ in range(4):  # back to back: each marker must still arrive with its own fd
        accepted, client = kit.tcp()
        fdpass.send_fd(sender, message.encode_byte(marker), accepted.fileno(), timeout=WAIT)
        accepted.close()
        clients.append(client)
    reader = HandoffReader(STREAM)
    for client in clients:
        got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
        assert got is not None
        record, handed = got
        with handed:
            assert record == HandoffRecord(Format.BYTE, marker=marker)
            assert_same_connection(handed, client)
        assert_fully_closed(client)
    sender.close()
    assert fdpass.recv_handoff(receiver, reader, timeout=WAIT) is None


@pytest.mark.parametrize("how", HOW)
def test_recv_handoff_plain_scgi_returns_the_connection(kit: Kit, how: str) -> None:
    sender, receiver = kit.unix_pair(how, STREAM)
    body = b"x" * 100_000
    head = scgi.encode([("CONTENT_LENGTH", str(len(body))), ("SCGI", "1")])

    def client() -> None:
        sender.sendall(head + body[:10])
        time.sleep(0.05)
        sender.sendall(body[10:])

    writer = threading.Thread(target=client)
    writer.start()
    got = fdpass.recv_handoff(receiver, timeout=WAIT)
    assert got is not None
    record, conn = got
    assert conn is receiver
    assert record.format is Format.PLAIN_SCGI
    assert record.headers == [(b"CONTENT_LENGTH", b"100000"), (b"SCGI", b"1")]
    rest = bytearray()
    conn.settimeout(WAIT)
    while len(rest) < record.remaining:
        chunk = conn.recv(65536)
        assert chunk
        rest += chunk
    writer.join(WAIT)
    assert record.body + rest == body
    conn.sendall(b"Status: 200 OK\r\n\r\n")
    assert sender.recv(100) == b"Status: 200 OK\r\n\r\n"


def test_recv_handoff_eof_between_records(kit: Kit, no_fd_leak: None) -> None:
    for kind in TYPES.values():
        sender, receiver = kit.unix_pair("socketpair", kind)
        sender.close()
        assert fdpass.recv_handoff(receiver, timeout=WAIT) is None


def test_recv_handoff_nginx_capture_split_over_two_sends(kit: Kit, no_fd_leak: None) -> None:
    capture = (Path(__file__).parent / "fixtures" / "nginx-fd-pass" / "get-query.bin").read_bytes()
    sender, receiver = kit.unix_pair("bound", STREAM)
    accepted, client = kit.tcp()
    fdpass.send_fd(sender, capture[:7], accepted.fileno(), timeout=WAIT)
    accepted.close()

    def rest() -> None:
        time.sleep(0.05)
        sender.sendall(capture[7:])
        sender.close()

    writer = threading.Thread(target=rest)
    writer.start()
    got = fdpass.recv_handoff(receiver, timeout=WAIT)
    writer.join(WAIT)
    assert got is not None
    record, handed = got
    with handed:
        assert record.format is Format.SCGI
        assert scgi.header_value(record.headers, b"REQUEST_URI") == b"/fd/hello?x=1&y=two%20words"
        assert_same_connection(handed, client)


def test_recv_size() -> None:
    with socket.socket(socket.AF_UNIX, SEQPACKET) as seq, socket.socket(socket.AF_UNIX) as st:
        assert fdpass.recv_size(seq) == message.MAX_PAYLOAD_SIZE + 1
        assert fdpass.recv_size(st) == fdpass.RECV_SIZE


# --- sockets that carry a Python-level timeout ----------------------------------------------

SOCKET_TIMEOUT = 30.0  # far longer than any wait below: hitting it means it was used


def test_nowait_forms_ignore_the_sockets_own_timeout(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for sock in (sender, receiver):
        sock.settimeout(SOCKET_TIMEOUT)
    accepted, client = kit.tcp()
    started = time.monotonic()
    with pytest.raises(BlockingIOError):
        fdpass.recv_fd_nowait(receiver)
    with pytest.raises(TimeoutError):
        fdpass.recv_fd(receiver, timeout=0.2)
    fill(sender)
    with pytest.raises(BlockingIOError):
        fdpass.send_fd_nowait(sender, b"X", accepted.fileno())
    with pytest.raises(TimeoutError):
        fdpass.send_fd(sender, b"X", accepted.fileno(), timeout=0.2)
    assert time.monotonic() - started < SOCKET_TIMEOUT / 2
    # the caller's setting is left as it was
    assert sender.gettimeout() == receiver.gettimeout() == SOCKET_TIMEOUT
    assert nonblocking_flag(sender) and nonblocking_flag(receiver)
    assert_same_connection(accepted, client)


def test_handoff_over_sockets_with_a_timeout(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("bound", STREAM)
    sender.settimeout(SOCKET_TIMEOUT)
    receiver.settimeout(SOCKET_TIMEOUT)
    accepted, client = kit.tcp()
    fdpass.send_fd(sender, message.encode_scgi([("SCGI", "1")]), accepted.fileno(), timeout=WAIT)
    accepted.close()
    got = fdpass.recv_handoff(receiver, timeout=WAIT)
    assert got is not None
    record, handed = got
    with handed:
        assert record.format is Format.SCGI
        assert_same_connection(handed, client)
    assert receiver.gettimeout() == sender.gettimeout() == SOCKET_TIMEOUT


def test_send_without_data_is_refused(kit: Kit, no_fd_leak: None) -> None:
    # unix(7): ancillary data needs at least one byte of real data to ride on.
    sender, _ = kit.unix_pair("socketpair", STREAM)
    accepted, client = kit.tcp()
    with pytest.raises(ValueError, match="at least one data byte"):
        fdpass.send_fd(sender, b"", accepted.fileno(), timeout=WAIT)
    assert_same_connection(accepted, client)


def test_timeout_after_the_fd_went_says_so(kit: Kit, no_fd_leak: None) -> None:
    sender, receiver = kit.unix_pair("socketpair", STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    accepted, _ = kit.tcp()
    with pytest.raises(TimeoutError, match="already passed"):
        fdpass.send_fd(sender, b"x" * (1 << 20), accepted.fileno(), timeout=0.2)
    _, fd_sock = fdpass.recv_fd(receiver, timeout=WAIT)
    assert fd_sock is not None  # the peer does hold it
    fd_sock.close()


# --- kernel TLS helpers (on real kTLS: tests/test_front_ktls.py) -----------------------------


def test_plain_sockets_are_not_tls_and_get_no_close_notify(no_fd_leak: None) -> None:
    """On a socket whose TLS the kernel does not hold, the close_notify alert
    would go out as two plain bytes: nothing may be sent."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            assert fdpass.tls_offloaded(server) is not None
            assert fdpass.send_tls_close_notify(server) is False
            server.shutdown(socket.SHUT_WR)
            client.settimeout(WAIT)
            assert client.recv(16) == b""  # the FIN alone, no stray bytes
    left, right = socket.socketpair()
    with left, right:
        assert "TCP_ULP" in (fdpass.tls_offloaded(left) or "")
        assert fdpass.send_tls_close_notify(left) is False
        right.setblocking(False)
        with pytest.raises(BlockingIOError):
            right.recv(16)
