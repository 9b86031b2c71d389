"""Request-head parsing under limits (sans-IO): bytes first, then every split, then fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdhandoff.errors import ProtocolError
from fdhandoff.httphead import (
    MAX_TRAILER_SIZE,
    ChunkedReader,
    HeadLimits,
    empty_lines_end,
    find_head_end,
    incomplete_head_error,
    is_cgi_header_name,
    parse_head,
    parse_response_head,
    split_host,
)
from fdhandoff.receiver.body import END, BodyDecoder

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


@pytest.mark.parametrize(
    ("fields", "chunked"),
    [
        (b"Transfer-Encoding: chunked\r\n", True),
        (b"Transfer-Encoding: gzip, chunked\r\n", True),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n", True),
        (b"Transfer-Encoding: chunked,\r\n", True),  # RFC 9110 §5.6.1: empty elements
        # RFC 9112 §6.3: chunked not last (over several lines too), or a
        # coding that merely ends in "chunked": the body ends at the close.
        (b"Transfer-Encoding: xchunked\r\n", False),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", False),
        (b"Transfer-Encoding: chunked, gzip\r\n", False),
        (b"Transfer-Encoding: identity\r\n", False),
    ],
)
def test_response_is_chunked_only_when_chunked_is_the_final_coding(
    fields: bytes, chunked: bool
) -> None:
    head = parse_response_head(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")
    assert (head.chunked, head.content_length) == (chunked, None)


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
    # Where the trailer section starts: right past the last chunk's "0\r\n".
    assert reader.trailer_start == CHUNKED.index(b"Trailer: x")


def test_chunked_reader_trailer_start_is_none_until_the_last_chunk() -> None:
    reader = ChunkedReader()
    reader.feed(b"5\r\nhello\r\n")
    assert reader.trailer_start is None
    reader.feed(b"0\r")
    assert reader.trailer_start is None  # the size line is not whole yet
    reader.feed(b"\n\r\n")
    assert (reader.trailer_start, reader.done) == (len(b"5\r\nhello\r\n0\r\n"), True)


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


#: Chunked bodies judged by RFC 9112 §7.1's grammar, and whether each is well-formed.
CHUNK_GRAMMAR = [
    (b"5;a=b\r\nhello\r\n0\r\n\r\n", True),
    (b'5;a="b c\\"d"\r\nhello\r\n0\r\n\r\n', True),  # quoted-string, quoted-pair
    (b"5 ;a=b\r\nhello\r\n0\r\n\r\n", True),  # BWS before ';' (§7.1.1)
    (b"5\t; a = b\r\nhello\r\n0\r\n\r\n", True),
    (b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nY:\r\n\r\n", True),
    (b"5;\r\nhello\r\n0\r\n\r\n", False),  # ';' without a name
    (b"5;a\x00\r\nhello\r\n0\r\n\r\n", False),  # NUL in an extension
    (b"5;a\rb\r\nhello\r\n0\r\n\r\n", False),  # bare CR in an extension
    (b"5;a@b\r\nhello\r\n0\r\n\r\n", False),  # not a token
    (b"5;a=b c\r\nhello\r\n0\r\n\r\n", False),  # unquoted space in a value
    (b'5;a="b\r\nhello\r\n0\r\n\r\n', False),  # unterminated quoted-string
    (b" 5\r\nhello\r\n0\r\n\r\n", False),  # whitespace before the size
    (b"5 \r\nhello\r\n0\r\n\r\n", False),  # whitespace, but no extension
    (b"0x5\r\nhello\r\n0\r\n\r\n", False),
    (b"5\r\nhello\r\n0\r\nNo-Colon\r\n\r\n", False),
    (b"5\r\nhello\r\n0\r\nX: 1\r\n folded\r\n\r\n", False),  # obs-fold (§5.2)
    (b"5\r\nhello\r\n0\r\nX : 1\r\n\r\n", False),  # whitespace before the colon
    (b"5\r\nhello\r\n0\r\nX: a\x00b\r\n\r\n", False),
    (b"5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n", False),
    (b"5\r\nhello\r\n0\r\nX: a\x01\r\n\r\n", False),
    (b"5\r\nhello\r\n0\r\n: a\r\n\r\n", False),
]


@pytest.mark.parametrize(("body", "valid"), CHUNK_GRAMMAR)
def test_chunked_grammar_is_the_same_for_front_and_receiver(body: bytes, valid: bool) -> None:
    # The front (auth mode) and the receiver must cut a chunked body at the
    # same byte and refuse the same ones, or a request is smuggled past one.
    reader = ChunkedReader()
    decoder = BodyDecoder(None, True)
    decoder.receive_data(body + NEXT)
    if not valid:
        with pytest.raises(ProtocolError):
            reader.feed(body)
        with pytest.raises(ProtocolError):
            while decoder.next_event() is not END:
                pass
        return
    used, pieces = reader.feed(body + NEXT)
    assert reader.done
    assert (used, b"".join(pieces)) == (len(body), b"hello")
    data = b""
    while (event := decoder.next_event()) is not END:
        assert isinstance(event, bytes)
        data += event
    assert (data, decoder.trailing_data) == (b"hello", NEXT)


def test_trailer_section_is_bounded() -> None:
    line = b"X-T: " + b"v" * 1000 + b"\r\n"
    body = b"0\r\n" + line * (MAX_TRAILER_SIZE // len(line) + 1) + b"\r\n"
    with pytest.raises(ProtocolError) as info:
        ChunkedReader().feed(body)
    assert info.value.status_hint == 431
    decoder = BodyDecoder(None, True)
    decoder.receive_data(body)
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.status_hint == 431


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


# --- conformance: RFC 9112 details llhttp is lenient about ---------------------------------


def head_end_like_the_front(buf: bytes) -> int:
    """Where the front takes the head to end in ``buf`` (server._absorb's search)."""
    start = empty_lines_end(buf) if buf[:1] == b"\r" else 0
    found = buf.find(b"\r\n\r\n", start)
    return -1 if found < 0 else found + 4


def judged_in_pieces(data: bytes, limits: HeadLimits | None = None) -> list[int]:
    """The status for ``data`` arriving whole, and split at every point, as the front
    reads it: each incomplete prefix judged by incomplete_head_error, the head
    parsed once its end is found.  ``0`` means parsed fine."""
    limits = limits or HeadLimits()
    results = []
    for split in range(len(data) + 1):
        pieces = [data[:split], data] if split else [data]
        outcome = None
        for seen in pieces:
            end = head_end_like_the_front(seen)
            if end < 0:
                error = incomplete_head_error(seen, limits)
                if error is not None:
                    outcome = error.status_hint
                    break
                continue
            try:
                parse_head(seen[:end], limits, http10=True)
                outcome = 0
            except ProtocolError as exc:
                outcome = exc.status_hint
            break
        results.append(-1 if outcome is None else outcome)
    return results


@pytest.mark.parametrize("blank", [b"\r\n", b"\r\n\r\n", b"\r\n" * 5])
def test_empty_lines_before_the_request_line_are_skipped(blank: bytes) -> None:
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the
    # request line.  CRLF CRLF there is not the end of an empty head.
    data = blank + b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    assert empty_lines_end(data) == len(blank)
    assert head_end_like_the_front(data + b"BODY") == len(data)
    head = parse_head(data)
    assert (head.method, head.target, head.host, head.size) == (b"GET", b"/a", b"a", len(data))
    assert set(judged_in_pieces(data)) == {0}


def test_empty_lines_do_not_hide_a_long_request_line() -> None:
    limits = HeadLimits(max_head_size=1024, max_uri_length=100)
    data = b"\r\nGET /" + b"a" * 150 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert status_of(data, limits) == 414
    error = incomplete_head_error(data[:140], limits)  # not ended yet, already too long
    assert error is not None and error.status_hint == 414
    assert set(judged_in_pieces(data, limits)) == {414}


@pytest.mark.parametrize(
    "data",
    [
        b"\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n",  # bare LF "empty line"
        b"\r\n\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\rGET /a HTTP/1.1\r\nHost: a\r\n\r\n",  # bare CR
    ],
)
def test_bare_cr_or_lf_before_the_request_line_is_refused(data: bytes) -> None:
    # llhttp skips them; a bare LF is refused everywhere else, whole or in pieces.
    assert status_of(data) == 400
    assert set(judged_in_pieces(data)) == {400}


#: The start of a TLS 1.3 ClientHello: a handshake record (22), version 3.1,
#: length 42, ClientHello (1)... (RFC 8446 §4.1.2, §5.1); no CR or LF in it.
CLIENT_HELLO = (
    b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03"
    + bytes(range(0x40, 0x60))
    + b"\x00\x00\x02\x13\x01\x01\x00"
)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (CLIENT_HELLO, "TLS sent to a plain HTTP port"),
        (b"\r\n" + CLIENT_HELLO, "TLS sent to a plain HTTP port"),
        (b"\x00\x01binary", "method is not a token"),
        (b" GET /a HTTP/1.1\r\n", "method is not a token"),
        (b"G{T /a HTTP/1.1\r\n", "method is not a token"),
        (b"GET\r", "method is not a token"),
        # RFC 9112 §2.2: a bare CR is invalid wherever it is.
        (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\r\n", "CR not followed by LF"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\rabc", "CR not followed by LF"),
        (b"GET /x HTTP/1.1\r\nHost: a\rX: b", "CR not followed by LF"),
        (b"\r\rGET /x HTTP/1.1\r\n", "CR not followed by LF"),
    ],
)
def test_heads_that_cannot_become_valid_are_refused_before_they_end(data: bytes, why: str) -> None:
    """400 as soon as the bytes prove it, not 408 at the head timeout."""
    error = incomplete_head_error(data)
    assert error is not None and error.status_hint == 400
    assert why in str(error)


