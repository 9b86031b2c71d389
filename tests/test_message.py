"""Handoff messages (fdhandoff.message): formats, detection and HandoffReader.

Mostly bytes only; the nginx fd_pass captures are also replayed over a real
socketpair with a real client fd attached.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdhandoff import fdpass, message, scgi
from fdhandoff.errors import ProtocolError
from fdhandoff.message import CLOSED, NEED_DATA, Format, HandoffReader, HandoffRecord

CAPTURES = Path(__file__).parent / "fixtures" / "nginx-fd-pass"
STREAM = socket.SOCK_STREAM
SEQPACKET = socket.SOCK_SEQPACKET

Result = HandoffRecord | message._Signal


def ns(block: bytes) -> bytes:
    return str(len(block)).encode() + b":" + block + b","


# --- the nginx fd_pass captures, pair by pair -------------------------------------

GET_QUERY = [
    (b"CONTENT_LENGTH", b"0"),
    (b"SCGI", b"1+fd_pass"),
    (b"REMOTE_ADDR", b"127.0.0.1"),
    (b"REMOTE_PORT", b"46750"),
    (b"REQUEST_METHOD", b"GET"),
    (b"REQUEST_URI", b"/fd/hello?x=1&y=two%20words"),
    (b"SERVER_ADDR", b"127.0.0.1"),
    (b"SERVER_PORT", b"18080"),
    (b"QUERY_STRING", b"x=1&y=two%20words"),
    (b"HTTP_HOST", b"127.0.0.1:18080"),
    (b"HTTP_USER_AGENT", b"curl/7.88.1"),
    (b"HTTP_ACCEPT", b"*/*"),
    (b"HTTP_X_CUSTOM_HEADER", b"abc"),
]

POST_FORM_BODY_SWALLOWED = [
    (b"CONTENT_LENGTH", b"0"),
    (b"SCGI", b"1+fd_pass"),
    (b"REMOTE_ADDR", b"127.0.0.1"),
    (b"REMOTE_PORT", b"46756"),
    (b"REQUEST_METHOD", b"POST"),
    (b"REQUEST_URI", b"/fd/upload?q=1"),
    (b"SERVER_ADDR", b"127.0.0.1"),
    (b"SERVER_PORT", b"18080"),
    (b"QUERY_STRING", b"q=1"),
    (b"HTTP_HOST", b"127.0.0.1:18080"),
    (b"HTTP_USER_AGENT", b"curl/7.88.1"),
    (b"HTTP_ACCEPT", b"*/*"),
    (b"HTTP_CONTENT_TYPE", b"application/x-www-form-urlencoded"),
    # nginx announces the client's 23-byte body and passes none of it
    # (CONTENT_LENGTH above is 0): the defect fdhandoff's front fixes.
    (b"HTTP_CONTENT_LENGTH", b"23"),
]

DUPLICATE_HEADERS = [
    (b"CONTENT_LENGTH", b"0"),
    (b"SCGI", b"1+fd_pass"),
    (b"REMOTE_ADDR", b"127.0.0.1"),
    (b"REMOTE_PORT", b"53456"),
    (b"REQUEST_METHOD", b"GET"),
    (b"REQUEST_URI", b"/fd/dup%2Fpath?a=%20b"),
    (b"SERVER_ADDR", b"127.0.0.1"),
    (b"SERVER_PORT", b"18080"),
    (b"QUERY_STRING", b"a=%20b"),
    (b"HTTP_HOST", b"x"),
    (b"HTTP_X_A", b"1"),
    (b"HTTP_X_A", b"2"),
    (b"HTTP_COOKIE", b"c1=1"),
    (b"HTTP_COOKIE", b"c2=2"),
    (b"HTTP_UPGRADE", b"websocket"),
    (b"HTTP_CONNECTION", b"Upgrade"),
]

CAPTURED = {
    "get-query.bin": (GET_QUERY, False),
    "post-form-body-swallowed.bin": (POST_FORM_BODY_SWALLOWED, False),
    "duplicate-headers.bin": (DUPLICATE_HEADERS, True),
}


def capture(name: str) -> bytes:
    return (CAPTURES / name).read_bytes()


@pytest.mark.parametrize("name", CAPTURED)
def test_capture_decodes_to_exactly_the_captured_pairs(name: str) -> None:
    pairs, dupes = CAPTURED[name]
    assert scgi.decode(capture(name), allow_duplicates=dupes) == (pairs, b"")


def test_duplicate_headers_capture_rejected_without_allow_duplicates() -> None:
    with pytest.raises(ProtocolError, match="duplicate"):
        scgi.decode(capture("duplicate-headers.bin"))


@pytest.mark.parametrize("name", CAPTURED)
def test_capture_through_handoff_reader_at_every_split(name: str) -> None:
    pairs, _ = CAPTURED[name]
    data = capture(name)
    for chunks in splits(data):
        records, rest = read(HandoffReader(STREAM), chunks, fd_first=True)
        assert records == [HandoffRecord(Format.SCGI, headers=pairs)], chunks
        assert rest == []


@pytest.mark.parametrize("name", CAPTURED)
def test_capture_with_a_real_fd_over_a_socketpair(name: str, no_fd_leak: None) -> None:
    pairs, _ = CAPTURED[name]
    sender, receiver = socket.socketpair(socket.AF_UNIX, STREAM)
    client, client_peer = socket.socketpair()
    with sender, receiver, client_peer:
        with client:
            fdpass.send_fd(sender, capture(name), client.fileno(), timeout=10)
        sender.close()  # nginx closes its end after the one sendmsg
        got = fdpass.recv_handoff(receiver, timeout=10)
        assert got is not None
        record, handed = got
        with handed:
            assert record == HandoffRecord(Format.SCGI, headers=pairs)
            handed.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            assert client_peer.recv(100) == b"HTTP/1.1 204 No Content\r\n\r\n"


# --- helpers --------------------------------------------------------------------------


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, then two pieces at every position."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def read(
    reader: HandoffReader, chunks: list[bytes], *, fd_first: bool, eof: bool = False
) -> tuple[list[Result], list[bytes]]:
    """Feed chunks the way the I/O layer does (the fd on the first one).

    Returns what next_record() produced (NEED_DATA left out) and the chunks
    that were not fed because an SCGI record, or CLOSED, ended the reading.
    """
    results: list[Result] = []
    pending = list(chunks)
    while pending:
        chunk = pending.pop(0)
        reader.receive(chunk, 1 if fd_first and len(pending) == len(chunks) - 1 else 0)
        result = reader.next_record()
        if result is NEED_DATA:
            continue
        results.append(result)
        if result is CLOSED or result.format in (Format.SCGI, Format.PLAIN_SCGI):
            return results, pending
    if eof:
        reader.receive(b"", 0)
        results.append(reader.next_record())
    return results, pending


# --- detect_format -------------------------------------------------------------------


@pytest.mark.parametrize("first", [b"0", b"1", b"9", b"\x00", b"X", b"\x01", b"{"])
def test_seqpacket_is_always_payload(first: bytes) -> None:
    assert message.detect_format(first, SEQPACKET) is Format.PAYLOAD


@pytest.mark.parametrize("digit", [b"%d" % d for d in range(10)])
def test_stream_digit_is_scgi(digit: bytes) -> None:
    assert message.detect_format(digit + b"23:", STREAM) is Format.SCGI


@pytest.mark.parametrize("marker", [b"\x00", b"X", b"\x01", b"\xff", b"a", b":"])
def test_stream_non_digit_is_a_byte_marker(marker: bytes) -> None:
    assert message.detect_format(marker, STREAM) is Format.BYTE


def test_known_markers_are_byte_format() -> None:
    assert set(message.KNOWN_MARKERS) == {b"\x00", b"X", b"\x01"}
    for marker in message.KNOWN_MARKERS:
        assert message.detect_format(marker, STREAM) is Format.BYTE


def test_stream_without_bytes_and_other_socket_types_rejected() -> None:
    with pytest.raises(ProtocolError, match="no bytes"):
        message.detect_format(b"", STREAM)
    with pytest.raises(ProtocolError, match="SOCK_STREAM or SOCK_SEQPACKET"):
        message.detect_format(b"1", socket.SOCK_DGRAM)


def test_stream_digit_without_fd_is_plain_scgi() -> None:
    reader = HandoffReader(STREAM)
    assert reader.format is None
    reader.receive(ns(b"CONTENT_LENGTH\x000\x00SCGI\x001\x00"), 0)
    assert reader.format is Format.PLAIN_SCGI
    reader = HandoffReader(STREAM)
    reader.receive(b"2", 1)
    assert reader.format is Format.SCGI


# --- encoders --------------------------------------------------------------------------


def test_encode_payload() -> None:
    assert message.encode_payload(b"") == b"\x00" == message.APACHE_EMPTY_PAYLOAD
    assert message.encode_payload(b'{"user_id":1}') == b'{"user_id":1}'
    biggest = b"p" * message.MAX_PAYLOAD_SIZE
    assert message.MAX_PAYLOAD_SIZE == 212960
    assert message.encode_payload(biggest) is biggest
    with pytest.raises(ValueError, match="212960"):
        message.encode_payload(biggest + b"p")


def test_decode_payload() -> None:
    assert message.decode_payload(b"\x00") == HandoffRecord(Format.PAYLOAD, payload=b"")
    assert message.decode_payload(b"\x00\x00") == HandoffRecord(Format.PAYLOAD, payload=b"\x00\x00")
    assert message.decode_payload(b"{}") == HandoffRecord(Format.PAYLOAD, payload=b"{}")
    with pytest.raises(ProtocolError):
        message.decode_payload(b"")


@pytest.mark.parametrize("marker", [b"\x00", b"X", b"\x01"])
def test_encode_byte(marker: bytes) -> None:
    assert message.encode_byte(marker) == marker
    assert message.decode_byte(marker) == HandoffRecord(Format.BYTE, marker=marker)


@pytest.mark.parametrize("bad", [b"", b"7", b"XX", b"\x00\x00"])
def test_encode_byte_rejects_digits_and_lengths_other_than_one(bad: bytes) -> None:
    with pytest.raises(ValueError):
        message.encode_byte(bad)
    with pytest.raises(ProtocolError):
        message.decode_byte(bad)


def test_encode_byte_default_is_the_fd_pass_toy_marker() -> None:
    assert message.encode_byte() == b"\x01"


def test_encode_scgi_is_the_scgi_codec_with_already_read_as_body() -> None:
    headers = [("SCGI", "1"), ("REQUEST_METHOD", "GET")]
    assert message.encode_scgi(headers, b"xy") == scgi.encode(headers, b"xy")
    assert message.encode_scgi(headers) == ns(
        b"CONTENT_LENGTH\x000\x00SCGI\x001\x00REQUEST_METHOD\x00GET\x00"
    )


# --- HandoffReader: PAYLOAD -------------------------------------------------------------


def test_payload_records_on_one_connection_then_closed() -> None:
    reader = HandoffReader(SEQPACKET)
    for record in (b"\x00", b'{"user_id":12345}', b"7", b"X" * 1000):
        reader.receive(record, 1)
        assert reader.next_record() == message.decode_payload(record)
        assert reader.next_record() is NEED_DATA
    reader.receive(b"", 0)
    assert reader.next_record() is CLOSED
    assert reader.format is Format.PAYLOAD


@pytest.mark.parametrize("nfds", [0, 2, 3])
def test_payload_needs_exactly_one_fd(nfds: int) -> None:
    reader = HandoffReader(SEQPACKET)
    with pytest.raises(ProtocolError, match="fds"):
        reader.receive(b"{}", nfds)


def test_payload_eof_before_any_record_is_closed() -> None:
    reader = HandoffReader(SEQPACKET)
    reader.receive(b"", 0)
    assert reader.next_record() is CLOSED


# --- HandoffReader: BYTE ----------------------------------------------------------------


@pytest.mark.parametrize("marker", [b"\x00", b"X", b"\x01"])
def test_byte_markers_on_a_persistent_connection(marker: bytes) -> None:
    reader = HandoffReader(STREAM)
    for _ in range(5):
        reader.receive(marker, 1)
        assert reader.next_record() == HandoffRecord(Format.BYTE, marker=marker)
    reader.receive(b"", 0)
    assert reader.next_record() is CLOSED


@pytest.mark.parametrize(
    ("data", "nfds"), [(b"X", 0), (b"X", 2), (b"XX", 1), (b"XX", 2), (b"X1", 1)]
)
def test_byte_marker_needs_one_byte_and_one_fd(data: bytes, nfds: int) -> None:
    reader = HandoffReader(STREAM)
    with pytest.raises(ProtocolError):
        reader.receive(data, nfds)


def test_byte_format_rejects_a_digit_marker_later() -> None:
    reader = HandoffReader(STREAM)
    reader.receive(b"X", 1)
    assert isinstance(reader.next_record(), HandoffRecord)
    with pytest.raises(ProtocolError):
        reader.receive(b"1", 1)


def test_fd_without_data_rejected() -> None:
    reader = HandoffReader(STREAM)
    with pytest.raises(ProtocolError, match="without data"):
        reader.receive(b"", 1)


# --- HandoffReader: SCGI handoff -------------------------------------------------------

HANDOFF_HEADERS = [
    (b"CONTENT_LENGTH", b"11"),
    (b"SCGI", b"1"),
    (b"REQUEST_METHOD", b"POST"),
    (b"HTTP_X", b"\xff"),
]
HANDOFF = ns(b"CONTENT_LENGTH\x0011\x00SCGI\x001\x00REQUEST_METHOD\x00POST\x00HTTP_X\x00\xff\x00")
ALREADY_READ = b"hello world"
TRAILING = b"\x17\x03\x03relayed"


def test_scgi_handoff_at_every_split() -> None:
    data = HANDOFF + ALREADY_READ
    expected = HandoffRecord(Format.SCGI, headers=HANDOFF_HEADERS, body=ALREADY_READ)
    for chunks in splits(data):
        reader = HandoffReader(STREAM)
        records, rest = read(reader, chunks, fd_first=True)
        assert records == [expected] and rest == []
        assert reader.trailing_data == b""
        assert reader.next_record() is CLOSED  # one SCGI handoff per connection


def test_scgi_handoff_keeps_trailing_data_at_every_split() -> None:
    data = HANDOFF + ALREADY_READ + TRAILING
    for chunks in splits(data):
        reader = HandoffReader(STREAM)
        records, rest = read(reader, chunks, fd_first=True)
        assert records == [HandoffRecord(Format.SCGI, headers=HANDOFF_HEADERS, body=ALREADY_READ)]
        # What was fed after the message stays available; the rest is still
        # on the connection, which now belongs to the caller.
        assert reader.trailing_data + b"".join(rest) == TRAILING


def test_second_fd_inside_an_scgi_handoff_rejected() -> None:
    data = HANDOFF + ALREADY_READ
    for i in range(1, len(data)):
        reader = HandoffReader(STREAM)
        reader.receive(data[:i], 1)
        assert reader.next_record() is NEED_DATA
        with pytest.raises(ProtocolError, match="second fd"):
            reader.receive(data[i:], 1)


def test_two_fds_on_the_first_bytes_rejected() -> None:
    with pytest.raises(ProtocolError, match="fd"):
        HandoffReader(STREAM).receive(HANDOFF, 2)


def test_eof_between_records_is_closed() -> None:
    reader = HandoffReader(STREAM)
    reader.receive(b"", 0)
    assert reader.next_record() is CLOSED


def test_eof_mid_message_is_a_protocol_error_at_every_point() -> None:
    data = HANDOFF + ALREADY_READ
    for i in range(1, len(data)):
        for fd in (True, False):
            reader = HandoffReader(STREAM)
            reader.receive(data[:i], 1 if fd else 0)
            result = reader.next_record()
            if result is not NEED_DATA:
                # plain SCGI is released past the ','; its body is the caller's
                assert not fd and isinstance(result, HandoffRecord)
                continue
            with pytest.raises(ProtocolError, match="closed inside"):
                reader.receive(b"", 0)


def test_max_body_is_inclusive_and_413_above() -> None:
    body = b"b" * 100
    data = scgi.encode([("SCGI", "1")], body)
    reader = HandoffReader(STREAM, max_body=100)
    reader.receive(data, 1)
    record = reader.next_record()
    assert isinstance(record, HandoffRecord) and record.body == body
    reader = HandoffReader(STREAM, max_body=99)
    with pytest.raises(ProtocolError) as info:
        reader.receive(data[:40], 1)  # refused on the announcement, before the body
    assert info.value.status_hint == 413


def test_default_max_body_is_max_already_read() -> None:
    head = scgi.encode([("CONTENT_LENGTH", str(message.MAX_ALREADY_READ + 1)), ("SCGI", "1")])
    with pytest.raises(ProtocolError) as info:
        HandoffReader(STREAM).receive(head, 1)
    assert info.value.status_hint == 413
    head = scgi.encode([("CONTENT_LENGTH", str(message.MAX_ALREADY_READ)), ("SCGI", "1")])
    reader = HandoffReader(STREAM)
    reader.receive(head, 1)
    assert reader.next_record() is NEED_DATA


def test_max_block_is_passed_to_the_decoder() -> None:
    with pytest.raises(ProtocolError) as info:
        HandoffReader(STREAM, max_block=10).receive(HANDOFF, 1)
    assert info.value.status_hint == 431


@pytest.mark.parametrize("scgi_value", [b"1", None])
def test_duplicates_with_an_fd_only_from_nginx_fd_pass(scgi_value: bytes | None) -> None:
    block = b"CONTENT_LENGTH\x000\x00"
    if scgi_value is not None:
        block += b"SCGI\x00" + scgi_value + b"\x00"
    block += b"HTTP_COOKIE\x00a\x00HTTP_COOKIE\x00b\x00"
    with pytest.raises(ProtocolError, match="duplicate"):
        HandoffReader(STREAM).receive(ns(block), 1)
    # Plain SCGI: nginx scgi_pass before 1.23 repeats names; kept in order.
    reader = HandoffReader(STREAM)
    reader.receive(ns(block), 0)
    record = reader.next_record()
    assert isinstance(record, HandoffRecord) and record.format is Format.PLAIN_SCGI
    assert [v for n, v in record.headers if n == b"HTTP_COOKIE"] == [b"a", b"b"]


def test_nginx_duplicates_accepted_for_both_fd_and_plain() -> None:
    data = capture("duplicate-headers.bin")
    for nfds, fmt in ((1, Format.SCGI), (0, Format.PLAIN_SCGI)):
        reader = HandoffReader(STREAM)
        reader.receive(data, nfds)
        assert reader.next_record() == HandoffRecord(fmt, headers=DUPLICATE_HEADERS)


@pytest.mark.parametrize("nfds", [1, 0])
@pytest.mark.parametrize("name", [b"REQUEST_METHOD", b"REMOTE_ADDR", b"HANDOFF_DATA"])
def test_only_http_names_may_repeat(nfds: int, name: bytes) -> None:
    """One HTTP_* pair per header line is how nginx sends repeated headers; a
    repeated CGI variable is two answers to one question (SCGI: names are
    unique), refused whole and at every split, with an fd or without."""
    pairs = [
        (b"CONTENT_LENGTH", b"0"),
        (b"SCGI", b"1+fd_pass"),
        (b"REQUEST_METHOD", b"GET"),
        (b"REQUEST_URI", b"/"),
        (b"REMOTE_ADDR", b"127.0.0.1"),
        (b"HANDOFF_DATA", b"x"),
        (name, b"other"),
    ]
    block = b"".join(n + b"\0" + v + b"\0" for n, v in pairs)
    for chunks in splits(ns(block)):
        reader = HandoffReader(STREAM)
        with pytest.raises(ProtocolError, match=f"duplicate SCGI header names \\[{name!r}\\]"):
            for index, chunk in enumerate(chunks):
                reader.receive(chunk, nfds if index == 0 else 0)
                reader.next_record()


def test_failed_reader_stays_failed() -> None:
    reader = HandoffReader(STREAM)
    with pytest.raises(ProtocolError):
        reader.receive(b"024:", 1)
    for data, nfds in ((b"24:", 0), (b"", 0), (b"X", 1)):
        with pytest.raises(ProtocolError, match="already failed"):
            reader.receive(data, nfds)


def test_feeding_before_next_record_is_a_caller_error() -> None:
    reader = HandoffReader(SEQPACKET)
    reader.receive(b"a", 1)
    with pytest.raises(RuntimeError):
        reader.receive(b"b", 1)


# --- HandoffReader: plain SCGI (no fd) -------------------------------------------------

PLAIN_BODY = b"field=value&other=" + bytes(range(0x80, 0x90))
PLAIN_HEADERS = [(b"CONTENT_LENGTH", b"%d" % len(PLAIN_BODY)), (b"SCGI", b"1")]
PLAIN = scgi.encode(PLAIN_HEADERS[1:], PLAIN_BODY)


def test_plain_scgi_released_after_the_comma_with_remaining_at_every_split() -> None:
    comma = PLAIN.index(b",")
    for chunks in splits(PLAIN):
        reader = HandoffReader(STREAM)
        records, rest = read(reader, chunks, fd_first=False)
        assert len(records) == 1, chunks
        record = records[0]
        assert isinstance(record, HandoffRecord)
        assert record.format is Format.PLAIN_SCGI
        assert record.headers == PLAIN_HEADERS
        # released by the very chunk that brought the ',': never later
        fed = sum(map(len, chunks)) - sum(map(len, rest))
        assert fed == first_boundary_at_or_after(chunks, comma + 1)
        # the bytes already fed are in body, the rest is still on the connection
        assert record.body + b"".join(rest) == PLAIN_BODY
        assert record.remaining == len(PLAIN_BODY) - len(record.body)
        assert reader.trailing_data == b""
        assert reader.next_record() is CLOSED


def first_boundary_at_or_after(chunks: list[bytes], offset: int) -> int:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total >= offset:
            return total
    raise AssertionError("offset beyond the data")


def test_plain_scgi_without_body() -> None:
    data = scgi.encode([("SCGI", "1")])
    for chunks in splits(data):
        records, rest = read(HandoffReader(STREAM), chunks, fd_first=False)
        headers = [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1")]
        assert records == [HandoffRecord(Format.PLAIN_SCGI, headers=headers)]
        assert rest == []


def test_plain_scgi_keeps_bytes_after_the_body() -> None:
    reader = HandoffReader(STREAM)
    reader.receive(PLAIN + b"EXTRA", 0)
    record = reader.next_record()
    assert record == HandoffRecord(Format.PLAIN_SCGI, headers=PLAIN_HEADERS, body=PLAIN_BODY)
    assert reader.trailing_data == b"EXTRA"


def test_fd_inside_plain_scgi_rejected() -> None:
    reader = HandoffReader(STREAM)
    reader.receive(PLAIN[:5], 0)
    assert reader.next_record() is NEED_DATA
    with pytest.raises(ProtocolError, match="fd"):
        reader.receive(PLAIN[5:], 1)


@pytest.mark.parametrize("start", [b"+", b" ", b"-"])
def test_netstring_with_a_bad_first_byte_is_named_as_such(start: bytes) -> None:
    """A length that does not start with a digit makes the stream look like
    BYTE markers; the error says what was most likely meant."""
    reader = HandoffReader(socket.SOCK_STREAM)
    data = start + message.encode_scgi([(b"REQUEST_METHOD", b"GET")])
    with pytest.raises(ProtocolError, match="neither an SCGI netstring") as caught:
        reader.receive(data, 1)
    assert repr(start)[2:-1] in str(caught.value)


def test_marker_run_after_the_first_keeps_its_own_error() -> None:
    reader = HandoffReader(socket.SOCK_STREAM)
    reader.receive(b"X", 1)
    assert reader.next_record().marker == b"X"  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="marker handoff delivered 2 bytes"):
        reader.receive(b"XX", 1)
