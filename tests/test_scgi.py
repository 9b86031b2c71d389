"""The strict SCGI codec (fdhandoff.scgi), bytes only.

Every vector is fed whole, one byte at a time, and split in two at every
position, because a stream socket may deliver a message in any chunking.
Vectors follow the SCGI spec (https://python.ca/scgi/protocol.txt) and the
reject/accept lists real clients and nginx fd_pass call for.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from fdhandoff import scgi
from fdhandoff.errors import ProtocolError

# --- helpers -------------------------------------------------------------------


def ns(block: bytes) -> bytes:
    """A netstring written out independently of the code under test."""
    return str(len(block)).encode() + b":" + block + b","


#: The example of the SCGI spec, byte for byte: a 70-byte block, then the body.
SPEC_EXAMPLE = (
    b"70:"
    b"CONTENT_LENGTH\x0027\x00"
    b"SCGI\x001\x00"
    b"REQUEST_METHOD\x00POST\x00"
    b"REQUEST_URI\x00/deepthought\x00"
    b","
    b"What is the answer to life?"
)
SPEC_HEADERS = [
    (b"CONTENT_LENGTH", b"27"),
    (b"SCGI", b"1"),
    (b"REQUEST_METHOD", b"POST"),
    (b"REQUEST_URI", b"/deepthought"),
]
SPEC_BODY = b"What is the answer to life?"

#: A valid 24-byte header block, so that the length-prefix vectors differ from
#: a valid message in the prefix only.
BLOCK24 = b"CONTENT_LENGTH\x000\x00A\x00bcde\x00"
assert len(BLOCK24) == 24


@dataclass
class Outcome:
    """What a Decoder produced for one chunking of the input."""

    headers: scgi.HeaderList | None = None
    content_length: int | None = None
    body: bytes = b""
    body_events: int = 0
    ended: bool = False
    trailing: bytes = b""
    events: list[scgi.Event] = field(default_factory=list)


def _drain(decoder: scgi.Decoder, out: Outcome) -> None:
    """Pull events until NEED_DATA, checking their order on the way."""
    while True:
        event = decoder.next_event()
        if event is scgi.NEED_DATA:
            return
        assert not out.ended, f"{event!r} after End"
        out.events.append(event)
        if isinstance(event, scgi.Headers):
            assert out.headers is None, "second Headers event"
            out.headers = event.headers
            out.content_length = event.content_length
        elif isinstance(event, scgi.Body):
            assert out.headers is not None, "Body before Headers"
            assert event.data, "empty Body event"
            out.body += event.data
            out.body_events += 1
        else:
            assert isinstance(event, scgi.End)
            assert out.headers is not None, "End before Headers"
            out.ended = True


def feed(chunks: list[bytes], *, eof: bool = True, **kwargs: object) -> Outcome:
    """Feed ``chunks`` to a fresh Decoder (then EOF), collecting every event."""
    decoder = scgi.Decoder(**kwargs)  # type: ignore[arg-type]
    out = Outcome()
    for chunk in chunks:
        assert chunk, "an empty chunk would mean EOF"
        decoder.receive_data(chunk)
        _drain(decoder, out)
    if eof:
        decoder.receive_data(b"")
        _drain(decoder, out)
    if out.ended:
        out.trailing = decoder.trailing_data
    return out


def chunkings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """Whole, one byte at a time, and split in two at every position."""
    yield "whole", [data] if data else []
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield f"split@{i}", [data[:i], data[i:]]


MODES: dict[str, Callable[[bytes], Iterator[tuple[str, list[bytes]]]]] = {
    "whole": lambda d: (c for c in chunkings(d) if c[0] == "whole"),
    "bytewise": lambda d: (c for c in chunkings(d) if c[0] == "bytewise"),
    "every-split": lambda d: (c for c in chunkings(d) if c[0].startswith("split@")),
}


# --- the spec's example -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_spec_example_decodes_in_every_chunking(mode: str) -> None:
    for name, chunks in MODES[mode](SPEC_EXAMPLE):
        out = feed(chunks)
        assert out.headers == SPEC_HEADERS, name
        assert out.content_length == 27, name
        assert out.body == SPEC_BODY, name
        assert out.ended and out.trailing == b"", name


def test_spec_example_length_prefix_is_70() -> None:
    assert SPEC_EXAMPLE.startswith(b"70:")
    assert SPEC_EXAMPLE.index(b",", 3) == 3 + 70


def test_spec_example_whole_message_decode_and_encode() -> None:
    assert scgi.decode(SPEC_EXAMPLE) == (SPEC_HEADERS, SPEC_BODY)
    assert scgi.encode(SPEC_HEADERS[1:], SPEC_BODY) == SPEC_EXAMPLE
    assert scgi.encode(SPEC_HEADERS, SPEC_BODY) == SPEC_EXAMPLE


def test_body_is_handed_out_as_it_arrives_never_accumulated() -> None:
    out = feed([SPEC_EXAMPLE[i : i + 1] for i in range(len(SPEC_EXAMPLE))])
    assert out.body_events == len(SPEC_BODY)  # one Body per byte fed
    assert all(len(e.data) == 1 for e in out.events if isinstance(e, scgi.Body))


def test_headers_are_released_before_the_body_arrives() -> None:
    decoder = scgi.Decoder()
    decoder.receive_data(SPEC_EXAMPLE[: SPEC_EXAMPLE.index(b",") + 1])
    event = decoder.next_event()
    assert isinstance(event, scgi.Headers) and event.content_length == 27
    assert decoder.next_event() is scgi.NEED_DATA
    assert decoder.in_body and not decoder.done


# --- reject list ---------------------------------------------------------------

R400 = 400
R431 = 431

REJECT: dict[str, tuple[bytes, int]] = {
    # netstring framing
    "0:, (no CONTENT_LENGTH)": (b"0:,", R400),
    "empty input": (b"", R400),
    "colon only": (b":", R400),
    "colon without length": (b":" + BLOCK24 + b",", R400),
    "00:": (b"00:,", R400),
    "024:": (b"024:" + BLOCK24 + b",", R400),
    "+24:": (b"+24:" + BLOCK24 + b",", R400),
    " 24:": (b" 24:" + BLOCK24 + b",", R400),
    "2_4:": (b"2_4:" + BLOCK24 + b",", R400),
    "24 :": (b"24 :" + BLOCK24 + b",", R400),
    "-24:": (b"-24:" + BLOCK24 + b",", R400),
    "0x18:": (b"0x18:" + BLOCK24 + b",", R400),
    "non-ASCII digit": ("٢٤:".encode() + BLOCK24 + b",", R400),
    "10-digit length, no colon": (b"1" * 10, R431),
    "10-digit length with colon": (b"0000000024:" + BLOCK24 + b",", R400),
    "10 significant digits": (b"1000000024:" + BLOCK24 + b",", R431),
    "endless digits": (b"9" * 200, R431),
    "9-digit length above max_block": (b"999999999:", R431),
    "length just above MAX_BLOCK_SIZE": (b"%d:" % (scgi.MAX_BLOCK_SIZE + 1), R431),
    "missing colon": (b"24" + BLOCK24 + b",", R400),
    "semicolon instead of colon": (b"24;" + BLOCK24 + b",", R400),
    "missing comma then EOF": (b"24:" + BLOCK24, R400),
    "semicolon instead of comma": (b"24:" + BLOCK24 + b";", R400),
    "NUL instead of comma": (b"24:" + BLOCK24 + b"\x00", R400),
    "length ends mid-pair": (b"20:" + BLOCK24[:20] + b",", R400),
    "length ends after a name": (b"19:" + BLOCK24[:19] + b",", R400),
    "length swallows the comma": (b"25:" + BLOCK24 + b",", R400),
    "length one short": (b"23:" + BLOCK24 + b",", R400),
    "EOF inside the length": (b"24", R400),
    "EOF right after the colon": (b"24:", R400),
    "EOF inside the block": (b"24:" + BLOCK24[:10], R400),
    # header block contents
    "block without final NUL": (ns(b"CONTENT_LENGTH\x000"), R400),
    "odd number of strings": (ns(b"CONTENT_LENGTH\x000\x00SCGI\x00"), R400),
    "single NUL": (ns(b"\x00"), R400),
    "empty name": (ns(b"CONTENT_LENGTH\x000\x00\x00v\x00"), R400),
    "duplicate name": (ns(b"CONTENT_LENGTH\x000\x00A\x001\x00A\x002\x00"), R400),
    "duplicate empty-valued name": (ns(b"CONTENT_LENGTH\x000\x00A\x00\x00A\x00\x00"), R400),
    "CONTENT_LENGTH absent": (ns(b"SCGI\x001\x00"), R400),
    "CONTENT_LENGTH not first": (ns(b"SCGI\x001\x00CONTENT_LENGTH\x000\x00"), R400),
    "CONTENT_LENGTH lower case": (ns(b"content_length\x000\x00"), R400),
    "CONTENT_LENGTH twice": (ns(b"CONTENT_LENGTH\x000\x00CONTENT_LENGTH\x000\x00"), R400),
    "CONTENT_LENGTH empty": (ns(b"CONTENT_LENGTH\x00\x00"), R400),
    "CONTENT_LENGTH +0": (ns(b"CONTENT_LENGTH\x00+0\x00"), R400),
    "CONTENT_LENGTH -1": (ns(b"CONTENT_LENGTH\x00-1\x00"), R400),
    "CONTENT_LENGTH space": (ns(b"CONTENT_LENGTH\x00 1\x00") + b"x", R400),
    "CONTENT_LENGTH trailing space": (ns(b"CONTENT_LENGTH\x001 \x00") + b"x", R400),
    "CONTENT_LENGTH underscore": (ns(b"CONTENT_LENGTH\x001_0\x00") + b"x" * 10, R400),
    "CONTENT_LENGTH hex": (ns(b"CONTENT_LENGTH\x000x1\x00") + b"x", R400),
    "CONTENT_LENGTH non-ASCII digit": (ns("CONTENT_LENGTH\x00٣\x00".encode()) + b"xyz", R400),
    "CONTENT_LENGTH 19 digits": (ns(b"CONTENT_LENGTH\x00" + b"1" * 19 + b"\x00"), R400),
    "SCGI 2": (ns(b"CONTENT_LENGTH\x000\x00SCGI\x002\x00"), R400),
    "SCGI empty": (ns(b"CONTENT_LENGTH\x000\x00SCGI\x00\x00"), R400),
    "SCGI 1+other": (ns(b"CONTENT_LENGTH\x000\x00SCGI\x001+other\x00"), R400),
    "SCGI twice": (ns(b"CONTENT_LENGTH\x000\x00SCGI\x001\x00SCGI\x001\x00"), R400),
    # body
    "EOF inside the body": (ns(b"CONTENT_LENGTH\x005\x00") + b"abc", R400),
    "EOF before the body": (ns(b"CONTENT_LENGTH\x005\x00"), R400),
    "spec example cut short": (SPEC_EXAMPLE[:-1], R400),
}


def _assert_rejected(chunks: list[bytes], status: int, name: str, **kwargs: object) -> None:
    with pytest.raises(ProtocolError) as info:
        feed(chunks, **kwargs)
    assert info.value.status_hint == status, f"{name}: {info.value}"
    assert str(info.value), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vector", REJECT)
def test_reject(vector: str, mode: str) -> None:
    data, status = REJECT[vector]
    for name, chunks in MODES[mode](data):
        _assert_rejected(chunks, status, f"{vector} {name}")


@pytest.mark.parametrize("vector", REJECT)
def test_reject_whole_message_decode(vector: str) -> None:
    data, status = REJECT[vector]
    with pytest.raises(ProtocolError) as info:
        scgi.decode(data)
    assert info.value.status_hint == status


@pytest.mark.parametrize("vector", ["CONTENT_LENGTH twice", "SCGI twice"])
def test_duplicates_of_content_length_and_scgi_rejected_even_when_allowed(vector: str) -> None:
    data, _ = REJECT[vector]
    for name, chunks in chunkings(data):
        _assert_rejected(chunks, R400, f"{vector} {name}", allow_duplicates=True)


def test_trailing_bytes_rejected_by_decode_but_kept_by_decoder() -> None:
    data = SPEC_EXAMPLE + b"GET / HTTP/1.1\r\n"
    with pytest.raises(ProtocolError, match="unexpected bytes"):
        scgi.decode(data)
    for name, chunks in chunkings(data):
        out = feed(chunks)
        assert out.ended, name
        assert out.body == SPEC_BODY, name
        assert out.trailing == b"GET / HTTP/1.1\r\n", name


def test_bytes_fed_after_end_go_to_trailing_data() -> None:
    decoder = scgi.Decoder()
    decoder.receive_data(ns(BLOCK24))
    assert isinstance(decoder.next_event(), scgi.Headers)
    assert isinstance(decoder.next_event(), scgi.End)
    decoder.receive_data(b"abc")
    decoder.receive_data(b"def")
    assert decoder.next_event() is scgi.NEED_DATA
    assert decoder.trailing_data == b"abcdef"
    assert decoder.done


def test_rejects_as_soon_as_the_prefix_is_bad_without_waiting_for_eof() -> None:
    for prefix in (b"024", b"+", b" ", b"2_", b"00", b":", b"24;"):
        decoder = scgi.Decoder()
        decoder.receive_data(prefix)
        with pytest.raises(ProtocolError):
            decoder.next_event()


# --- a failed decoder stays failed -------------------------------------------------


@pytest.mark.parametrize("vector", ["024:", "duplicate name", "semicolon instead of comma"])
def test_failed_decoder_stays_failed(vector: str) -> None:
    data, _ = REJECT[vector]
    decoder = scgi.Decoder()
    decoder.receive_data(data)
    with pytest.raises(ProtocolError) as first:
        while decoder.next_event() is not scgi.NEED_DATA:
            pass
    for _ in range(3):
        with pytest.raises(ProtocolError) as again:
            decoder.next_event()
        assert again.value is first.value
    with pytest.raises(ProtocolError) as again:
        decoder.receive_data(SPEC_EXAMPLE)
    assert again.value is first.value
    with pytest.raises(ProtocolError) as again:
        decoder.receive_data(b"")
    assert again.value is first.value
    assert not decoder.done and not decoder.in_body


def test_receive_after_eof_is_a_caller_error() -> None:
    decoder = scgi.Decoder()
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"1")


# --- limits: nothing is buffered beyond max_block -----------------------------------


def test_huge_length_prefix_rejected_before_any_block_byte() -> None:
    decoder = scgi.Decoder()
    for byte in b"999999999":
        decoder.receive_data(bytes([byte]))
        assert decoder.next_event() is scgi.NEED_DATA
    decoder.receive_data(b":")
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.status_hint == 431


def test_length_prefix_longer_than_max_digits_rejected_at_the_extra_digit() -> None:
    decoder = scgi.Decoder()
    for _ in range(scgi.MAX_LENGTH_DIGITS):
        decoder.receive_data(b"1")
        assert decoder.next_event() is scgi.NEED_DATA
    with pytest.raises(ProtocolError) as info:
        decoder.receive_data(b"1")  # refused as it is fed
    assert info.value.status_hint == 431
    with pytest.raises(ProtocolError):
        decoder.next_event()


def test_max_block_is_inclusive_and_checked_at_the_prefix() -> None:
    out = feed([ns(BLOCK24)], max_block=24)
    assert out.headers == [(b"CONTENT_LENGTH", b"0"), (b"A", b"bcde")]
    decoder = scgi.Decoder(max_block=23)
    decoder.receive_data(b"24:")  # not a single block byte yet
    with pytest.raises(ProtocolError, match="exceeds") as info:
        decoder.next_event()
    assert info.value.status_hint == 431
    with pytest.raises(ProtocolError) as info:
        scgi.decode(ns(BLOCK24), max_block=23)
    assert info.value.status_hint == 431


def test_default_max_block_size() -> None:
    pad = scgi.MAX_BLOCK_SIZE - len(b"CONTENT_LENGTH\x000\x00P\x00\x00")
    block = b"CONTENT_LENGTH\x000\x00P\x00" + b"v" * pad + b"\x00"
    assert len(block) == scgi.MAX_BLOCK_SIZE
    headers, body = scgi.decode(ns(block))
    assert headers[1] == (b"P", b"v" * pad) and body == b""
    decoder = scgi.Decoder()
    decoder.receive_data(b"%d:" % (scgi.MAX_BLOCK_SIZE + 1))
    with pytest.raises(ProtocolError) as info:
        decoder.next_event()
    assert info.value.status_hint == 431


def test_content_length_digit_limit() -> None:
    biggest = b"9" * scgi.MAX_CONTENT_LENGTH_DIGITS
    decoder = scgi.Decoder()
    decoder.receive_data(ns(b"CONTENT_LENGTH\x00" + biggest + b"\x00"))
    event = decoder.next_event()
    assert isinstance(event, scgi.Headers) and event.content_length == int(biggest)
    assert decoder.next_event() is scgi.NEED_DATA  # waits for the body, buffers nothing
    with pytest.raises(ProtocolError, match="digits"):
        scgi.decode(ns(b"CONTENT_LENGTH\x00" + biggest + b"9\x00"))


# --- accept list -------------------------------------------------------------------

HIGH = bytes(range(0x80, 0x100))

ACCEPT: dict[str, tuple[bytes, scgi.HeaderList, bytes, bool]] = {
    "spec example": (SPEC_EXAMPLE, SPEC_HEADERS, SPEC_BODY, False),
    "minimal": (ns(b"CONTENT_LENGTH\x000\x00"), [(b"CONTENT_LENGTH", b"0")], b"", False),
    "24-byte block": (ns(BLOCK24), [(b"CONTENT_LENGTH", b"0"), (b"A", b"bcde")], b"", False),
    "empty values": (
        ns(b"CONTENT_LENGTH\x000\x00SCGI\x001\x00QUERY_STRING\x00\x00HTTP_X\x00\x00"),
        [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), (b"QUERY_STRING", b""), (b"HTTP_X", b"")],
        b"",
        False,
    ),
    "bytes 0x80-0xff in values": (
        ns(b"CONTENT_LENGTH\x000\x00HTTP_X\x00" + HIGH + b"\x00"),
        [(b"CONTENT_LENGTH", b"0"), (b"HTTP_X", HIGH)],
        b"",
        False,
    ),
    "body with NUL, comma and digits": (
        ns(b"CONTENT_LENGTH\x008\x00") + b"\x00,12:\x00,\xff",
        [(b"CONTENT_LENGTH", b"8")],
        b"\x00,12:\x00,\xff",
        False,
    ),
    "SCGI=1": (
        ns(b"CONTENT_LENGTH\x000\x00SCGI\x001\x00"),
        [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1")],
        b"",
        False,
    ),
    "SCGI=1+fd_pass": (
        ns(b"CONTENT_LENGTH\x000\x00SCGI\x001+fd_pass\x00"),
        [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1+fd_pass")],
        b"",
        False,
    ),
    "SCGI absent (scgi_pass without scgi_params)": (
        ns(b"CONTENT_LENGTH\x003\x00REQUEST_METHOD\x00POST\x00") + b"a=b",
        [(b"CONTENT_LENGTH", b"3"), (b"REQUEST_METHOD", b"POST")],
        b"a=b",
        False,
    ),
    "SCGI not second": (
        ns(b"CONTENT_LENGTH\x000\x00A\x00b\x00SCGI\x001\x00"),
        [(b"CONTENT_LENGTH", b"0"), (b"A", b"b"), (b"SCGI", b"1")],
        b"",
        False,
    ),
    "duplicates with allow_duplicates": (
        ns(b"CONTENT_LENGTH\x000\x00HTTP_COOKIE\x00a=1\x00HTTP_COOKIE\x00b=2\x00"),
        [(b"CONTENT_LENGTH", b"0"), (b"HTTP_COOKIE", b"a=1"), (b"HTTP_COOKIE", b"b=2")],
        b"",
        True,
    ),
    "18-digit CONTENT_LENGTH of zero": (
        ns(b"CONTENT_LENGTH\x00" + b"0" * 18 + b"\x00"),
        [(b"CONTENT_LENGTH", b"0" * 18)],
        b"",
        False,
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vector", ACCEPT)
def test_accept(vector: str, mode: str) -> None:
    data, headers, body, dupes = ACCEPT[vector]
    for name, chunks in MODES[mode](data):
        out = feed(chunks, allow_duplicates=dupes)
        assert out.headers == headers, f"{vector} {name}"
        assert out.content_length == len(body), f"{vector} {name}"
        assert out.body == body, f"{vector} {name}"
        assert out.ended and out.trailing == b"", f"{vector} {name}"


@pytest.mark.parametrize("vector", ACCEPT)
def test_accept_whole_message_decode(vector: str) -> None:
    data, headers, body, dupes = ACCEPT[vector]
    assert scgi.decode(data, allow_duplicates=dupes) == (headers, body)


def test_body_split_across_many_reads() -> None:
    body = bytes(range(256)) * 40
    data = ns(b"CONTENT_LENGTH\x00%d\x00" % len(body)) + body
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    out = feed(chunks)
    assert out.body == body and out.ended and out.body_events > 1


# --- encode -------------------------------------------------------------------------


def test_encode_puts_content_length_first_and_computes_it() -> None:
    data = scgi.encode([("SCGI", "1"), ("REQUEST_METHOD", "POST")], b"hello")
    assert data == ns(b"CONTENT_LENGTH\x005\x00SCGI\x001\x00REQUEST_METHOD\x00POST\x00") + b"hello"


def test_encode_moves_a_given_content_length_first() -> None:
    data = scgi.encode([("SCGI", "1"), ("CONTENT_LENGTH", "3")], b"abc")
    assert data == ns(b"CONTENT_LENGTH\x003\x00SCGI\x001\x00") + b"abc"


def test_encode_without_body_gives_zero() -> None:
    assert scgi.encode([]) == ns(b"CONTENT_LENGTH\x000\x00")
    assert scgi.encode([("SCGI", "1")], b"") == ns(b"CONTENT_LENGTH\x000\x00SCGI\x001\x00")


def test_encode_keeps_given_content_length_when_body_is_streamed_separately() -> None:
    head = scgi.encode([("CONTENT_LENGTH", "5"), ("SCGI", "1")])
    assert head == ns(b"CONTENT_LENGTH\x005\x00SCGI\x001\x00")
    assert scgi.decode(head + b"12345") == ([(b"CONTENT_LENGTH", b"5"), (b"SCGI", b"1")], b"12345")


@pytest.mark.parametrize("given", ["4", "2", "0"])
def test_encode_content_length_mismatch(given: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        scgi.encode([("CONTENT_LENGTH", given)], b"abc")


@pytest.mark.parametrize("bad", ["", "+0", "-1", " 1", "1_0", "0x1", "abc", "1" * 19])
def test_encode_bad_content_length(bad: str) -> None:
    with pytest.raises(ValueError):
        scgi.encode([("CONTENT_LENGTH", bad)])


def test_encode_content_length_twice() -> None:
    with pytest.raises(ValueError, match="twice"):
        scgi.encode([("CONTENT_LENGTH", "0"), ("CONTENT_LENGTH", "0")])
    with pytest.raises(ValueError, match="twice"):
        scgi.encode([("CONTENT_LENGTH", "0"), ("CONTENT_LENGTH", "0")], allow_duplicates=True)


@pytest.mark.parametrize(
    "pair",
    [("", "x"), (b"", b"x"), ("A\x00B", "x"), ("A", "x\x00y"), (b"A", b"\x00"), (b"\x00", b"")],
)
def test_encode_rejects_empty_names_and_nul(pair: tuple[str | bytes, str | bytes]) -> None:
    with pytest.raises(ValueError):
        scgi.encode([pair])


def test_encode_str_as_utf8_and_bytes_verbatim() -> None:
    data = scgi.encode([("HTTP_X_NAME", "é€"), (b"HTTP_RAW", b"\xff\x80")])
    headers, _ = scgi.decode(data)
    assert headers == [
        (b"CONTENT_LENGTH", b"0"),
        (b"HTTP_X_NAME", "é€".encode()),
        (b"HTTP_RAW", b"\xff\x80"),
    ]


def test_encode_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        scgi.encode([("A", 1)])  # type: ignore[list-item]


def test_encode_duplicates_only_when_allowed() -> None:
    pairs = [("HTTP_COOKIE", "a=1"), ("HTTP_COOKIE", "b=2")]
    with pytest.raises(ValueError, match="duplicate"):
        scgi.encode(pairs)
    data = scgi.encode(pairs, allow_duplicates=True)
    with pytest.raises(ProtocolError, match="duplicate"):
        scgi.decode(data)
    assert scgi.decode(data, allow_duplicates=True)[0][1:] == [
        (b"HTTP_COOKIE", b"a=1"),
        (b"HTTP_COOKIE", b"b=2"),
    ]


@pytest.mark.parametrize("value", ["", "2", "1+other", "1 "])
def test_encode_rejects_an_scgi_version_decode_would_refuse(value: str) -> None:
    with pytest.raises(ValueError, match="SCGI"):
        scgi.encode([("SCGI", value)])


def test_encode_rejects_scgi_twice_even_with_duplicates_allowed() -> None:
    with pytest.raises(ValueError, match="SCGI"):
        scgi.encode([("SCGI", "1"), ("SCGI", "1")], allow_duplicates=True)


def test_encode_netstring() -> None:
    assert scgi.encode_netstring(b"") == b"0:,"
    assert scgi.encode_netstring(b"hello") == b"5:hello,"


def test_header_value_returns_the_first_match() -> None:
    headers = [(b"A", b"1"), (b"B", b""), (b"A", b"2")]
    assert scgi.header_value(headers, b"A") == b"1"
    assert scgi.header_value(headers, b"B") == b""
    assert scgi.header_value(headers, b"C") is None


def test_done_when_command_line() -> None:
    code = (
        "import fdhandoff.scgi as s; "
        "print(s.decode(s.encode([('CONTENT_LENGTH','3'),('SCGI','1')], b'abc')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "([(b'CONTENT_LENGTH', b'3'), (b'SCGI', b'1')], b'abc')\n"
    assert result.stderr == ""


# --- framing and buffering bounds -----------------------------------------------------


def test_headers_wait_for_the_closing_comma() -> None:
    decoder = scgi.Decoder()
    decoder.receive_data(ns(BLOCK24)[:-1])
    assert decoder.next_event() is scgi.NEED_DATA  # block whole, ',' not yet here
    decoder.receive_data(b";")
    with pytest.raises(ProtocolError, match="not terminated by ','"):
        decoder.next_event()


def test_runaway_length_prefix_refused_as_it_is_fed() -> None:
    decoder = scgi.Decoder()
    decoder.receive_data(b"12345")
    with pytest.raises(ProtocolError, match="too long") as caught:
        decoder.receive_data(b"67890")  # no next_event() call needed
    assert caught.value.status_hint == 431
    with pytest.raises(ProtocolError):
        decoder.next_event()  # and it stays failed


def test_bytes_after_end_are_kept_in_linear_time() -> None:
    decoder = scgi.Decoder()
    decoder.receive_data(ns(BLOCK24))
    while not isinstance(decoder.next_event(), scgi.End):
        pass
    chunk = b"t" * 1024
    for _ in range(20_000):  # 20 MiB: quadratic concatenation would take minutes
        decoder.receive_data(chunk)
    assert len(decoder.trailing_data) == 20_000 * 1024


def test_encode_refuses_a_block_decode_would_refuse() -> None:
    big = [("A", "x" * scgi.MAX_BLOCK_SIZE)]
    with pytest.raises(ValueError, match="exceeds the limit"):
        scgi.encode(big)
    small = scgi.encode([("A", "x" * 100)], max_block=200)
    assert scgi.decode(small, max_block=200)[0][1] == (b"A", b"x" * 100)
    with pytest.raises(ValueError, match="exceeds the limit"):
        scgi.encode([("A", "x" * 200)], max_block=200)


def test_encode_writes_a_given_content_length_canonically() -> None:
    data = scgi.encode([("CONTENT_LENGTH", "05"), ("SCGI", "1")])
    assert data.startswith(ns(b"CONTENT_LENGTH\x005\x00SCGI\x001\x00"))