@pytest.mark.parametrize(
    "data",
    [
        b"G",
        b"GET",
        b"GET ",
        b"\r",
        b"\r\n",
        b"\r\n\r",
        b"GET /x HTTP/1.1\r",
        b"GET / HTTP/1.1\r\nA: b\r\n\r",
    ],
)
def test_prefixes_of_valid_heads_wait(data: bytes) -> None:
    # A lone CR at the end may be the first half of a CRLF (an empty line
    # before the request line included, RFC 9112 §2.2).
    assert incomplete_head_error(data) is None


def test_client_hello_is_refused_whole_or_in_pieces() -> None:
    assert set(judged_in_pieces(CLIENT_HELLO)) == {400}
    with pytest.raises(ProtocolError, match="TLS sent to a plain HTTP port"):
        parse_head(CLIENT_HELLO + b"\r\n\r\n")  # even with a head end in it


@pytest.mark.parametrize(
    "data",
    [
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\rabc\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\r\n\r\n",
    ],
)
def test_bare_cr_after_the_fields_is_refused_whole_or_in_pieces(data: bytes) -> None:
    assert set(judged_in_pieces(data)) == {400}


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET  /a HTTP/1.1", 400),  # RFC 9112 §3: single SP between the parts
        (b"GET /a  HTTP/1.1", 400),
        (b"GET /a HTTP/1.2", 0),  # RFC 9110 §6.2: a higher minor version is read as 1.1
        (b"GET /a HTTP/1.9", 0),
        (b"GET /a HTTP/2.0", 505),  # RFC 9110 §15.6.6: another major version
        (b"GET /a HTTP/3.0", 505),
        (b"GET /a HTTP/9.9", 505),
        (b"GET /a HTTP/0.9", 505),
        (b"GET /a HTTP/0.8", 505),
        (b"GET /a HTTP/11", 400),  # malformed, not another version
        (b"GET /a HTTP/1.10", 400),
        (b"GET /a http/1.1", 400),
        (b"GET /a HTTP/1.1 ", 400),
        (b"GET  /a HTTP/1.2", 400),
    ],
)
def test_request_line_spacing_and_versions(line: bytes, status: int) -> None:
    data = line + b"\r\nHost: a\r\n\r\n"
    if status:
        assert status_of(data) == status
    else:
        head = parse_head(data)
        assert (head.version, head.target, head.size) == (b"1.1", b"/a", len(data))
    assert set(judged_in_pieces(data)) == {status}


