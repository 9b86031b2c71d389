"""Helpers for the receiver tests: a receiver in a thread, senders in every peer format.

Also the handlers that subprocess receivers load as ``test_receiver_support:NAME``
(tests start them with this directory on PYTHONPATH).  No tests here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fdhandoff import fdpass, message, scgi
from fdhandoff.receiver import Handoff, Options, Receiver, engine, sync
from fdhandoff.receiver.listeners import Bind, Listener, close_listener, open_listener
from fdhandoff.receiver.runner import new_event_loop

# uvloop opens a process-wide pipe pair with its first loop; open it now so
# that fd-leak checks around a test do not count it.
new_event_loop("uvloop").close()

TESTS = Path(__file__).parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"

# --- a receiver in this process ------------------------------------------------------


class ReceiverThread:
    """Runs the asyncio engine on its own loop in a thread; stop() shuts it down."""

    def __init__(
        self,
        handler: Callable[[Handoff], Awaitable[None]],
        binds: Sequence[Bind],
        options: Options | None = None,
        loop: str = "asyncio",
    ) -> None:
        self.listeners: list[Listener] = [open_listener(b) for b in binds]
        self.handler = handler
        self.options = options or Options()
        self.loop_kind = loop
        self.loop: asyncio.AbstractEventLoop | None = None
        self.receiver: Receiver | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            with asyncio.Runner(loop_factory=lambda: new_event_loop(self.loop_kind)) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._ready.set()

    #: Let engine.serve run the handler's startup()/shutdown() (subclasses
    #: that drive the lifespan themselves turn it off).
    engine_lifespan = True

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        def ready(receiver: Receiver) -> None:
            self.receiver = receiver
            self._ready.set()

        await engine.serve(
            self.handler,
            [x.sock for x in self.listeners],
            self.options,
            stop=self._stop,
            ready=ready,
            lifespan=self.engine_lifespan,
        )

    def start(self) -> ReceiverThread:
        self.thread.start()
        assert self._ready.wait(10), "receiver did not start"
        if self.error:
            raise self.error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the receiver's loop and return its result."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []

        def wrapper() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self.loop.call_soon_threadsafe(wrapper)
        assert done.wait(10)
        return box[0] if box else None

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "receiver did not stop"
        for listener in self.listeners:
            close_listener(listener)
        if self.error:
            raise self.error

    def __enter__(self) -> ReceiverThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SyncReceiverThread:
    """The sync engine in a thread (it starts one more thread per connection)."""

    def __init__(
        self,
        handler: Callable[[Any], object],
        binds: Sequence[Bind],
        options: Options | None = None,
    ) -> None:
        self.listeners = [open_listener(b) for b in binds]
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=sync.serve,
            args=(handler, [x.sock for x in self.listeners], options or Options()),
            kwargs={"stop": self.stop_event},
            daemon=True,
        )

    def __enter__(self) -> SyncReceiverThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "sync receiver did not stop"
        for listener in self.listeners:
            close_listener(listener)


# --- client connections to hand over -----------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(client, server side): a real loopback TCP connection; hand over the server side."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    return client, server_side


def read_to_fin(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until EOF; a reset (``ConnectionResetError``) fails the caller's test."""
    sock.settimeout(timeout)
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)


def read_all(sock: socket.socket, timeout: float = 10.0, limit: int = 1 << 30) -> bytes:
    """Read until EOF (or ``timeout`` seconds without data)."""
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < limit:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        data = sock.recv(1 << 16)
        if not data:
            break
        out += data
    return out


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0]
    status = int(first.split()[1])  # "HTTP/1.1 200 OK" or CGI "Status: 200 OK"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        body = rest[size + 2 :]


# --- senders in every peer format --------------------------------------------------------


