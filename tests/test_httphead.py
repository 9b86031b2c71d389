"""Request-head parsing under limits (sans-IO): bytes first, then every split, then fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdhandoff.errors import ProtocolError
from fdhandoff.httphead import (
    ChunkedReader,
    HeadLimits,
    find_head_end,
    incomplete_head_error,
    parse_head,
    parse_response_head,
    split_host,
)

GET = (
    b"GET /fd/hello?x=1&y=two%20words HTTP/1.1\r\n"
    b"Host: 127.0.0.1:18080\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"X-Custom-Header: abc\r\n"
    b"\r\n"
)


def status_of(head: bytes, limits: HeadLimits | None = None) -> int:
    with pytest.raises(ProtocolError) as info:
        parse_head(head, limits or HeadLimits())
    return info.value.status_hint


def test_parses_a_curl_get() -> None:
    head = parse_head(GET)
    assert head.method == b"GET"
    assert head.target == b"/fd/hello?x=1&y=two%20words"
    assert head.path == b"/fd/hello"
    assert head.query == b"x=1&y=two%20words"
    assert head.version == b"1.1"
    assert head.host == b"127.0.0.1"
    assert head.port == b"18080"
    assert head.headers[3] == (b"X-Custom-Header", b"abc")
    assert head.content_length is None and not head.chunked and not head.has_body
    assert head.size == len(GET)


def test_body_framing_headers() -> None:
    post = parse_head(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 23\r\n\r\n")
    assert post.content_length == 23 and post.has_body
    chunked = parse_head(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked.chunked and chunked.content_length is None


def test_upgrade_request_is_parsed_whole() -> None:
    head = parse_head(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert head.upgrade
    assert head.values(b"upgrade") == [b"websocket"]


def test_absolute_form_takes_the_host_from_the_target() -> None:
    head = parse_head(b"GET http://Example.COM:8080/a/b?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (head.host, head.port, head.path, head.query) == (
        b"example.com",
        b"8080",
        b"/a/b",
        b"q=1",
    )
    # RFC 9112 §3.2.2: the authority replaces Host; REQUEST_URI is origin-form,
    # as nginx's $request_uri.
    assert head.target == b"/a/b?q=1"
    assert head.values(b"host") == [b"example.com:8080"]


def test_host_trailing_dot_dropped_and_empty_host_refused() -> None:
    assert parse_head(b"GET / HTTP/1.1\r\nHost: Example.com.:81\r\n\r\n").host == b"example.com"
    assert parse_head(b"GET http://a.b./ HTTP/1.1\r\nHost: x\r\n\r\n").host == b"a.b"
    for value in (b"", b":80", b"."):
        with pytest.raises(ProtocolError, match="names no host"):
            parse_head(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /a HTTP/1.1\r\nHost: x\x00y\r\n\r\n", 400),  # NUL in a value
        (b"GET /a HTTP/1.1\r\nHost: x\ry\r\n\r\n", 400),  # CR in a value
        (b"GET /a HTTP/1.1\r\nX: \x7f\r\nHost: a\r\n\r\n", 400),  # DEL in a value
        (b"GET /a HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),  # obs-fold
        (b"GET /a HTTP/1.1\r\nHo st: a\r\n\r\n", 400),  # space in a name
        (b"GET /a HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # space before the colon
        (b"GET /a HTTP/1.1\r\nH\x01st: a\r\n\r\n", 400),  # control byte in a name
        (b"GET /a HTTP/1.1\r\n: a\r\nHost: a\r\n\r\n", 400),  # empty name
        (b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5x\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),  # two Hosts
        (b"GET /a HTTP/1.1\r\nHost: a b\r\n\r\n", 400),  # malformed Host
        (b"GET /a HTTP/1.1\r\nHost: a:99999x\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # space in the target
        (b"GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # not origin-form
        (b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: a\r\n", 400),  # no blank line: incomplete
        (b"FOO /a HTTP/1.1\r\nHost: a\r\n\r\n", 501),  # a token, but not a method we know
        (b"get /a HTTP/1.1\r\nHost: a\r\n\r\n", 501),  # methods are case-sensitive
        (b"G(T /a HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # not a token
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
        (b"GET /a HTTP/1.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /a HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\n", 505),
    ],
)
def test_rejects_with_the_right_status(head: bytes, status: int) -> None:
    assert status_of(head) == status


def test_head_and_line_limits() -> None:
    limits = HeadLimits(max_head_size=1024, max_uri_length=100, max_headers=3)
    long_uri = b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert status_of(long_uri, limits) == 414
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 1100 + b"\r\n\r\n"
    assert status_of(big, limits) == 431
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: 1\r\n" * 3 + b"\r\n"
    assert status_of(many, limits) == 431
    ok = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: 1\r\n" * 2 + b"\r\n"
    assert parse_head(ok, limits).method == b"GET"


def test_incomplete_head_judgement() -> None:
    limits = HeadLimits(max_head_size=1024, max_uri_length=100, max_headers=3)
    assert incomplete_head_error(b"GET / HTTP/1.1\r\nHost: a\r\n", limits) is None
    # The request line alone is already too long: 414 before the head ends.
    error = incomplete_head_error(b"GET /" + b"a" * 150, limits)
    assert error is not None and error.status_hint == 414
    error = incomplete_head_error(b"GET / HTTP/1.1\r\nX: " + b"v" * 1100, limits)
    assert error is not None and error.status_hint == 431
    error = incomplete_head_error(b"GET / HTTP/1.1\nHost: a\n", limits)
    assert error is not None and error.status_hint == 400


def test_find_head_end_resumes_across_a_split_terminator() -> None:
    data = GET + b"BODY"
    end = len(GET)
    assert find_head_end(data) == end
    for split in range(1, len(data)):
        first = find_head_end(data[:split])
        if first >= 0:
            assert first == end
            continue
        assert find_head_end(data, max(0, split - 3)) == end
    assert find_head_end(b"GET / HTTP/1.1\nHost: a\n\n") == -1  # bare LF never ends a head


def test_split_host() -> None:
    assert split_host(b"Example.com") == (b"example.com", b"")
    assert split_host(b"example.com:80") == (b"example.com", b"80")
    assert split_host(b"[::1]:8080") == (b"[::1]", b"8080")
    for bad in (b"", b":80", b"a:b:c", b"[::1", b"[::1]x", b"a/b", b"a:123456"):
        with pytest.raises(ProtocolError):
            split_host(bad)


def test_response_head() -> None:
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\nX-Socket-Handoff: /run/d.sock\r\nContent-Length: 5\r\n\r\n"
    )
    assert head.status == 200 and head.content_length == 5 and not head.chunked
    assert head.values(b"x-socket-handoff") == [b"/run/d.sock"]
    chunked = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert chunked.chunked
    with pytest.raises(ProtocolError) as info:
        parse_response_head(b"HTTP/1.1 2x0 OK\r\n\r\n")
    assert info.value.status_hint == 502


# --- chunked bodies ----------------------------------------------------------------------

CHUNKED = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


def feed_all(reader: ChunkedReader, data: bytes, step: int) -> tuple[int, bytes]:
    """Feed as a front does: peek ``step`` bytes, consume what the reader took."""
    pos, out = 0, []
    while pos < len(data) and not reader.done:
        window = data[pos : pos + step]
        used, pieces = reader.feed(window)
        out += pieces
        pos += used
        if used < len(window):
            assert reader.done  # only stops short at the end of the body
    return pos, b"".join(out)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunked_reader_stops_exactly_at_the_end(step: int) -> None:
    reader = ChunkedReader()
    used, body = feed_all(reader, CHUNKED + NEXT, step)
    assert reader.done
    assert body == b"hello world"
    assert used == len(CHUNKED)  # the pipelined request is not consumed


@pytest.mark.parametrize(
    "bad",
    [
        b"x\r\n",
        b"5\nhello\r\n",
        b"5\r\nhelloX\r\n",
        b"12345678901234567\r\n",
        b"5 5\r\n",
        b"-5\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        b"1;" + b"e" * 5000,
    ],
)
def test_chunked_reader_rejects(bad: bytes) -> None:
    reader = ChunkedReader()
    with pytest.raises(ProtocolError):
        reader.feed(bad)
        reader.feed(b"\r\n\r\n")
    with pytest.raises(ProtocolError):
        reader.feed(b"0\r\n\r\n")  # stays failed


# --- fuzz: accepts, or raises a documented error -------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parse_head(data: bytes) -> None:
    try:
        head = parse_head(data + b"\r\n\r\n")
    except ProtocolError as exc:
        assert exc.status_hint in (400, 414, 431, 501, 505)
        return
    for name, value in head.headers:
        assert b"\x00" not in name + value and b"\r" not in value and b"\n" not in value


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"Host", b"X-A", b"Cookie", b"Accept"]),
            st.binary(min_size=0, max_size=20).filter(
                lambda v: all(32 <= b < 127 for b in v) and v.strip() == v
            ),
        ),
        max_size=8,
    )
)
def test_fuzz_headers_round_trip(headers: list[tuple[bytes, bytes]]) -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    try:
        head = parse_head(raw + b"\r\n")
    except ProtocolError as exc:
        assert exc.status_hint == 400  # Host missing, repeated or malformed
        return
    assert list(head.headers) == headers
