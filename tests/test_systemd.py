"""systemd integration: socket activation (LISTEN_FDS) and readiness (NOTIFY_SOCKET).

The parsing and the notification datagrams are tested in-process; the front
and ``fdhandoff serve`` are started by systemd's own ``systemd-socket-activate``,
which binds the sockets, waits for the first connection and then executes the
program with them, as systemd does for a ``.socket`` unit.  That first
connection was made before the program ran: it must still be served.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fdhandoff import systemd
from fdhandoff.errors import ConfigError
from test_metrics import _free_port
from test_receiver_support import read_all

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0

pytestmark = pytest.mark.timeout(120)


# --- parsing LISTEN_FDS -------------------------------------------------------------------


def test_no_listen_fds_means_no_sockets() -> None:
    env: dict[str, str] = {}
    inherited = systemd.Inherited.from_environ(env)
    assert inherited.count == 0
    assert inherited.unclaimed() == []


def test_listen_fds_for_another_process_are_ignored_and_removed() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    inherited = systemd.Inherited.from_environ(env)
    assert inherited.count == 0
    # Removed either way: a process this one starts must not take them.
    assert env == {}


@pytest.mark.parametrize("count", ["0", "-1", "abc", "", "1e3", "٣", "99999"])
def test_malformed_listen_fds_is_a_config_error(count: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    with pytest.raises(ConfigError, match="LISTEN_FDS"):
        systemd.Inherited.from_environ(env)


def _adopt_in_child(fd_kind: str) -> subprocess.CompletedProcess[str]:
    """Put a ``fd_kind`` object at fd 3 of a fresh interpreter and adopt it."""
    code = f"""
import os, socket, sys
from fdhandoff import systemd
from fdhandoff.errors import ConfigError
kind = {fd_kind!r}
if kind == "file":
    fd = os.open(os.devnull, os.O_RDONLY)
elif kind == "unbound":
    fd = socket.socket().detach()
else:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    fd = listener.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
env = {{"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}}
try:
    inherited = systemd.Inherited.from_environ(env)
except ConfigError as exc:
    print("error:", exc)
    print("fd 3 open:", os.path.exists("/proc/self/fd/3"))
    sys.exit(0)
print("adopted:", inherited.unclaimed())
print("cloexec:", not os.get_inheritable(3))
"""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        check=True,
    )


def test_a_passed_listening_socket_is_adopted_close_on_exec() -> None:
    out = _adopt_in_child("listening").stdout
    assert re.search(r"adopted: \['127\.0\.0\.1:\d+'\]", out), out
    assert "cloexec: True" in out


@pytest.mark.parametrize(
    ("kind", "reason"), [("file", "is not a socket"), ("unbound", "not a listening socket")]
)
def test_a_passed_fd_that_is_not_a_listening_socket_is_refused(kind: str, reason: str) -> None:
    out = _adopt_in_child(kind).stdout
    assert reason in out, out
    # Not closed behind the caller's back: the fd is reported, not consumed.
    assert "fd 3 open: True" in out, out


def test_take_matches_by_bound_address() -> None:
    tcp4 = socket.socket()
    tcp4.bind(("127.0.0.1", 0))
    tcp4.listen()
    tcp6 = socket.socket(socket.AF_INET6)
    tcp6.bind(("::1", 0))
    tcp6.listen()
    inherited = systemd.Inherited([tcp4, tcp6])
    try:
        port4, port6 = tcp4.getsockname()[1], tcp6.getsockname()[1]
        assert inherited.take_tcp("127.0.0.1", port4 + 1 if port4 < 65535 else 1) is None
        assert inherited.take_tcp("::1", port4) is None  # right port, wrong address
        # The same address however it is written.
        assert inherited.take_tcp("0:0:0:0:0:0:0:1", port6) is tcp6
        assert inherited.take_tcp("127.0.0.1", port4) is tcp4
        assert inherited.take_tcp("127.0.0.1", port4) is None  # taken once
        assert inherited.unclaimed() == []
        inherited.give_back(tcp4)
        assert inherited.unclaimed() == [f"127.0.0.1:{port4}"]
    finally:
        inherited.close()
        tcp4.close()
        tcp6.close()


def test_take_unix_matches_path_and_type(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(path)
    stream.listen()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    abstract.bind(b"\0fdhandoff-test-%d" % os.getpid())
    abstract.listen()
    inherited = systemd.Inherited([stream, abstract])
    try:
        assert inherited.take_unix(path, socket.SOCK_SEQPACKET) is None
        assert inherited.unclaimed() == [f"unix:{path}", f"unix:@fdhandoff-test-{os.getpid()}"]
        assert inherited.take_unix(path, socket.SOCK_STREAM) is stream
        assert inherited.take_unix(f"\0fdhandoff-test-{os.getpid()}", socket.SOCK_SEQPACKET) is (
            abstract
        )
    finally:
        inherited.close()
        stream.close()
        abstract.close()


# --- sd_notify ---------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing where systemd's notification socket would."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(TIMEOUT)
    yield path, sock
    sock.close()


def _messages(sock: socket.socket, until: str, timeout: float = TIMEOUT) -> list[str]:
    """Notification datagrams up to and including the first containing ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not got or until not in got[-1]:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {until!r} notification; got {got}") from None
    return got


def test_notify_sends_one_datagram(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    assert systemd.notify("READY=1", "STATUS=ok", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_to_an_abstract_socket() -> None:
    name = f"fdhandoff-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(TIMEOUT)
        assert systemd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_a_manager_is_a_no_op(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not systemd.notify("READY=1", environ={})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:999"})
    assert "only UNIX sockets" in caplog.text
    # Nobody listening: logged, never raised (readiness does not decide serving).
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert "notifying the service manager" in caplog.text


# --- the front and the receiver under systemd-socket-activate ----------------------------


class Activated:
    """A program started by ``systemd-socket-activate``; stderr kept in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            time.sleep(0.05)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def activate(
    require_tool: Callable[[str], str], tmp_path: Path
) -> Iterator[Callable[..., Activated]]:
    tool = require_tool("systemd-socket-activate")
    started: list[Activated] = []

    def start(listen: list[str], args: list[str], *, notify: str | None = None) -> Activated:
        env = [
            "-E",
            f"PYTHONPATH={REPO / 'src'}{os.pathsep}{REPO / 'tests'}",
            "-E",
            "PYTHONUNBUFFERED=1",
        ]
        if notify is not None:
            env += ["-E", f"NOTIFY_SOCKET={notify}"]
        log = tmp_path / f"activated-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [tool, *(f"--listen={item}" for item in listen), *env,
                 sys.executable, "-m", "fdhandoff", *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
            )  # fmt: skip
        activated = Activated(proc, log)
        started.append(activated)
        # systemd-socket-activate says so once its sockets listen.
        for item in listen:
            activated.wait_for(f"Listening on {item}")
        return activated

    yield start
    for activated in started:
        activated.stop()


def _get(connect: Callable[[], socket.socket], target: str = "/x") -> bytes:
    with connect() as sock:
        sock.settimeout(TIMEOUT)
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode())
        return read_all(sock, TIMEOUT)


@contextmanager
def _receiver(tmp_path: Path, name: str = "r.sock") -> Iterator[str]:
    path = str(tmp_path / name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdhandoff", "serve", "test_receiver_support:echo",
         "--interface", "handoff", "--bind", f"unix:{path}", "--no-access-log"],
        env=dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.05)
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)


def test_front_serves_the_connection_that_started_it(
    activate: Callable[..., Activated],
    tmp_path: Path,
    notify_socket: tuple[str, socket.socket],
) -> None:
    port = _free_port()
    unix = str(tmp_path / "front.sock")
    with _receiver(tmp_path) as backend:
        front = activate(
            [f"127.0.0.1:{port}", unix],
            ["front", "--listen", f"127.0.0.1:{port}", "--listen", f"unix:{unix}",
             "--route", f"/=unix:{backend}"],
            notify=notify_socket[0],
        )  # fmt: skip
        # Connected while no front runs: the kernel queues it on systemd's socket.
        first = _get(lambda: socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        assert first.startswith(b"HTTP/1.1 200"), first
        front.wait_for("socket activation: 127.0.0.1")
        assert "ready, listening on 127.0.0.1" in front.output()
        ready = _messages(notify_socket[1], "READY=1")
        assert ready[-1] == f"READY=1\nSTATUS=listening on 127.0.0.1:{port}, unix:{unix}"

        def unix_client() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(unix)
            return sock

        assert _get(unix_client).startswith(b"HTTP/1.1 200")
        baseline = front.fd_count()
        for _ in range(20):
            assert _get(unix_client, "/again").startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + TIMEOUT
        while front.fd_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert front.fd_count() <= baseline
        assert front.stop() == 0
        assert _messages(notify_socket[1], "STOPPING=1")[-1] == "STOPPING=1"
    # systemd created the socket file, so it is systemd's to remove.
    assert os.path.exists(unix)


def test_front_workers_share_the_passed_socket_and_the_supervisor_alone_notifies(
    activate: Callable[..., Activated],
    tmp_path: Path,
    notify_socket: tuple[str, socket.socket],
) -> None:
    """``workers = 2`` under systemd: the supervisor takes the passed socket,
    both workers accept on it, and only the supervisor (the main process)
    reports READY, RELOADING around a new generation, and STOPPING."""
    port = _free_port()
    with _receiver(tmp_path) as backend:
        config = tmp_path / "front.toml"
        config.write_text(
            f'workers = 2\n[[listen]]\naddress = "127.0.0.1:{port}"\n'
            f'[[route]]\nprefix = "/"\nbackend = "unix:{backend}"\n'
        )
        front = activate([f"127.0.0.1:{port}"], ["front", "--config", str(config)],
                         notify=notify_socket[0])  # fmt: skip
        first = _get(lambda: socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        assert first.startswith(b"HTTP/1.1 200"), first
        ready = _messages(notify_socket[1], "READY=1")
        assert ready == ["READY=1\nSTATUS=supervising 2 workers"], ready
        for _ in range(10):
            got = _get(lambda: socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
            assert got.startswith(b"HTTP/1.1 200")
        front.proc.send_signal(signal.SIGHUP)
        reload = _messages(notify_socket[1], "READY=1")
        assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC="), reload
        assert reload[-1] == "READY=1\nSTATUS=supervising 2 workers"
        front.wait_for("new generation of 2 workers")
        got = _get(lambda: socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        assert got.startswith(b"HTTP/1.1 200")
        assert front.stop() == 0
        assert _messages(notify_socket[1], "STOPPING=1") == ["STOPPING=1"]
        # Nothing from the workers, before or after.
        notify_socket[1].settimeout(0.3)
        with pytest.raises(TimeoutError):
            notify_socket[1].recv(4096)


def test_front_refuses_a_passed_socket_it_has_no_listen_for(
    activate: Callable[..., Activated],
) -> None:
    port, extra = _free_port(), _free_port()
    front = activate(
        [f"127.0.0.1:{port}", f"127.0.0.1:{extra}"],
        ["front", "--listen", f"127.0.0.1:{port}", "--route", "/=unix:/nonexistent.sock"],
    )
    # The connection that starts it is refused with the front, not left hanging.
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        assert read_all(sock, TIMEOUT) == b""
    assert front.proc.wait(TIMEOUT) == 2
    assert (
        f"socket activation passed 127.0.0.1:{extra}, which no [[listen]] address names"
        in front.output()
    )


def test_front_reload_keeps_a_dropped_passed_socket_for_later(
    activate: Callable[..., Activated],
    tmp_path: Path,
    notify_socket: tuple[str, socket.socket],
) -> None:
    first, second = _free_port(), _free_port()
    config = tmp_path / "front.toml"
    with _receiver(tmp_path) as backend:
        route = f'[[route]]\nprefix = "/"\nbackend = "unix:{backend}"\n'

        def listen(*ports: int) -> str:
            return "".join(f'[[listen]]\naddress = "127.0.0.1:{p}"\n' for p in ports)

        config.write_text(listen(first, second) + route)
        front = activate(
            [f"127.0.0.1:{first}", f"127.0.0.1:{second}"],
            ["front", "--config", str(config)],
            notify=notify_socket[0],
        )

        def client(port: int) -> Callable[[], socket.socket]:
            return lambda: socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

        assert _get(client(first)).startswith(b"HTTP/1.1 200")
        _messages(notify_socket[1], "READY=1")
        # Dropped by a reload: systemd still listens there, so it is kept.
        config.write_text(listen(first) + route)
        front.proc.send_signal(signal.SIGHUP)
        reload = _messages(notify_socket[1], "READY=1")
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reload[0]), reload
        assert reload[-1] == f"READY=1\nSTATUS=listening on 127.0.0.1:{first}"
        front.wait_for(f"reload: 127.0.0.1:{second} is no longer configured")
        # And taken again by the next reload (binding it anew would fail).
        config.write_text(listen(first, second) + route)
        front.proc.send_signal(signal.SIGHUP)
        assert _messages(notify_socket[1], "READY=1")[-1].endswith(f"127.0.0.1:{second}")
        assert "reload refused" not in front.output()
        assert _get(client(second)).startswith(b"HTTP/1.1 200")
        assert front.stop() == 0


def test_receiver_takes_the_handoff_that_started_it(
    activate: Callable[..., Activated],
    tmp_path: Path,
    notify_socket: tuple[str, socket.socket],
) -> None:
    path = str(tmp_path / "r.sock")
    receiver = activate(
        [path],
        [
            "serve",
            "test_receiver_support:echo",
            "--interface",
            "handoff",
            "--bind",
            f"unix:{path}",
            "--workers",
            "2",
        ],
        notify=notify_socket[0],
    )
    port = _free_port()
    front = subprocess.Popen(
        [sys.executable, "-m", "fdhandoff", "front", "--listen", f"127.0.0.1:{port}",
         "--route", f"/=unix:{path}"],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert front.stderr is not None
        while "ready, listening" not in front.stderr.readline():
            assert front.poll() is None, "front did not start"
        # The front's handoff started the receiver and waited in its backlog.
        answer = _get(lambda: socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        assert answer.startswith(b"HTTP/1.1 200"), answer
        # One READY=1, from the supervisor: the workers have no NOTIFY_SOCKET.
        ready = _messages(notify_socket[1], "READY=1")
        assert ready == ["READY=1\nSTATUS=supervising 2 workers"]
        receiver.wait_for("socket activation: unix:" + path)
        assert receiver.stop() == 0
        assert _messages(notify_socket[1], "STOPPING=1") == ["STOPPING=1"]
        # Nothing more: a worker stopping said nothing.
        notify_socket[1].settimeout(0.3)
        with pytest.raises(TimeoutError):
            notify_socket[1].recv(4096)
    finally:
        front.send_signal(signal.SIGTERM)
        front.wait(TIMEOUT)
    assert os.path.exists(path)  # systemd's file: left for it to remove


def test_receiver_refuses_a_passed_socket_it_has_no_bind_for(
    activate: Callable[..., Activated], tmp_path: Path
) -> None:
    path, extra = str(tmp_path / "r.sock"), str(tmp_path / "extra.sock")
    receiver = activate(
        [path, extra], ["serve", "test_receiver_support:echo", "--bind", f"unix:{path}"]
    )
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.settimeout(TIMEOUT)
        # Closed with the receiver, not left waiting (unix(7): a reset).
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert receiver.proc.wait(TIMEOUT) == 2
    assert f"socket activation passed unix:{extra}, which no --bind names" in receiver.output()


def _activated_serve(sock: socket.socket, path: str, notify: str) -> subprocess.Popen[bytes]:
    """``fdhandoff serve`` given ``sock`` as fd 3, the way systemd starts a service
    of a ``.socket`` unit: systemd keeps its own copy open across restarts."""
    # LISTEN_PID must be the pid of the program itself: set after fork, and
    # exec keeps the pid.
    launcher = (
        "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}",
        LISTEN_FDS="1",
        NOTIFY_SOCKET=notify,
    )
    return subprocess.Popen(
        [sys.executable, "-c", launcher, "-m", "fdhandoff", "serve",
         "test_receiver_support:echo", "--interface", "handoff", "--bind", f"unix:{path}",
         "--no-access-log", "--grace", "1"],
        env=env, pass_fds=(3,), preexec_fn=lambda: os.dup2(sock.fileno(), 3),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_receiver_restart_behind_a_held_socket_answers_every_request(
    tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    """What socket activation is for: while no receiver runs, the front's
    handoff waits in the socket systemd holds, and the next receiver takes it."""
    path = str(tmp_path / "held.sock")
    held = socket.socket(socket.AF_UNIX)
    held.bind(path)
    held.listen()
    port = _free_port()
    config = tmp_path / "front.toml"
    config.write_text(
        f'[[listen]]\naddress = "127.0.0.1:{port}"\n'
        f'[[route]]\nprefix = "/"\nbackend = "unix:{path}"\n'
        "[timeouts]\nhandoff = 15.0\n"
    )
    front = subprocess.Popen(
        [sys.executable, "-m", "fdhandoff", "front", "--config", str(config)],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    receivers: list[subprocess.Popen[bytes]] = []

    def client() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

    try:
        assert front.stderr is not None
        while "ready, listening" not in front.stderr.readline():
            assert front.poll() is None, "front did not start"
        receivers.append(_activated_serve(held, path, notify_socket[0]))
        assert _messages(notify_socket[1], "READY=1")[-1].startswith("READY=1")
        assert _get(client).startswith(b"HTTP/1.1 200")
        receivers[0].send_signal(signal.SIGTERM)
        assert receivers[0].wait(TIMEOUT) == 0
        # No receiver runs now: this request's handoff waits in the socket.
        waiting = client()
        waiting.sendall(b"GET /during-restart HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.5)
        receivers.append(_activated_serve(held, path, notify_socket[0]))
        waiting.settimeout(TIMEOUT)
        answer = read_all(waiting, TIMEOUT)
        waiting.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"/during-restart" in answer
        assert _get(client).startswith(b"HTTP/1.1 200")
    finally:
        for proc in receivers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(TIMEOUT)
        front.send_signal(signal.SIGTERM)
        front.wait(TIMEOUT)
        held.close()