def test_http_1_2_with_a_bad_header_is_still_refused() -> None:
    assert status_of(b"GET /a HTTP/1.2\r\nHost: a\r\nBad Name: x\r\n\r\n") == 400


def test_http_1_0_only_when_the_caller_accepts_it() -> None:
    data = b"GET /a HTTP/1.0\r\n\r\n"
    assert status_of(data) == 505  # the default: callers that answer in 1.1 only
    head = parse_head(data, http10=True)
    assert (head.version, head.host, head.port) == (b"1.0", b"", b"")  # Host optional
    with_host = parse_head(b"GET /a HTTP/1.0\r\nHost: A:81\r\n\r\n", http10=True)
    assert (with_host.host, with_host.port) == (b"a", b"81")
    absolute = parse_head(b"GET http://b:82/x HTTP/1.0\r\n\r\n", http10=True)
    assert (absolute.host, absolute.target) == (b"b", b"/x")
    assert absolute.values(b"host") == [b"b:82"]  # the receiver learns the host too
    # RFC 9110 §7.8: Upgrade in an HTTP/1.0 request is ignored.
    upgrade = b"GET /a HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert not parse_head(upgrade, http10=True).upgrade
    for bad in (
        b"GET /a HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
        b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    ):
        with pytest.raises(ProtocolError) as info:
            parse_head(bad, http10=True)
        assert info.value.status_hint == 400


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"Host: a \r\n", b"a"),
        (b"Host: a\t \r\n", b"a"),
        (b"Host:\ta\t\r\n", b"a"),
    ],
)
def test_whitespace_around_a_value_is_not_part_of_it(header: bytes, value: bytes) -> None:
    # RFC 9112 §5.1: OWS before and after a field value is excluded; llhttp
    # only drops it before.  The parser drops it after, from every value.
    data = (
        b"POST /a HTTP/1.1\r\n" + header + b"Content-Length: 12 \r\nX-A:  b c \t \r\n"
        b"X-Empty:   \r\nX-Tab:\tv\t\r\n\r\n"
    )
    head = parse_head(data)
    assert head.host == value and head.values(b"host") == [value]
    assert head.values(b"content-length") == [b"12"] and head.content_length == 12
    assert head.values(b"x-a") == [b"b c"]  # inner whitespace stays
    assert head.values(b"x-empty") == [b""]
    assert head.values(b"x-tab") == [b"v"]
    assert set(judged_in_pieces(data)) == {0}


