"""End to end: every sender's handoff format, real sockets, a receiver in a thread."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path

import pytest

from fdhandoff import fdpass, scgi
from fdhandoff.errors import ProtocolError
from fdhandoff.message import MAX_PAYLOAD_SIZE
from fdhandoff.receiver import Handoff, Options
from fdhandoff.receiver.listeners import Bind
from test_receiver_support import (
    MarkerSender,
    ReceiverThread,
    front_headers,
    nginx_fixture,
    read_all,
    send_payload,
    send_raw_scgi,
    send_scgi,
    split_response,
    tcp_pair,
    wait_closed,
)

LOOPS = ["asyncio", "uvloop"]


class Recorder:
    """Handler that remembers every Handoff's fields and answers with a summary."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

    async def __call__(self, handoff: Handoff) -> None:
        body = await handoff.read_body() if handoff.has_request else b""
        self.seen.append(
            {
                "format": handoff.format.value,
                "method": handoff.method,
                "path": handoff.path,
                "raw_path": handoff.raw_path,
                "query": handoff.query_string,
                "headers": handoff.headers,
                "client": handoff.client,
                "server": handoff.server,
                "tls": handoff.tls,
                "upgraded": handoff.upgraded,
                "route": handoff.route,
                "payload": handoff.payload,
                "already_read": handoff.already_read,
                "http_version": handoff.http_version,
                "body": body,
                "blocking": handoff.socket.getblocking(),
                "head_sent": handoff.head_sent_by_sender,
            }
        )
        await handoff.respond(200, [("Content-Type", "text/plain")], b"got " + body)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "r.sock")


@pytest.mark.parametrize("loop", LOOPS)
def test_front_scgi_request_fields_and_response(
    sock_path: str, loop: str, no_fd_leak: None
) -> None:
    rec = Recorder()
    with ReceiverThread(rec, [Bind(sock_path)], loop=loop):
        client, server_side = tcp_pair()
        headers = front_headers(
            "GET",
            "/caf%C3%A9/a%2Fb?x=1&y=two%20words",
            [("Host", "example.test"), ("X-Custom", "abc"), ("Cookie", "a=1; b=2")],
            HTTPS="on",
            HANDOFF_ROUTE="sse",
            HANDOFF_DATA='{"user_id":1}',
        )
        send_scgi(sock_path, headers, server_side)
        status, hdrs, body = split_response(read_all(client))
        client.close()
    assert status == 200
    assert hdrs["connection"] == "close"
    assert hdrs["content-length"] == str(len(body))
    assert body == b"got "
    seen = rec.seen[0]
    assert seen["format"] == "scgi"
    assert seen["method"] == "GET"
    assert seen["path"] == "/café/a/b"
    assert seen["raw_path"] == b"/caf%C3%A9/a%2Fb"
    assert seen["query"] == b"x=1&y=two%20words"
    assert seen["headers"] == [
        ("host", "example.test"),
        ("x-custom", "abc"),
        ("cookie", "a=1; b=2"),
    ]
    assert seen["client"] == ("127.0.0.1", 40000)
    assert seen["server"] == ("127.0.0.1", 8080)
    assert seen["tls"] is True
    assert seen["route"] == "sse"
    assert seen["payload"] == b'{"user_id":1}'
    assert seen["upgraded"] is False
    assert seen["blocking"] is False


def test_front_already_read_bytes_start_the_body(sock_path: str, no_fd_leak: None) -> None:
    """Bytes the front read past the head are the body's start: none is lost."""
    rec = Recorder()
    body = bytes(range(256)) * 40  # 10240 bytes
    with ReceiverThread(rec, [Bind(sock_path)]):
        client, server_side = tcp_pair()
        already = body[:3000]
        headers = front_headers(
            "POST", "/upload", [("Content-Length", str(len(body)))], already_read=already
        )
        send_scgi(sock_path, headers, server_side, already)
        client.sendall(body[3000:])
        status, _, answer = split_response(read_all(client))
        client.close()
    assert status == 200
    assert answer == b"got " + body
    assert rec.seen[0]["already_read"] == body[:3000]


#: Expect is a list (RFC 9110 section 10.1.1); the front merges repeated lines.
EXPECTATIONS = ["100-continue", "100-continue, foo", "foo, 100-Continue"]


