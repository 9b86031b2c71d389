"""RFC 9112 / 9110 conformance of request heads and bodies, front and receiver side by side.

One table of request heads, each judged as the front judges it (whole, and
split at every byte), and, for every head the front hands off, the framing
each side then applies: the front's own reading (``RequestHead``), the
receiver's reading of the SCGI description the front sends with the socket,
and the receiver's reading of the same head on a kept-alive connection.  Any
difference between those three would let one side cut the byte stream where
the other does not: request smuggling.  Then chunked bodies, cut by the
front's reader (auth mode) and the receiver's decoder, and a few of the same
cases over real sockets through a real front and receiver.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdhandoff import scgi
from fdhandoff.errors import ProtocolError
from fdhandoff.front.describe import Endpoint, describe
from fdhandoff.httphead import ChunkedReader, RequestHead, parse_head
from fdhandoff.message import Format, HandoffRecord
from fdhandoff.receiver.asgi_scope import request_from_handoff, request_from_head
from fdhandoff.receiver.body import END, NEED_DATA, BodyDecoder, framing
from fdhandoff.receiver.request import HandoffInfo
from handoff_receiver import FrontProcess, running_front
from test_httphead import judged_in_pieces
from test_receiver_asgi_support import ASGIReceiver, ResponseReader

pytestmark = pytest.mark.timeout(120)

HOST = b"Host: a\r\n"


def head(line: bytes, *fields: bytes) -> bytes:
    """A request head: ``line``, the field lines given (CRLF added), the blank line."""
    return line + b"\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n"


def get(*fields: bytes) -> bytes:
    return head(b"GET / HTTP/1.1", b"Host: a", *fields)


def post(*fields: bytes) -> bytes:
    return head(b"POST / HTTP/1.1", b"Host: a", *fields)


def framings(parsed: RequestHead) -> tuple[tuple[int | None, bool], ...]:
    """``(content_length, chunked)`` as the front, the receiver of its SCGI
    description, and the receiver of the same head on a kept-alive connection
    read it (no body is ``(0, False)`` for all three)."""
    front = (None, True) if parsed.chunked else (parsed.content_length or 0, False)
    message, _ = describe(
        parsed,
        remote=Endpoint(b"192.0.2.1", b"1"),
        server=Endpoint(b"192.0.2.2", b"80"),
        route=b"/",
    )
    decoded = scgi.parse_whole(message)
    assert decoded is not None
    described = request_from_handoff(HandoffInfo(HandoffRecord(Format.SCGI, headers=decoded[0])))
    kept_alive, _ = request_from_head(parsed)
    return front, framing(described.headers), framing(kept_alive.headers)


# --- request heads: status, whole and in pieces; framing on both sides --------------------

#: (head, status): 0 is handed off.  Every head gets the same answer whole and
#: split anywhere (the front judges an unfinished head as it arrives).
HEADS: list[tuple[bytes, int]] = [
    # Request line (RFC 9112 §3).
    (get(), 0),
    (b"\r\n" + get(), 0),  # §2.2: empty lines before the request line are ignored
    (b"\r\n\r\n" + get(), 0),
    (b"\n" + get(), 400),  # ... but only CRLF ones: bare LF is refused everywhere
    (head(b"GET  / HTTP/1.1", b"Host: a"), 400),  # single SP only
    (head(b"GET / HTTP/1.1 ", b"Host: a"), 400),
    (head(b"GET\t/ HTTP/1.1", b"Host: a"), 400),
    (head(b"GET /\tHTTP/1.1", b"Host: a"), 400),
    (head(b"GET / http/1.1", b"Host: a"), 400),  # HTTP-name is case-sensitive
    (head(b"GET / HTTP/1.2", b"Host: a"), 0),  # RFC 9110 §6.2: read as 1.1
    (head(b"GET / HTTP/1.10", b"Host: a"), 400),
    (head(b"GET / HTTP/2.0", b"Host: a"), 505),
    (head(b"GET / HTTP/0.9", b"Host: a"), 505),
    (b"GET /\r\n\r\n", 400),  # HTTP/0.9 simple request: no request line of RFC 9112
    (head(b"GET http://u:p@a/ HTTP/1.1", b"Host: a"), 400),  # userinfo (RFC 9110 §4.2.4)
    (head(b"GET http://a/x HTTP/1.1", b"Host: a"), 0),
    (head(b"GET * HTTP/1.1", b"Host: a"), 400),  # asterisk-form is for OPTIONS only
    (head(b"OPTIONS * HTTP/1.1", b"Host: a"), 0),
    (head(b"CONNECT a:443 HTTP/1.1", b"Host: a"), 501),  # not a proxy
    (head(b"GET /a\x00b HTTP/1.1", b"Host: a"), 400),
    (head(b"GET /a\x01b HTTP/1.1", b"Host: a"), 400),
    (head(b"GET /a\x7fb HTTP/1.1", b"Host: a"), 400),
    (head(b"GET /a#b HTTP/1.1", b"Host: a"), 400),  # a fragment is never sent
    (head(b"X" * 300 + b" / HTTP/1.1", b"Host: a"), 501),  # a token, just unknown
    (head(b"X" * 9000 + b" / HTTP/1.1", b"Host: a"), 414),
    # Field lines (RFC 9112 §5).
    (get(b"X-A : b"), 400),  # whitespace between name and colon
    (get(b"X-A\t: b"), 400),
    (get(b"X-A: b", b" folded"), 400),  # obs-fold (§5.2)
    (get(b"X-A: b", b"\tfolded"), 400),
    (get(b": b"), 400),  # empty name
    (get(b"X/A: b"), 400),  # not a token
    (get(b"X-A: b\x00c"), 400),
    (get(b"X-A: b\rc"), 400),
    (get(b"X-A: b\x7fc"), 400),
    (get(b"X-A: b\x80c"), 0),  # obs-text is allowed (RFC 9110 §5.5)
    (b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n", 400),  # bare LF (§2.2)
    (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\nGET /x HTTP/1.1\r\nHost: b\r\n\r\n", 400),
    (get(*[b"X-%d: a" % i for i in range(99)]), 0),  # 100 field lines
    (get(*[b"X-%d: a" % i for i in range(100)]), 431),
    (head(b"GET / HTTP/1.1", b"Host: a", b"Host: a"), 400),  # RFC 9112 §3.2
    (head(b"GET / HTTP/1.1"), 400),
    (head(b"GET / HTTP/1.0"), 0),  # Host is optional in 1.0
    (head(b"GET / HTTP/1.1", b"Host: a b"), 400),
    (head(b"GET / HTTP/1.1", b"Host: a/b"), 400),
    (head(b"GET / HTTP/1.1", b"Host: u@a"), 400),
    (head(b"GET / HTTP/1.1", b"Host: a:8x"), 400),
    (head(b"GET http://good/ HTTP/1.1", b"Host: a b"), 400),
    # Transfer-Encoding (RFC 9112 §6.1, §6.3).
    (post(b"Transfer-Encoding: chunked"), 0),
    (post(b"Transfer-Encoding: Chunked"), 0),
    (post(b"Transfer-Encoding:  chunked"), 0),
    (post(b"Transfer-Encoding: , chunked"), 0),  # RFC 9110 §5.6.1: empty elements
    (post(b"Transfer-Encoding: chunked, chunked"), 400),
    (post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400),
    (post(b"Transfer-Encoding: identity"), 400),
    (post(b"Transfer-Encoding: xchunked"), 400),
    (post(b"Transfer-Encoding: chunkedx"), 400),
    (post(b"Transfer-Encoding: chunked, gzip"), 400),  # chunked not final
    (post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"), 400),
    (post(b"Transfer-Encoding: gzip, chunked"), 501),  # understood, not implemented
    (post(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"), 501),
    (post(b"Transfer-Encoding:"), 400),
    (post(b"Transfer-Encoding: chunked", b"Content-Length: 3"), 400),
    (post(b"Content-Length: 3", b"Transfer-Encoding: chunked"), 400),
    (head(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked"), 400),
    (post(b"Transfer-Encoding : chunked"), 400),
    (post(b"Transfer_Encoding: chunked"), 0),  # not the field: dropped, no body
    # Content-Length (RFC 9110 §8.6).
    (post(b"Content-Length: 5"), 0),
    (post(b"Content-Length:  5 "), 0),
    (post(b"Content-Length: 007"), 0),
    (post(b"Content-Length: " + b"9" * 18), 0),
    (post(b"Content-Length: " + b"9" * 19), 400),
    (post(b"Content-Length: " + b"9" * 25), 400),
    (post(b"Content-Length: +1"), 400),
    (post(b"Content-Length: -1"), 400),
    (post(b"Content-Length: 0x1"), 400),
    (post(b"Content-Length: 1,1"), 400),
    (post(b"Content-Length: 1, 2"), 400),
    (post(b"Content-Length: 1 1"), 400),
    (post(b"Content-Length:"), 400),
    (post(b"Content-Length: 5", b"Content-Length: 5"), 400),
    (post(b"Content-Length: 5", b"Content-Length: 6"), 400),
    (post(b"Content_Length: 5"), 0),  # not the field: dropped, no body
    (get(b"Content-Length: 5"), 0),  # a GET may carry content: it is framed as any
    (head(b"HEAD / HTTP/1.1", b"Host: a", b"Content-Length: 5"), 0),
    (head(b"POST / HTTP/1.0", b"Content-Length: 5"), 0),
]


@pytest.mark.parametrize(("data", "status"), HEADS)
def test_request_heads(data: bytes, status: int) -> None:
    verdicts = set(judged_in_pieces(data))
    assert verdicts == {status}, f"whole and in pieces: {verdicts}, expected {status}"
    if status:
        return
    parsed = parse_head(data, http10=True)
    front, described, kept_alive = framings(parsed)
    assert front == described == kept_alive


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((b"Content-Length: 5",), (5, False)),
        ((b"Content-Length: 007",), (7, False)),
        ((b"Transfer-Encoding: chunked",), (None, True)),
        ((b"Transfer-Encoding: , chunked",), (None, True)),
        ((b"Transfer_Encoding: chunked", b"Content-Length: 2"), (2, False)),
        ((b"Content_Length: 5",), (0, False)),
        ((), (0, False)),
    ],
)
def test_both_sides_read_the_same_framing(
    fields: tuple[bytes, ...], expected: tuple[int | None, bool]
) -> None:
    assert set(framings(parse_head(post(*fields)))) == {expected}


#: Field lines that matter for framing, as a client may spell them.
_NAMES = [
    b"Content-Length",
    b"content-length",
    b"Content_Length",
    b"Transfer-Encoding",
    b"TRANSFER-ENCODING",
    b"Transfer_Encoding",
    b"Connection",
    b"Upgrade",
    b"Expect",
    b"X-A",
]
_PIECES = [b"chunked", b"Chunked", b"gzip", b"identity", b",", b" ", b"\t", b"0", b"1", b"5"]
_PIECES += [b"close", b"upgrade", b"websocket", b"100-continue", b";", b'"', b"x"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(
        [b"GET / HTTP/1.1", b"POST /x HTTP/1.1", b"POST /x HTTP/1.0", b"GET http://h/ HTTP/1.1"]
    ),
    st.lists(
        st.tuples(
            st.sampled_from(_NAMES), st.lists(st.sampled_from(_PIECES), max_size=4).map(b"".join)
        ),
        max_size=5,
    ),
)
def test_every_head_handed_off_is_framed_alike_on_both_sides(
    line: bytes, fields: list[tuple[bytes, bytes]]
) -> None:
    data = head(line, *([b"Host: h"] if b"1.1" in line else []), *(n + b":" + v for n, v in fields))
    try:
        parsed = parse_head(data, http10=True)
    except ProtocolError:
        return
    front, described, kept_alive = framings(parsed)
    assert front == described == kept_alive


# --- chunked bodies: the front's reader and the receiver's decoder ------------------------


def cut_by_front(body: bytes, step: int) -> tuple[int, bytes] | None:
    """(bytes of the body, data) as the front's auth mode cuts it, peeking ``step``
    bytes at a time; None if refused or unfinished."""
    reader, pos, data = ChunkedReader(), 0, b""
    try:
        while pos < len(body) and not reader.done:
            used, pieces = reader.feed(body[pos : pos + step])
            pos, data = pos + used, data + b"".join(pieces)
    except ProtocolError:
        return None
    return (pos, data) if reader.done else None


def cut_by_receiver(body: bytes, step: int) -> tuple[int, bytes] | None:
    decoder, data, fed = BodyDecoder(None, True), b"", 0
    try:
        while fed < len(body):
            piece = body[fed : fed + step]
            decoder.receive_data(piece)
            fed += len(piece)
            while (event := decoder.next_event()) is not NEED_DATA:
                if event is END:
                    return fed - len(decoder.trailing_data), data
                assert isinstance(event, bytes)
                data += event
    except ProtocolError:
        return None
    return None


NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),  # HEXDIG: either case
        (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"005\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello"),  # 16 digits
        (b"5;a=b\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5 ; a = b\r\nhello\r\n0\r\n\r\n", b"hello"),  # BWS (RFC 9112 §7.1.1)
        (b'5;a="b; c\\"d"\r\nhello\r\n0\r\n\r\n', b"hello"),
        (b"5;a;b\r\nhello\r\n0;z\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", b"hello"),
        # Forbidden in trailers (RFC 9110 §6.5.1): dropped by both, not applied.
        (b"0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nHost: b\r\n\r\n", b""),
        # Refused by both (None).
        (b" 5\r\nhello\r\n0\r\n\r\n", None),
        (b"5 \r\nhello\r\n0\r\n\r\n", None),
        (b"5\t\r\nhello\r\n0\r\n\r\n", None),
        (b"0x5\r\nhello\r\n0\r\n\r\n", None),
        (b"+5\r\nhello\r\n0\r\n\r\n", None),
        (b"-5\r\nhello\r\n0\r\n\r\n", None),
        (b"\r\nhello\r\n0\r\n\r\n", None),
        (b"00000000000000005\r\nhello\r\n0\r\n\r\n", None),  # 17 digits
        (b"10000000000000000\r\n", None),  # would overflow 64 bits
        (b"5;\r\nhello\r\n0\r\n\r\n", None),  # bare semicolon
        (b"5;a;;b\r\nhello\r\n0\r\n\r\n", None),
        (b"5;=b\r\nhello\r\n0\r\n\r\n", None),
        (b"5;a=\r\nhello\r\n0\r\n\r\n", None),
        (b'5;a="b\r\nhello\r\n0\r\n\r\n', None),
        (b"5;a\x00\r\nhello\r\n0\r\n\r\n", None),
        (b"5\r\nhelloX\r\n0\r\n\r\n", None),  # no CRLF after the data
        (b"5\r\nhello0\r\n\r\n", None),
        (b"5\r\nhello\r0\r\n\r\n", None),
        (b"5\nhello\r\n0\r\n\r\n", None),  # bare LF anywhere in the framing
        (b"5\r\nhello\n0\r\n\r\n", None),
        (b"5\r\nhello\r\n0\n\r\n", None),
        (b"5\r\nhello\r\n0\r\n\n", None),
        (b"5\rhello\r\n0\r\n\r\n", None),
        (b"0\r\nX-T: 1\r\n folded\r\n\r\n", None),
        (b"0\r\nX-T : 1\r\n\r\n", None),
        (b"0\r\nX-T: 1\x00\r\n\r\n", None),
        (b"0\r\nno colon\r\n\r\n", None),
    ],
)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_chunked_bodies_end_at_the_same_byte_on_both_sides(
    body: bytes, data: bytes | None, step: int
) -> None:
    data_with_next = body + NEXT
    expected = None if data is None else (len(body), data)
    assert cut_by_front(data_with_next, step) == expected
    assert cut_by_receiver(data_with_next, step) == expected


# --- over real sockets: a real front, the ASGI receiver ----------------------------------


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with what it was: method, path and body."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = {"method": scope["method"], "path": scope["path"], "body": body.decode("latin-1")}
    text = json.dumps(seen).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(text))],
        }
    )
    await send({"type": "http.response.body", "body": text})


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontProcess]:
    path = str(tmp_path_factory.mktemp("conformance") / "app.sock")
    with (
        ASGIReceiver(_echo, path, lifespan=False),
        running_front(["--listen", "127.0.0.1:0", "--route", f"/=unix:{path}"]) as started,
    ):
        yield started


@contextmanager
def _connection(front: FrontProcess) -> Iterator[tuple[Any, ResponseReader]]:
    sock = front.connect()
    try:
        yield sock, ResponseReader(sock, timeout=10)
    finally:
        sock.close()


def _served(front: FrontProcess, data: bytes, *, head_first: bool = False) -> list[object]:
    """What the connection answered to ``data`` sent in one write: the
    requests the application saw, then the status of a refusal, if any."""
    answers: list[object] = []
    with _connection(front) as (sock, reader):
        sock.sendall(data)
        while True:
            try:
                response = reader.read(head_request=head_first and not answers)
            except ConnectionError:
                break
            if response.status != 200:
                answers.append(response.status)
                break
            if head_first and not answers:
                answers.append("HEAD answered")  # no body to tell what was seen
            else:
                seen = json.loads(response.body)
                answers.append(f"{seen['method']} {seen['path']} {seen['body']!r}")
            if response.header("connection") == "close":
                break
    return answers


CLOSE = b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
#: A first request after which the connection stays open: the next head is the receiver's.
KEEP = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "served"),
    [
        (
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" + CLOSE,
            ["POST /a 'hello'", "GET /last ''"],
        ),
        (
            b"GET /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" + CLOSE,
            ["GET /a 'hello'", "GET /last ''"],
        ),
        (
            b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;ext="q"\r\nhello\r\n0\r\nX-T: 1\r\n\r\n' + CLOSE,
            ["POST /a 'hello'", "GET /last ''"],
        ),
        # A request inside chunk data is data; Content-Length beside
        # Transfer-Encoding is refused rather than one of them believed.
        (
            b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"21\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n0\r\n\r\n" + CLOSE,
            ["POST /a 'GET /smuggled HTTP/1.1\\r\\nHost: a\\r\\n'", "GET /last ''"],
        ),
        (
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            [400],
        ),
        # A later request is held to the front's rules by the receiver.
        (KEEP + b"GET /\r\n\r\n", ["GET /first ''", 400]),
        (
            KEEP + b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            ["GET /first ''", 400],
        ),
        (
            KEEP
            + b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            ["GET /first ''", 400],
        ),
        (
            KEEP + b"POST /b HTTP/1.1\r\nHost: a\nContent-Length: 1\r\n\r\nx",
            ["GET /first ''", 400],
        ),
        (
            KEEP + b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\nhello\r\n0\r\n\r\n" + CLOSE,
            ["GET /first ''", 400],
        ),
        (b"\r\n\r\n" + CLOSE, ["GET /last ''"]),
        (b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\r\n" + CLOSE, ["GET /a ''", "GET /last ''"]),
    ],
)
def test_what_each_connection_serves(
    front: FrontProcess, data: bytes, served: list[object]
) -> None:
    assert _served(front, data) == served


def test_head_with_content_keeps_the_next_request(front: FrontProcess) -> None:
    """RFC 9112 §6.3: Content-Length frames a HEAD request's content too."""
    data = b"HEAD /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" + CLOSE
    assert _served(front, data, head_first=True) == ["HEAD answered", "GET /last ''"]