def test_transfer_encoding_value_case_and_whitespace() -> None:
    for value in (b"chunked", b"CHUNKED", b"Chunked ", b"\tchunked  "):
        head = parse_head(
            b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + value + b"\r\n\r\n"
        )
        assert head.chunked
        assert head.values(b"transfer-encoding")[0].strip(b", ").lower() == b"chunked"


@pytest.mark.parametrize(
    ("te", "status"),
    [
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),  # RFC 9112 §6.1: not understood
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501),
        (b"Transfer-Encoding: identity, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked, chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked, gzip\r\n", 400),  # RFC 9112 §6.3: final not chunked
        (b"Transfer-Encoding: chunked;a=b\r\n", 400),
        (b"Transfer-Encoding: xchunked\r\n", 400),
        (b"Transfer-Encoding: \r\n", 400),
    ],
)
def test_transfer_codings_other_than_chunked(te: bytes, status: int) -> None:
    data = b"POST /a HTTP/1.1\r\nHost: a\r\n" + te + b"\r\n"
    assert status_of(data) == status
    assert set(judged_in_pieces(data)) == {status}


@pytest.mark.parametrize(
    "cl",
    [b"5, 5", b"5, 6", b"-5", b"+5", b" ", b"5 5", b"0x5", b"5.0", b"18446744073709551616"],
)
def test_content_length_values_refused(cl: bytes) -> None:
    data = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: " + cl + b"\r\n\r\n"
    assert status_of(data) == 400


