"""Test harness for the front: a minimal receiver and the front as a real subprocess.

The receiver is built on fdhandoff.fdpass only (the project's receiver is a
separate role the front must not depend on).  It runs in a thread, takes
handoffs on a UNIX socket, closes the UNIX connection once the handoff is
read (the "taken" acknowledgement), and serves each client according to a
behaviour chosen by the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fdhandoff import fdpass, scgi
from fdhandoff.message import HandoffRecord

FIXTURES_NGINX = Path(__file__).parent / "fixtures" / "nginx-fd-pass"

#: Generous bounds: a loaded 2-core CI machine must not fail a correct front.
STARTUP_TIMEOUT = 30.0
IO_TIMEOUT = 10.0


@dataclass
class Handoff:
    """What one handoff delivered, as the receiver saw it."""

    record: HandoffRecord
    headers: dict[bytes, bytes]
    body: bytes = b""
    extra: bytes = b""
    nodelay: int | None = None
    peer_pid: int = 0
    pairs: list[tuple[bytes, bytes]] = field(default_factory=list)


def read_exactly(sock: socket.socket, size: int, timeout: float = IO_TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_to_close(sock: socket.socket, *, reset_ok: bool = False) -> bytes:
    """Everything until the peer closes (its timeout is the caller's); with
    ``reset_ok`` a reset ends the reading like a close."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        if not reset_ok:
            raise
    return data


def read_available(sock: socket.socket, wait: float) -> bytes:
    """Whatever arrives within ``wait`` seconds of silence."""
    data = b""
    sock.settimeout(wait)
    with contextlib.suppress(TimeoutError, OSError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def respond(client: socket.socket, payload: dict[str, object]) -> None:
    body = json.dumps(payload).encode()
    client.settimeout(IO_TIMEOUT)
    client.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )


def describe_handoff(handoff: Handoff) -> dict[str, object]:
    return {
        "headers": {k.decode(): v.decode("latin-1") for k, v in handoff.headers.items()},
        "body": handoff.body.decode("latin-1"),
        "extra": handoff.extra.decode("latin-1"),
    }


Behaviour = Callable[["TestReceiver", Handoff, socket.socket], None]


def echo(receiver: TestReceiver, handoff: Handoff, client: socket.socket) -> None:
    """Read the body HTTP_CONTENT_LENGTH announces, plus ``extra_bytes`` more, answer JSON."""
    length = int(handoff.headers.get(b"HTTP_CONTENT_LENGTH", b"0"))
    handoff.body = handoff.record.body + read_exactly(client, length - len(handoff.record.body))
    if receiver.extra_bytes:
        handoff.extra = read_exactly(client, receiver.extra_bytes)
    respond(client, describe_handoff(handoff))


class TestReceiver:
    """A receiver on ``path`` serving handoffs in a thread.

    ``mode``: "serve" (take the handoff, close the UNIX connection, run
    ``behaviour``), "close" (accept and close without reading), "hold"
    (accept and never read), "backlog" (listen but never accept),
    "keep-open" (read the handoff but keep the UNIX connection open),
    "nginx" (one recvmsg, decode like a receiver written for nginx fd_pass).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        path: Path,
        *,
        mode: str = "serve",
        behaviour: Behaviour = echo,
        sock_type: int = socket.SOCK_STREAM,
        backlog: int = 64,
        extra_bytes: int = 0,
    ) -> None:
        self.path = str(path)
        self.mode = mode
        self.behaviour = behaviour
        self.extra_bytes = extra_bytes
        self.handoffs: queue.Queue[Handoff] = queue.Queue()
        self.errors: list[BaseException] = []
        self.held: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX, sock_type)
        self.listener.bind(self.path)
        self.listener.listen(1 if mode == "backlog" else backlog)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.mode == "backlog":
            self._stop.wait()
            return
        while not self._stop.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            conn, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        client: socket.socket | None = None
        try:
            if self.mode == "close":
                conn.close()
                return
            if self.mode == "hold":
                self.held.append(conn)
                return
            pid = fdpass.peer_credentials(conn).pid
            if self.mode == "nginx":
                client, handoff = self._take_like_nginx(conn)
            else:
                result = fdpass.recv_handoff(conn, timeout=IO_TIMEOUT)
                assert result is not None
                record, client = result
                pairs = record.headers
                handoff = Handoff(record, dict(pairs), pairs=list(pairs))
            handoff.peer_pid = pid
            if client.family in (socket.AF_INET, socket.AF_INET6):
                handoff.nodelay = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            if self.mode == "keep-open":
                self.held.append(conn)
            else:
                conn.close()  # the "taken" acknowledgement
            self.behaviour(self, handoff, client)
            self.handoffs.put(handoff)
        except BaseException as exc:  # reported to the test, never swallowed
            self.errors.append(exc)
        finally:
            if client is not None:
                client.close()
            if self.mode not in ("hold", "keep-open"):
                conn.close()

    def _take_like_nginx(self, conn: socket.socket) -> tuple[socket.socket, Handoff]:
        """What a daemon written for nginx fd_pass does: ONE recvmsg, decode, go."""
        data, client = fdpass.recv_fd(conn, timeout=IO_TIMEOUT)
        assert client is not None, "no fd arrived with the first recvmsg"
        client.setblocking(True)
        pairs, body = scgi.decode(data, allow_duplicates=True)
        from fdhandoff.message import Format  # noqa: PLC0415

        record = HandoffRecord(Format.SCGI, headers=pairs, body=body)
        return client, Handoff(record, dict(pairs), pairs=pairs)

    def next(self, timeout: float = IO_TIMEOUT) -> Handoff:
        if self.errors:
            raise self.errors[0]
        try:
            return self.handoffs.get(timeout=timeout)
        except queue.Empty:
            if self.errors:
                raise self.errors[0] from None
            raise

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self.held:
            sock.close()
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --- the front as a subprocess ------------------------------------------------------------

_READY = re.compile(r"ready, listening on (.+)$")


class FrontProcess:
    """``python -m fdhandoff front ...`` with its stderr collected line by line."""

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fdhandoff", "front", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env=env,
            preexec_fn=preexec,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait_for(_READY, STARTUP_TIMEOUT)
        self.addresses = [a.strip() for a in ready.group(1).split(",")]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(
        self, pattern: re.Pattern[str] | str, timeout: float = IO_TIMEOUT
    ) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    found = regex.search(line)
                    if found:
                        return found
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no line matching {regex.pattern!r}; stderr:\n" + "\n".join(self.lines)
                    )
                self._changed.wait(min(remaining, 0.2))

    def hid_detail(self, body: bytes, detail: str) -> None:
        """The client's answer kept ``detail`` (a server-side reason) to itself; the log has it."""
        assert detail.encode() not in body, body
        self.wait_for(re.escape(detail))

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.addresses[0].rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def url(self) -> str:
        return f"http://{self.addresses[0]}"

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def settled_fd_count(self, expected: int, timeout: float = IO_TIMEOUT) -> int:
        """The fd count once it reaches ``expected`` (or the last value seen)."""
        deadline = time.monotonic() + timeout
        count = self.fd_count()
        while count != expected and time.monotonic() < deadline:
            time.sleep(0.02)
            count = self.fd_count()
        return count

    def fd_count_within(self, limit: int, timeout: float = IO_TIMEOUT) -> int:
        """The fd count once it is at most ``limit`` (or the last value seen)."""
        deadline = time.monotonic() + timeout
        count = self.fd_count()
        while count > limit and time.monotonic() < deadline:
            time.sleep(0.02)
            count = self.fd_count()
        return count

    def connect(self) -> socket.socket:
        return socket.create_connection(self.host_port, timeout=IO_TIMEOUT)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@contextlib.contextmanager
def running_front(args: list[str], **kwargs: object) -> Iterator[FrontProcess]:
    front = FrontProcess(args, **kwargs)  # type: ignore[arg-type]
    try:
        yield front
    finally:
        front.stop()


def http_exchange(
    front: FrontProcess, request: bytes, *, timeout: float = IO_TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; return status, headers, body."""
    with front.connect() as sock:
        sock.sendall(request)
        sock.settimeout(timeout)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        raise AssertionError(f"not an HTTP response: {data[:200]!r}")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


# --- fixtures shared by the front tests ------------------------------------------------------
# A test module imports them as ``*_fixture``; pytest knows them as sockdir, receivers, fronts.


@pytest.fixture(name="sockdir")
def sockdir_fixture() -> Iterator[Path]:
    """A short directory for UNIX sockets (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fh-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="receivers")
def receivers_fixture(sockdir: Path) -> Iterator[Callable[..., TestReceiver]]:
    made: list[TestReceiver] = []

    def make(name: str = "r.sock", **kwargs: object) -> TestReceiver:
        receiver = TestReceiver(sockdir / name, **kwargs)  # type: ignore[arg-type]
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture(name="fronts")
def fronts_fixture(sockdir: Path) -> Iterator[Callable[..., FrontProcess]]:
    made: list[FrontProcess] = []

    def make(
        *routes: str, config: str | None = None, listen: str = "127.0.0.1:0", **kwargs: object
    ) -> FrontProcess:
        args = ["--listen", listen]
        for route in routes:
            args += ["--route", route]
        if config is not None:
            path = sockdir / f"front{len(made)}.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        front = FrontProcess(args, **kwargs)  # type: ignore[arg-type]
        made.append(front)
        return front

    yield make
    for front in made:
        front.stop()