@pytest.mark.parametrize("expect", EXPECTATIONS)
def test_chunked_request_body_and_expect_continue(
    sock_path: str, expect: str, no_fd_leak: None
) -> None:
    rec = Recorder()
    with ReceiverThread(rec, [Bind(sock_path)]):
        client, server_side = tcp_pair()
        headers = front_headers(
            "POST",
            "/c",
            [("Transfer-Encoding", "chunked"), ("Expect", expect)],
        )
        send_scgi(sock_path, headers, server_side)
        client.settimeout(10)
        interim = client.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
        status, _, answer = split_response(read_all(client))
        client.close()
    assert status == 200
    assert answer == b"got hello world"


@pytest.mark.parametrize("loop", LOOPS)
def test_nginx_fd_pass_captures(sock_path: str, loop: str, no_fd_leak: None) -> None:
    rec = Recorder()
    with ReceiverThread(rec, [Bind(sock_path)], loop=loop):
        for name in ("get-query.bin", "duplicate-headers.bin", "post-form-body-swallowed.bin"):
            client, server_side = tcp_pair()
            data = nginx_fixture(name, client)
            if name.startswith("post"):
                client.sendall(b"name=value&other=thing1")  # 23 bytes, as announced
            send_raw_scgi(sock_path, data, server_side)
            status, _, _ = split_response(read_all(client))
            client.close()
            assert status == 200, name
    get, dup, post = rec.seen
    assert get["path"] == "/fd/hello"
    assert get["query"] == b"x=1&y=two%20words"
    assert ("x-custom-header", "abc") in get["headers"]  # type: ignore[operator]
    assert get["http_version"] == "1.1"
    assert dup["path"] == "/fd/dup/path"
    assert dup["raw_path"] == b"/fd/dup%2Fpath"
    assert dup["headers"] == [
        ("host", "x"),
        ("x-a", "1"),
        ("x-a", "2"),
        ("cookie", "c1=1"),
        ("cookie", "c2=2"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
    ]
    assert post["method"] == "POST"
    assert post["body"] == b"name=value&other=thing1"
    assert get["client"][0] == "127.0.0.1"  # type: ignore[index]


@pytest.mark.parametrize("loop", LOOPS)
def test_apache_payload_over_seqpacket(tmp_path: Path, loop: str, no_fd_leak: None) -> None:
    path = str(tmp_path / "apache.sock")
    rec = Recorder()
    payload = json.dumps(
        {"user_id": 12345, "prompt": "hi", "uri": "/handoff.php?prompt=hi", "method": "GET"}
    ).encode()
    big = b"x" * MAX_PAYLOAD_SIZE
    with ReceiverThread(rec, [Bind(path, socket.SOCK_SEQPACKET)], loop=loop):
        for data in (payload, b"", big):
            client, server_side = tcp_pair()
            send_payload(path, data, server_side)
            status, _, _ = split_response(read_all(client))
            client.close()
            assert status == 200
    assert [s["payload"] for s in rec.seen] == [payload, b"", big]
    first = rec.seen[0]
    assert first["format"] == "payload"
    assert first["method"] is None
    assert first["client"][0] == "127.0.0.1"  # type: ignore[index]
    assert first["server"][0] == "127.0.0.1"  # type: ignore[index]


@pytest.mark.parametrize("loop", LOOPS)
def test_byte_markers_several_per_connection(sock_path: str, loop: str, no_fd_leak: None) -> None:
    rec = Recorder()
    with ReceiverThread(rec, [Bind(sock_path)], loop=loop):
        sender = MarkerSender(sock_path)
        clients = []
        for marker in (b"\x01", b"\x00", b"X", b"\x01"):
            client, server_side = tcp_pair()
            sender.send(marker, server_side)
            clients.append(client)
        answers = [read_all(c) for c in clients]
        for c in clients:
            c.close()
        # The persistent connection stays open for more markers.
        client, server_side = tcp_pair()
        sender.send(b"\x01", server_side)
        answers.append(read_all(client))
        client.close()
        sender.close()
    assert answers[0].startswith(b"HTTP/1.1 200 OK\r\n")
    # mod_proxy_fdpass: Apache already sent the head; only the body follows.
    assert answers[1] == b"got "
    assert answers[4].startswith(b"HTTP/1.1 200 OK\r\n")
    assert [s["format"] for s in rec.seen] == ["byte"] * 5
    assert [s["head_sent"] for s in rec.seen[:3]] == [False, True, False]
    upgraded = [s for s in rec.seen if s["upgraded"]]
    assert len(upgraded) == 1


def test_plain_scgi_on_the_unix_connection(sock_path: str, no_fd_leak: None) -> None:
    rec = Recorder()
    with ReceiverThread(rec, [Bind(sock_path)]):
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(sock_path)
        body = b"field=1&other=2"
        request = scgi.encode(
            [
                ("CONTENT_LENGTH", str(len(body))),
                ("SCGI", "1"),
                ("REQUEST_METHOD", "POST"),
                ("REQUEST_URI", "/form?a=b"),
                ("CONTENT_TYPE", "application/x-www-form-urlencoded"),
                ("HTTP_HOST", "h"),
            ],
            body,
        )
        conn.sendall(request[:-5])
        time.sleep(0.05)
        conn.sendall(request[-5:])
        answer = read_all(conn)
        conn.close()
    assert answer.startswith(b"Status: 200 OK\r\n")
    assert b"\r\nConnection:" not in answer
    assert answer.endswith(b"\r\n\r\ngot " + body)
    seen = rec.seen[0]
    assert seen["format"] == "plain-scgi"
    assert ("content-type", "application/x-www-form-urlencoded") in seen["headers"]  # type: ignore[operator]
    assert ("content-length", str(len(body))) in seen["headers"]  # type: ignore[operator]


def test_plain_scgi_content_length_differing_from_the_clients_is_refused(
    sock_path: str, no_fd_leak: None
) -> None:
    """A CONTENT_LENGTH shorter than the client's Content-Length is a body the
    sender cut short (nginx 1.22 with scgi_request_buffering off): 400,
    not a truncated body handed to the application as a whole one."""
    rec = Recorder()
    with ReceiverThread(rec, [Bind(sock_path)]):
        answers = []
        for announced in ("10", "3"):
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(sock_path)
                request = [
                    ("CONTENT_LENGTH", "3"),
                    ("SCGI", "1"),
                    ("REQUEST_METHOD", "POST"),
                    ("REQUEST_URI", "/"),
                    ("HTTP_CONTENT_LENGTH", announced),
                ]
                conn.sendall(scgi.encode(request, b"abc"))
                answers.append(read_all(conn))
    assert answers[0].startswith(b"Status: 400 Bad Request\r\n")
    assert answers[1].startswith(b"Status: 200 OK\r\n")
    assert answers[1].endswith(b"got abc")
    assert len(rec.seen) == 1


def test_silent_connection_does_not_stall_others(sock_path: str, no_fd_leak: None) -> None:
    rec = Recorder()
    options = Options(handoff_timeout=5.0)
    with ReceiverThread(rec, [Bind(sock_path)], options):
        silent = [socket.socket(socket.AF_UNIX) for _ in range(5)]
        for s in silent:
            s.connect(sock_path)
        client, server_side = tcp_pair()
        send_scgi(sock_path, front_headers("GET", "/"), server_side)
        assert split_response(read_all(client))[0] == 200
        client.close()
        # Served while the silent connections still wait for their timeout...
        for s in silent:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        # ...after which the receiver closes them.
        assert all(wait_closed(s, 20) for s in silent)
        for s in silent:
            s.close()


async def _fail(handoff: Handoff) -> None:
    if handoff.path == "/raise":
        raise RuntimeError("boom")
    if handoff.path == "/nothing":
        return
    if handoff.path == "/protocol":
        raise ProtocolError("bad thing", status_hint=422)
    await handoff.read_body()
    await handoff.respond(200)


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/raise", [], 500),
        ("/nothing", [], 500),
        ("/protocol", [], 422),
        ("/body", [("Transfer-Encoding", "chunked")], 400),  # bad chunk below
        ("/body", [("Content-Length", "1"), ("Transfer-Encoding", "chunked")], 400),
        ("/body", [("Content-Length", "99999999999")], 413),
    ],
)
def test_handler_errors_answer_the_client(
    sock_path: str, target: str, headers: list[tuple[str, str]], status: int, no_fd_leak: None
) -> None:
    with ReceiverThread(_fail, [Bind(sock_path)]):
        client, server_side = tcp_pair()
        send_scgi(sock_path, front_headers("POST", target, headers), server_side)
        client.sendall(b"zz\r\n")
        got = read_all(client)
        client.close()
    assert split_response(got)[0] == status


