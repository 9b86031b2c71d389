"""Property tests for the WebSocket codec: any bytes give events or the documented
error, and random valid streams decode the same however they are split."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdhandoff.errors import ProtocolError
from fdhandoff.websocket import (
    NEED_DATA,
    Close,
    Event,
    Message,
    Opcode,
    Ping,
    Pong,
    State,
    WebSocket,
    WebSocketProtocolError,
    encode_close_payload,
    encode_frame,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def run(ws: WebSocket, pieces: list[bytes], eof: bool) -> tuple[list[Event], ProtocolError | None]:
    events: list[Event] = []
    try:
        # b"" is EOF, so an empty piece is only fed when EOF is meant
        for piece in [*(p for p in pieces if p), *([b""] if eof else [])]:
            ws.receive_data(piece)
            while (event := ws.next_event()) is not NEED_DATA:
                assert isinstance(event, Message | Ping | Pong | Close)
                events.append(event)
    except WebSocketProtocolError as exc:
        return events, exc
    return events, None


def check_failed_state(ws: WebSocket, error: ProtocolError) -> None:
    assert isinstance(error, WebSocketProtocolError)
    assert error.close_code in (1002, 1007, 1009)
    assert ws.state is State.CLOSED
    # exactly one close frame with that code was queued
    client = WebSocket(client=True)
    client.receive_data(ws.data_to_send())
    replies = []
    while (event := client.next_event()) is not NEED_DATA:
        replies.append(event)
    assert [type(e) for e in replies][-1:] == [Close]
    assert isinstance(replies[-1], Close)
    assert replies[-1].code == error.close_code


@FUZZ
@given(
    data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6), eof=st.booleans()
)
def test_arbitrary_bytes_give_events_or_a_protocol_error(
    data: bytes, cuts: list[int], eof: bool
) -> None:
    ws = WebSocket(max_message_size=200)
    _, error = run(ws, split(data, cuts), eof)
    if error is not None:
        check_failed_state(ws, error)


@FUZZ
@given(data=st.binary(max_size=300), eof=st.booleans())
def test_arbitrary_bytes_client_mode(data: bytes, eof: bool) -> None:
    ws = WebSocket(client=True, max_message_size=200)
    _, error = run(ws, [data], eof)
    if error is not None:
        assert isinstance(error, WebSocketProtocolError)
        assert ws.state is State.CLOSED


# --- structured: random valid streams ----------------------------------------------------------


@dataclass(frozen=True)
class Item:
    frames: list[tuple[int, bytes, bool]]  # (opcode, payload, fin)
    events: list[Event]


@st.composite
def data_message(draw: st.DrawFn) -> Item:
    """A text or binary message split into fragments, with control frames between them."""
    text = draw(st.booleans())
    if text:
        value: str | bytes = draw(st.text(max_size=40))
        raw = value.encode()
    else:
        value = raw = draw(st.binary(max_size=60))
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=4))
    pieces = split(raw, cuts) or [b""]
    frames: list[tuple[int, bytes, bool]] = []
    events: list[Event] = []
    for index, piece in enumerate(pieces):
        opcode = (Opcode.TEXT if text else Opcode.BINARY) if index == 0 else Opcode.CONTINUATION
        frames.append((opcode, piece, index == len(pieces) - 1))
        if index < len(pieces) - 1 and draw(st.booleans()):
            ping = draw(st.binary(max_size=125))
            frames.append((Opcode.PING, ping, True))
            events.append(Ping(ping))
    events.append(Message(value))
    return Item(frames, events)


control = st.one_of(
    st.binary(max_size=125).map(lambda b: Item([(Opcode.PING, b, True)], [Ping(b)])),
    st.binary(max_size=125).map(lambda b: Item([(Opcode.PONG, b, True)], [Pong(b)])),
)


@FUZZ
@given(
    items=st.lists(st.one_of(data_message(), control), max_size=8),
    close=st.one_of(
        st.none(), st.tuples(st.sampled_from([1000, 1001, 1011, 3000, 4999]), st.text(max_size=20))
    ),
    masks=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(0, 5000), max_size=10),
)
def test_random_valid_streams_decode_identically_at_any_split(
    items: list[Item],
    close: tuple[int, str] | None,
    masks: object,
    cuts: list[int],
) -> None:
    frames = [frame for item in items for frame in item.frames]
    expected = [event for item in items for event in item.events]
    if close is not None:
        reason = close[1].encode()[:100].decode("utf-8", "ignore")
        frames.append((Opcode.CLOSE, encode_close_payload(close[0], reason), True))
        expected.append(Close(close[0], reason))
    rng = masks
    data = b"".join(
        encode_frame(op, payload, fin=fin, mask=rng.randbytes(4))  # type: ignore[attr-defined]
        for op, payload, fin in frames
    )
    whole, error = run(WebSocket(), [data], eof=False)
    assert error is None
    assert whole == expected
    ws = WebSocket()
    pieces, error = run(ws, split(data, cuts), eof=False)
    assert error is None
    assert pieces == expected
    assert ws.state is (State.CLOSED if close else State.OPEN)


@FUZZ
@given(
    items=st.lists(data_message(), min_size=1, max_size=4),
    position=st.integers(0, 10_000),
    byte=st.integers(0, 255),
)
def test_corrupted_valid_streams_give_events_or_a_protocol_error(
    items: list[Item], position: int, byte: int
) -> None:
    data = bytearray(
        b"".join(
            encode_frame(op, payload, fin=fin, mask=b"\x01\x02\x03\x04")
            for item in items
            for op, payload, fin in item.frames
        )
    )
    data[position % len(data)] = byte
    ws = WebSocket(max_message_size=100)
    _, error = run(ws, [bytes(data)], eof=True)
    if error is not None:
        check_failed_state(ws, error)
