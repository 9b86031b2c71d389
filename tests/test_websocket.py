"""WebSocket frame codec (RFC 6455 §5-§7): valid streams at every split, every violation,
closing handshake, client/server pair, memory of idle connections."""

from __future__ import annotations

import os
import sys
import tracemalloc
from collections.abc import Iterable

import pytest

from fdhandoff.errors import ProtocolError
from fdhandoff.websocket import (
    MAX_MESSAGE_SIZE,
    NEED_DATA,
    Close,
    CloseCode,
    Event,
    Message,
    Opcode,
    Ping,
    Pong,
    State,
    WebSocket,
    WebSocketProtocolError,
    apply_mask,
    encode_close_payload,
    encode_frame,
)

MASK = b"\x37\xfa\x21\x3d"  # the masking key of the RFC 6455 §5.7 examples


def cf(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked (client-to-server) frame."""
    return encode_frame(opcode, payload, fin=fin, mask=MASK, rsv=rsv)


def drain(ws: WebSocket) -> list[Event]:
    events: list[Event] = []
    while (event := ws.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        events.append(event)
    return events


def feed(ws: WebSocket, pieces: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        ws.receive_data(piece)
        events += drain(ws)
    return events


def naive_mask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))


def close_frames(data: bytes) -> list[Close]:
    """Parse frames a server sent, with a client-mode codec; return its close events."""
    client = WebSocket(client=True)
    client.receive_data(data)
    return [e for e in drain(client) if isinstance(e, Close)]


# --- RFC 6455 §5.7 examples --------------------------------------------------------------


def test_rfc_examples_server_side() -> None:
    ws = WebSocket()
    masked_hello = bytes.fromhex("818537fa213d7f9f4d5158")
    masked_pong = bytes.fromhex("8a8537fa213d7f9f4d5158")
    assert feed(ws, [masked_hello, masked_pong]) == [Message("Hello"), Pong(b"Hello")]


def test_rfc_examples_client_side() -> None:
    ws = WebSocket(client=True)
    hello = bytes.fromhex("810548656c6c6f")
    fragmented = bytes.fromhex("010348656c80026c6f")
    ping = bytes.fromhex("890548656c6c6f")
    assert feed(ws, [hello, fragmented, ping]) == [Message("Hello")] * 2 + [Ping(b"Hello")]
    assert ws.data_to_send()[:2] == b"\x8a\x85"  # a masked pong from the client


def test_rfc_examples_length_encodings() -> None:
    ws = WebSocket(client=True)
    assert encode_frame(Opcode.BINARY, bytes(256))[:4] == b"\x82\x7e\x01\x00"
    assert encode_frame(Opcode.BINARY, bytes(65536))[:10] == b"\x82\x7f" + (65536).to_bytes(
        8, "big"
    )
    for size in (0, 125, 126, 65535, 65536):
        assert feed(ws, [encode_frame(Opcode.BINARY, bytes(size))]) == [Message(bytes(size))]


# --- valid streams at every split point ------------------------------------------------------

TEXT = "κόσμε — 🙂"
UTF8 = TEXT.encode()

STREAMS: dict[str, tuple[bytes, list[Event], bytes]] = {
    # name: (client bytes, events, automatic replies the server must queue)
    "text": (cf(Opcode.TEXT, b"Hello"), [Message("Hello")], b""),
    "binary-empty-text-empty": (
        cf(Opcode.BINARY, b"\x00\xff") + cf(Opcode.BINARY) + cf(Opcode.TEXT),
        [Message(b"\x00\xff"), Message(b""), Message("")],
        b"",
    ),
    "utf8-split-inside-code-points": (
        cf(Opcode.TEXT, UTF8[:1], fin=False)
        + cf(Opcode.CONTINUATION, UTF8[1:6], fin=False)
        + cf(Opcode.CONTINUATION, b"", fin=False)
        + cf(Opcode.CONTINUATION, UTF8[6:-2], fin=False)
        + cf(Opcode.CONTINUATION, UTF8[-2:]),
        [Message(TEXT)],
        b"",
    ),
    "control-frames-between-fragments": (
        cf(Opcode.BINARY, b"ab", fin=False)
        + cf(Opcode.PING, b"p1")
        + cf(Opcode.CONTINUATION, b"cd", fin=False)
        + cf(Opcode.PONG, b"")
        + cf(Opcode.PING)
        + cf(Opcode.CONTINUATION, b"ef"),
        [Ping(b"p1"), Pong(b""), Ping(b""), Message(b"abcdef")],
        b"\x8a\x02p1\x8a\x00",
    ),
    "16-bit-length": (
        cf(Opcode.BINARY, bytes(range(256)) * 2),
        [Message(bytes(range(256)) * 2)],
        b"",
    ),
    "125-byte-ping-then-close": (
        cf(Opcode.PING, b"x" * 125)
        + cf(Opcode.CLOSE, b"\x03\xe8bye")
        + cf(Opcode.TEXT, b"ignored"),
        [Ping(b"x" * 125), Close(1000, "bye")],
        b"\x8a\x7d" + b"x" * 125 + b"\x88\x02\x03\xe8",
    ),
}


@pytest.mark.parametrize("name", STREAMS)
def test_stream_whole_bytewise_and_at_every_split(name: str) -> None:
    data, expected, replies = STREAMS[name]
    ways: list[list[bytes]] = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    for pieces in ways:
        ws = WebSocket()
        assert feed(ws, pieces) == expected, [len(p) for p in pieces]
        assert ws.data_to_send() == replies
        assert ws.error is None


def test_large_message_in_uneven_chunks() -> None:
    payload = os.urandom(300_000)
    data = cf(Opcode.BINARY, payload[:70_000], fin=False) + cf(
        Opcode.CONTINUATION, payload[70_000:]
    )
    for size in (1, 7, 4093, 65536, len(data)):
        if size == 1:
            pieces = [data[:20], *(data[i : i + 1] for i in range(20, 200)), data[200:]]
        else:
            pieces = [data[i : i + size] for i in range(0, len(data), size)]
        assert feed(WebSocket(), pieces) == [Message(payload)]


def test_message_of_exactly_the_limit_is_accepted() -> None:
    ws = WebSocket(max_message_size=10)
    stream = cf(Opcode.TEXT, b"12345", fin=False) + cf(Opcode.CONTINUATION, b"67890")
    assert feed(ws, [stream, cf(Opcode.BINARY, bytes(10))]) == [
        Message("1234567890"),
        Message(bytes(10)),
    ]
    assert MAX_MESSAGE_SIZE == 1024 * 1024
    assert feed(WebSocket(), [cf(Opcode.BINARY, bytes(MAX_MESSAGE_SIZE))]) == [
        Message(bytes(MAX_MESSAGE_SIZE))
    ]


# --- violations ------------------------------------------------------------------------------

PE, INVALID, TOO_BIG = CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_DATA, CloseCode.MESSAGE_TOO_BIG


def header(first: int, length: int, extended: bytes = b"", masked: bool = True) -> bytes:
    return bytes((first, (0x80 if masked else 0) | length)) + extended + (MASK if masked else b"")


VIOLATIONS: dict[str, tuple[bytes, int, str]] = {
    "unmasked": (encode_frame(Opcode.TEXT, b"hi"), PE, "unmasked frame"),
    "rsv1": (cf(Opcode.TEXT, b"hi", rsv=4), PE, "RSV bits"),
    "rsv2": (cf(Opcode.BINARY, b"hi", rsv=2), PE, "RSV bits"),
    "rsv3": (cf(Opcode.PING, b"", rsv=1), PE, "RSV bits"),
    **{f"opcode-{op}": (cf(op, b"x"), PE, "reserved opcode") for op in (3, 4, 5, 6, 7, 11, 12, 15)},
    "fragmented-ping": (cf(Opcode.PING, b"", fin=False), PE, "fragmented control"),
    "fragmented-close": (cf(Opcode.CLOSE, b"", fin=False), PE, "fragmented control"),
    "ping-126": (header(0x89, 126, (126).to_bytes(2, "big")), PE, "over 125"),
    "close-127": (header(0x88, 127, (200_000).to_bytes(8, "big")), PE, "over 125"),
    "lone-continuation": (cf(Opcode.CONTINUATION, b"x"), PE, "no message to continue"),
    "text-inside-fragmented": (
        cf(Opcode.TEXT, b"a", fin=False) + cf(Opcode.TEXT, b"b"),
        PE,
        "new data frame inside",
    ),
    "binary-inside-fragmented": (
        cf(Opcode.BINARY, b"a", fin=False) + cf(Opcode.PING) + cf(Opcode.BINARY, b"b"),
        PE,
        "new data frame inside",
    ),
    "64-bit-top-bit": (header(0x82, 127, (1 << 63 | 5).to_bytes(8, "big")), PE, "top bit"),
    "non-minimal-16": (header(0x82, 126, (125).to_bytes(2, "big")), PE, "non-minimal 16"),
    "non-minimal-64": (header(0x82, 127, (65535).to_bytes(8, "big")), PE, "non-minimal 64"),
    "2**62-bytes": (header(0x82, 127, (1 << 62).to_bytes(8, "big")), TOO_BIG, "exceeds the limit"),
    "over-limit-single": (cf(Opcode.BINARY, bytes(MAX_MESSAGE_SIZE + 1)), TOO_BIG, "exceeds"),
    "over-limit-fragments": (
        cf(Opcode.BINARY, bytes(MAX_MESSAGE_SIZE), fin=False) + cf(Opcode.CONTINUATION, b"x"),
        TOO_BIG,
        "exceeds the limit",
    ),
    "bad-utf8": (cf(Opcode.TEXT, b"ok\xc0\xaf"), INVALID, "not UTF-8"),
    "truncated-utf8": (cf(Opcode.TEXT, UTF8[:-1]), INVALID, "not UTF-8"),
    "truncated-utf8-fragments": (
        cf(Opcode.TEXT, UTF8[:-1], fin=False) + cf(Opcode.CONTINUATION, b""),
        INVALID,
        "not UTF-8",
    ),
    "surrogate": (cf(Opcode.TEXT, b"\xed\xa0\x80"), INVALID, "not UTF-8"),
    "above-U+10FFFF": (cf(Opcode.TEXT, b"\xf4\x90\x80\x80"), INVALID, "not UTF-8"),
    "overlong": (cf(Opcode.TEXT, b"\xe0\x80\xaf"), INVALID, "not UTF-8"),
    "close-1-byte": (cf(Opcode.CLOSE, b"\x03"), PE, "1 byte"),
    "close-bad-reason": (cf(Opcode.CLOSE, b"\x03\xe8\xff"), INVALID, "reason is not UTF-8"),
    **{
        f"close-code-{code}": (cf(Opcode.CLOSE, code.to_bytes(2, "big")), PE, "invalid close code")
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535)
    },
}


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("name", VIOLATIONS)
def test_violation_closes_with_the_right_code(name: str) -> None:
    data, code, message = VIOLATIONS[name]
    ws = WebSocket()
    ws.receive_data(data)
    with pytest.raises(WebSocketProtocolError, match=message) as info:
        drain(ws)
    assert isinstance(info.value, ProtocolError)
    assert info.value.close_code == code
    assert ws.state is State.CLOSED
    assert ws.error is info.value
    # the close frame with that code is queued, once
    (close,) = close_frames(ws.data_to_send())
    assert close.code == code
    assert message.split()[0] in close.reason
    assert ws.data_to_send() == b""
    # the object stays failed
    with pytest.raises(WebSocketProtocolError) as again:
        ws.next_event()
    assert again.value is info.value
    for call in (
        lambda: ws.receive_data(b"\x81"),
        lambda: ws.receive_data(b""),
        lambda: ws.send_message("x"),
        lambda: ws.send_ping(),
        lambda: ws.send_pong(),
        lambda: ws.send_close(),
    ):
        with pytest.raises(WebSocketProtocolError):
            call()


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("name", VIOLATIONS)
def test_violation_detected_byte_by_byte(name: str) -> None:
    data, code, _ = VIOLATIONS[name]
    ws = WebSocket()
    with pytest.raises(WebSocketProtocolError) as info:
        feed(ws, (data[i : i + 1] for i in range(len(data))))
    assert info.value.close_code == code


@pytest.mark.usefixtures("no_fd_leak")
def test_huge_length_refused_from_the_header_alone() -> None:
    # The 10-byte header that crashed the Go daemon: no mask key, no payload yet.
    ws = WebSocket()
    ws.receive_data(b"\x82\xff" + (1 << 62).to_bytes(8, "big"))
    with pytest.raises(WebSocketProtocolError, match="exceeds the limit") as info:
        ws.next_event()
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG
    assert close_frames(ws.data_to_send())[0].code == 1009


@pytest.mark.usefixtures("no_fd_leak")
def test_fragment_pushing_over_the_limit_is_refused_at_its_header() -> None:
    ws = WebSocket(max_message_size=100)
    assert feed(ws, [cf(Opcode.TEXT, b"a" * 60, fin=False)]) == []
    ws.receive_data(header(0x00, 41))  # next fragment announces 41 more bytes
    with pytest.raises(WebSocketProtocolError) as info:
        ws.next_event()
    assert info.value.close_code == 1009


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize(
    "first_piece",
    [
        # invalid sequence in the first fragment: refused before the message ends
        cf(Opcode.TEXT, b"valid \xff", fin=False),
        # invalid sequence in the received part of one big frame
        cf(Opcode.TEXT, b"abc\xc3\x28" + b"x" * 1000)[:20],
        # a surrogate lead pending at the end of what arrived
        cf(Opcode.TEXT, b"abc\xed\xa0" + b"\x80" + b"x" * 1000)[:13],
    ],
)
def test_invalid_utf8_fails_fast(first_piece: bytes) -> None:
    ws = WebSocket()
    ws.receive_data(first_piece)
    with pytest.raises(WebSocketProtocolError) as info:
        ws.next_event()
    assert info.value.close_code == CloseCode.INVALID_DATA


@pytest.mark.usefixtures("no_fd_leak")
def test_masked_frame_to_a_client_is_refused() -> None:
    ws = WebSocket(client=True)
    ws.receive_data(cf(Opcode.TEXT, b"hi"))
    with pytest.raises(WebSocketProtocolError, match="masked frame from the server"):
        ws.next_event()
    # the client's close frame is masked, as every client frame must be
    out = ws.data_to_send()
    assert out[0] == 0x88 and out[1] & 0x80
    server = WebSocket()
    server.receive_data(out)
    assert drain(server)[0] == Close(1002, "masked frame from the server (RFC 6455 §5.1)")


@pytest.mark.usefixtures("no_fd_leak")
def test_violation_after_our_close_queues_no_second_close_frame() -> None:
    ws = WebSocket()
    ws.send_close(1001)
    ws.receive_data(encode_frame(Opcode.TEXT, b"unmasked"))
    with pytest.raises(WebSocketProtocolError):
        ws.next_event()
    assert ws.data_to_send() == b""


# --- closing handshake and EOF ---------------------------------------------------------------


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_peer_close_is_echoed(code: int) -> None:
    ws = WebSocket()
    ws.receive_data(cf(Opcode.CLOSE, encode_close_payload(code, "reason ✓")))
    assert drain(ws) == [Close(code, "reason ✓")]
    assert ws.state is State.CLOSED
    assert ws.data_to_send() == b"\x88\x02" + code.to_bytes(2, "big")
    ws.receive_data(cf(Opcode.TEXT, b"after close"))
    ws.receive_data(b"")
    assert ws.next_event() is NEED_DATA


def test_empty_close_gets_an_empty_close() -> None:
    ws = WebSocket()
    ws.receive_data(cf(Opcode.CLOSE))
    assert drain(ws) == [Close(CloseCode.NO_STATUS, "")]
    assert ws.data_to_send() == b"\x88\x00"


def test_close_started_by_us() -> None:
    ws = WebSocket()
    assert ws.send_close(1001, "bye") == b"\x88\x05\x03\xe9bye"
    assert ws.state is State.CLOSING
    assert ws.send_close() == b""  # sent at most once
    with pytest.raises(RuntimeError, match="CLOSING"):
        ws.send_message("late")
    with pytest.raises(RuntimeError):
        ws.send_ping()
    # the peer may still send data; its pings get no pong after our close
    ws.receive_data(cf(Opcode.TEXT, b"still") + cf(Opcode.PING, b"?"))
    assert drain(ws) == [Message("still"), Ping(b"?")]
    ws.receive_data(cf(Opcode.CLOSE, b"\x03\xe9"))
    assert drain(ws) == [Close(1001, "")]
    assert ws.state is State.CLOSED
    assert ws.data_to_send() == b""


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (b"", ""),
        (b"\x81", "frame header"),
        (cf(Opcode.TEXT, b"Hello")[:8], "middle of a message"),
        (cf(Opcode.TEXT, b"He", fin=False), "middle of a message"),
    ],
)
def test_eof_without_close_is_1006(tail: bytes, reason: str) -> None:
    ws = WebSocket()
    assert feed(ws, [cf(Opcode.TEXT, b"first"), tail] if tail else [cf(Opcode.TEXT, b"first")]) == [
        Message("first")
    ]
    ws.receive_data(b"")
    event = ws.next_event()
    assert isinstance(event, Close)
    assert event.code == CloseCode.ABNORMAL
    assert reason in event.reason
    assert ws.state is State.CLOSED
    assert ws.data_to_send() == b""  # nobody to answer
    assert ws.next_event() is NEED_DATA
    with pytest.raises(RuntimeError, match="after EOF"):
        ws.receive_data(b"more")


def test_eof_after_our_close_is_1006() -> None:
    ws = WebSocket()
    ws.send_close()
    ws.receive_data(b"")
    assert ws.next_event() == Close(1006, "")


# --- sending ---------------------------------------------------------------------------------


def test_server_sends_unmasked_frames() -> None:
    ws = WebSocket()
    assert ws.send_message("Hello") == bytes.fromhex("810548656c6c6f")
    assert ws.send_message(b"\x00") == b"\x82\x01\x00"
    assert ws.send_ping(b"p") == b"\x89\x01p"
    assert ws.send_pong() == b"\x8a\x00"
    assert ws.send_message(bytes(200))[:4] == b"\x82\x7e\x00\xc8"


def test_client_masks_with_fresh_keys() -> None:
    client = WebSocket(client=True)
    frames = [client.send_message("same") for _ in range(8)]
    assert all(f[1] == 0x84 for f in frames)
    assert len({f[2:6] for f in frames}) > 1
    server = WebSocket()
    assert feed(server, frames) == [Message("same")] * 8


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ws: ws.send_ping(bytes(126)), "limit is 125"),
        (lambda ws: ws.send_pong(bytes(126)), "limit is 125"),
        (lambda ws: ws.send_close(1005, "x"), "without a status code"),
        (lambda ws: ws.send_close(1006), "must not be sent"),
        (lambda ws: ws.send_close(999), "must not be sent"),
        (lambda ws: ws.send_close(1000, "é" * 62), "limit is 123"),
    ],
)
def test_send_rejects_bad_arguments(call: object, message: str) -> None:
    ws = WebSocket()
    with pytest.raises(ValueError, match=message):
        call(ws)  # type: ignore[operator]
    assert ws.state is State.OPEN


def test_send_close_without_status() -> None:
    assert WebSocket().send_close(CloseCode.NO_STATUS) == b"\x88\x00"
    assert WebSocket().send_close(1000, "é" * 61 + "x")[:2] == b"\x88\x7d"


@pytest.mark.parametrize("size", [-1, True])
def test_bad_max_message_size(size: int) -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        WebSocket(max_message_size=size)


# --- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 4095, 4096, 4097, 8192, 8195, 20_001])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 6])
def test_apply_mask_matches_the_definition(size: int, offset: int) -> None:
    data = os.urandom(size)
    mask = os.urandom(4)
    assert apply_mask(data, mask, offset) == naive_mask(data, mask, offset)
    assert apply_mask(apply_mask(data, mask, offset), mask, offset) == data
    assert apply_mask(bytearray(data), mask, offset) == apply_mask(memoryview(data), mask, offset)


def test_encode_frame_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        encode_frame(Opcode.TEXT, b"x", mask=b"abc")
    with pytest.raises(ValueError, match="out of range"):
        encode_frame(16, b"")
    with pytest.raises(ValueError, match="out of range"):
        encode_frame(1, b"", rsv=8)


# --- a client and a server codec talking to each other (like h11's ConnectionPair) -----------


class Pair:
    def __init__(self) -> None:
        self.client = WebSocket(client=True)
        self.server = WebSocket()

    def to_server(self, data: bytes) -> list[Event]:
        self.server.receive_data(data)
        events = drain(self.server)
        replies = self.server.data_to_send()
        if replies:
            self.client.receive_data(replies)
        return events

    def to_client(self, data: bytes) -> list[Event]:
        self.client.receive_data(data)
        events = drain(self.client)
        replies = self.client.data_to_send()
        if replies:
            self.server.receive_data(replies)
        return events


def test_pair_messages_pings_and_close_from_the_client() -> None:
    p = Pair()
    big = os.urandom(200_000)
    for message in ("hi", "ünïcödé", b"", big):
        assert p.to_server(p.client.send_message(message)) == [Message(message)]
        assert p.to_client(p.server.send_message(message)) == [Message(message)]
    assert p.to_server(p.client.send_ping(b"c")) == [Ping(b"c")]
    assert drain(p.client) == [Pong(b"c")]  # the automatic pong reached the client
    assert p.to_client(p.server.send_ping(b"s")) == [Ping(b"s")]
    assert drain(p.server) == [Pong(b"s")]
    assert p.to_server(p.client.send_close(1000, "done")) == [Close(1000, "done")]
    assert p.client.state is State.CLOSING
    assert drain(p.client) == [Close(1000, "")]
    assert p.client.state is p.server.state is State.CLOSED


def test_pair_close_from_the_server() -> None:
    p = Pair()
    assert p.to_client(p.server.send_close(1001, "restart")) == [Close(1001, "restart")]
    assert drain(p.server) == [Close(1001, "")]
    assert p.client.state is p.server.state is State.CLOSED


def test_pair_violation_reaches_the_peer_as_a_close() -> None:
    p = Pair()
    with pytest.raises(WebSocketProtocolError):
        p.to_server(encode_frame(Opcode.BINARY, b"unmasked"))
    p.client.receive_data(p.server.data_to_send())
    assert drain(p.client) == [Close(1002, "unmasked frame from the client (RFC 6455 §5.1)")]
    assert p.client.data_to_send()[0] == 0x88  # the client answers the close


# --- memory ----------------------------------------------------------------------------------

#: Documented in docs/websocket.md: an idle server connection object is 112
#: bytes on 64-bit CPython 3.11 (10 slots + object and GC headers).
IDLE_OBJECT_BOUND = 128
#: tracemalloc bytes per idle connection, object plus a list slot to hold it.
IDLE_TRACED_BOUND = 160


def used(ws: WebSocket) -> WebSocket:
    """A connection that has gone through a message, a ping and a partial frame."""
    ws.receive_data(cf(Opcode.TEXT, b"Hello", fin=False) + cf(Opcode.PING, b"!"))
    drain(ws)
    ws.receive_data(cf(Opcode.CONTINUATION, b" world")[:5])
    drain(ws)
    ws.receive_data(cf(Opcode.CONTINUATION, b" world")[5:])
    assert drain(ws) == [Message("Hello world")]
    ws.data_to_send()
    return ws


def test_idle_object_is_small_and_holds_no_buffer() -> None:
    ws = used(WebSocket())
    assert not hasattr(ws, "__dict__")
    own = sys.getsizeof(ws)
    assert own <= IDLE_OBJECT_BOUND
    # What the slots point to is shared (None, False, 0, the empty bytes, the
    # State member, the default limit): nothing is owned by the idle object.
    shared = {id(None), id(False), id(0), id(b""), id(State.OPEN), id(MAX_MESSAGE_SIZE)}
    for slot in WebSocket.__slots__:
        assert id(getattr(ws, slot)) in shared, slot


def test_10000_idle_connections_fit_the_bound() -> None:
    count = 10_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conns = [used(WebSocket()) for _ in range(count)]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(conns) == count
    per_connection = (after - before) / count
    assert per_connection <= IDLE_TRACED_BOUND, per_connection


def test_partial_frame_memory_is_released() -> None:
    ws = WebSocket()
    ws.receive_data(cf(Opcode.BINARY, bytes(100_000))[:60_000])
    assert drain(ws) == []
    ws.receive_data(cf(Opcode.BINARY, bytes(100_000))[60_000:])
    assert drain(ws) == [Message(bytes(100_000))]
    shared = {id(None), id(False), id(0), id(b""), id(State.OPEN), id(MAX_MESSAGE_SIZE)}
    assert all(id(getattr(ws, slot)) in shared for slot in WebSocket.__slots__)


def test_waiting_on_a_partial_header_keeps_only_its_bytes() -> None:
    ws = WebSocket()
    chunk = cf(Opcode.BINARY, bytes(50_000)) + cf(Opcode.TEXT, b"next")[:3]
    ws.receive_data(chunk)
    assert drain(ws) == [Message(bytes(50_000))]
    kept = ws._buf  # the only way to see it: nothing else may pin the 50 kB chunk
    assert kept is not None and len(kept) == 3
    ws.receive_data(cf(Opcode.TEXT, b"next")[3:])
    assert drain(ws) == [Message("next")]
    assert ws._buf is None


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_receive_data_takes_any_bytes_like(kind: type) -> None:
    ws = WebSocket()
    data = cf(Opcode.TEXT, b"Hello") + cf(Opcode.BINARY, b"x" * 300)
    ws.receive_data(kind(data[:4]))
    ws.receive_data(kind(data[4:]))
    assert drain(ws) == [Message("Hello"), Message(b"x" * 300)]


@pytest.mark.parametrize("opcode", [Opcode.BINARY, Opcode.TEXT])
def test_one_byte_fragments_do_not_amplify_memory(opcode: Opcode) -> None:
    # 30 kB as 30,000 one-byte fragments: a list of pieces would hold at least
    # a pointer per byte; the message buffer must stay near the payload size.
    size = 30_000
    frames = [cf(opcode, b"a", fin=False)]
    frames += [cf(Opcode.CONTINUATION, b"a", fin=False)] * (size - 2)
    frames.append(cf(Opcode.CONTINUATION, b"a"))
    stream = b"".join(frames)
    ws = WebSocket()
    tracemalloc.start()
    try:
        events = feed(ws, (stream[i : i + 4096] for i in range(0, len(stream), 4096)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert events == [Message("a" * size if opcode == Opcode.TEXT else b"a" * size)]
    assert peak < 4 * size, peak