@pytest.mark.parametrize(
    "headers",
    [
        [("CONTENT_LENGTH", "0"), ("SCGI", "1"), ("REQUEST_URI", "/")],  # no method
        [("CONTENT_LENGTH", "0"), ("SCGI", "1"), ("REQUEST_METHOD", "GET"), ("REQUEST_URI", "x")],
        [
            ("CONTENT_LENGTH", "0"),
            ("SCGI", "1"),
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/"),
            ("SERVER_PROTOCOL", "HTTP/2.0"),
        ],
    ],
)
def test_unusable_request_description_gets_an_error(
    sock_path: str, headers: list[tuple[str, str]], no_fd_leak: None
) -> None:
    with ReceiverThread(Recorder(), [Bind(sock_path)]):
        client, server_side = tcp_pair()
        send_scgi(sock_path, headers, server_side)
        status = split_response(read_all(client))[0]
        client.close()
    assert status in (400, 505)


@pytest.mark.parametrize(
    "data",
    [
        b"12:CONTENT_LEN",  # netstring cut short, then EOF
        b"5:abcde,",  # not a header block
        b"024:CONTENT_LENGTH\x000\x00SCGI\x001\x00,",  # leading zero
        b"30:CONTENT_LENGTH\x005\x00SCGI\x001\x00A\x00b\x00,ab",  # body cut short
    ],
)
def test_invalid_scgi_handoff_closes_client(sock_path: str, data: bytes, no_fd_leak: None) -> None:
    with ReceiverThread(Recorder(), [Bind(sock_path)]):
        client, server_side = tcp_pair()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(sock_path)
            fdpass.send_fd(conn, data, server_side.fileno(), timeout=5)
            server_side.close()
            conn.shutdown(socket.SHUT_WR)
            assert wait_closed(conn)
        assert read_all(client, timeout=10) == b""  # closed, not answered
        client.close()