def wait_closed(conn: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer closed ``conn`` (the receiver's "taken" acknowledgement)."""
    conn.settimeout(timeout)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True  # closed with our bytes unread: closed all the same
    except TimeoutError:
        return False


def send_scgi(
    path: str,
    headers: Sequence[tuple[str | bytes, str | bytes]],
    fd_sock: socket.socket,
    already_read: bytes = b"",
    *,
    allow_duplicates: bool = False,
    wait: bool = True,
) -> None:
    """Hand over like the fdhandoff front / nginx fd_pass: one connection, one message."""
    data = scgi.encode(headers, already_read, allow_duplicates=allow_duplicates)
    send_raw_scgi(path, data, fd_sock, wait=wait)


def send_raw_scgi(path: str, data: bytes, fd_sock: socket.socket, *, wait: bool = True) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        fdpass.send_fd(conn, data, fd_sock.fileno(), timeout=10)
        fd_sock.close()
        if wait:
            assert wait_closed(conn), "receiver did not close the UNIX connection"


def send_payload(path: str, payload: bytes, fd_sock: socket.socket) -> None:
    """Hand over like Apache mod_socket_handoff: SEQPACKET, raw payload, one record."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 212992)
        conn.connect(path)
        fd_sock.setblocking(False)  # Apache's client fds are O_NONBLOCK
        fdpass.send_fd(conn, message.encode_payload(payload), fd_sock.fileno(), timeout=10)
        fd_sock.close()
        assert wait_closed(conn), "receiver did not close the SEQPACKET connection"


class MarkerSender:
    """A persistent BYTE-format connection (mod_proxy_fdpass, OpenResty, fd-pass)."""

    def __init__(self, path: str) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(path)

    def send(self, marker: bytes, fd_sock: socket.socket) -> None:
        fdpass.send_fd(self.conn, marker, fd_sock.fileno(), timeout=10)
        fd_sock.close()

    def close(self) -> None:
        self.conn.close()


def nginx_fixture(name: str, client: socket.socket) -> bytes:
    """An nginx fd_pass capture with REMOTE_ADDR/PORT rewritten for ``client``."""
    raw = (FIXTURES / "nginx-fd-pass" / name).read_bytes()
    headers, body = scgi.decode(raw, allow_duplicates=True)
    addr, port = client.getsockname()[:2]
    fixed: list[tuple[bytes, bytes]] = []
    for key, value in headers:
        if key == b"REMOTE_ADDR":
            value = addr.encode()
        elif key == b"REMOTE_PORT":
            value = str(port).encode()
        fixed.append((key, value))
    out = scgi.encode(fixed, body, allow_duplicates=True)
    assert out.split(b":", 1)[1].startswith(b"CONTENT_LENGTH\x000\x00SCGI\x001+fd_pass\x00")
    return out


def front_headers(
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    already_read: bytes = b"",
    **extra: str,
) -> list[tuple[str, str]]:
    """SCGI headers as the fdhandoff front sends them."""
    out = [
        ("CONTENT_LENGTH", str(len(already_read))),
        ("SCGI", "1"),
        ("REQUEST_METHOD", method),
        ("REQUEST_URI", target),
        ("QUERY_STRING", target.partition("?")[2]),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "40000"),
        ("SERVER_ADDR", "127.0.0.1"),
        ("SERVER_PORT", "8080"),
        ("SERVER_NAME", "localhost"),
    ]
    out += [("HTTP_" + n.upper().replace("-", "_"), v) for n, v in headers]
    out += list(extra.items())
    return out


class MiniFront:
    """A front for tests: accepts TCP clients, reads each request head and hands
    the connection over in the fdhandoff front's SCGI format (already-read
    bytes included), so real HTTP/WebSocket client libraries can be used."""

    def __init__(self, unix_path: str, **extra: str) -> None:
        self.unix_path = unix_path
        self.extra = extra
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.handed = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._hand_over(conn, addr)
            except OSError:
                conn.close()

    def _hand_over(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        pairs = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        headers = front_headers(method, target, pairs, rest, **self.extra)  # type: ignore[arg-type]
        headers = [(n, version if n == "SERVER_PROTOCOL" else v) for n, v in headers]
        headers = [
            (n, addr[0] if n == "REMOTE_ADDR" else str(addr[1]) if n == "REMOTE_PORT" else v)
            for n, v in headers
        ]
        send_scgi(self.unix_path, headers, conn, rest)
        self.handed += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.listener.close()

    def __enter__(self) -> MiniFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- subprocess receivers -----------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Served(subprocess.Popen[str]):
    """A receiver process; its output goes to a file (a pipe nobody reads
    would fill up and block the receiver's logging)."""

    log_path: Path


@contextlib.contextmanager
def serve_process(
    target: str,
    binds: Sequence[str],
    *args: str,
    env: dict[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> Iterator[Served]:
    """``fdhandoff serve`` in a subprocess, ready once every socket accepts."""
    cmd = [sys.executable, "-m", "fdhandoff", "serve", target, "--interface", "handoff"]
    for bind in binds:
        cmd += ["--bind", bind]
    cmd += list(args)
    full_env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{REPO / 'src'}")
    full_env.update(env or {})
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with open(log_path, "w") as out:
        proc = Served(
            cmd,
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec,
        )
    proc.log_path = log_path
    try:
        deadline = time.monotonic() + 20
        while not all(_listening(b) for b in binds):
            if proc.poll() is not None:
                raise AssertionError(f"receiver exited early:\n{log_path.read_text()}")
            assert time.monotonic() < deadline, "receiver did not start listening"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            log_path.unlink()


def _listening(bind: str) -> bool:
    """True once something accepts connections at the bind address."""
    scheme, _, path = bind.partition(":")
    kind = socket.SOCK_SEQPACKET if scheme == "unix-seqpacket" else socket.SOCK_STREAM
    with socket.socket(socket.AF_UNIX, kind) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def output_of(proc: Served) -> str:
    """Everything the process printed so far."""
    return proc.log_path.read_text()


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


# --- handlers used by subprocess receivers ---------------------------------------------------


async def echo(handoff: Handoff) -> None:
    """Describe the request back; /sse streams events until the client leaves."""
    if handoff.path == "/sse":
        stream = await handoff.sse()
        stream.send("ready")
        return
    if handoff.path == "/sse-3":  # three events, then the server ends the stream
        stream = await handoff.sse()
        for i in range(3):
            await stream.send(f"tick {i}")
        stream.close()
        return
    if handoff.path == "/slow-sse":
        stream = await handoff.sse()
        for i in range(50):
            await stream.send(f"tick {i}")
            await asyncio.sleep(0.1)
        stream.close()
        return
    if handoff.path == "/cookies":
        text = "|".join(handoff.header_values("cookie")) + "\n"
        await handoff.respond(200, [("Content-Type", "text/plain")], text.encode())
        return
    body = await handoff.read_body()
    text = f"{handoff.format.value} {handoff.method} {handoff.path} {len(body)}\n"
    await handoff.respond(200, [("Content-Type", "text/plain")], text.encode() + body)


async def asgi_echo(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """ASGI twin of :func:`echo`: scheme, method, path, body length, then the body.

    A WebSocket echoes text messages; ``/stream`` answers ``started`` and then
    waits for ``http.disconnect`` (as sse-starlette does).
    """
    if scope["type"] == "lifespan":
        while (event := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (event := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": "echo:" + (event.get("text") or "")})
        return
    if scope["path"] == "/stream":
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"started\n", "more_body": True})
        event = await receive()
        await send({"type": "http.response.body", "body": event["type"].encode()})
        return
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    text = f"{scope['scheme']} {scope['method']} {scope['path']} {len(body)}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(text + body))],
        }
    )
    await send({"type": "http.response.body", "body": text + body})


async def record_or_block(handoff: Handoff) -> None:
    """:func:`echo` that first appends its path to the file ``$RECORD_TO``;
    /block then stalls the whole event loop for 1.5 s (a sync call)."""
    with open(os.environ["RECORD_TO"], "a") as out:
        out.write(f"{handoff.path}\n")
    if handoff.path == "/block":
        time.sleep(1.5)
    await echo(handoff)


def sync_echo(handoff: Any) -> None:
    """The sync flavour's twin of :func:`echo`."""
    body = handoff.read_body()
    text = f"{handoff.format.value} {handoff.method} {handoff.path} {len(body)}\n"
    handoff.respond(200, [("Content-Type", "text/plain")], text.encode() + body)


async def crash_on_path(handoff: Handoff) -> None:
    """/crash kills this worker process (the supervisor must restart it)."""
    if handoff.path == "/crash":
        os._exit(3)
    await handoff.respond(200, [], f"pid {os.getpid()}\n".encode())


class SlowStart:
    """A handler whose startup() takes far longer than any test waits."""

    async def startup(self) -> None:
        await asyncio.sleep(60)

    async def shutdown(self) -> None:
        pass

    async def __call__(self, handoff: Handoff) -> None:
        await echo(handoff)


slow_start = SlowStart()
