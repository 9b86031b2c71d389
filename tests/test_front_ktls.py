"""TLS listeners end to end, on real kernel TLS: real clients, real receivers, fd counts.

A TLS connection can only be handed off if the kernel holds its record layer
(kTLS), which needs the kernel's ``tls`` module.  Where it is missing (as on
the machines these tests were written on), this module is skipped here and
``tests/test_front_ktls_vm.py`` runs it inside a User-Mode Linux kernel that
has the module (``FDHANDOFF_KTLS_VM`` set): there, a missing kTLS fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from handoff_receiver import (
    IO_TIMEOUT,
    FrontProcess,
    TestReceiver,
    parse_response,
    read_to_close,
    receivers_fixture,  # noqa: F401  (fixture)
    sockdir_fixture,  # noqa: F401  (fixture)
)
from test_front_auth import App, auth_config, payload_echo
from test_front_auth import app as app_fixture  # noqa: F401  (fixture, under this name)
from test_front_websocket import masked_text_frame, upgrade_request, ws_echo
from test_metrics import _free_port, _scrape
from test_receiver_support import Served, output_of, read_until, serve_process

IN_VM = bool(os.environ.get("FDHANDOFF_KTLS_VM"))
TCP_ULP = 31


def kernel_tls() -> bool:
    """Can this kernel attach its TLS layer to a TCP socket?"""
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()),
    ):
        server, _ = listener.accept()
        with server:
            try:
                server.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
            except OSError as exc:
                if exc.errno == errno.ENOENT and not IN_VM:
                    return False
                raise
    return True


pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not kernel_tls(), reason="no kernel TLS here: test_front_ktls_vm.py runs these in a VM"
    ),
]


@pytest.fixture(scope="module", name="certs")
def certs_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key."""
    return make_cert(tmp_path_factory.mktemp("tls"))


def make_cert(where: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (and 127.0.0.1 for localhost) and its key."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make a test certificate"
    stem = "cert" if name == "localhost" else name
    cert, key = where / f"{stem}.pem", where / f"{stem}.key"
    alt = "DNS:localhost,IP:127.0.0.1" if name == "localhost" else f"DNS:{name}"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={name}", "-addext", f"subjectAltName={alt}",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture(name="tls_front")
def tls_front_fixture(
    certs: tuple[Path, Path], sockdir: Path
) -> Iterator[Callable[..., FrontProcess]]:
    made: list[FrontProcess] = []

    def make(routes: str, extra: str = "", files: tuple[Path, Path] | None = None) -> FrontProcess:
        cert, key = files or certs
        path = sockdir / f"front{len(made)}.toml"
        path.write_text(
            f'[[listen]]\naddress = "127.0.0.1:0"\n'
            f'tls_certificate = "{cert}"\ntls_key = "{key}"\n{routes}{extra}'
        )
        front = FrontProcess(["--config", str(path)])
        made.append(front)
        return front

    yield make
    for front in made:
        front.stop()


def client_context(certs: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs[0]))


@contextlib.contextmanager
def tls_connect(front: FrontProcess, certs: tuple[Path, Path]) -> Iterator[ssl.SSLSocket]:
    raw = front.connect()
    # suppress_ragged_eofs=False: a TCP close without close_notify is an
    # SSLEOFError, not an end, so tests can tell the two apart.
    context = client_context(certs)
    with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
        tls.settimeout(IO_TIMEOUT)
        yield tls


def read_until_close(tls: ssl.SSLSocket, *, close_notify: bool = True) -> bytes:
    """Everything until the server ends the TLS session; SSLEOFError if it
    closed the TCP connection without a close_notify first, unless
    ``close_notify`` is False (the test receiver, like receivers written for
    nginx, sends none)."""
    data = b""
    try:
        while chunk := tls.recv(65536):
            data += chunk
    except ssl.SSLEOFError:
        if close_notify:
            raise
    return data


def route(receiver: TestReceiver | str, prefix: str = "/", mode: str = "pass") -> str:
    path = receiver if isinstance(receiver, str) else receiver.path
    return f'[[route]]\nprefix = "{prefix}"\nmode = "{mode}"\nbackend = "unix:{path}"\n'