def test_two_fds_in_one_handoff_are_both_closed(sock_path: str, no_fd_leak: None) -> None:
    with ReceiverThread(Recorder(), [Bind(sock_path)]):
        c1, s1 = tcp_pair()
        c2, s2 = tcp_pair()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(sock_path)
            data = scgi.encode(front_headers())
            fds = array.array("i", [s1.fileno(), s2.fileno()]).tobytes()
            conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            s1.close()
            s2.close()
            assert wait_closed(conn)
        assert read_all(c1) == b""
        assert read_all(c2) == b""
        c1.close()
        c2.close()


def test_refused_sender_uid_closes_client(sock_path: str, no_fd_leak: None) -> None:
    rec = Recorder()
    options = Options(allow_uids=frozenset({os.getuid() + 1}), allow_gids=frozenset())
    with ReceiverThread(rec, [Bind(sock_path)], options):
        client, server_side = tcp_pair()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(sock_path)
            # The receiver may close before the message is sent.
            with contextlib.suppress(OSError):
                fdpass.send_fd(conn, scgi.encode(front_headers()), server_side.fileno(), timeout=5)
            server_side.close()
            assert wait_closed(conn)
        assert read_all(client) == b""
        client.close()
    assert rec.seen == []


def test_allowed_sender_uid_is_served(sock_path: str, no_fd_leak: None) -> None:
    options = Options(allow_uids=frozenset({os.getuid()}))
    with ReceiverThread(Recorder(), [Bind(sock_path)], options):
        client, server_side = tcp_pair()
        send_scgi(sock_path, front_headers(), server_side)
        assert split_response(read_all(client))[0] == 200
        client.close()


def test_ktls_rx_relay_is_refused_with_502(sock_path: str, no_fd_leak: None) -> None:
    rec = Recorder()
    with ReceiverThread(rec, [Bind(sock_path)]):
        client, server_side = tcp_pair()
        headers = [
            ("CONTENT_LENGTH", "0"),
            ("SCGI", "1+fd_pass"),
            ("HTTPS", "on"),
            ("KTLS_RX", "0"),
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/"),
        ]
        send_scgi(sock_path, headers, server_side)
        assert split_response(read_all(client))[0] == 502
        client.close()
    assert rec.seen == []


def test_many_concurrent_handoffs(sock_path: str, no_fd_leak: None) -> None:
    async def slow(handoff: Handoff) -> None:
        await asyncio.sleep(0.2)
        await handoff.respond(200, [], handoff.path.encode() if handoff.path else b"")

    with ReceiverThread(slow, [Bind(sock_path)]):
        clients = []
        for i in range(50):
            client, server_side = tcp_pair()
            send_scgi(sock_path, front_headers("GET", f"/{i}"), server_side)
            clients.append(client)
        bodies = [split_response(read_all(c))[2] for c in clients]
        for c in clients:
            c.close()
    assert bodies == [f"/{i}".encode() for i in range(50)]
