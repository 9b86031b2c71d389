"""The receiver's sans-IO pieces: request description, body framing, SSE, response heads."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdhandoff import scgi
from fdhandoff.errors import ProtocolError
from fdhandoff.message import Format, HandoffRecord
from fdhandoff.receiver import http
from fdhandoff.receiver.body import END, NEED_DATA, BodyDecoder, framing
from fdhandoff.receiver.request import HandoffInfo, split_target
from fdhandoff.receiver.sse import encode_comment, encode_event
from test_receiver_support import FIXTURES


def _scgi(pairs: list[tuple[bytes, bytes]], plain: bool = False) -> HandoffInfo:
    fmt = Format.PLAIN_SCGI if plain else Format.SCGI
    return HandoffInfo(HandoffRecord(fmt, headers=pairs))


# --- request description ------------------------------------------------------------------


def test_nginx_capture_with_duplicates() -> None:
    headers, _ = scgi.decode(
        (FIXTURES / "nginx-fd-pass" / "duplicate-headers.bin").read_bytes(), allow_duplicates=True
    )
    info = _scgi(headers)
    assert info.method == "GET"
    assert info.raw_path == b"/fd/dup%2Fpath"
    assert info.path == "/fd/dup/path"
    assert info.query_string == b"a=%20b"
    assert info.header("X-A") == "1"
    assert info.header_values("x-a") == ["1", "2"]
    assert info.header_values("cookie") == ["c1=1", "c2=2"]
    assert info.client == ("127.0.0.1", 53456)
    assert info.server == ("127.0.0.1", 18080)
    assert info.http_version == "1.1"  # nginx sends no SERVER_PROTOCOL: it only passes 1.1
    assert info.tls is False
    assert info.describe() == "GET /fd/dup%2Fpath?a=%20b"


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/", b"/", b""),
        (b"/a?b=c?d", b"/a", b"b=c?d"),
        (b"/a?", b"/a", b""),
        (b"*", b"*", b""),
        (b"http://example.com/x/y?z=1", b"/x/y", b"z=1"),
        (b"HTTPS://example.com", b"/", b""),
        (b"http://example.com?q", b"/", b"q"),
    ],
)
def test_split_target(target: bytes, path: bytes, query: bytes) -> None:
    assert split_target(target) == (path, query)


@pytest.mark.parametrize("target", [b"", b"relative", b"?q", b"x/y", b"ftp://h/p"])
def test_split_target_refuses_non_paths(target: bytes) -> None:
    with pytest.raises(ProtocolError):
        split_target(target)


def test_front_fields() -> None:
    info = _scgi(
        [
            (b"CONTENT_LENGTH", b"0"),
            (b"SCGI", b"1"),
            (b"REQUEST_METHOD", b"POST"),
            (b"REQUEST_URI", b"/%E2%82%AC/%ff?x"),
            (b"SERVER_PROTOCOL", b"HTTP/1.0"),
            (b"HTTPS", b"on"),
            (b"HANDOFF_ROUTE", b"api"),
            (b"HANDOFF_UPGRADED", b"websocket"),
            (b"HANDOFF_DATA", b'{"a":1}'),
            (b"REMOTE_ADDR", b"::1"),
            (b"REMOTE_PORT", b"not-a-port"),
            (b"HTTP_CONTENT_TYPE", b"text/plain"),
        ]
    )
    assert info.path == "/€/\ufffd"
    assert info.http_version == "1.0"
    assert info.tls and info.scheme == "https"
    assert info.route == "api"
    assert info.upgraded
    assert info.payload == b'{"a":1}'
    assert info.client == ("::1", 0)
    assert info.headers == [("content-type", "text/plain")]


def test_subprotocol_agreed_by_the_front() -> None:
    base = [(b"CONTENT_LENGTH", b"0"), (b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/ws")]
    upgraded = (b"HANDOFF_UPGRADED", b"websocket")
    chosen = (b"HANDOFF_SUBPROTOCOL", b"graphql-transport-ws")
    assert _scgi([*base, upgraded, chosen]).subprotocol == "graphql-transport-ws"
    assert _scgi([*base, upgraded]).subprotocol is None  # the front chose none
    assert _scgi([*base, chosen]).subprotocol is None  # no 101 was sent: nothing agreed


def test_plain_scgi_content_headers_and_cgi_fallbacks() -> None:
    info = _scgi(
        [
            (b"CONTENT_LENGTH", b"12"),
            (b"SCGI", b"1"),
            (b"REQUEST_METHOD", b"PUT"),
            (b"SCRIPT_NAME", b"/app"),
            (b"PATH_INFO", b"/item"),
            (b"QUERY_STRING", b"v=2"),
            (b"CONTENT_TYPE", b"application/json"),
        ],
        plain=True,
    )
    assert info.raw_path == b"/app/item"
    assert info.query_string == b"v=2"
    assert info.headers == [("content-type", "application/json"), ("content-length", "12")]


@pytest.mark.parametrize(
    ("pairs", "status"),
    [
        ([(b"REQUEST_URI", b"/")], 400),
        ([(b"REQUEST_METHOD", b"GET")], 400),
        (
            [(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/"), (b"SERVER_PROTOCOL", b"HTTP/2")],
            505,
        ),
    ],
)
def test_unusable_descriptions(pairs: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        _scgi([(b"CONTENT_LENGTH", b"0"), *pairs])
    assert info.value.status_hint == status


def test_payload_and_marker_formats_know_nothing_of_the_request() -> None:
    info = HandoffInfo(HandoffRecord(Format.PAYLOAD, payload=b"{}"))
    assert (info.method, info.path, info.headers, info.has_request) == (None, None, [], False)
    assert info.describe() == "- -"
    assert HandoffInfo(HandoffRecord(Format.BYTE, marker=b"X")).upgraded
    assert not HandoffInfo(HandoffRecord(Format.BYTE, marker=b"\x00")).upgraded


# --- body framing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], (0, False)),
        ([(b"content-length", b"10")], (10, False)),
        ([(b"content-length", b"10"), (b"content-length", b"10")], (10, False)),
        ([(b"transfer-encoding", b"gzip, chunked")], (None, True)),
        ([(b"transfer-encoding", b"gzip"), (b"transfer-encoding", b"Chunked")], (None, True)),
    ],
)
def test_framing(headers: list[tuple[bytes, bytes]], expected: tuple[int | None, bool]) -> None:
    assert framing(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"1"), (b"transfer-encoding", b"chunked")],
        [(b"content-length", b"1"), (b"content-length", b"2")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"+1")],
        [(b"content-length", b"1" * 19)],
        [(b"transfer-encoding", b"chunked, gzip")],
    ],
)
def test_framing_refuses_ambiguity(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ProtocolError):
        framing(headers)


def _drain(decoder: BodyDecoder) -> tuple[bytes, bool]:
    out = b""
    while True:
        event = decoder.next_event()
        if event is END:
            return out, True
        if event is NEED_DATA:
            return out, False
        assert isinstance(event, bytes)
        out += event


CHUNKED = b"5\r\nhello\r\n1;name=value\r\n \r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT"


@pytest.mark.parametrize("split", range(len(CHUNKED) + 1))
def test_chunked_at_every_split_point(split: int) -> None:
    decoder = BodyDecoder(None, True)
    if split:
        decoder.receive_data(CHUNKED[:split])  # b"" would mean EOF
    first, done = _drain(decoder)
    decoder.receive_data(CHUNKED[split:])
    rest, done = _drain(decoder)
    assert done
    assert first + rest == b"hello 0123456789"
    assert decoder.trailing_data == b"NEXT"


@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=20))
def test_chunked_round_trip(body: bytes, sizes: list[int]) -> None:
    encoded = b""
    rest = body
    for size in sizes:
        piece, rest = rest[:size], rest[size:]
        encoded += http.chunk(piece)
    encoded += http.chunk(rest) + http.LAST_CHUNK
    decoder = BodyDecoder(None, True)
    for i in range(0, len(encoded), 7):
        decoder.receive_data(encoded[i : i + 7])
    out, done = _drain(decoder)
    assert done and out == body


@pytest.mark.parametrize(
    "data",
    [
        b"x\r\n",
        b"-1\r\n",
        b"5\r\nhelloXX",
        b"1" * 17 + b"\r\n",
        b"5\nhello\n",
        b"9" * 5000,
        b"0\r\n" + b"T: x\r\n" * 3000,
    ],
)
def test_chunked_errors(data: bytes) -> None:
    decoder = BodyDecoder(None, True)
    decoder.receive_data(data)
    with pytest.raises(ProtocolError):
        _drain(decoder)


def test_length_body_and_eof() -> None:
    decoder = BodyDecoder(5, False)
    decoder.receive_data(b"abc")
    assert _drain(decoder) == (b"abc", False)
    decoder.receive_data(b"defgh")
    assert _drain(decoder) == (b"de", True)
    assert decoder.trailing_data == b"fgh"
    early = BodyDecoder(5, False)
    early.receive_data(b"ab")
    early.receive_data(b"")
    with pytest.raises(ProtocolError):
        _drain(early)


# --- SSE ------------------------------------------------------------------------------------


def _parse_sse(data: bytes) -> list[dict[str, str]]:
    """A parser following the WHATWG "interpret an event stream" steps."""
    events = []
    current: dict[str, str] = {}
    data_lines: list[str] = []
    for line in re.split(r"\r\n|\r|\n", data.decode()):
        if not line:
            if data_lines or current:
                if data_lines:
                    current["data"] = "\n".join(data_lines)
                events.append(current)
            current, data_lines = {}, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data_lines.append(value)
        else:
            current[field] = value
    return events


_line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"))


@given(
    st.text(st.characters(blacklist_categories=("Cs",))),
    st.none() | _line_text,
    st.none() | _line_text.filter(lambda s: "\x00" not in s),
)
def test_sse_events_round_trip(data: str, event: str | None, id_: str | None) -> None:
    parsed = _parse_sse(encode_event(data, event=event, id=id_))
    expected = {"data": "\n".join(re.split(r"\r\n|\r|\n", data))}
    if event is not None:
        expected["event"] = event
    if id_ is not None:
        expected["id"] = id_
    assert parsed == [expected]


def test_sse_comment_and_errors() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    assert _parse_sse(encode_comment("x")) == []
    with pytest.raises(ValueError):
        encode_event("x", event="a\nb")
    with pytest.raises(ValueError):
        encode_event("x", id="a\x00")
    with pytest.raises(ValueError):
        encode_event()
    assert encode_event(retry=10) == b"retry: 10\n\n"


# --- response heads --------------------------------------------------------------------------


def test_response_heads() -> None:
    head = http.response_head(200, [("X-A", "1"), (b"X-B", b"2")])
    assert head.startswith(b"HTTP/1.1 200 OK\r\nDate: ")
    assert head.endswith(b"\r\nX-A: 1\r\nX-B: 2\r\n\r\n")
    assert http.response_head(404, [], cgi=True) == b"Status: 404 Not Found\r\n\r\n"
    assert http.response_head(299, [], version="1.0").startswith(b"HTTP/1.0 299 \r\n")


def test_a_given_date_is_the_only_one() -> None:
    # RFC 9110 section 6.6.1: one Date; the caller's wins, as in the ASGI adapter.
    old = "Thu, 01 Jan 1970 00:00:00 GMT"
    for supplied in ([("Date", old)], ((b"DATE", old.encode()),)):  # a list, a tuple
        head = http.response_head(200, supplied)
        assert head.count(b"Date: ") + head.count(b"DATE: ") == 1
        assert old.encode() in head
    assert http.response_head(200, iter([("X-A", "1")])).count(b"Date: ") == 1


def test_connection_fields_are_dropped() -> None:
    given = [("Connection", "keep-alive"), (b"keep-alive", b"timeout=5"), ("X-A", "1")]
    assert http.without_connection_fields(given) == [("X-A", "1")]


@pytest.mark.parametrize(
    "header",
    [
        ("X-A", "1\r\nInjected: yes"),
        ("X A", "1"),
        ("", "1"),
        ("X-A", "nul\x00"),
        ("X:A", "1"),
        ("X-A", "a\x01b\x7f"),  # RFC 9110 section 5.5: no control characters
        (b"X-A", b"esc\x1b[0m"),
        ("X-A", "del\x7f"),
    ],
)
def test_response_header_injection_is_refused(header: tuple[str | bytes, str | bytes]) -> None:
    with pytest.raises(ValueError):
        http.response_head(200, [header])


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("Content-Length", "3")], True),
        ([(b"TRANSFER-ENCODING", b"chunked")], True),
        ([("X-A", "1"), ("content-length", "3")], True),
        ([("Content-Type", "text/plain"), (b"X-Length", b"3")], False),
        ([], False),
    ],
)
def test_framing_headers_are_recognised_in_any_case(
    headers: list[tuple[str | bytes, str | bytes]], expected: bool
) -> None:
    # Twice: the second answer comes from the name cache.
    assert http.has_framing(headers) is expected
    assert http.has_framing(headers) is expected
    assert http.has_header(headers, b"content-length") is any(
        (n if isinstance(n, bytes) else n.encode()).lower() == b"content-length" for n, _ in headers
    )


def test_status_range() -> None:
    with pytest.raises(ValueError):
        http.response_head(42)
    for status in (600, 999, 1000):  # RFC 9110 section 15: 100 to 599
        with pytest.raises(ValueError):
            http.response_head(status)
    assert http.response_head(599, []).startswith(b"HTTP/1.1 599 \r\n")
    with pytest.raises(ValueError):  # refused every time, not cached once
        http.response_head(42)
    # Status lines are cached per (status, version, cgi): no mix-ups between them.
    assert http.response_head(201, [], version="1.0").startswith(b"HTTP/1.0 201 Created\r\n")
    assert http.response_head(201, []).startswith(b"HTTP/1.1 201 Created\r\n")
    assert http.response_head(201, [], cgi=True) == b"Status: 201 Created\r\n\r\n"
    assert http.chunk(b"") == b""
    assert http.chunk(b"abc") == b"3\r\nabc\r\n"