@contextlib.contextmanager
def served_behind(
    tls_front: Callable[..., FrontProcess],
    sockdir: Path,
    target: str,
    prefix: str = "/",
    mode: str = "pass",
) -> Iterator[tuple[Served, FrontProcess]]:
    """``fdhandoff serve TARGET`` (as ASGI for the ASGI app) behind a TLS front."""
    path = sockdir / "serve.sock"
    interface = ("--interface", "asgi") if target.endswith("asgi_echo") else ()
    with serve_process(target, [f"unix:{path}"], *interface) as served:
        yield served, tls_front(route(str(path), prefix, mode))


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    path = shutil.which("curl")
    assert path is not None, "curl is needed"
    return subprocess.run(
        [path, "-sS", "--max-time", "20", *args], capture_output=True, timeout=60, check=False
    )


# --- handed off ------------------------------------------------------------------------------


def test_curl_over_tls_is_handed_off_with_https_in_the_description(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    front = tls_front(route(receiver, "/fd"))
    baseline = front.fd_count()
    _, port = front.host_port
    result = curl("--cacert", str(certs[0]), f"https://localhost:{port}/fd/x?q=1",
                  "--resolve", f"localhost:{port}:127.0.0.1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    headers = json.loads(result.stdout)["headers"]
    handoff = receiver.next()
    names = [name for name, _ in handoff.pairs]
    # nginx fd_pass's order: HTTPS and KTLS_RX right after SCGI.
    assert names[:5] == [b"CONTENT_LENGTH", b"SCGI", b"HTTPS", b"KTLS_RX", b"REMOTE_ADDR"]
    assert headers["HTTPS"] == "on"
    assert headers["KTLS_RX"] == "1"  # the kernel decrypts: nothing is relayed
    assert headers["CONTENT_LENGTH"] == "0"  # nothing was read past the head
    assert headers["REQUEST_URI"] == "/fd/x?q=1"
    assert headers["SERVER_NAME"] == "localhost"
    front.wait_for(r'"GET /fd/x\?q=1" route=/fd handed-off')
    assert front.settled_fd_count(baseline) == baseline


def test_workers_hand_off_tls_connections_before_and_after_a_reload(
    certs: tuple[Path, Path], receivers: Callable[..., TestReceiver], sockdir: Path
) -> None:
    """``workers = 2``: the TLS context made by the supervisor serves in every
    forked worker, on kernel TLS, and in the generation a SIGHUP forks."""
    receiver = receivers()
    cert, key = certs
    path = sockdir / "workers.toml"
    path.write_text(
        f'workers = 2\n[[listen]]\naddress = "127.0.0.1:0"\n'
        f'tls_certificate = "{cert}"\ntls_key = "{key}"\n{route(receiver)}'
    )
    front = FrontProcess(["--config", str(path)])
    try:
        front.wait_for(r"supervising 2 workers")

        def fetch_all(count: int) -> None:
            for index in range(count):
                with tls_connect(front, certs) as tls:
                    tls.sendall(b"GET /w%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % index)
                    data = read_until_close(tls, close_notify=False)
                assert data.startswith(b"HTTP/1.1 200"), data[:200]
                handoff = receiver.next()
                assert handoff.headers[b"HTTPS"] == b"on"
                assert handoff.headers[b"KTLS_RX"] == b"1"

        fetch_all(8)
        front.proc.send_signal(signal.SIGHUP)
        front.wait_for(r"new generation of 2 workers")
        fetch_all(8)
    finally:
        assert front.stop() == 0


def test_a_proxy_protocol_header_comes_before_the_handshake(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    """A TCP balancer's header, in clear, then the client's TLS session: the
    front reads exactly the header, then does the handshake."""
    receiver = receivers()
    front = tls_front("proxy_protocol = true\n" + route(receiver))
    baseline = front.fd_count()
    raw = front.connect()
    raw.sendall(b"PROXY TCP4 192.0.2.44 192.0.2.1 4444 443\r\n")
    context = client_context(certs)
    with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
        tls.settimeout(IO_TIMEOUT)
        tls.sendall(b"GET /p HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = read_until_close(tls, close_notify=False)
    assert parse_response(data)[0] == 200, data
    seen = receiver.next().headers
    assert (seen[b"REMOTE_ADDR"], seen[b"REMOTE_PORT"]) == (b"192.0.2.44", b"4444")
    assert (seen[b"HTTPS"], seen[b"KTLS_RX"]) == (b"on", b"1")
    front.wait_for(r'192\.0\.2\.44:4444 "GET /p" route=/ handed-off')
    assert front.settled_fd_count(baseline) == baseline


def test_the_certificate_is_chosen_by_server_name(
    certs: tuple[Path, Path],
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    """[[listen.sni]] on kernel TLS: each client verifies the certificate of the
    name it asked for, and the connection is handed off as any other."""
    cert, key = make_cert(sockdir, "api.example.org")
    receiver = receivers()
    sni = (
        f'[[listen.sni]]\nserver_names = ["api.example.org"]\n'
        f'tls_certificate = "{cert}"\ntls_key = "{key}"\n'
    )
    front = tls_front(sni + route(receiver))
    baseline = front.fd_count()
    for name, ca in (("api.example.org", cert), ("localhost", certs[0])):
        context = ssl.create_default_context(cafile=str(ca))  # verifies name and chain
        with context.wrap_socket(front.connect(), server_hostname=name) as tls:
            tls.settimeout(IO_TIMEOUT)
            tls.sendall(b"GET /sni HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
            data = read_until_close(tls, close_notify=False)
        assert parse_response(data)[0] == 200, data
        seen = receiver.next().headers
        assert (seen[b"SERVER_NAME"], seen[b"KTLS_RX"]) == (name.encode(), b"1")
    assert front.settled_fd_count(baseline) == baseline


def test_body_and_pipelined_request_in_the_same_record_reach_the_receiver(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    # The head, a 5000-byte body and a second request in ONE write: one TLS
    # record.  The front reads the head only; the kernel keeps the rest of
    # the decrypted record for the receiver (nginx loses such bytes).
    receiver = receivers(extra_bytes=len(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"))
    front = tls_front(route(receiver))
    body = bytes(range(256)) * 19 + b"12345678"
    request = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n" % (len(body), body)
    )
    with tls_connect(front, certs) as tls:
        tls.sendall(request)
        status, _, answer = parse_response(read_until_close(tls, close_notify=False))
    assert status == 200
    described = json.loads(answer)
    assert described["body"].encode("latin-1") == body
    assert described["extra"] == "GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    assert described["headers"]["CONTENT_LENGTH"] == "0"


def test_head_in_several_records_is_read_whole(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    front = tls_front(route(receiver))
    with tls_connect(front, certs) as tls:
        for piece in (b"GET /sp", b"lit HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            tls.sendall(piece)  # each write is a record of its own
            time.sleep(0.05)
        status, _, answer = parse_response(read_until_close(tls, close_notify=False))
    assert status == 200
    assert json.loads(answer)["headers"]["REQUEST_URI"] == "/split"


def test_fdhandoff_serve_asgi_keeps_the_tls_connection_alive(
    certs: tuple[Path, Path], sockdir: Path, tls_front: Callable[..., FrontProcess]
) -> None:
    with served_behind(tls_front, sockdir, "test_receiver_support:asgi_echo") as (served, front):
        with tls_connect(front, certs) as tls:
            tls.sendall(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            first = read_until(tls, b"abc")
            assert first.startswith(b"HTTP/1.1 200")
            assert first.endswith(b"https POST /one 3\nabc")  # scheme from HTTPS=on
            # Keep-alive: the receiver reads the next request off the kTLS socket.
            tls.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            second = read_until_close(tls)
        assert second.startswith(b"HTTP/1.1 200")
        assert second.endswith(b"https GET /two 0\n")
        # The client's close_notify reaches the receiver as a non-data record
        # (EIO on a kTLS socket): the end of that connection, not an error.
        with tls_connect(front, certs) as tls:
            tls.sendall(b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until(tls, b"GET /three 0\n").endswith(b"GET /three 0\n")
            tls.unwrap()  # close_notify while the receiver waits for a next request
        time.sleep(0.5)
        log = output_of(served)
        assert "Traceback" not in log and "ERROR" not in log, log


@pytest.mark.parametrize(
    ("target", "path", "ends_with"),
    [
        ("test_receiver_support:echo", "/one", b"scgi GET /one 0\n"),
        ("test_receiver_support:echo", "/sse-3", b"data: tick 2\n\n"),
        ("test_receiver_support:sync_echo", "/one", b"scgi GET /one 0\n"),
        ("test_receiver_support:asgi_echo", "/one", b"https GET /one 0\n"),
    ],
    ids=["native", "native-sse", "sync", "asgi"],
)
def test_every_receiver_flavour_ends_the_tls_session_with_close_notify(
    certs: tuple[Path, Path],
    sockdir: Path,
    tls_front: Callable[..., FrontProcess],
    target: str,
    path: str,
    ends_with: bytes,
) -> None:
    with served_behind(tls_front, sockdir, target) as (served, front):
        with tls_connect(front, certs) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = read_until_close(tls)  # SSLEOFError without close_notify
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert answer.endswith(ends_with) or answer.endswith(b"\r\n0\r\n\r\n"), answer
        assert ends_with in answer
        log = output_of(served)
        assert "Traceback" not in log and "ERROR" not in log, log


def test_websocket_over_tls(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers(behaviour=ws_echo)
    front = tls_front(route(receiver, "/ws", "websocket"))
    baseline = front.fd_count()
    _, port = front.host_port
    with connect(
        f"wss://localhost:{port}/ws/chat",
        ssl=client_context(certs),
        proxy=None,
        compression=None,
        open_timeout=IO_TIMEOUT,
        sock=socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT),
    ) as ws:
        ws.send("hello")
        assert ws.recv(timeout=IO_TIMEOUT) == "echo:hello"
    handoff = receiver.next()
    assert handoff.headers[b"HTTPS"] == b"on"
    assert handoff.headers[b"HANDOFF_UPGRADED"] == b"websocket"
    assert handoff.body == b"hello"
    front.wait_for(r'"GET /ws/chat" route=/ws 101 handed-off')
    assert front.settled_fd_count(baseline) == baseline


def test_auth_mode_over_tls_relays_and_hands_off(
    certs: tuple[Path, Path],
    app_fixture: type[App],  # noqa: F811  (the fixture imported above)
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    app = app_fixture
    daemon = receivers("daemon.sock", sock_type=socket.SOCK_SEQPACKET, behaviour=payload_echo)
    front = tls_front(auth_config(app, sockdir))
    # Relayed: the application's answer, then the front's close_notify.
    with tls_connect(front, certs) as tls:
        tls.sendall(b"POST /app/other HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody")
        status, _, body = parse_response(read_until_close(tls))
    assert status == 201
    assert body == b"from the app: body"
    headers = app.seen[-1]["headers"]
    assert isinstance(headers, dict)
    assert headers["X-Forwarded-Proto"] == "https"
    time.sleep(0.3)  # the relayed connection's lingering close ends
    baseline = front.fd_count()
    # Handed off (Apache's format) to a daemon, which answers on the kTLS socket.
    with tls_connect(front, certs) as tls:
        tls.sendall(b"GET /app/handoff HTTP/1.1\r\nHost: a\r\n\r\n")
        # The test receiver closes without close_notify: read up to the end of the JSON.
        data = read_until(tls, b'"extra": ""}')
    assert json.loads(parse_response(data)[2])["payload"] == '{"user_id":12345}'
    assert daemon.next().record.payload == b'{"user_id":12345}'
    front.wait_for(r'"GET /app/handoff" route=/app handed-off')
    assert front.settled_fd_count(baseline) == baseline


# --- the front's own answers and refusals ---------------------------------------------------


def test_error_answer_ends_with_close_notify(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    front = tls_front(route(receiver, "/only"))
    baseline = front.fd_count()
    with tls_connect(front, certs) as tls:
        tls.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_until_close(tls)  # SSLEOFError without a close_notify
    status, headers, body = parse_response(data)
    assert status == 404
    assert headers["connection"] == "close"
    assert b"no route for /elsewhere" in body
    front.wait_for(r'"GET /elsewhere" route=- 404')
    assert front.settled_fd_count(baseline) == baseline


def test_plain_http_to_the_tls_port_is_a_readable_400(
    receivers: Callable[..., TestReceiver], tls_front: Callable[..., FrontProcess]
) -> None:
    receiver = receivers()
    front = tls_front(route(receiver))
    baseline = front.fd_count()
    with front.connect() as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_to_close(sock)
    status, _, body = parse_response(data)
    assert status == 400
    assert b"plain HTTP sent to a TLS port" in body
    front.wait_for(r'"GET /x" route=- 400 "plain HTTP sent to a TLS port')
    assert front.settled_fd_count(baseline) == baseline


def test_failed_and_silent_handshakes_are_closed(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    port = _free_port()
    front = tls_front(
        route(receiver), f'[timeouts]\nhead = 0.5\n[metrics]\naddress = "127.0.0.1:{port}"\n'
    )
    baseline = front.fd_count()
    # A record that claims to be a handshake and is not one.
    with front.connect() as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")
        answer = read_to_close(sock, reset_ok=True)
        assert answer == b"" or answer[:1] == b"\x15", answer  # at most an alert record
    front.wait_for(r"TLS handshake failed")
    # A client that starts a handshake record and never finishes it.
    with front.connect() as sock:
        sock.sendall(b"\x16\x03\x01")
        start = time.monotonic()
        assert read_to_close(sock, reset_ok=True) == b""
        assert time.monotonic() - start < 3
    front.wait_for(r"TLS handshake not complete within 0.5 s")
    # A client that does not trust the certificate (it aborts the handshake).
    raw = front.connect()
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    raw.close()
    front.wait_for(r"TLS handshake failed")
    assert front.settled_fd_count(baseline) == baseline
    scraped = _scrape(port)
    assert 'fdhandoff_front_tls_failures_total{reason="failed"} 2' in scraped, scraped
    assert 'fdhandoff_front_tls_failures_total{reason="timeout"} 1' in scraped, scraped
    # Still serving.
    with tls_connect(front, certs) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_response(read_until_close(tls, close_notify=False))[0] == 200


def test_reload_reads_renewed_certificates_and_refuses_broken_ones(
    certs: tuple[Path, Path],
    tmp_path: Path,
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    live = (tmp_path / "live.pem", tmp_path / "live.key")
    for source, target in zip(certs, live, strict=True):
        target.write_bytes(source.read_bytes())
    front = tls_front(route(receiver), files=live)

    def served_certificate(trusted: tuple[Path, Path]) -> bytes:
        with tls_connect(front, trusted) as tls:
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert parse_response(read_until_close(tls, close_notify=False))[0] == 200
        assert der is not None
        return der

    first = served_certificate(certs)
    (tmp_path / "renewed").mkdir()
    renewed = make_cert(tmp_path / "renewed")
    for source, target in zip(renewed, live, strict=True):
        target.write_bytes(source.read_bytes())
    front.proc.send_signal(signal.SIGHUP)
    front.wait_for("configuration reloaded")
    second = served_certificate(renewed)
    assert second != first
    live[0].write_text("not a certificate\n")
    front.proc.send_signal(signal.SIGHUP)
    front.wait_for(r"reload refused, the running configuration stays: listen 127\.0\.0\.1:0: TLS")
    assert served_certificate(renewed) == second


# --- partial records: no spinning --------------------------------------------------------------
# Kernels whose kTLS has no poll of its own (Debian 12's 6.1, and the VM's)
# report a socket readable as soon as part of a record has arrived, while
# recv() waits for the whole record: a level-triggered reader would spin
# (aio.PARTIAL_RECORD_PAUSE).  Each test sends a whole record and, in the same
# write, the start of the next one (so the readiness that delivers the first
# finds the second's bytes queued), leaves that record unfinished for a while,
# and measures the CPU time the server process spends meanwhile.

#: CPU seconds a server may use while a client sits on a partial record for
#: SITTING seconds (a spinning one uses all of them).
SITTING = 1.5
CPU_ALLOWED = 0.3


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawTls:
    """A TLS client over memory BIOs: the test decides where its records are cut."""

    def __init__(self, sock: socket.socket, certs: tuple[Path, Path], hold: float = 0.0) -> None:
        """Handshake; ``hold``: seconds to sit on the second flight (a slow client)."""
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(certs).wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )
        flights = 0
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flights += 1
                if flights == 2:
                    time.sleep(hold)
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                assert data, "the server closed during the handshake"
                self.incoming.write(data)
        self.sock.sendall(self.outgoing.read())

    def records(self, plain: bytes) -> bytes:
        self.tls.write(plain)
        return self.outgoing.read()

    def read_until(self, marker: bytes) -> bytes:
        """Plain bytes from the server until ``marker`` has come (the connection stays)."""
        plain = b""
        self.sock.settimeout(IO_TIMEOUT)
        while marker not in plain:
            with contextlib.suppress(ssl.SSLWantReadError):
                while chunk := self.tls.read(65536):
                    plain += chunk
            if marker not in plain:
                data = self.sock.recv(65536)
                assert data, plain
                self.incoming.write(data)
        return plain

    def answer(self) -> bytes:
        """What the server sends until it closes (the test receiver sends no close_notify)."""
        data = read_to_close(self.sock, reset_ok=True)
        self.incoming.write(data)
        self.incoming.write_eof()
        plain = b""
        with contextlib.suppress(ssl.SSLZeroReturnError, ssl.SSLEOFError):
            while chunk := self.tls.read(65536):
                plain += chunk
        return plain


def cpu_while_sitting(pid: int, sock: socket.socket, whole: bytes, partial: bytes) -> float:
    sock.sendall(whole + partial)
    time.sleep(0.2)
    before = cpu_seconds(pid)
    time.sleep(SITTING)
    return cpu_seconds(pid) - before


def test_a_partial_record_costs_the_front_nothing_while_the_head_arrives(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    front = tls_front(route(receiver))
    baseline = front.fd_count()
    with front.connect() as sock:
        client = RawTls(sock, certs)
        begun = client.records(b"GET /sat HTTP/1.1\r\n")  # the head has begun
        rest = client.records(b"Host: x\r\n\r\n")
        spent = cpu_while_sitting(front.proc.pid, sock, begun, rest[:10])
        sock.sendall(rest[10:])
        status, _, body = parse_response(client.answer())
    assert spent < CPU_ALLOWED, f"the front used {spent:.2f} s of CPU in {SITTING} s"
    assert status == 200
    assert json.loads(body)["headers"]["REQUEST_URI"] == "/sat"
    assert front.settled_fd_count(baseline) == baseline


def test_a_partial_record_costs_the_front_nothing_while_it_lingers(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    front = tls_front(route(receiver, "/only"), "[timeouts]\nlinger = 5\n")
    baseline = front.fd_count()
    with front.connect() as sock:
        client = RawTls(sock, certs)
        # Answered 404 at once; the front then reads (lingers on) what still comes.
        request = client.records(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
        spent = cpu_while_sitting(front.proc.pid, sock, request, client.records(b"more")[:8])
        sock.shutdown(socket.SHUT_WR)
        answer = client.answer()
    assert spent < CPU_ALLOWED, f"the front used {spent:.2f} s of CPU in {SITTING} s"
    assert parse_response(answer)[0] == 404
    assert front.settled_fd_count(baseline) == baseline


@pytest.mark.parametrize(
    ("target", "answer"),
    [
        ("test_receiver_support:echo", b"scgi POST /up 5\nhello"),
        ("test_receiver_support:sync_echo", b"scgi POST /up 5\nhello"),
        ("test_receiver_support:asgi_echo", b"https POST /up 5\nhello"),
    ],
    ids=["native", "sync", "asgi"],
)
def test_a_partial_record_costs_the_receiver_nothing_while_the_body_arrives(
    certs: tuple[Path, Path],
    sockdir: Path,
    tls_front: Callable[..., FrontProcess],
    target: str,
    answer: bytes,
) -> None:
    with served_behind(tls_front, sockdir, target) as (served, front):
        with front.connect() as sock:
            client = RawTls(sock, certs)
            head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
            head_record = client.records(head)  # records in the order they are sent
            body = client.records(b"hello")
            spent = cpu_while_sitting(served.pid, sock, head_record, body[:10])
            sock.sendall(body[10:])
            got = client.answer()
        assert spent < CPU_ALLOWED, f"the receiver used {spent:.2f} s of CPU in {SITTING} s"
        assert got.startswith(b"HTTP/1.1 200"), got
        assert got.endswith(answer), got


# --- reload and deadlines ----------------------------------------------------------------------


def test_a_connection_in_tls_stays_https_when_a_reload_makes_its_listener_plain(
    certs: tuple[Path, Path],
    sockdir: Path,
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    receiver = receivers()
    front = tls_front(route(receiver))
    with tls_connect(front, certs) as tls:
        tls.sendall(b"GET /mid HTTP/1.1\r\n")  # the head has begun, over TLS
        time.sleep(0.2)
        (sockdir / "front0.toml").write_text(
            '[[listen]]\naddress = "127.0.0.1:0"\n' + route(receiver)
        )
        front.proc.send_signal(signal.SIGHUP)
        front.wait_for("configuration reloaded")
        tls.sendall(b"Host: x\r\n\r\n")
        assert read_until(tls, b"}").endswith(b"}")
    headers = receiver.next().headers
    assert headers[b"HTTPS"] == b"on"  # what the connection is, not what the listener became
    assert headers[b"REQUEST_URI"] == b"/mid"


def test_a_slow_handshake_leaves_the_head_no_extra_time(
    certs: tuple[Path, Path],
    receivers: Callable[..., TestReceiver],
    tls_front: Callable[..., FrontProcess],
) -> None:
    """timeouts.head counts from the accept, handshake included, even when a
    quicker connection started waiting for its head in between."""
    receiver = receivers()
    front = tls_front(route(receiver), "[timeouts]\nhead = 2\n")
    slow = front.connect()
    accepted = time.monotonic()

    def slow_client() -> None:
        client = RawTls(slow, certs, hold=1.2)
        slow.sendall(client.records(b"GET /slow HTTP/1.1\r\n"))

    thread = threading.Thread(target=slow_client)
    thread.start()
    time.sleep(0.6)
    with front.connect() as quick:
        client = RawTls(quick, certs)
        quick.sendall(client.records(b"GET /quick HTTP/1.1\r\n"))  # its deadline: 2.6 s
        thread.join(10)
        slow.settimeout(10)
        read_to_close(slow, reset_ok=True)
        closed_after = time.monotonic() - accepted
        slow.close()
    assert closed_after < 2.45, f"the slow connection had {closed_after:.2f} s, not 2"


def test_a_partial_record_costs_the_asgi_receiver_nothing_in_a_websocket(
    certs: tuple[Path, Path], sockdir: Path, tls_front: Callable[..., FrontProcess]
) -> None:
    target = "test_receiver_support:asgi_echo"
    behind = served_behind(tls_front, sockdir, target, "/ws", "websocket")
    with behind as (served, front), front.connect() as sock:
        client = RawTls(sock, certs)
        sock.sendall(client.records(upgrade_request(b"/ws")))
        assert client.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        one = client.records(masked_text_frame(b"one"))
        two = client.records(masked_text_frame(b"two"))
        spent = cpu_while_sitting(served.pid, sock, one, two[:10])
        sock.sendall(two[10:])
        assert b"echo:one" in client.read_until(b"echo:two")
    assert spent < CPU_ALLOWED, f"the receiver used {spent:.2f} s of CPU in {SITTING} s"


def test_a_partial_record_costs_nothing_while_an_asgi_app_waits_for_disconnect(
    certs: tuple[Path, Path], sockdir: Path, tls_front: Callable[..., FrontProcess]
) -> None:
    target = "test_receiver_support:asgi_echo"
    with served_behind(tls_front, sockdir, target) as (served, front), front.connect() as sock:
        client = RawTls(sock, certs)
        sock.sendall(client.records(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"))
        client.read_until(b"started")
        following = client.records(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        spent = cpu_while_sitting(served.pid, sock, b"", following[:10])
    assert spent < CPU_ALLOWED, f"the receiver used {spent:.2f} s of CPU in {SITTING} s"
