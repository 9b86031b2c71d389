"""Plain SCGI from a real nginx (scgi_pass), driven by a real curl."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fdhandoff.receiver.listeners import Bind
from test_receiver_support import ReceiverThread, echo, read_all

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            scgi_param REQUEST_METHOD $request_method;
            scgi_param REQUEST_URI $request_uri;
            scgi_param QUERY_STRING $query_string;
            scgi_param CONTENT_TYPE $content_type;
            scgi_param SCGI 1;
            scgi_param SERVER_PROTOCOL $server_protocol;
            scgi_param REQUEST_SCHEME $scheme;
            scgi_param REMOTE_ADDR $remote_addr;
            scgi_param REMOTE_PORT $remote_port;
            scgi_param SERVER_PORT $server_port;
            scgi_param SERVER_NAME $server_name;
            scgi_pass unix:{sock};
        }}
        location /unbuffered/ {{
            scgi_param REQUEST_METHOD $request_method;
            scgi_param REQUEST_URI $request_uri;
            scgi_param SCGI 1;
            scgi_param SERVER_PROTOCOL $server_protocol;
            scgi_request_buffering off;
            scgi_pass unix:{sock};
        }}
    }}
}}
"""


def _free_port() -> int:
    # nginx cannot listen on port 0; take a port the kernel just handed out.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def nginx(tmp_path: Path, require_tool: Callable[[str], str]) -> Iterator[tuple[int, str]]:
    binary = require_tool("nginx")
    sock = str(tmp_path / "scgi.sock")
    port = _free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port, sock=sock))
    proc = subprocess.Popen(
        [binary, "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield port, sock
    finally:
        proc.terminate()
        proc.wait(15)


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "20", *args],
        capture_output=True,
        check=False,
        timeout=30,
    )


def _start(sock: str) -> ReceiverThread:
    receiver = ReceiverThread(echo, [Bind(sock)]).start()
    os.chmod(sock, 0o666)  # nginx workers may run as another user
    return receiver


def test_nginx_scgi_pass_get_and_post(nginx: tuple[int, str], no_fd_leak: None) -> None:
    port, sock = nginx
    receiver = _start(sock)
    try:
        got = _curl(f"http://127.0.0.1:{port}/hello%20there?x=1")
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith(b"HTTP/1.1 200")
        assert got.stdout.endswith(b"\r\n\r\nplain-scgi GET /hello there 0\n")

        body = "field=" + "v" * 100_000  # larger than nginx's in-memory body buffer
        got = _curl("--data-binary", body, f"http://127.0.0.1:{port}/form")
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith(b"HTTP/1.1 200")
        expected = f"plain-scgi POST /form {len(body)}\n{body}".encode()
        assert got.stdout.endswith(b"\r\n\r\n" + expected)
    finally:
        receiver.stop()


def test_nginx_scgi_pass_sse_is_not_buffered(nginx: tuple[int, str], no_fd_leak: None) -> None:
    port, sock = nginx
    receiver = _start(sock)
    try:
        # The stream never ends; curl gives up after 3 s with what arrived.
        got = subprocess.run(
            ["curl", "-sS", "-N", "--max-time", "3", f"http://127.0.0.1:{port}/sse"],
            capture_output=True,
            check=False,
            timeout=30,
        )
        assert b"data: ready\n\n" in got.stdout
    finally:
        receiver.stop()


def test_nginx_scgi_pass_repeated_headers(nginx: tuple[int, str], no_fd_leak: None) -> None:
    # nginx before 1.23 (Debian 12 ships 1.22) sends one HTTP_* pair per header
    # line; later versions merge them.  Either way the request is served.
    port, sock = nginx
    receiver = _start(sock)
    try:
        got = _curl(
            "-H", "Cookie: a=1", "-H", "Cookie: b=2", "-H", "X-A: 1", "-H", "X-A: 2",
            f"http://127.0.0.1:{port}/cookies",
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith(b"HTTP/1.1 200"), got.stdout
        body = got.stdout.partition(b"\r\n\r\n")[2]
        assert body in (b"a=1|b=2\n", b"a=1; b=2\n")  # repeated, or merged by nginx
    finally:
        receiver.stop()


def test_nginx_scgi_pass_unbuffered_body_is_never_cut_short(
    nginx: tuple[int, str], no_fd_leak: None
) -> None:
    """nginx 1.22 with scgi_request_buffering off sends as CONTENT_LENGTH
    only the body bytes it has read so far; the client's Content-Length says
    how long the body is.  The application must never get a truncated body as
    a whole one: refused (400) where the two differ, served whole where nginx
    sends the right length."""
    port, sock = nginx
    receiver = _start(sock)
    try:
        body = b"v" * 200_000
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(
                b"POST /unbuffered/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000]
            )
            time.sleep(0.5)  # nginx has connected and sent what it had
            with contextlib.suppress(OSError):  # refused: nginx may stop reading
                client.sendall(body[1000:])
            answer = read_all(client)
        status = answer.split(b"\r\n", 1)[0]
        if status == b"HTTP/1.1 200 OK":
            assert answer.endswith(b"\r\n\r\nplain-scgi POST /unbuffered/x 200000\n" + body)
        else:
            assert status == b"HTTP/1.1 400 Bad Request", answer[:200]
    finally:
        receiver.stop()