def test_content_length_digits_are_bounded_like_the_receivers() -> None:
    # llhttp takes up to 2**64 - 1; the receiver's framing stops at 18
    # significant digits, and the front refuses what the receiver would.
    def post(cl: bytes) -> bytes:
        return b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: " + cl + b"\r\n\r\n"

    assert status_of(post(b"1" + b"0" * 18)) == 400
    assert status_of(post(b"18446744073709551615")) == 400
    assert parse_head(post(b"9" * 18)).content_length == 10**18 - 1
    assert parse_head(post(b"0" * 30 + b"5")).content_length == 5  # leading zeros are digits


def test_absolute_form_ip_literal_keeps_its_brackets() -> None:
    head = parse_head(b"GET http://[::1]:8080/x HTTP/1.1\r\nHost: other\r\n\r\n")
    # The same host as a Host header "[::1]:8080" gives, for routing and SERVER_NAME.
    assert (head.host, head.port) == split_host(b"[::1]:8080") == (b"[::1]", b"8080")
    assert head.values(b"host") == [b"[::1]:8080"]
    assert parse_head(b"GET http://[::1]/ HTTP/1.1\r\nHost: o\r\n\r\n").values(b"host") == [
        b"[::1]"
    ]


@pytest.mark.parametrize(
    ("target", "host", "path"),
    [
        (b"http://h:/a", b"h", b"/a"),
        (b"http://h:", b"h", b"/"),
        (b"http://h:?q", b"h", b"/?q"),
        (b"http://[::1]:/x", b"[::1]", b"/x"),
    ],
)
def test_absolute_form_with_an_empty_port_is_the_host_alone(
    target: bytes, host: bytes, path: bytes
) -> None:
    # RFC 3986 §3.2.3 and §6.2.3: "http://h:/" is "http://h/", as "Host: h:"
    # is host h; llhttp refuses the empty port, nginx accepts it.
    head = parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (head.host, head.port, head.target) == (host, b"", path)
    assert head.values(b"host") == [host]


@pytest.mark.parametrize("target", [b"http://:/a", b"http://h::/a", b"http://h:x/a"])
def test_absolute_form_with_a_bad_authority_is_400(target: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: other\r\n\r\n")
    assert info.value.status_hint == 400
    assert target.decode() in str(info.value)  # the request's own spelling


def test_host_percent_encoding_must_be_well_formed() -> None:
    assert split_host(b"a%2Db") == (b"a%2db", b"")
    for bad in (b"a%zz", b"a%2", b"%"):
        with pytest.raises(ProtocolError):
            split_host(bad)


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"OPTIONS * HTTP/1.1", 0),  # asterisk-form: OPTIONS only (RFC 9112 §3.2.4)
        (b"GET * HTTP/1.1", 400),
        (b"GET a:443 HTTP/1.1", 400),  # authority-form: CONNECT only (RFC 9112 §3.2.3)
        (b"CONNECT a:443 HTTP/1.1", 501),
        (b"GET ftp://a/ HTTP/1.1", 400),
        (b"GET http://u@a/ HTTP/1.1", 400),
        (b"G\x01T / HTTP/1.1", 400),  # a method is a token
        (b"BREW / HTTP/1.1", 501),
    ],
)
def test_request_target_forms(line: bytes, status: int) -> None:
    data = line + b"\r\nHost: a:443\r\n\r\n"
    if status:
        assert status_of(data) == status
    else:
        assert parse_head(data).path == b"*"


