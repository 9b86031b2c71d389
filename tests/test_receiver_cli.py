"""``fdhandoff serve`` as a process: sockets, permissions, signals, workers, EMFILE, fd counts."""

from __future__ import annotations

import array
import asyncio
import os
import re
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fdhandoff import fdpass, scgi
from fdhandoff.receiver import engine
from fdhandoff.websocket import Opcode, encode_frame
from test_receiver_support import (
    REPO,
    TESTS,
    fd_count,
    front_headers,
    output_of,
    read_all,
    read_until,
    readable,
    send_raw_scgi,
    send_scgi,
    serve_process,
    split_response,
    tcp_pair,
    wait_closed,
)

ECHO = "test_receiver_support:echo"


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{REPO / 'src'}")
    return subprocess.run(
        [sys.executable, "-m", "fdhandoff", "serve", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _get(path: str, target: str = "/hello") -> tuple[int, bytes]:
    client, server_side = tcp_pair()
    send_scgi(path, front_headers("GET", target), server_side)
    status, _, body = split_response(read_all(client))
    client.close()
    return status, body


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def test_serve_answers_and_cleans_up(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with serve_process("test_receiver_support:echo", [f"unix:{path}"]) as proc:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert _get(path) == (200, b"scgi GET /hello 0\n")
        assert _stop(proc) == 0
        log = output_of(proc)
    assert not os.path.exists(path)
    assert '"GET /hello" 200' in log  # the access-log line


def test_seqpacket_bind_socket_mode_and_group(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    group = str(os.getgid())
    with serve_process(
        "test_receiver_support:echo",
        [f"unix-seqpacket:{path}"],
        "--socket-mode",
        "0600",
        "--socket-group",
        group,
    ):
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_gid == os.getgid()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            probe.connect(path)


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a socket file nobody listens on: what a crash leaves
    stale.close()
    with serve_process("test_receiver_support:echo", [f"unix:{path}"]):
        assert _get(path)[0] == 200


def test_live_socket_and_regular_file_are_not_replaced(tmp_path: Path) -> None:
    live = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(live)
        other.listen()
        done = _serve(ECHO, "--interface", "handoff", "--bind", f"unix:{live}")
        assert done.returncode == 2
        assert "in use" in done.stderr
        assert os.path.exists(live)
    regular = tmp_path / "file.sock"
    regular.write_text("precious")
    done = _serve(ECHO, "--interface", "handoff", "--bind", f"unix:{regular}")
    assert done.returncode == 2
    assert "not a socket" in done.stderr
    assert regular.read_text() == "precious"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodule:app"], "cannot import"),
        (["test_receiver_support:nothing"], "has no attribute"),
        (["test_receiver_support"], "expected module:attribute"),
    ],
)
def test_bad_targets_are_config_errors(tmp_path: Path, args: list[str], message: str) -> None:
    path = str(tmp_path / "r.sock")
    done = _serve(*args, "--interface", "handoff", "--bind", f"unix:{path}")
    assert done.returncode == 2
    assert message in done.stderr
    assert not os.path.exists(path)


def test_bad_bind_is_a_config_error(tmp_path: Path) -> None:
    done = _serve("test_receiver_support:echo", "--interface", "handoff", "--bind", "tcp:1234")
    assert done.returncode == 2
    assert "unix:PATH" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--linger-timeout", "-1"], "--linger-timeout must be between 0 and 86400 seconds"),
        (["--max-body-size", "-1"], "--max-body-size must not be negative"),
        (["--max-connections", "-5"], "--max-connections must not be negative"),
        (["--grace", "-0.5"], "--grace must be between 0 and 86400 seconds"),
        (["--grace", "inf"], "--grace must be between 0 and 86400 seconds"),
        (["--max-stream-buffer", "0"], "--max-stream-buffer must be positive"),
        (["--max-ws-message-size", "-1"], "--max-ws-message-size must be positive"),
        (["--handoff-timeout", "nan"], "--handoff-timeout must be between 0.001 and 86400 seconds"),
        (["--body-timeout", "1e400"], "--body-timeout must be between 0.001 and 86400 seconds"),
        (["--write-timeout", "0"], "--write-timeout must be between 0.001 and 86400 seconds"),
        (["--write-timeout", "86401"], "--write-timeout must be between 0.001 and 86400 seconds"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--keepalive-timeout", "-1"], "--keepalive-timeout must be between 0 and 86400 seconds"),
        (["--keepalive-timeout", "nan"], "--keepalive-timeout must be between 0 and 86400 seconds"),
        (["--keepalive-timeout", "inf"], "--keepalive-timeout must be between 0 and 86400 seconds"),
        (["--max-head-size", "512"], "--max-head-size must be between 1024 and 1048576"),
        (["--max-uri-length", "10"], "--max-uri-length must be between 64 and 1048576"),
        (["--max-headers", "0"], "--max-headers must be between 1 and 10000"),
        (
            ["--max-head-size", "2048", "--max-uri-length", "4096"],
            "--max-uri-length is larger than the head size limit (2048)",
        ),
    ],
)
def test_out_of_range_options_are_config_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    path = str(tmp_path / "r.sock")
    done = _serve(ECHO, "--interface", "handoff", "--bind", f"unix:{path}", *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert not os.path.exists(path)


def test_metrics_port_0_gives_each_worker_a_port_of_its_own(tmp_path: Path) -> None:
    # With --workers, worker i serves metrics on PORT + i; port 0 asks the
    # kernel for a free port instead, for every worker, and the log says which.
    path = str(tmp_path / "r.sock")
    with serve_process(
        ECHO, [f"unix:{path}"], "--workers", "2", "--metrics", "127.0.0.1:0"
    ) as proc:
        deadline = time.monotonic() + 30
        ports: list[int] = []
        while len(ports) < 2 and time.monotonic() < deadline:
            ports = [
                int(p)
                for p in re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/", output_of(proc))
            ]
            time.sleep(0.05)
        assert len(ports) == 2, output_of(proc)
        assert 0 not in ports and len(set(ports)) == 2 and min(ports) > 1024
        for port in ports:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as scrape:
                scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_all(scrape).startswith(b"HTTP/1.1 200")
        assert _stop(proc) == 0


def test_sync_handler_is_served(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with serve_process("test_receiver_support:sync_echo", [f"unix:{path}"]):
        assert _get(path) == (200, b"scgi GET /hello 0\n")


# --- signals and grace --------------------------------------------------------------------------


def test_sigterm_stops_taking_handoffs_and_lets_streams_finish(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with serve_process("test_receiver_support:echo", [f"unix:{path}"], "--grace", "20") as proc:
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/slow-sse"), server_side)
        assert b"tick 0" in read_until(client, b"tick 0")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with socket.socket(socket.AF_UNIX) as late, pytest.raises(OSError):
            late.connect(path)  # no longer accepting
        rest = read_all(client, timeout=20)
        client.close()
        assert proc.wait(30) == 0
    assert b"tick 49" in rest  # the stream finished within the grace period


def test_sigterm_during_startup_removes_the_socket_files(tmp_path: Path) -> None:
    # The socket is bound before the handler's startup() runs; a SIGTERM in
    # between (a supervisor dying) must still leave no socket file behind.
    path = str(tmp_path / "r.sock")
    with serve_process("test_receiver_support:slow_start", [f"unix:{path}"]) as proc:
        assert _stop(proc) == 0
        log = output_of(proc)
    assert not os.path.exists(path), log
    assert "before the receiver was serving" in log


def test_serving_gives_the_signal_handlers_back(tmp_path: Path) -> None:
    """After serve() the loop's removal must not leave SIGTERM at its default
    action: a signal while the caller still cleans up (socket files) would
    kill the process half-way.  The handler from before serve() is back."""

    def before(signum: int, frame: object) -> None:
        pass

    async def handler(handoff: object) -> None:
        pass

    async def main(listener: socket.socket) -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await engine.serve(handler, [listener], stop=stop)

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(tmp_path / "r.sock"))
            listener.listen()
            asyncio.run(main(listener))
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_streams_are_closed_after_the_grace_period(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    ws_path = str(tmp_path / "w.sock")
    with serve_process(
        "test_receiver_websocket:echo", [f"unix:{path}", f"unix:{ws_path}"], "--grace", "1"
    ) as proc:
        sse_client, server_side = tcp_pair()
        ws_client, ws_side = tcp_pair()
        headers = front_headers("GET", "/ws", HANDOFF_UPGRADED="websocket")
        send_scgi(ws_path, headers, ws_side)
        ws_client.sendall(encode_frame(Opcode.TEXT, b"hi", mask=b"abcd"))
        assert read_until(ws_client, b"hi").endswith(b"hi")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        closing = read_until(ws_client, b"shutting down", timeout=20)
        assert time.monotonic() - started >= 0.9
        assert closing[:1] == b"\x88"
        assert struct.unpack("!H", closing[2:4])[0] == 1001
        ws_client.sendall(encode_frame(Opcode.CLOSE, b"\x03\xe9", mask=b"abcd"))
        assert proc.wait(30) == 0
        sse_client.close()
        server_side.close()
        ws_client.close()


# --- workers ----------------------------------------------------------------------------------


def test_workers_share_sockets_restart_and_stop(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with serve_process(
        "test_receiver_support:crash_on_path", [f"unix:{path}"], "--workers", "2"
    ) as proc:
        pids = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            status, body = _get(path)
            assert status == 200
            pids.add(int(body.split()[1]))
            time.sleep(0.05)
        assert len(pids) == 2, "both workers take handoffs"
        # Workers die (each /crash kills the one that takes it); the supervisor
        # replaces them, and serving goes on until a replacement answers.
        deadline = time.monotonic() + 60
        replaced = False
        while time.monotonic() < deadline and not replaced:
            status, body = _get(path)
            assert status == 200
            replaced = int(body.split()[1]) not in pids
            if not replaced:
                client, server_side = tcp_pair()
                send_scgi(path, front_headers("GET", "/crash"), server_side)
                client.close()
        assert replaced, "a new worker answers"
        assert _stop(proc) == 0
        log = output_of(proc)
    assert "died: exit status 3; restarting" in log
    assert not os.path.exists(path)


def test_workers_stop_taking_handoffs_at_once_and_finish_streams(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with serve_process(ECHO, [f"unix:{path}"], "--workers", "2", "--grace", "20") as proc:
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/slow-sse"), server_side)
        assert b"tick 0" in read_until(client, b"tick 0")
        proc.send_signal(signal.SIGTERM)
        # Well before the stream's remaining ~5 s are over.
        deadline = time.monotonic() + 2
        refused = False
        while not refused and time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as late:
                try:
                    late.connect(path)
                except OSError:
                    refused = True
            time.sleep(0.05)
        assert refused, "the supervisor still listens after SIGTERM"
        rest = read_all(client, timeout=20)
        client.close()
        assert proc.wait(30) == 0
    assert b"tick 49" in rest


# --- resource exhaustion and fd accounting ----------------------------------------------------


def _low_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, hard))


def test_emfile_is_survived(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with serve_process(
        "test_receiver_support:echo", [f"unix:{path}"], "--loop", "asyncio", preexec=_low_fd_limit
    ) as proc:
        clients = []
        conns = []
        for _ in range(60):
            client, server_side = tcp_pair()
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(path)
            message = scgi.encode(front_headers("GET", "/sse"))
            fdpass.send_fd(conn, message, server_side.fileno(), timeout=10)
            server_side.close()
            clients.append(client)
            conns.append(conn)
        time.sleep(2)
        served = [c for c in clients if readable(c, 0.1)]
        assert 0 < len(served) < 60  # the limit was hit
        assert proc.poll() is None  # and survived
        for c in clients:
            c.close()
        for conn in conns:
            conn.close()
        time.sleep(1)
        assert _get(path) == (200, b"scgi GET /hello 0\n")  # serving again
        assert _stop(proc) == 0
        log = output_of(proc)
    assert "Too many open files" in log or "EMFILE" in log
    assert "control data truncated" not in log  # no handoff was lost


def test_error_paths_leave_no_fd_in_the_receiver(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    with serve_process(
        "test_receiver_support:echo", [f"unix:{path}"], "--handoff-timeout", "1"
    ) as proc:
        assert _get(path)[0] == 200
        time.sleep(0.3)
        baseline = fd_count(proc.pid)
        # invalid netstring, two fds, unusable request, silent connection,
        # client gone before the answer, body that never comes (timeout).
        c, s = tcp_pair()
        send_raw_scgi(path, b"5:abcde,", s)
        c.close()
        c1, s1 = tcp_pair()
        c2, s2 = tcp_pair()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            fds = array.array("i", [s1.fileno(), s2.fileno()]).tobytes()
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            conn.sendmsg([scgi.encode(front_headers())], rights)
            s1.close()
            s2.close()
            assert wait_closed(conn)
        c1.close()
        c2.close()
        c, s = tcp_pair()
        send_scgi(path, [("CONTENT_LENGTH", "0"), ("SCGI", "1")], s)
        c.close()
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(path)
        assert wait_closed(silent)
        silent.close()
        c, s = tcp_pair()
        c.close()
        send_scgi(path, front_headers(), s)
        c, s = tcp_pair()
        send_scgi(path, front_headers("GET", "/sse"), s)
        read_until(c, b"ready")
        c.close()
        time.sleep(1)
        assert _get(path)[0] == 200
        time.sleep(0.5)
        assert fd_count(proc.pid) == baseline


def test_asgi_keepalive_flags_bound_the_requests_the_receiver_reads_itself(
    tmp_path: Path,
) -> None:
    """--keepalive-timeout and the head limits apply to the requests a
    kept-alive ASGI connection brings after the handed-off one: those never
    pass the front, so the receiver enforces its own flags on them."""
    path = str(tmp_path / "r.sock")
    with serve_process(
        "test_receiver_support:asgi_echo",
        [f"unix:{path}"],
        "--interface", "asgi",
        "--keepalive-timeout", "0.5",
        "--max-head-size", "2048",
        "--max-uri-length", "1024",
        "--max-headers", "4",
    ):  # fmt: skip
        for next_head, status in (
            (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 200),
            (b"GET /" + b"u" * 1100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 2100 + b"\r\n\r\n", 431),
            (
                b"GET /a HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5)) + b"\r\n",
                431,
            ),
        ):
            client, server_side = tcp_pair()
            send_scgi(path, front_headers("GET", "/first"), server_side)
            client.settimeout(10)
            first = read_until(client, b"/first")
            assert first.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" not in first.lower()
            client.sendall(next_head)
            answer = read_all(client)
            assert answer.startswith(b"HTTP/1.1 %d " % status), (status, answer[:80])
            client.close()
        # Idle after a response: closed after the 0.5 s, not uvicorn's 5 s.
        client, server_side = tcp_pair()
        send_scgi(path, front_headers("GET", "/first"), server_side)
        client.settimeout(10)
        assert read_until(client, b"/first").startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert read_all(client, timeout=10) == b""
        assert time.monotonic() - started < 3
        client.close()
