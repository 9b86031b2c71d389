"""The server side against the Autobahn|Testsuite fuzzingclient case categories.

Real ``fdhandoff serve`` processes running an echo (tests/ws_echo_app.py) in
each receiver flavour (the native API with an ``on_message`` callback and with
``async for``, the sync flavour, ASGI) behind a real ``fdhandoff front`` whose
websocket routes answer the upgrade themselves; the client is a raw 127.0.0.1
socket speaking frames built and parsed here, independently of the project's
codec.  Representative cases of Autobahn's categories 1-7, 9 and 10 (12 and 13
are permessage-deflate, not implemented: an offer of it gets a plain
handshake), judged as Autobahn judges them: the echo comes back intact, a
violation gets the close code RFC 6455 prescribes (1002, 1007, 1009) and
nothing after it, server frames are never masked, and the server ends the TCP
connection right after the closing handshake.  After every case each receiver
is alive, holds no more descriptors than before and echoes on a new
connection, and so does the front.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fdhandoff.receiver.options import MAX_WS_MESSAGE_SIZE
from handoff_receiver import FrontProcess, running_front
from test_receiver_asgi_e2e import ReceiverProcess

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).parent.parent
IO_TIMEOUT = 5.0
#: Autobahn's default wait for the server to drop the TCP connection after
#: the closing handshake (``serverConnectionDropTimeout``).
DROP_TIMEOUT = 1.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10

#: Route prefixes of the front: the native API with a callback, with
#: ``async for``, the sync flavour (a thread, ``for``), and ASGI; each behind
#: a websocket route (the front sends the 101).  The ``pass-`` routes let the
#: receiver answer the upgrade itself.
FLAVOURS = ["cb", "iter", "sync", "asgi"]
PASS_FLAVOURS = ["pass-cb", "pass-sync", "pass-asgi"]
#: The receiver processes, by a route each serves.
RECEIVERS = {"native": "cb", "sync": "sync", "asgi": "asgi"}

KOSME = "κόσμε".encode()


# --- frames, built and parsed here (not by the code under test) ----------------------------


def mask_payload(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One client frame, with the shortest length encoding (RFC 6455 §5.2)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + mask_payload(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True

    def __repr__(self) -> str:
        shown = self.payload if len(self.payload) <= 40 else self.payload[:40] + b"..."
        return f"Frame({self.opcode}, {shown!r} [{len(self.payload)}], fin={self.fin})"


@dataclass(frozen=True)
class Send:
    """Client bytes to write: ``chop`` bytes per write, then a ``pause``."""

    data: bytes
    chop: int = 0
    pause: float = 0.0


def f(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    chop: int = 0,
    pause: float = 0.0,
) -> Send:
    """A frame to send (see :func:`frame`), written as :class:`Send` says."""
    return Send(frame(opcode, payload, fin=fin, rsv=rsv, masked=masked), chop, pause)


class Client:
    """A raw WebSocket client over 127.0.0.1 (after the front's 101)."""

    def __init__(
        self, front: FrontProcess, flavour: str, headers: bytes = b"", *, autobahn: bool = False
    ) -> None:
        self.sock = socket.create_connection(front.host_port, timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        if autobahn:
            # The opening handshake of Autobahn's client, header for header.
            host, port = front.host_port
            request = (
                b"GET /%s/ HTTP/1.1\r\nUser-Agent: AutobahnTestSuite/0.8.2-0.10.9\r\n"
                b"Host: %s:%d\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
                b"Pragma: no-cache\r\nCache-Control: no-cache\r\nSec-WebSocket-Key: %s\r\n"
                b"Sec-WebSocket-Version: 13\r\n%s\r\n"
                % (flavour.encode(), host.encode(), port, key, headers)
            )
        else:
            request = (
                b"GET /%s/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                b"Sec-WebSocket-Version: 13\r\n%s\r\n" % (flavour.encode(), key, headers)
            )
        self.sock.sendall(request)
        self.buf = b""
        self.eof = False
        deadline = time.monotonic() + IO_TIMEOUT
        while b"\r\n\r\n" not in self.buf:
            assert time.monotonic() < deadline, self.buf
            self._fill()
            assert not self.eof, f"closed during the handshake: {self.buf!r}"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101 "), head
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        assert fields["sec-websocket-accept"] == expected
        self.response_headers = fields
        self.close_sent = False

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if data:
            self.buf += data
        else:
            self.eof = True

    def send(self, *items: Send | bytes) -> None:
        for item in items:
            send = item if isinstance(item, Send) else Send(item)
            if send.data[:1] and send.data[0] & 0x0F == CLOSE:
                self.close_sent = True
            if send.chop:
                for start in range(0, len(send.data), send.chop):
                    self.sock.sendall(send.data[start : start + send.chop])
                    if send.chop < 16:
                        time.sleep(0.0005)  # separate segments, mostly
            else:
                self.sock.sendall(send.data)
            if send.pause:
                time.sleep(send.pause)

    def _need(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            if self.eof:
                return False
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out with {self.buf[:64]!r} buffered"
            self.sock.settimeout(remaining)
            self._fill()
        return True

    def recv_frame(self, timeout: float = IO_TIMEOUT) -> Frame | None:
        """The next server frame; None at EOF.  Checks what every server frame must be."""
        deadline = time.monotonic() + timeout
        if not self._need(2, deadline):
            assert not self.buf, f"EOF inside a frame header: {self.buf!r}"
            return None
        first, second = self.buf[0], self.buf[1]
        assert not second & 0x80, "a server must not mask its frames (RFC 6455 §5.1)"
        assert not first & 0x70, "RSV bits set by the server, no extension was negotiated"
        length, size = second & 0x7F, 2
        if length == 126:
            assert self._need(4, deadline), "EOF inside a frame header"
            (length,), size = struct.unpack("!H", self.buf[2:4]), 4
        elif length == 127:
            assert self._need(10, deadline), "EOF inside a frame header"
            (length,), size = struct.unpack("!Q", self.buf[2:10]), 10
        assert self._need(size + length, deadline), "EOF inside a frame"
        payload = self.buf[size : size + length]
        self.buf = self.buf[size + length :]
        return Frame(first & 0x0F, payload, bool(first & 0x80))

    def message(self, timeout: float = IO_TIMEOUT) -> Frame:
        got = self.recv_frame(timeout)
        assert got is not None, "EOF instead of a frame"
        return got

    def until_eof(self, timeout: float = IO_TIMEOUT) -> list[Frame]:
        """Every frame until the server closes the TCP connection.

        The server's close frame is answered as RFC 6455 §5.5.1 requires
        (unless ours went first); the server must then end the TCP
        connection (§7.1.1) within :data:`DROP_TIMEOUT`, all within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        frames: list[Frame] = []
        exchanged = None  # when both close frames were sent
        while (got := self.recv_frame(deadline - time.monotonic())) is not None:
            frames.append(got)
            if got.opcode == CLOSE and exchanged is None:
                if not self.close_sent:
                    code = got.payload[:2] if len(got.payload) >= 2 else b""
                    self.send(frame(CLOSE, code))
                exchanged = time.monotonic()
        if exchanged is not None:
            assert time.monotonic() - exchanged < DROP_TIMEOUT, "the server kept the connection"
        return frames

    def close(self) -> None:
        self.sock.close()


#: The server's close frame a case expects: its code, None for no code, or a set of those.
Closing = int | set[int | None] | None

#: Frames to send, the frames expected back, the server's close frame.
Case = tuple[list[Send], list[Frame], Closing]


def close_code(got: Frame) -> int | None:
    assert got.opcode == CLOSE, got
    if not got.payload:
        return None
    assert len(got.payload) >= 2, got
    got.payload[2:].decode("utf-8")  # a reason is UTF-8 (RFC 6455 §5.5.1)
    return int(struct.unpack("!H", got.payload[:2])[0])


# --- the servers -----------------------------------------------------------------------------


@dataclass
class Servers:
    front: FrontProcess
    receivers: dict[str, ReceiverProcess]  # by flavour
    baselines: dict[str, int]  # receiver fd counts by flavour, front's under "front"

    def connect(self, flavour: str, headers: bytes = b"", *, autobahn: bool = False) -> Client:
        return Client(self.front, flavour, headers, autobahn=autobahn)


def start_receiver(tmp: Path, name: str, target: str, interface: str) -> ReceiverProcess:
    path = str(tmp / f"{name}.sock")
    log = tmp / f"{name}.log"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
        PYTHONUNBUFFERED="1",
    )
    args = ["serve", target, "--interface", interface, "--bind", f"unix:{path}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fdhandoff", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    receiver = ReceiverProcess(proc, log, path)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        assert proc.poll() is None, f"receiver exited:\n{receiver.output()}"
        assert time.monotonic() < deadline, "receiver did not start listening"
        time.sleep(0.05)
    return receiver


def echo_once(servers: Servers, flavour: str) -> None:
    client = servers.connect(flavour)
    try:
        client.send(frame(TEXT, b"still here"))
        assert client.message() == Frame(TEXT, b"still here")
        client.send(frame(CLOSE, close_payload(1000)))
        assert [close_code(got) for got in client.until_eof()] == [1000]
    finally:
        client.close()


def fd_links(pid: int) -> list[str]:
    """What the fds of process ``pid`` are, for a failure message."""
    kinds = {}
    for table in ("tcp", "tcp6", "unix"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                inode = fields[6] if table == "unix" else fields[9]
                kinds[inode] = f"{table} {' '.join(fields[1:4]) if table != 'unix' else fields[7:]}"
    links = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            links.append(f"{name} -> {link} {kinds.get(link[8:-1], '')}")
    return links


def unix_inodes() -> set[str]:
    with open("/proc/net/unix") as table:
        next(table)
        return {line.split()[6] for line in table}


def held_fds(pid: int) -> int:
    """The fds of process ``pid`` but its UNIX sockets and epoll instances.

    Those are the channels between the front and the receivers and, in the
    sync flavour, the selector each channel's reader waits in: kept open on
    purpose, and more of them are opened while handoffs overlap (up to the
    front's ``limits.channels`` per backend).  Client connections, files and
    pipes are what a case could leak.
    """
    unix = unix_inodes()
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            link = os.readlink(f"{fd_dir}/{name}")
            count += not (
                (link.startswith("socket:[") and link[8:-1] in unix)
                or link == "anon_inode:[eventpoll]"
            )
    return count


def stable(count: Callable[[], int], quiet: float = 0.3) -> int:
    """``count()`` once it stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + IO_TIMEOUT
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.01)
        if (now := count()) != last:
            last, since = now, time.monotonic()
    return last


def settled(count: Callable[[], int], expected: int) -> int:
    """``count()`` once it is ``expected`` (or the last value, after IO_TIMEOUT);
    polled often: a connection just closed takes the receiver a moment."""
    deadline = time.monotonic() + IO_TIMEOUT
    while (now := count()) != expected and time.monotonic() < deadline:
        time.sleep(0.002)
    return now


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("ab")
    with contextlib.ExitStack() as stack:
        receivers: dict[str, ReceiverProcess] = {}
        for name, target, interface in [
            ("native", "ws_echo_app:handler", "handoff"),
            ("sync", "ws_echo_app:sync_handler", "handoff"),
            ("asgi", "ws_echo_app:app", "asgi"),
        ]:
            receivers[name] = start_receiver(tmp, name, target, interface)
            stack.callback(receivers[name].stop)
        routes = {
            "cb": ("websocket", "native"),
            "iter": ("websocket", "native"),
            "sync": ("websocket", "sync"),
            "asgi": ("websocket", "asgi"),
            "pass-cb": ("pass", "native"),
            "pass-sync": ("pass", "sync"),
            "pass-asgi": ("pass", "asgi"),
        }
        config = tmp / "front.toml"
        config.write_text(
            "".join(
                f'[[route]]\nprefix = "/{route}/"\nmode = "{mode}"\n'
                f'backend = "unix:{receivers[name].path}"\n'
                for route, (mode, name) in routes.items()
            )
        )
        front = stack.enter_context(
            running_front(["--listen", "127.0.0.1:0", "--config", str(config)])
        )
        made = Servers(front, {route: receivers[name] for route, (_, name) in routes.items()}, {})
        for route in routes:
            echo_once(made, route)  # every route warm: channels, imports
        processes = {**{name: r.proc.pid for name, r in receivers.items()}, "front": front.proc.pid}
        made.baselines = {
            name: stable(functools.partial(held_fds, pid)) for name, pid in processes.items()
        }
        yield made
        for name, receiver in receivers.items():
            # Clients that broke the protocol are logged at INFO: no warning,
            # error or traceback came from any case.
            problems = [
                line
                for line in receiver.output().splitlines()
                if " WARNING " in line or " ERROR " in line or "Traceback" in line
            ]
            assert not problems, f"{name} receiver:\n" + "\n".join(problems[:20])


@pytest.fixture
def ws(servers: Servers, request: pytest.FixtureRequest) -> Iterator[Callable[..., Client]]:
    """Connections to the test's flavour; afterwards, the servers are checked.

    Whatever the case did, the receiver is alive, serves a new connection and
    holds no descriptor more than before; so does the front.
    """
    flavour: str = request.node.callspec.params["flavour"]
    made: list[Client] = []

    def connect(headers: bytes = b"", *, autobahn: bool = False) -> Client:
        client = servers.connect(flavour, headers, autobahn=autobahn)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()
    receiver = servers.receivers[flavour]
    assert receiver.proc.poll() is None, f"receiver died:\n{receiver.output()[-3000:]}"
    echo_once(servers, flavour)
    pids = {name: servers.receivers[route].proc.pid for name, route in RECEIVERS.items()}
    pids["front"] = servers.front.proc.pid
    for name, pid in pids.items():
        baseline = servers.baselines[name]
        held = settled(functools.partial(held_fds, pid), baseline)
        assert held == baseline, f"{name}: fd leak\n" + "\n".join(fd_links(pid))


def run_case(
    client: Client,
    sends: list[Send],
    echoes: list[Frame],
    close: Closing = 1000,
    *,
    timeout: float = IO_TIMEOUT,
) -> None:
    """Send ``sends``; expect ``echoes``, then the server's close frame with
    ``close`` (a set: any of them; None: no status code) and the end of the
    TCP connection.  Without a close frame among ``sends``, the client closes
    with 1000 after sending them, unless ``close`` is a failure code (the
    server then closes first)."""
    client.send(*sends)
    allowed = close if isinstance(close, set) else {close}
    if allowed <= {1000, None} and not client.close_sent:
        client.send(frame(CLOSE, close_payload(1000)))
    got = client.until_eof(timeout)
    assert got, "the connection ended without a close frame"
    *data, last = got
    assert data == echoes
    assert close_code(last) in allowed, last
    assert client.eof


flavours = pytest.mark.parametrize("flavour", FLAVOURS)


# --- 1: framing ------------------------------------------------------------------------------

LENGTHS = [0, 125, 126, 127, 128, 65535, 65536]


@flavours
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("length", LENGTHS)
def test_1_payload_lengths_of_each_encoding(
    ws: Callable[..., Client], flavour: str, opcode: int, length: int
) -> None:
    """Autobahn 1.1.1-1.2.8: 7-bit, 16-bit and 64-bit lengths at their edges."""
    payload = (b"*" if opcode == TEXT else b"\xfe") * length
    run_case(ws(), [f(opcode, payload)], [Frame(opcode, payload)])


@flavours
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
def test_1_frame_in_chopped_writes(ws: Callable[..., Client], flavour: str, opcode: int) -> None:
    """Autobahn 1.1.8 / 1.2.8: a 64 KiB frame written in pieces of 997 bytes."""
    payload = (b"*" if opcode == TEXT else b"\xfe") * 65536
    run_case(ws(), [f(opcode, payload, chop=997)], [Frame(opcode, payload)])


# --- 2: pings and pongs ---------------------------------------------------------------------

PING_PAYLOADS = {
    "empty": b"",  # 2.1
    "text": b"Hello, world!",  # 2.2
    "binary": b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff",  # 2.3
    "125": b"\xfe" * 125,  # 2.4
}


@flavours
@pytest.mark.parametrize("payload", PING_PAYLOADS.values(), ids=PING_PAYLOADS.keys())
@pytest.mark.parametrize("chop", [0, 1], ids=["whole", "bytewise"])
def test_2_ping_is_answered_with_its_payload(
    ws: Callable[..., Client], flavour: str, payload: bytes, chop: int
) -> None:
    """Autobahn 2.1-2.4, 2.6 (1-byte writes): a pong with the same payload."""
    run_case(ws(), [f(PING, payload, chop=chop)], [Frame(PONG, payload)])


@flavours
def test_2_pings_of_every_size_are_answered(ws: Callable[..., Client], flavour: str) -> None:
    """Every control payload length, 0 to 125, comes back in its pong."""
    payloads = [bytes(range(n)) for n in range(126)]
    client = ws()
    client.send(b"".join(frame(PING, p) for p in payloads))
    run_case(client, [], [Frame(PONG, p) for p in payloads])


TEN_PINGS = [f"payload-{i}".encode() for i in range(10)]

CASES_2: dict[str, Case] = {
    # 2.5: a control frame carries at most 125 bytes (RFC 6455 §5.5).
    "2.5 ping of 126 bytes": ([f(PING, b"\xfe" * 126)], [], 1002),
    # 2.7-2.9: an unsolicited pong is a heartbeat, not to be answered (§5.5.3).
    "2.7 unsolicited pong": ([f(PONG)], [], 1000),
    "2.8 unsolicited pong with payload": ([f(PONG, b"unsolicited")], [], 1000),
    "2.9 unsolicited pong then ping": (
        [f(PONG, b"unsolicited"), f(PING, b"ping")],
        [Frame(PONG, b"ping")],
        1000,
    ),
    # 2.10, 2.11: ten pings, each answered, in order.
    "2.10 ten pings": ([f(PING, p) for p in TEN_PINGS], [Frame(PONG, p) for p in TEN_PINGS], 1000),
    "2.11 ten pings bytewise": (
        [f(PING, p, chop=1) for p in TEN_PINGS],
        [Frame(PONG, p) for p in TEN_PINGS],
        1000,
    ),
}


@flavours
@pytest.mark.parametrize("case", CASES_2.values(), ids=CASES_2.keys())
def test_2_control_frames(
    ws: Callable[..., Client],
    flavour: str,
    case: Case,
) -> None:
    run_case(ws(), *case)


# --- 3: reserved bits -----------------------------------------------------------------------

CASES_3 = {
    "3.1 text rsv1": (TEXT, b"Hello, world!", 1),
    "3.2 text rsv2": (TEXT, b"Hello, world!", 2),
    "3.3 text rsv3": (TEXT, b"Hello, world!", 3),
    "3.4 text rsv4": (TEXT, b"Hello, world!", 4),
    "3.5 binary rsv5": (BINARY, b"\x00\xff\xfe\xfd", 5),
    "3.6 ping rsv6": (PING, b"Hello, world!", 6),
    "3.7 close rsv7": (CLOSE, close_payload(1000), 7),
}


@flavours
@pytest.mark.parametrize(("opcode", "payload", "rsv"), CASES_3.values(), ids=CASES_3.keys())
@pytest.mark.parametrize("chop", [0, 1], ids=["whole", "bytewise"])
def test_3_reserved_bits_fail_the_connection(
    ws: Callable[..., Client], flavour: str, opcode: int, payload: bytes, rsv: int, chop: int
) -> None:
    """RSV bits without a negotiated extension: 1002 (RFC 6455 §5.2); the
    message before is echoed, nothing after the bad frame is (the ping).
    Bytewise: Autobahn 3.4's octet-wise chops."""
    sends = [f(TEXT, b"before"), f(opcode, payload, rsv=rsv, chop=chop), f(PING, b"after")]
    run_case(ws(), sends, [Frame(TEXT, b"before")], 1002)


# --- 4: reserved opcodes --------------------------------------------------------------------


@flavours
@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
@pytest.mark.parametrize(
    ("payload", "chop"),
    [(b"", 0), (b"reserved opcode", 0), (b"reserved opcode", 1)],
    ids=["empty", "payload", "bytewise"],
)
def test_4_reserved_opcodes_fail_the_connection(
    ws: Callable[..., Client], flavour: str, opcode: int, payload: bytes, chop: int
) -> None:
    """Autobahn 4.1.x (3-7, data) and 4.2.x (11-15, control): 1002 (RFC 6455 §5.2)."""
    sends = [f(TEXT, b"before"), f(opcode, payload, chop=chop), f(PING, b"after")]
    run_case(ws(), sends, [Frame(TEXT, b"before")], 1002)


# --- 5: fragmentation -----------------------------------------------------------------------

CASES_5: dict[str, Case] = {
    # §5.5: control frames must not be fragmented.
    "5.1 fragmented ping": ([f(PING, b"frag", fin=False), f(CONT, b"ment")], [], 1002),
    "5.2 fragmented pong": ([f(PONG, b"frag", fin=False), f(CONT, b"ment")], [], 1002),
    "5.3 text in two fragments": (
        [f(TEXT, b"frag", fin=False), f(CONT, b"ment")],
        [Frame(TEXT, b"fragment")],
        1000,
    ),
    "5.5 text in two fragments bytewise": (
        [f(TEXT, b"frag", fin=False, chop=1), f(CONT, b"ment", chop=1)],
        [Frame(TEXT, b"fragment")],
        1000,
    ),
    # §5.4: control frames may come between fragments; a ping is answered at once.
    "5.6 ping between fragments": (
        [f(TEXT, b"frag", fin=False), f(PING, b"p"), f(CONT, b"ment")],
        [Frame(PONG, b"p"), Frame(TEXT, b"fragment")],
        1000,
    ),
    "5.7 ping between fragments bytewise": (
        [f(TEXT, b"frag", fin=False, chop=1), f(PING, b"p", chop=1), f(CONT, b"ment", chop=1)],
        [Frame(PONG, b"p"), Frame(TEXT, b"fragment")],
        1000,
    ),
    "5.8 pong between fragments": (
        [f(BINARY, b"\x00", fin=False), f(PONG, b"p"), f(CONT, b"\x01")],
        [Frame(BINARY, b"\x00\x01")],
        1000,
    ),
    # §5.4: a continuation needs a message to continue.
    "5.9 continuation without start, fin": (
        [f(CONT, b"orphan"), f(TEXT, b"after")],
        [],
        1002,
    ),
    "5.12 continuation without start, not fin": (
        [f(CONT, b"orphan", fin=False), f(TEXT, b"after")],
        [],
        1002,
    ),
    "5.15 continuation after the message ended": (
        [f(TEXT, b"one", fin=False), f(CONT, b"two"), f(CONT, b"three", fin=False)],
        [Frame(TEXT, b"onetwo")],
        1002,
    ),
    # §5.4: no new data message before the fragmented one ends.
    "5.18 text while a text message is open": (
        [f(TEXT, b"one", fin=False), f(TEXT, b"two")],
        [],
        1002,
    ),
    "fragmented close": ([f(CLOSE, close_payload(1000), fin=False)], [], 1002),
    "fragmented ping inside a message": (
        [f(TEXT, b"one", fin=False), f(PING, b"p", fin=False), f(CONT, b"two")],
        [],
        1002,
    ),
    "5.18 text after a ping inside a message": (
        [f(TEXT, b"one", fin=False), f(PING, b"p"), f(TEXT, b"two")],
        [Frame(PONG, b"p")],
        1002,
    ),
    "5.18 binary while a text message is open": (
        [f(TEXT, b"one", fin=False), f(BINARY, b"two", fin=False)],
        [],
        1002,
    ),
    # 5.19/5.20: pings in a message sent over time; each answered before it ends.
    "5.19 pings over time inside a message": (
        [
            f(TEXT, b"f1", fin=False),
            f(CONT, b"f2", fin=False),
            f(PING, b"pong-1", pause=0.05),
            f(CONT, b"f3", fin=False),
            f(CONT, b"f4", fin=False),
            f(PING, b"pong-2", pause=0.05),
            f(CONT, b"f5"),
        ],
        [Frame(PONG, b"pong-1"), Frame(PONG, b"pong-2"), Frame(TEXT, b"f1f2f3f4f5")],
        1000,
    ),
    "zero-length fragments, then an orphan": (
        [f(TEXT, b"", fin=False), f(CONT, b"", fin=False), f(CONT, b"x"), f(CONT, b"")],
        [Frame(TEXT, b"x")],
        1002,
    ),
}


@flavours
@pytest.mark.parametrize("case", CASES_5.values(), ids=CASES_5.keys())
def test_5_fragmentation(
    ws: Callable[..., Client],
    flavour: str,
    case: Case,
) -> None:
    run_case(ws(), *case)


@flavours
def test_5_pong_arrives_while_the_message_is_still_open(
    ws: Callable[..., Client], flavour: str
) -> None:
    """Autobahn 5.19 checks the pong comes before the message's last fragment
    is sent: a ping inside a fragmented message is answered at once."""
    client = ws()
    client.send(f(TEXT, b"open", fin=False), f(PING, b"now"))
    assert client.message() == Frame(PONG, b"now")
    run_case(client, [f(CONT, b"ed")], [Frame(TEXT, b"opened")])


# --- 6: UTF-8 ---------------------------------------------------------------------------------

VALID_UTF8 = [
    "Hello-µ@ßöäüàá-UTF-8!!",  # 6.2.x
    "κόσμε",  # 6.5.x: 2-byte characters
    "\u0800\uffff\ud7ff\ue000\ufffd",  # 3-byte edges
    "\U00010000\U0010ffff\U0001f600",  # 4-byte edges
]


@flavours
@pytest.mark.parametrize("text", VALID_UTF8, ids=["latin", "greek", "3-byte", "4-byte"])
def test_6_valid_utf8_split_at_every_byte(
    ws: Callable[..., Client], flavour: str, text: str
) -> None:
    """Autobahn 6.2.x, 6.5.x-6.7.x: valid text, whole, bytewise, and in two
    fragments cut at every byte position, inside multi-byte characters too."""
    data = text.encode()
    messages = [[f(TEXT, data)], [f(TEXT, data, chop=1)]]
    messages += [[f(TEXT, data[:i], fin=False), f(CONT, data[i:])] for i in range(1, len(data))]
    bytewise = [f(CONT, data[i : i + 1], fin=False) for i in range(1, len(data))]
    messages.append([f(TEXT, data[:1], fin=False), *bytewise, f(CONT, b"")])
    sends = [send for message in messages for send in message]
    run_case(ws(), sends, [Frame(TEXT, data)] * len(messages))


CASES_6_1: dict[str, Case] = {
    "6.1.1 empty text": ([f(TEXT)], [Frame(TEXT, b"")], 1000),
    "6.1.2 three empty fragments": (
        [f(TEXT, fin=False), f(CONT, fin=False), f(CONT)],
        [Frame(TEXT, b"")],
        1000,
    ),
    "6.1.3 empty, text, empty fragments": (
        [f(TEXT, fin=False), f(CONT, b"middle", fin=False), f(CONT)],
        [Frame(TEXT, b"middle")],
        1000,
    ),
}


@flavours
@pytest.mark.parametrize("case", CASES_6_1.values(), ids=CASES_6_1.keys())
def test_6_empty_text(ws: Callable[..., Client], flavour: str, case: Case) -> None:
    run_case(ws(), *case)


@flavours
@pytest.mark.parametrize("length", range(1, len(KOSME) + 1))
def test_6_every_prefix_of_a_multibyte_text(
    ws: Callable[..., Client], flavour: str, length: int
) -> None:
    """Autobahn 6.6.x: each prefix of "κόσμε"; cut inside a character it is
    not UTF-8 (1007), else it is echoed."""
    data = KOSME[:length]
    try:
        data.decode()
    except UnicodeDecodeError:
        run_case(ws(), [f(TEXT, data)], [], 1007)
    else:
        run_case(ws(), [f(TEXT, data)], [Frame(TEXT, data)])


#: Invalid UTF-8 that is invalid as soon as its bytes are seen (Autobahn
#: 6.3-6.21): a server must fail the connection without waiting for more.
INVALID_AT_ONCE = {
    "6.3.1 surrogate in text": KOSME + b"\xed\xa0\x80edited",
    "6.4.1 above U+10FFFF": KOSME + b"\xf4\x90\x80\x80edited",
    "high surrogate": b"\xed\xa0\x80",
    "low surrogate": b"\xed\xbf\xbf",
    "surrogate pair": b"\xed\xa0\x80\xed\xb0\x80",
    "overlong NUL 2 bytes": b"\xc0\x80",
    "overlong NUL 3 bytes": b"\xe0\x80\x80",
    "overlong NUL 4 bytes": b"\xf0\x80\x80\x80",
    "overlong slash": b"\xc0\xaf",
    "overlong 2-byte max": b"\xc1\xbf",
    "overlong 3-byte max": b"\xe0\x9f\xbf",
    "overlong 4-byte max": b"\xf0\x8f\xbf\xbf",
    "U+110000": b"\xf4\x90\x80\x80",
    "F7 BF BF BF": b"\xf7\xbf\xbf\xbf",
    "5-byte sequence": b"\xf8\x88\x80\x80\x80",
    "6-byte sequence": b"\xfc\x84\x80\x80\x80\x80",
    "lone continuation": b"\x80",
    "lone BF": b"\xbf",
    "FE": b"\xfe",
    "FF": b"\xff",
    "start byte then ASCII": b"\xc2A",
    "3-byte lead then ASCII": b"\xe1\xbdA",
}

#: Invalid only because the message ends inside a character: known at its end.
INVALID_AT_END = {
    "truncated 2-byte": KOSME + b"\xce",
    "truncated 3-byte": b"\xe1\xbd",
    "truncated 4-byte": b"\xf0\x9f\x98",
}

INVALID_UTF8 = {**INVALID_AT_ONCE, **INVALID_AT_END}


@flavours
@pytest.mark.parametrize("data", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
@pytest.mark.parametrize("how", ["frame", "bytewise writes", "1-byte fragments"])
def test_6_invalid_utf8_is_1007(
    ws: Callable[..., Client], flavour: str, data: bytes, how: str
) -> None:
    """RFC 6455 §8.1: text that is not UTF-8 fails the connection with 1007."""
    if how == "frame":
        sends = [f(TEXT, data)]
    elif how == "bytewise writes":
        sends = [f(TEXT, data, chop=1)]
    else:
        last = len(data) - 1
        sends = [
            f(TEXT if i == 0 else CONT, data[i : i + 1], fin=i == last) for i in range(len(data))
        ]
    run_case(ws(), sends, [], 1007)


@flavours
@pytest.mark.parametrize("data", INVALID_AT_ONCE.values(), ids=INVALID_AT_ONCE.keys())
@pytest.mark.parametrize(
    "where", ["first fragment", "later fragment", "part of a frame", "part of the final fragment"]
)
def test_6_invalid_utf8_fails_fast(
    ws: Callable[..., Client], flavour: str, data: bytes, where: str
) -> None:
    """Autobahn 6.4.x: the server closes with 1007 as soon as the invalid
    bytes arrive, without waiting for the rest of the message (never sent here)."""
    if where == "first fragment":
        sends = [f(TEXT, data, fin=False)]
    elif where == "later fragment":
        sends = [f(TEXT, b"valid ", fin=False), f(CONT, data, fin=False)]
    else:
        # A final frame announcing more payload than is sent (6.4.3, 6.4.4).
        opcode = TEXT if where == "part of a frame" else CONT
        whole = frame(opcode, data + b"*" * 64)
        sends = [Send(whole[: len(whole) - 64])]
        if opcode == CONT:
            sends.insert(0, f(TEXT, b"valid ", fin=False))
    started = time.monotonic()
    run_case(ws(), sends, [], 1007, timeout=IO_TIMEOUT)
    assert time.monotonic() - started < 2.0


# --- 7: the closing handshake ---------------------------------------------------------------

#: Autobahn 7.7.x, and 1012-1014, registered with IANA since RFC 6455 (docs/websocket.md).
VALID_CLOSE_CODES = [
    *(1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011),
    *(1012, 1013, 1014),
    *(3000, 3999, 4000, 4999),
]
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]

CASES_7: dict[str, Case] = {
    "7.1.1 echo then close": (
        [f(TEXT, b"Hello"), f(CLOSE, close_payload(1000))],
        [Frame(TEXT, b"Hello")],
        1000,
    ),
    "7.1.2 close twice": ([f(CLOSE, close_payload(1000)), f(CLOSE, close_payload(1000))], [], 1000),
    "7.1.3 ping after close": ([f(CLOSE, close_payload(1000)), f(PING, b"late")], [], 1000),
    "7.1.4 text after close": ([f(CLOSE, close_payload(1000)), f(TEXT, b"late")], [], 1000),
    "7.1.5 fragment, close, continuation": (
        [f(TEXT, b"frag", fin=False), f(CLOSE, close_payload(1000)), f(CONT, b"ment")],
        [],
        1000,
    ),
    "7.1.6 large message, close, ping": (
        [f(TEXT, b"*" * 262144), f(CLOSE, close_payload(1000)), f(PING, b"late")],
        [Frame(TEXT, b"*" * 262144)],
        1000,
    ),
    "7.3.1 empty close": ([f(CLOSE)], [], {None, 1000}),
    "7.3.2 close with 1-byte payload": ([f(CLOSE, b"\x03")], [], 1002),
    "7.3.3 close 1000": ([f(CLOSE, close_payload(1000))], [], 1000),
    "7.3.4 close 1000 with reason": ([f(CLOSE, close_payload(1000, b"Hello World!"))], [], 1000),
    "7.3.5 close with a 123-byte reason": ([f(CLOSE, close_payload(1000, b"*" * 123))], [], 1000),
    "7.3.6 close payload of 126 bytes": ([f(CLOSE, close_payload(1000, b"*" * 124))], [], 1002),
    "7.5.1 close reason not UTF-8": (
        [f(CLOSE, close_payload(1000, KOSME + b"\xed\xa0\x80edited"))],
        [],
        1007,
    ),
    "close with a multi-byte reason": (
        [f(CLOSE, close_payload(1000, "κόσμε ∞ 😀".encode()))],
        [],
        1000,
    ),
}


@flavours
@pytest.mark.parametrize("case", CASES_7.values(), ids=CASES_7.keys())
def test_7_closing_handshake(
    ws: Callable[..., Client],
    flavour: str,
    case: Case,
) -> None:
    """The close is answered (RFC 6455 §5.5.1), nothing after it is processed,
    and the server ends the TCP connection (§7.1.1)."""
    run_case(ws(), *case)


@flavours
@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_7_valid_close_codes_are_echoed(ws: Callable[..., Client], flavour: str, code: int) -> None:
    """Autobahn 7.7.x: the reply carries the client's code."""
    run_case(ws(), [f(CLOSE, close_payload(code, b"bye"))], [], code)


@flavours
@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_7_invalid_close_codes_are_1002(ws: Callable[..., Client], flavour: str, code: int) -> None:
    """Autobahn 7.9.x, 7.13.x: codes that must not be sent (RFC 6455 §7.4)."""
    run_case(ws(), [f(CLOSE, close_payload(code))], [], 1002)


# --- 9: big messages ------------------------------------------------------------------------


@flavours
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("size", [65536, 1 << 20], ids=["64KiB", "1MiB"])
@pytest.mark.parametrize(
    ("fragment", "chop"),
    [(0, 0), (0, 64), (64, 0), (4096, 0), (65536, 0)],
    ids=["one frame", "64-byte writes", "64B fragments", "4KiB fragments", "64KiB fragments"],
)
def test_9_large_messages_are_echoed_intact(
    ws: Callable[..., Client], flavour: str, opcode: int, size: int, fragment: int, chop: int
) -> None:
    """Autobahn 9.1.x-9.6.x at the sizes of 9.1.1-9.1.3: whole, fragmented
    (9.3, 9.4) and chopped into small writes (9.5, 9.6)."""
    if size > 65536 and (chop or fragment == 64):
        size = 65536  # 16384 writes or frames make the point at 64 KiB already
    payload = os.urandom(size // 2).hex().encode() if opcode == TEXT else os.urandom(size)
    if fragment:
        pieces = [payload[i : i + fragment] for i in range(0, size, fragment)]
        last = len(pieces) - 1
        sends = [
            f(opcode if i == 0 else CONT, piece, fin=i == last) for i, piece in enumerate(pieces)
        ]
    else:
        sends = [f(opcode, payload, chop=chop)]
    client = ws()
    client.send(*sends)
    got = client.message()
    assert (got.opcode, got.fin, len(got.payload)) == (opcode, True, size)
    assert got.payload == payload
    run_case(client, [], [])


@flavours
def test_9_many_small_messages_in_a_row(ws: Callable[..., Client], flavour: str) -> None:
    """Autobahn 9.7.x/9.8.x: a burst of messages, each echoed, in order."""
    messages = [f"message {i}".encode() for i in range(1000)]
    client = ws()
    client.send(b"".join(frame(TEXT if i % 2 else BINARY, m) for i, m in enumerate(messages)))
    run_case(client, [], [Frame(TEXT if i % 2 else BINARY, m) for i, m in enumerate(messages)])


@flavours
def test_9_message_of_the_default_limit_is_echoed(ws: Callable[..., Client], flavour: str) -> None:
    """The limit (``--max-ws-message-size``, 16 MiB by default, docs/security.md)
    is the largest message taken, as Autobahn 9.1.6 / 9.2.6 send."""
    payload = os.urandom(MAX_WS_MESSAGE_SIZE)
    client = ws()
    client.send(frame(BINARY, payload))
    got = client.message(timeout=30)
    assert (got.opcode, len(got.payload)) == (BINARY, MAX_WS_MESSAGE_SIZE)
    assert got.payload == payload
    run_case(client, [], [])


@flavours
@pytest.mark.parametrize("fragmented", [False, True], ids=["one frame", "fragments"])
def test_9_message_over_the_limit_is_1009(
    ws: Callable[..., Client], flavour: str, fragmented: bool
) -> None:
    """Over the limit: close 1009 (RFC 6455 §7.4.1), decided from the frame
    header, so not one payload byte over the limit needs to be sent."""
    size = MAX_WS_MESSAGE_SIZE + 1
    if fragmented:
        first = f(BINARY, b"\x00" * 1000, fin=False)
        header = struct.pack("!BBQ", 0x80 | CONT, 0x80 | 127, size - 1000) + os.urandom(4)
    else:
        first = Send(b"")
        header = struct.pack("!BBQ", 0x80 | BINARY, 0x80 | 127, size) + os.urandom(4)
    run_case(ws(), [first, Send(header)], [], 1009)


# --- 10: auto-fragmentation -----------------------------------------------------------------


@flavours
@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("fragment", [1, 1300], ids=["1-byte", "1300-byte"])
def test_10_message_in_fragments_is_echoed_intact(
    ws: Callable[..., Client], flavour: str, opcode: int, fragment: int
) -> None:
    """Autobahn 10.1.1 (fragments of 1300 bytes) and down to one byte each."""
    size = 2000 if fragment == 1 else 65536
    if opcode == TEXT:
        payload = ("κόσμε😀a" * size)[:size].encode()[:size]
        payload = payload.decode("utf-8", "ignore").encode()
    else:
        payload = os.urandom(size)
    pieces = [payload[i : i + fragment] for i in range(0, len(payload), fragment)]
    last = len(pieces) - 1
    sends = [f(opcode if i == 0 else CONT, p, fin=i == last) for i, p in enumerate(pieces)]
    client = ws()
    client.send(b"".join(send.data for send in sends))
    run_case(client, [], [Frame(opcode, payload)])


# --- masking, handshake ---------------------------------------------------------------------


@flavours
@pytest.mark.parametrize("opcode", [TEXT, PING, CLOSE], ids=["text", "ping", "close"])
def test_unmasked_client_frame_is_1002(
    ws: Callable[..., Client], flavour: str, opcode: int
) -> None:
    """RFC 6455 §5.1: a server closes on an unmasked frame."""
    payload = close_payload(1000) if opcode == CLOSE else b"bare"
    run_case(
        ws(), [f(TEXT, b"before"), f(opcode, payload, masked=False)], [Frame(TEXT, b"before")], 1002
    )


@flavours
@pytest.mark.parametrize(
    "header",
    [
        b"\x81\xfe\x00\x05",
        b"\x81\xff" + struct.pack("!Q", 5),
        b"\x82\xff" + struct.pack("!Q", 65535),
    ],
    ids=["16-bit for 5", "64-bit for 5", "64-bit for 65535"],
)
def test_non_minimal_length_is_1002(ws: Callable[..., Client], flavour: str, header: bytes) -> None:
    """RFC 6455 §5.2: the minimal number of bytes MUST be used for the length
    (docs/websocket.md: refused, not guessed at)."""
    length = int.from_bytes(header[2:], "big")
    key = os.urandom(4)
    bad = header + key + mask_payload(b"x" * length, key)
    run_case(ws(), [f(TEXT, b"before"), Send(bad)], [Frame(TEXT, b"before")], 1002)


@pytest.mark.parametrize("flavour", FLAVOURS + PASS_FLAVOURS)
def test_autobahns_own_opening_handshake(ws: Callable[..., Client], flavour: str) -> None:
    """``Upgrade: WebSocket`` (the token is case-insensitive, RFC 6455 §4.2.1),
    a Host with its port, cache headers."""
    client = ws(autobahn=True)
    assert "sec-websocket-protocol" not in client.response_headers
    run_case(client, [f(TEXT, b"Hello")], [Frame(TEXT, b"Hello")])


@pytest.mark.parametrize("flavour", FLAVOURS + PASS_FLAVOURS)
def test_permessage_deflate_offer_gets_a_plain_handshake(
    ws: Callable[..., Client], flavour: str
) -> None:
    """No extension is implemented: an offer of one is left out of the 101
    (RFC 6455 §9.1), and frames are then plain (RSV1 would be 1002).  The
    offers of Autobahn's cases 12 and 13."""
    client = ws(
        b"Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; "
        b"server_max_window_bits=9, permessage-deflate; client_max_window_bits\r\n"
        b"Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n",
        autobahn=True,
    )
    assert "sec-websocket-extensions" not in client.response_headers
    run_case(client, [f(TEXT, b"plain")], [Frame(TEXT, b"plain")])


@pytest.mark.parametrize("flavour", FLAVOURS + PASS_FLAVOURS)
def test_frames_behind_the_upgrade_request_in_one_write(servers: Servers, flavour: str) -> None:
    """A client that sends frames in the same write as its upgrade loses none."""
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection(servers.front.host_port, timeout=IO_TIMEOUT) as sock:
        sock.sendall(
            b"GET /%s/early HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (flavour.encode(), key)
            + frame(PING, b"early")
            + frame(TEXT, b"early text")
            + frame(CLOSE, close_payload(1000))
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, frames = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frames == b"\x8a\x05early" + b"\x81\x0aearly text" + b"\x88\x02\x03\xe8"