@pytest.mark.parametrize(("line_length", "status"), [(97, 0), (98, 0), (99, 414), (100, 414)])
def test_request_line_limit_counts_its_crlf_like_nginx(line_length: int, status: int) -> None:
    """max_uri_length holds the request line and its CRLF, as nginx's 8 KiB
    buffer does (8190 bytes before the CRLF by default), whole or in pieces."""
    limits = HeadLimits(max_head_size=1024, max_uri_length=100)
    line = b"GET /" + b"a" * (line_length - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == line_length
    data = line + b"\r\nHost: a\r\n\r\n"
    if status:
        assert status_of(data, limits) == status
    else:
        assert parse_head(data, limits).method == b"GET"
    assert set(judged_in_pieces(data, limits)) == {status}


def test_overlong_request_line_is_414_even_when_the_head_is_too_large() -> None:
    """A head judged whole gets the answer it gets while still arriving."""
    limits = HeadLimits(max_head_size=200, max_uri_length=100)
    data = b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert status_of(data, limits) == 414
    assert set(judged_in_pieces(data, limits)) == {414}


@pytest.mark.parametrize("line", [b"GET /", b"GET / HTTP/1.1 x", b"GET", b"GET /a HTTP/1"])
def test_a_line_that_is_no_request_line_is_400_once_it_ends(line: bytes) -> None:
    """HTTP/0.9's ``GET /`` and other lines without the form of a request line
    are refused when they end, not after the head timeout."""
    error = incomplete_head_error(line + b"\r\n")
    assert error is not None and error.status_hint == 400
    assert incomplete_head_error(line) is None  # may still become one


@pytest.mark.parametrize(
    "data",
    [
        b"GET /\r\n\r\n",  # HTTP/0.9's simple request, blank line and all
        b"\r\nGET /\r\n\r\n",
        b"GET /a\r\nHost: a\r\n\r\n",
    ],
)
def test_a_line_without_a_version_is_400_whole_or_in_pieces(data: bytes) -> None:
    """llhttp reads ``GET /`` as HTTP/0.9; RFC 9112 §3 has no such request line.
    Arriving in pieces it is 400 as soon as it ends: whole, it must be 400 too,
    not 505, or the answer would depend on how the client's writes were cut."""
    assert status_of(data) == 400
    assert set(judged_in_pieces(data)) == {400}
    # A line that names HTTP/0.9 is a version we do not support.
    assert set(judged_in_pieces(b"GET / HTTP/0.9\r\nHost: a\r\n\r\n")) == {505}


@pytest.mark.parametrize(
    "value", [b"..", b"..:80", b"h..x", b"a...", b".a", b"a.b..", b"..example.com"]
)
def test_host_with_an_empty_label_is_refused(value: bytes) -> None:
    with pytest.raises(ProtocolError, match="empty label"):
        split_host(value)
    assert status_of(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n") == 400
    target = b"http://" + value + b"/a"
    assert status_of(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n") == 400


@pytest.mark.parametrize("value", [b"a b", b"", b"a/b", b"a..b"])
def test_invalid_host_is_400_with_an_absolute_target_too(value: bytes) -> None:
    """RFC 9112 section 3.2: an invalid Host is 400 even where the target's
    authority replaces it."""
    assert status_of(b"GET http://h/a HTTP/1.1\r\nHost: " + value + b"\r\n\r\n") == 400


def test_cgi_header_names() -> None:
    # One rule for the front's first request and the receiver's later ones.
    for name in (b"Host", b"X-Forwarded-For", b"x-a", b"A1"):
        assert is_cgi_header_name(name)
    for name in (b"X_A", b"X.B", b"X~C", b"X!", b"\xe9"):
        assert not is_cgi_header_name(name)
