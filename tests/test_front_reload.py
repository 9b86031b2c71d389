"""``SIGHUP``: the front reads its configuration again and applies it, dropping nothing.

Real front processes, real receivers (``fdhandoff serve`` for the channels),
real sockets; the configuration file is rewritten between signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdhandoff import fdpass
from fdhandoff.front.handoff import Handoffs
from fdhandoff.message import CHANNEL_ACK
from handoff_receiver import (
    IO_TIMEOUT,
    FrontProcess,
    TestReceiver,
    parse_response,
    read_to_close,
    running_front,
    sockdir_fixture,  # noqa: F401  (fixture)
)
from test_metrics import _free_port
from test_receiver_asgi_e2e import ReceiverProcess, serve

pytestmark = pytest.mark.timeout(120)


def _config(ports: list[int], backend: str, extra: str = "") -> str:
    listen = "".join(f'[[listen]]\naddress = "127.0.0.1:{port}"\n' for port in ports)
    return f'{listen}[[route]]\nprefix = "/"\nbackend = "unix:{backend}"\n{extra}'


def _reload(front: FrontProcess, path: Path, text: str, expect: str) -> None:
    """Write the configuration, send SIGHUP, wait for one more line matching ``expect``."""
    before = sum(expect in line for line in front.lines)
    path.write_text(text)
    front.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + IO_TIMEOUT
    while sum(expect in line for line in front.lines) <= before:
        assert front.proc.poll() is None, "\n".join(front.lines)
        assert time.monotonic() < deadline, f"no new {expect!r} in:\n" + "\n".join(front.lines)
        time.sleep(0.02)


def _get(port: int, target: str = "/x", head_rest: bytes = b"") -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n%s\r\n" % (target.encode(), head_rest))
        return _answer(sock)


def _answer(sock: socket.socket) -> dict[str, object]:
    data = read_to_close(sock)
    status, _, body = parse_response(data)
    assert status == 200, data
    result: dict[str, object] = json.loads(body)
    return result


@pytest.fixture
def two_receivers(sockdir: Path) -> Iterator[tuple[TestReceiver, TestReceiver]]:
    first = TestReceiver(sockdir / "one.sock")
    second = TestReceiver(sockdir / "two.sock")
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def test_reload_changes_routes_and_listeners_and_keeps_what_is_in_flight(
    no_fd_leak: None, sockdir: Path, two_receivers: tuple[TestReceiver, TestReceiver]
) -> None:
    first, second = two_receivers
    kept, added = _free_port(), _free_port()
    path = sockdir / "front.toml"
    path.write_text(_config([kept], first.path))
    with running_front(["--config", str(path)]) as front:
        assert _get(kept)["headers"]["HANDOFF_ROUTE"] == "/"  # type: ignore[index]
        assert first.handoffs.get(timeout=IO_TIMEOUT)
        baseline = front.fd_count()
        # A client in the middle of its head while the configuration changes.
        slow = socket.create_connection(("127.0.0.1", kept), timeout=IO_TIMEOUT)
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n")
        time.sleep(0.2)
        _reload(front, path, _config([kept, added], second.path), "configuration reloaded")
        front.wait_for(
            rf"configuration reloaded: listening on 127\.0\.0\.1:{kept}, 127\.0\.0\.1:{added}"
        )
        slow.sendall(b"\r\n")  # its head ends under the new routes
        with slow:
            assert _answer(slow)["headers"]["REQUEST_URI"] == "/slow"  # type: ignore[index]
        assert second.handoffs.get(timeout=IO_TIMEOUT).headers[b"REQUEST_URI"] == b"/slow"
        _get(added)
        assert second.handoffs.get(timeout=IO_TIMEOUT)
        assert first.handoffs.empty()
        # The address left out is closed; the one kept never stopped listening.
        _reload(front, path, _config([added], second.path), "configuration reloaded")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", kept), timeout=IO_TIMEOUT).close()
        _get(added)
        assert front.settled_fd_count(baseline) == baseline


def test_invalid_reload_keeps_the_running_configuration(
    no_fd_leak: None, sockdir: Path, two_receivers: tuple[TestReceiver, TestReceiver]
) -> None:
    """All or nothing: a configuration error, or a new address that cannot be
    bound, is logged and changes nothing (not even the routes)."""
    first, second = two_receivers
    port = _free_port()
    path = sockdir / "front.toml"
    path.write_text(_config([port], first.path))
    with socket.socket() as taken, running_front(["--config", str(path)]) as front:
        baseline = front.fd_count()
        broken = _config([port], second.path).replace('prefix = "/"', 'prefix = "x"')
        _reload(front, path, broken, "reload refused")
        front.wait_for(r"reload refused, the running configuration stays: route\[0\]\.prefix = 'x'")
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        _reload(front, path, _config([port, busy], second.path), "reload refused")
        front.wait_for(rf"reload refused, .*127\.0\.0\.1:{busy}")
        _get(port)
        assert first.handoffs.get(timeout=IO_TIMEOUT)
        assert second.handoffs.empty()
        assert front.settled_fd_count(baseline) == baseline


def test_reload_reopens_the_access_log(
    sockdir: Path, two_receivers: tuple[TestReceiver, TestReceiver]
) -> None:
    """logrotate's rename-then-signal: later lines go to a new file at the path."""
    first, _ = two_receivers
    port = _free_port()
    access = sockdir / "access.log"
    path = sockdir / "front.toml"
    text = _config([port], first.path, f'[log]\naccess = "{access}"\n')
    path.write_text(text)
    with running_front(["--config", str(path)]) as front:
        _get(port, "/before")
        deadline = time.monotonic() + IO_TIMEOUT
        while "/before" not in (access.read_text() if access.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        access.rename(sockdir / "access.log.1")
        _reload(front, path, text, "configuration reloaded")
        _get(port, "/after")
        deadline = time.monotonic() + IO_TIMEOUT
        while not access.exists() or "/after" not in access.read_text():
            assert time.monotonic() < deadline, "nothing logged to the reopened file"
            time.sleep(0.05)
    assert "/after" not in (sockdir / "access.log.1").read_text()


def test_reload_retires_channels_to_the_old_backend(tmp_path: Path) -> None:
    """Channels belong to the configuration that opened them: after a reload
    that moves the route, the old receiver's channel closes, and handoffs go
    over channels to the new one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    port = _free_port()
    path = tmp_path / "front.toml"
    with (
        serve("examples.starlette_app:app", tmp_path / "a") as old,
        serve("examples.starlette_app:app", tmp_path / "b") as new,
    ):
        path.write_text(_config([port], old.path))
        with running_front(["--config", str(path)]) as front:
            for _ in range(3):
                _http_ok(port)
            _wait_channels(old, lambda n: n >= 1)
            _reload(front, path, _config([port], new.path), "configuration reloaded")
            _wait_channels(old, lambda n: n == 0)
            for _ in range(3):
                _http_ok(port)
            _wait_channels(new, lambda n: n >= 1)


def _http_ok(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = read_to_close(sock, reset_ok=True)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]


def _wait_channels(receiver: ReceiverProcess, done: object) -> None:
    assert callable(done)
    deadline = time.monotonic() + IO_TIMEOUT
    while not done(receiver.channel_count()):
        assert time.monotonic() < deadline, f"channels: {receiver.channel_count()}"
        time.sleep(0.05)


def test_a_head_over_a_lowered_size_limit_is_431_after_the_reload(
    no_fd_leak: None, sockdir: Path, two_receivers: tuple[TestReceiver, TestReceiver]
) -> None:
    """A head already holding more than the new max_head_size when the reload
    lands is refused with 431 on its next bytes, as it would be from the start."""
    first, _ = two_receivers
    port = _free_port()
    path = sockdir / "front.toml"
    path.write_text(_config([port], first.path))
    with running_front(["--config", str(path)]) as front:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as client:
            client.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 20000)
            time.sleep(0.3)  # read and kept by the front: the head has not ended
            smaller = _config([port], first.path, "[limits]\nmax_head_size = 16384\n")
            _reload(front, path, smaller, "configuration reloaded")
            client.sendall(b"b")
            data = read_to_close(client)
        assert data.startswith(b"HTTP/1.1 431 "), data[:200]
        front.wait_for(r'"GET /big" route=- 431 "request head larger than 16384 bytes"')
        assert not any("Traceback" in line or "Exception" in line for line in front.lines)
        assert first.handoffs.empty()


def test_a_connection_acknowledged_after_the_reload_joins_no_pool(no_fd_leak: None) -> None:
    """Handoffs.reconfigure retires channels, also one whose first handoff is
    still unacknowledged: when its ACK comes, it closes instead of becoming a
    channel to the backend the old configuration named."""
    taken: list[object] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        handoffs = Handoffs(
            loop, 5.0, taken=lambda f: taken.append(f.context), failed=lambda f, why: None,
            channels=4,
        )  # fmt: skip
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        client, client_peer = socket.socketpair()
        try:
            link = handoffs.open(ours, "old-backend")
            assert handoffs.send(link, client, b"1:x,", "in flight")
            passed = fdpass.recv_fd(theirs, blocking=False)[1]
            assert passed is not None
            passed.close()
            handoffs.reconfigure(2.0, 4)  # the reload lands before the ACK
            theirs.sendall(CHANNEL_ACK)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if taken:
                    break
            assert taken == ["in flight"]
            assert handoffs.channel("old-backend") is None
            assert handoffs.channels == 0
            assert ours.fileno() == -1  # closed, not kept idle
            assert theirs.recv(1) == b""  # the receiver sees the end
        finally:
            handoffs.close()
            theirs.close()
            client_peer.close()

    asyncio.run(scenario())


def test_sighup_while_stopping_does_not_kill_the_front(sockdir: Path) -> None:
    """After the loop stops handling SIGHUP, its default action would kill the
    front: a reload or log-rotation signal during a stop must not."""
    path = sockdir / "front.toml"
    path.write_text(_config([_free_port()], str(sockdir / "none.sock")))
    front = FrontProcess(["--config", str(path)])
    done = threading.Event()

    def hup_until_exit() -> None:
        while not done.is_set() and front.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                front.proc.send_signal(signal.SIGHUP)
            time.sleep(0.001)

    try:
        front.proc.send_signal(signal.SIGTERM)
        sender = threading.Thread(target=hup_until_exit)
        sender.start()
        code = front.proc.wait(timeout=30)
        done.set()
        sender.join(timeout=10)
        assert code == 0, "\n".join(front.lines)
    finally:
        done.set()
        front.stop()


def test_a_lowered_head_timeout_applies_to_heads_already_waiting(
    no_fd_leak: None, sockdir: Path, two_receivers: tuple[TestReceiver, TestReceiver]
) -> None:
    """Lowering timeouts.head (against slow clients) reaches the heads that began
    before the reload too, counted from their start; a later head is not kept
    waiting behind an earlier one's longer deadline."""
    first, _ = two_receivers
    port = _free_port()
    path = sockdir / "front.toml"
    path.write_text(_config([port], first.path, "[timeouts]\nhead = 8\n"))
    with running_front(["--config", str(path)]) as front:
        early = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        early.sendall(b"GET /early HTTP/1.1\r\n")
        time.sleep(0.2)
        _reload(front, path, _config([port], first.path, "[timeouts]\nhead = 1\n"), "reloaded")
        late = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        late.sendall(b"GET /late HTTP/1.1\r\n")
        began = time.monotonic()
        for sock in (late, early):
            with sock:
                data = read_to_close(sock)
            assert data.startswith(b"HTTP/1.1 408 "), data[:100]
        assert time.monotonic() - began < 4  # not the 8 s the early head began with
        front.wait_for(r'"GET /late" route=- 408 "request head not complete within 1 s"')


def test_a_file_that_is_not_utf8_is_refused_by_reload_and_check(
    no_fd_leak: None, sockdir: Path, two_receivers: tuple[TestReceiver, TestReceiver]
) -> None:
    first, _ = two_receivers
    port = _free_port()
    path = sockdir / "front.toml"
    good = _config([port], first.path)
    path.write_text(good)
    with running_front(["--config", str(path)]) as front:
        before = sum("reload refused" in line for line in front.lines)
        path.write_bytes(good.encode() + b"# caf\xe9\n")
        front.proc.send_signal(signal.SIGHUP)
        front.wait_for(r"reload refused, .*not valid TOML: not UTF-8 at byte")
        assert sum("reload refused" in line for line in front.lines) == before + 1
        assert not any("Traceback" in line for line in front.lines)
        _get(port)
    checked = subprocess.run(
        [sys.executable, "-m", "fdhandoff", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 2
    assert "not valid TOML: not UTF-8 at byte" in checked.stderr
