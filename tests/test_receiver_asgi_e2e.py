"""End to end: `fdhandoff serve examples.*:app` behind the real front, with curl and websockets.

The receiver and the front run as subprocesses, exactly as a user starts
them; the apps in examples/ are unchanged Starlette and FastAPI apps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from handoff_receiver import FrontProcess, running_front
from test_receiver_asgi_support import IO_TIMEOUT, ASGIReceiver, ResponseReader
from test_receiver_nginx import nginx  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).parent.parent

#: SO_LINGER on with a zero timeout: close() sends a RST (a client that vanished).
RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"


class ReceiverProcess:
    """``python -m fdhandoff serve TARGET --bind unix:PATH``; output kept in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, path: str) -> None:
        self.proc = proc
        self.log = log
        self.path = path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = IO_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            time.sleep(0.05)

    def _unix_connections(self) -> set[str]:
        """Inodes of the UNIX connections accepted on the listening path (from the front)."""
        found = set()
        with open("/proc/net/unix") as table:
            next(table)
            for line in table:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; an accepted
                # socket shows its listener's path, without __SO_ACCEPTCON.
                if len(fields) == 8 and fields[7] == self.path and fields[3] != "00010000":
                    found.add(fields[6])
        return found

    def channel_count(self) -> int:
        """UNIX connections from the front still open: its channels, once settled."""
        conns = self._unix_connections()
        fd_dir = f"/proc/{self.proc.pid}/fd"
        count = 0
        for name in os.listdir(fd_dir):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                link = os.readlink(f"{fd_dir}/{name}")
                count += link.startswith("socket:[") and link[8:-1] in conns
        return count

    def fd_count(self) -> int:
        """Open fds, not counting the front's channels (kept open on purpose)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd")) - self.channel_count()

    def stable_fd_count(self, quiet: float = 0.5, timeout: float = 20.0) -> int:
        """The fd count once it stopped changing for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        count, since = self.fd_count(), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.fd_count()
            if now != count:
                count, since = now, time.monotonic()
        return count

    def settled_fd_count(self, expected: int, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        count = self.fd_count()
        while count != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.fd_count()
        return count

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@contextlib.contextmanager
def serve(target: str, tmp_path: Path, *args: str) -> Iterator[ReceiverProcess]:
    path = str(tmp_path / "app.sock")
    log = tmp_path / "receiver.log"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fdhandoff", "serve", target, "--bind", f"unix:{path}", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    receiver = ReceiverProcess(proc, log, path)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert proc.poll() is None, f"receiver exited:\n{receiver.output()}"
            assert time.monotonic() < deadline, "receiver did not start listening"
            time.sleep(0.05)
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def curl(require_tool: Callable[[str], str]) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    path = require_tool("curl")

    def run(*args: str, input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [path, "-sS", "--max-time", "30", *args],
            capture_output=True,
            timeout=60,
            check=False,
            input=input_bytes,
        )

    return run


def front_for(
    receiver: ReceiverProcess, tmp_path: Path
) -> contextlib.AbstractContextManager[FrontProcess]:
    """The real front: /ws/ in websocket mode (it answers the 101), the rest in pass mode."""
    config = tmp_path / "front.toml"
    config.write_text(
        f'[[route]]\nprefix = "/upgraded/"\nmode = "websocket"\nbackend = "unix:{receiver.path}"\n'
    )
    return running_front(
        ["--listen", "127.0.0.1:0", "--config", str(config), "--route", f"/=unix:{receiver.path}"]
    )


# --- Starlette -------------------------------------------------------------------------------


def test_starlette_example_with_curl(
    tmp_path: Path, curl: Callable[..., subprocess.CompletedProcess[bytes]]
) -> None:
    with (
        serve("examples.starlette_app:app", tmp_path) as receiver,
        front_for(receiver, tmp_path) as front,
    ):
        url = front.url
        assert curl(url + "/").stdout == b"hello from starlette\n"

        info = json.loads(curl(url + "/info?x=1&y=two%20words", "-H", "X-Test: yes").stdout)
        assert info["path"] == "/info"
        assert info["query"] == "x=1&y=two%20words"
        assert ["x-test", "yes"] in info["headers"]
        assert info["client"][0] == "127.0.0.1"
        assert info["handoff_format"] == "scgi"
        assert info["started_pid"] == receiver.proc.pid  # lifespan state reached the request

        upload = tmp_path / "upload.bin"
        upload.write_bytes(os.urandom(3 * 1024 * 1024))
        posted = curl(
            url + "/echo",
            "--data-binary",
            f"@{upload}",
            "-H",
            "Content-Type: application/octet-stream",
        )
        assert posted.stdout == upload.read_bytes()
        chunked = curl(
            url + "/echo",
            "--data-binary",
            f"@{upload}",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
        )
        assert chunked.stdout == upload.read_bytes()

        assert curl(url + "/stream?n=4").stdout == b"line 0\nline 1\nline 2\nline 3\n"

        events = curl(url + "/sse?n=3&interval=0.01", "-N").stdout.decode()
        assert events.startswith("retry: 1000\n\n")
        assert 'id: 2\ndata: {"token": 2}\n\n' in events
        assert events.endswith("event: done\ndata: [DONE]\n\n")

        head = curl(url + "/", "-I")
        assert head.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-length: 21\r\n" in head.stdout

        # Keep-alive: curl reuses the handed-over connection for the next URLs.
        reused = curl("-v", url + "/", url + "/stream?n=1", url + "/info")
        assert reused.returncode == 0
        assert reused.stderr.count(b"Re-using existing connection") == 2
        assert reused.stdout.startswith(b"hello from starlette\nline 0\n{")
        assert front.proc.poll() is None
    assert "application startup complete" in receiver.output()


def test_pipelined_requests_through_the_front(tmp_path: Path) -> None:
    with (
        serve("examples.starlette_app:app", tmp_path) as receiver,
        front_for(receiver, tmp_path) as front,
    ):
        sock = front.connect()
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping"
            b"GET /stream?n=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        reader = ResponseReader(sock)
        bodies = [reader.read().body for _ in range(3)]
        assert reader.closed()
        sock.close()
    assert bodies == [b"hello from starlette\n", b"ping", b"line 0\nline 1\n"]


def test_starlette_websockets_through_the_front(tmp_path: Path) -> None:
    with (
        serve("examples.starlette_app:app", tmp_path, "--loop", "asyncio") as receiver,
        front_for(receiver, tmp_path) as front,
    ):
        ws_url = front.url.replace("http://", "ws://")
        with connect(ws_url + "/ws/echo", subprotocols=["echo"], proxy=None) as ws:
            assert ws.subprotocol == "echo"
            ws.send("hello")
            assert ws.recv(IO_TIMEOUT) == "hello"
            ws.send(b"\x00bin")
            assert ws.recv(IO_TIMEOUT) == b"\x00bin"
        with connect(ws_url + "/ws/chat", proxy=None) as alice:
            alice.send("a1")
            assert alice.recv(IO_TIMEOUT) == "a1"  # alice is in the room
            with connect(ws_url + "/ws/chat", proxy=None) as bob:
                bob.send("b1")
                assert bob.recv(IO_TIMEOUT) == "b1"
                assert alice.recv(IO_TIMEOUT) == "b1"
                alice.send("a2")
                assert bob.recv(IO_TIMEOUT) == "a2"
                assert alice.recv(IO_TIMEOUT) == "a2"


@pytest.mark.parametrize("listed", [True, False])
def test_websocket_upgraded_by_the_front(tmp_path: Path, listed: bool) -> None:
    """The front's websocket mode sends the 101 itself (HANDOFF_UPGRADED),
    with the subprotocol the route lists; the app, choosing from what its
    scope offers, accepts exactly what the client was told, listed or not."""

    with serve("examples.starlette_app:app", tmp_path) as receiver:
        config = tmp_path / "front.toml"
        config.write_text(
            f'[[route]]\nprefix = "/ws/"\nmode = "websocket"\nbackend = "unix:{receiver.path}"\n'
            + ('subprotocols = ["echo"]\n' if listed else "")
        )
        with running_front(["--listen", "127.0.0.1:0", "--config", str(config)]) as front:
            ws_url = front.url.replace("http://", "ws://")
            offered = [Subprotocol("echo")]
            with connect(ws_url + "/ws/echo", proxy=None, subprotocols=offered) as ws:
                assert ws.subprotocol == ("echo" if listed else None)
                ws.send("via the front's 101")
                assert ws.recv(IO_TIMEOUT) == "via the front's 101"
        assert "cannot be sent any more" not in receiver.output()


# --- FastAPI -----------------------------------------------------------------------------------


def test_fastapi_example(
    tmp_path: Path, curl: Callable[..., subprocess.CompletedProcess[bytes]]
) -> None:
    with (
        serve("examples.fastapi_app:app", tmp_path) as receiver,
        front_for(receiver, tmp_path) as front,
    ):
        url = front.url
        item = json.loads(curl(url + "/items/1?q=x").stdout)
        assert item == {"item_id": 1, "name": "hammer", "q": "x"}  # filled at startup
        created = curl(
            url + "/items",
            "-H",
            "Content-Type: application/json",
            "--data",
            json.dumps({"name": "drill", "price": 9.5}),
        )
        assert json.loads(created.stdout) == {"name": "drill", "price": 9.5, "created": True}
        invalid = curl(
            url + "/items",
            "-H",
            "Content-Type: application/json",
            "--data",
            "{}",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
        )
        assert invalid.stdout == b"422"
        tokens = curl(url + "/tokens?n=3", "-N").stdout.decode()
        assert tokens.split("\n\n")[:4] == [
            'data: {"token": "tok0"}',
            'data: {"token": "tok1"}',
            'data: {"token": "tok2"}',
            "data: [DONE]",
        ]
        boom = curl(url + "/boom", "-w", "%{http_code}", "-o", "/dev/null")
        assert boom.stdout == b"500"
        ws_url = url.replace("http://", "ws://")
        with connect(ws_url + "/ws", proxy=None) as ws:
            ws.send("fastapi")
            assert ws.recv(IO_TIMEOUT) == "echo: fastapi"
        assert receiver.stop() == 0
    output = receiver.output()
    assert "deliberate failure" in output  # the app error is logged with its traceback
    assert output.index("application startup complete") < output.index(
        "application shutdown complete"
    )


# --- descriptors -------------------------------------------------------------------------------


def test_no_fd_left_after_disconnects_and_errors(tmp_path: Path) -> None:
    # Checked in the receiver process (/proc/PID/fd), where the connections live.
    """Streams cut by their clients, WebSockets dropped, bad requests: every fd is closed."""
    with (
        serve("examples.starlette_app:app", tmp_path) as receiver,
        front_for(receiver, tmp_path) as front,
    ):
        warm = front.connect()
        warm.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reader = ResponseReader(warm)
        assert reader.read().status == 200
        assert reader.closed()
        warm.close()
        baseline = receiver.stable_fd_count()
        socks: list[socket.socket] = []
        for _ in range(10):
            sock = front.connect()
            sock.sendall(b"GET /sse?n=0&interval=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"retry" in sock.recv(4096)
            socks.append(sock)
        for _ in range(5):
            sock = front.connect()
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
            socks.append(sock)
        for _ in range(5):
            sock = front.connect()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n")
            socks.append(sock)
        ws_url = front.url.replace("http://", "ws://")
        with contextlib.ExitStack() as stack:
            dropped = [
                stack.enter_context(connect(ws_url + "/ws/echo", proxy=None)) for _ in range(5)
            ]
            assert receiver.fd_count() > baseline
            for sock in socks:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                sock.close()
            for ws in dropped:
                ws.socket.close()  # gone without a close frame
            assert receiver.settled_fd_count(baseline) == baseline


# --- nginx scgi_pass ---------------------------------------------------------------------------


def test_starlette_behind_real_nginx_scgi_pass(
    nginx: tuple[int, str],  # noqa: F811  (the fixture imported above)
    curl: Callable[..., subprocess.CompletedProcess[bytes]],
    no_fd_leak: None,
) -> None:
    """Plain SCGI from nginx: CGI answers, bodies nginx buffered, streams not held back."""
    sys.path.insert(0, str(REPO))
    try:
        from examples.starlette_app import app  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO))
    port, sock = nginx
    with ASGIReceiver(app, sock):
        os.chmod(sock, 0o666)  # nginx workers may run as another user
        url = f"http://127.0.0.1:{port}"
        got = curl("-i", url + "/info?x=1")
        assert got.stdout.startswith(b"HTTP/1.1 200")
        info = json.loads(got.stdout.partition(b"\r\n\r\n")[2])
        assert info["handoff_format"] == "plain-scgi"
        assert info["query"] == "x=1"
        body = os.urandom(300_000)  # nginx spools it, then sends it with CONTENT_LENGTH
        assert curl(url + "/echo", "--data-binary", "@-", input_bytes=body).stdout == body
        # An endless SSE stream: events must arrive while it runs, not when nginx's
        # buffers fill (X-Accel-Buffering: no).
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as client:
            client.sendall(b"GET /sse?n=0&interval=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"data: {" not in data:
                chunk = client.recv(4096)
                assert chunk, data
                data += chunk
        assert b"text/event-stream" in data
