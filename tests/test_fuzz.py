"""Property tests and fuzzing of the sans-IO core (hypothesis).

Invariants:
* encode -> decode is the identity for any valid header list and body, fed
  in any chunking;
* on arbitrary bytes, and on mutations of valid messages, decode(), the
  incremental Decoder and HandoffReader either return or raise ProtocolError
  -- nothing else;
* the Decoder gives the same answer whatever the chunking, and anything
  decode() accepts re-encodes to exactly the same bytes (only canonical
  messages are accepted).
"""

from __future__ import annotations

import itertools
import re
import socket
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdhandoff import message, scgi
from fdhandoff.errors import ProtocolError
from fdhandoff.message import CLOSED, NEED_DATA, Format, HandoffReader, HandoffRecord

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=200, deadline=None)

CAPTURES = [
    path.read_bytes()
    for path in sorted((Path(__file__).parent / "fixtures" / "nginx-fd-pass").glob("*.bin"))
]
RESERVED = {b"CONTENT_LENGTH", b"SCGI"}

# --- strategies --------------------------------------------------------------------

names = st.binary(min_size=1, max_size=24).filter(lambda n: b"\x00" not in n and n not in RESERVED)
values = st.binary(max_size=40).filter(lambda v: b"\x00" not in v)
text_names = st.text(min_size=1, max_size=12).filter(
    lambda n: "\x00" not in n and n.encode() not in RESERVED
)
text_values = st.text(max_size=20).filter(lambda v: "\x00" not in v)
scgi_versions = st.sampled_from([None, b"1", b"1+fd_pass"])


@st.composite
def header_lists(draw: st.DrawFn) -> scgi.HeaderList:
    """Unique names (no NUL, not empty), values without NUL, optional SCGI pair."""
    pairs = draw(st.lists(st.tuples(names, values), max_size=12, unique_by=lambda p: p[0]))
    version = draw(scgi_versions)
    if version is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), (b"SCGI", version))
    return pairs


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random positions (no empty chunk)."""
    if not data:
        return []
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8, unique=True))
    edges = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@st.composite
def valid_messages(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(CAPTURES))
    return scgi.encode(draw(header_lists()), draw(st.binary(max_size=64)))


INTERESTING = [0, ord(","), ord(":"), ord("0"), ord("1"), ord("9"), ord("+"), ord(" "), 0xFF]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message with a few byte-level mutations."""
    data = bytearray(draw(valid_messages()))
    byte = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255))
    for _ in range(draw(st.integers(1, 4))):
        size = len(data)
        op = draw(st.sampled_from(["set", "insert", "delete", "duplicate", "truncate", "swap"]))
        pos = draw(st.integers(0, max(0, size - 1)))
        if op == "set" and size:
            data[pos] = draw(byte)
        elif op == "insert":
            data[pos:pos] = bytes(draw(st.lists(byte, min_size=1, max_size=4)))
        elif op == "delete" and size:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "duplicate" and size:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "swap" and size > 1:
            other = draw(st.integers(0, size - 1))
            data[pos], data[other] = data[other], data[pos]
    return bytes(data)


@st.composite
def structural_mutations(draw: st.DrawFn) -> bytes:
    """A message whose framing is right but whose contents break one rule (or none).

    Byte-level mutations mostly break the netstring length; these keep it
    consistent so the header-block rules themselves are exercised.
    """
    headers = draw(header_lists())
    body = draw(st.binary(max_size=16))
    pairs = [(b"CONTENT_LENGTH", b"%d" % len(body)), *headers]
    op = draw(
        st.sampled_from(
            [
                "none",
                "empty-name",
                "dup-pair",
                "dup-length",
                "dup-scgi",
                "move-length",
                "drop-length",
                "length-value",
                "scgi-value",
                "odd",
                "no-final-nul",
            ]
        )
    )
    at = draw(st.integers(1, len(pairs)))
    if op == "empty-name":
        pairs.insert(at, (b"", draw(values)))
    elif op == "dup-pair" and len(pairs) > 1:
        pairs.insert(at, pairs[draw(st.integers(1, len(pairs) - 1))])
    elif op == "dup-length":
        pairs.insert(at, pairs[0])
    elif op == "dup-scgi":
        pairs[at:at] = [(b"SCGI", b"1"), (b"SCGI", draw(st.sampled_from([b"1", b"1+fd_pass"])))]
    elif op == "move-length" and len(pairs) > 1:
        pairs.insert(at, pairs.pop(0))
    elif op == "drop-length":
        pairs.pop(0)
    elif op == "length-value":
        bad = [b"", b"+0", b"-1", b" 1", b"1_0", b"0x0", b"00", b"%d" % (len(body) + 1)]
        pairs[0] = (b"CONTENT_LENGTH", draw(st.sampled_from(bad)))
    elif op == "scgi-value":
        pairs.insert(at, (b"SCGI", draw(st.sampled_from([b"", b"2", b"1+", b"1 ", b"01"]))))
    block = b"".join(name + b"\x00" + value + b"\x00" for name, value in pairs)
    if op == "odd":
        block += draw(names) + b"\x00"
    elif op == "no-final-nul":
        block = block[:-1]
    prefix = b"%d" % len(block)
    # Mostly a right prefix and no trailer, so the block rules decide.
    prefix = draw(st.sampled_from([prefix] * 7 + [b"0" + prefix, b"+" + prefix, prefix + b" "]))
    trailer = draw(st.sampled_from([b""] * 9 + [b"x"]))
    return prefix + b":" + block + b"," + body + trailer


any_input = st.one_of(
    st.binary(max_size=200),
    mutated_messages(),
    valid_messages(),
    structural_mutations(),
    structural_mutations(),
)

LENGTH = re.compile(rb"(0|[1-9][0-9]{0,8}):")
DECIMAL = re.compile(rb"[0-9]{1,18}")


def reference_decode(
    raw: bytes, allow_duplicates: bool, max_block: int = scgi.MAX_BLOCK_SIZE
) -> tuple[scgi.HeaderList, bytes] | None:
    """The SCGI rules written out a second way (regular expressions, no state
    machine), as an oracle: the message, or None if it must be refused."""
    match = LENGTH.match(raw)
    if match is None or int(match[1]) > max_block:
        return None
    start = match.end()
    end = start + int(match[1])
    block, rest = raw[start:end], raw[end:]
    if len(block) < int(match[1]) or not rest.startswith(b",") or not block.endswith(b"\x00"):
        return None
    strings = block[:-1].split(b"\x00")
    if len(strings) % 2:
        return None
    pairs = list(zip(strings[::2], strings[1::2], strict=True))
    if pairs[0][0] != b"CONTENT_LENGTH" or not DECIMAL.fullmatch(pairs[0][1]):
        return None
    names_seen = [name for name, _ in pairs]
    for name, value in pairs:
        if not name or (name == b"SCGI" and value not in (b"1", b"1+fd_pass")):
            return None
        if names_seen.count(name) > 1 and (
            not allow_duplicates or name in (b"CONTENT_LENGTH", b"SCGI")
        ):
            return None
    body = rest[1:]
    if len(body) != int(pairs[0][1]):
        return None
    return pairs, body


# --- helpers ---------------------------------------------------------------------------

Outcome = tuple[str, object]


def run_decoder(chunks: list[bytes], **kwargs: object) -> Outcome:
    """Feed chunks then EOF; ('ok', (headers, body, trailing)) or ('error', status_hint)."""
    decoder = scgi.Decoder(**kwargs)  # type: ignore[arg-type]
    headers: scgi.HeaderList | None = None
    body = b""
    try:
        for chunk in [*chunks, b""]:
            decoder.receive_data(chunk)
            while (event := decoder.next_event()) is not scgi.NEED_DATA:
                if isinstance(event, scgi.Headers):
                    headers = event.headers
                elif isinstance(event, scgi.Body):
                    body += event.data
    except ProtocolError as exc:
        return "error", exc.status_hint
    assert decoder.done, "no error, yet the message did not end at EOF"
    return "ok", (headers, body, decoder.trailing_data)


# --- round trip --------------------------------------------------------------------------


@ROUND_TRIP
@given(headers=header_lists(), body=st.binary(max_size=300), data=st.data())
def test_round_trip_at_random_split_points(
    headers: scgi.HeaderList, body: bytes, data: st.DataObject
) -> None:
    encoded = scgi.encode(headers, body)
    expected = [(b"CONTENT_LENGTH", b"%d" % len(body)), *headers]
    assert scgi.decode(encoded) == (expected, body)
    chunks = data.draw(splits(encoded))
    assert run_decoder(chunks) == ("ok", (expected, body, b""))


@ROUND_TRIP
@given(pairs=st.lists(st.tuples(text_names, text_values), max_size=8, unique_by=lambda p: p[0]))
def test_round_trip_of_text_headers_is_utf8(pairs: list[tuple[str, str]]) -> None:
    headers, body = scgi.decode(scgi.encode(pairs, b"x"))
    assert headers[1:] == [(n.encode(), v.encode()) for n, v in pairs]
    assert body == b"x"


@ROUND_TRIP
@given(
    pairs=st.lists(st.tuples(st.sampled_from([b"HTTP_A", b"HTTP_B"]), values), max_size=6),
    data=st.data(),
)
def test_round_trip_with_duplicates(pairs: scgi.HeaderList, data: st.DataObject) -> None:
    encoded = scgi.encode(pairs, allow_duplicates=True)
    chunks = data.draw(splits(encoded))
    assert run_decoder(chunks, allow_duplicates=True) == (
        "ok",
        ([(b"CONTENT_LENGTH", b"0"), *pairs], b"", b""),
    )


# --- fuzz: only ProtocolError ----------------------------------------------------------------


@FUZZ
@given(raw=any_input, dupes=st.booleans())
def test_decode_returns_or_raises_protocol_error(raw: bytes, dupes: bool) -> None:
    expected = reference_decode(raw, dupes)
    try:
        headers, body = scgi.decode(raw, allow_duplicates=dupes)
    except ProtocolError as exc:
        assert exc.status_hint in (400, 431)
        assert expected is None, f"refused a valid message: {exc}"
        return
    assert (headers, body) == expected
    # Re-encoding gives the same bytes, but for CONTENT_LENGTH, which encode()
    # writes canonically ("00" is accepted, as RFC 9110's 1*DIGIT, and written "0").
    canonical = raw.replace(
        b"CONTENT_LENGTH\x00" + headers[0][1] + b"\x00",
        b"CONTENT_LENGTH\x00" + b"%d" % int(headers[0][1]) + b"\x00",
        1,
    )
    netstring = canonical.partition(b":")[2]
    canonical = b"%d:" % (len(netstring) - 1 - len(body)) + netstring
    assert scgi.encode(headers, body, allow_duplicates=dupes) == canonical


@FUZZ
@given(
    raw=any_input,
    data=st.data(),
    dupes=st.booleans(),
    max_block=st.sampled_from([8, 64, scgi.MAX_BLOCK_SIZE]),
)
def test_decoder_agrees_with_itself_whatever_the_chunking(
    raw: bytes, data: st.DataObject, dupes: bool, max_block: int
) -> None:
    whole = run_decoder([raw] if raw else [], allow_duplicates=dupes, max_block=max_block)
    bytewise = run_decoder(
        [raw[i : i + 1] for i in range(len(raw))], allow_duplicates=dupes, max_block=max_block
    )
    chunked = run_decoder(data.draw(splits(raw)), allow_duplicates=dupes, max_block=max_block)
    assert whole == bytewise == chunked
    if whole[0] == "ok" and max_block == scgi.MAX_BLOCK_SIZE:
        headers, body, trailing = whole[1]  # type: ignore[misc]
        if not trailing:
            assert scgi.decode(raw, allow_duplicates=dupes) == (headers, body)


@st.composite
def feeds(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    """What successive recvmsg calls could return: (bytes, number of fds)."""
    if draw(st.booleans()):
        chunk = st.one_of(st.binary(max_size=64), mutated_messages())
        return draw(st.lists(st.tuples(chunk, st.integers(0, 3)), max_size=6))
    raw = draw(st.one_of(valid_messages(), mutated_messages(), structural_mutations()))
    chunks = draw(splits(raw))
    first = st.sampled_from([1, 1, 1, 0, 0, 2])
    later = st.sampled_from([0, 0, 0, 0, 1])
    return [(chunk, draw(first if i == 0 else later)) for i, chunk in enumerate(chunks)]


@FUZZ
@given(
    sock_type=st.sampled_from([socket.SOCK_STREAM, socket.SOCK_SEQPACKET]),
    chunks=feeds(),
    eof=st.booleans(),
    max_body=st.sampled_from([0, 16, message.MAX_ALREADY_READ]),
)
def test_handoff_reader_returns_or_raises_protocol_error(
    sock_type: int, chunks: list[tuple[bytes, int]], eof: bool, max_body: int
) -> None:
    reader = HandoffReader(sock_type, max_body=max_body)
    fds_seen: list[int] = []
    try:
        for data, nfds in chunks:
            reader.receive(data, nfds)
            fds_seen.append(nfds)
            record = reader.next_record()
            if record is NEED_DATA:
                continue
            if record is CLOSED:
                assert data == b""
                return
            assert isinstance(record, HandoffRecord)
            check_fd_rules(record, nfds, fds_seen)
            if record.format in (Format.SCGI, Format.PLAIN_SCGI):
                return  # the connection now belongs to the caller
        if eof:
            reader.receive(b"", 0)
            assert reader.next_record() is CLOSED
    except ProtocolError as exc:
        assert exc.status_hint in (400, 413, 431)


class DecoderOnlyReader(HandoffReader):
    """A HandoffReader without its whole-handoff fast path."""

    def _whole(self, data: bytes) -> bool:
        return False


def read_all(
    chunks: list[tuple[bytes, int]], max_body: int, fast: bool
) -> list[object]:
    """Every record, signal or error a HandoffReader gives for ``chunks``."""
    reader = (HandoffReader if fast else DecoderOnlyReader)(socket.SOCK_STREAM, max_body=max_body)
    seen: list[object] = []
    try:
        for data, nfds in chunks:
            reader.receive(data, nfds)
            while isinstance(record := reader.next_record(), HandoffRecord):
                seen.append(record)
            seen.append(record)
            if reader.trailing_data:
                seen.append(("trailing", reader.trailing_data))
            if record is CLOSED:
                break  # one handoff per connection: the rest is the caller's
    except ProtocolError as exc:
        seen.append(("error", exc.status_hint, str(exc)))
    return seen


@FUZZ
@given(
    raws=st.lists(
        st.one_of(valid_messages(), mutated_messages(), structural_mutations()),
        min_size=1,
        max_size=3,
    ),
    channel=st.booleans(),
    max_body=st.sampled_from([0, 16, message.MAX_ALREADY_READ]),
)
def test_whole_handoff_fast_path_agrees_with_the_decoder(
    raws: list[bytes], channel: bool, max_body: int
) -> None:
    """A handoff that arrives in one read skips the incremental decoder; the
    records and errors must be the same as the decoder's, byte for byte."""
    if channel:
        raws = [channel_handoff(raw) for raw in raws]
    chunks = [(raw, 1) for raw in raws if raw]
    assert read_all(chunks, max_body, fast=True) == read_all(chunks, max_body, fast=False)


def channel_handoff(raw: bytes) -> bytes:
    """``raw`` with HANDOFF_CHANNEL=1 added to its header block, if it parses."""
    try:
        headers, body = scgi.decode(raw, allow_duplicates=True)
    except ProtocolError:
        return raw
    return scgi.encode([*headers, (b"HANDOFF_CHANNEL", b"1")], body, allow_duplicates=True)


def check_fd_rules(record: HandoffRecord, nfds: int, fds_seen: list[int]) -> None:
    """A record only ever comes out with the fds its format requires, and
    repeated SCGI names only from nginx fd_pass."""
    if record.format in (Format.SCGI, Format.PLAIN_SCGI):
        names = [name for name, _ in record.headers]
        repeated = {name for name in names if names.count(name) > 1}
        if repeated:
            # Only HTTP_* names, one pair per header line: nginx fd_pass, and
            # nginx scgi_pass before 1.23 (plain SCGI).
            assert all(name.startswith(b"HTTP_") for name in repeated), repeated
            fd_pass = scgi.header_value(record.headers, b"SCGI") == b"1+fd_pass"
            assert fd_pass or record.format is Format.PLAIN_SCGI
    if record.format in (Format.PAYLOAD, Format.BYTE):
        assert nfds == 1
    elif record.format is Format.SCGI:
        assert fds_seen[0] == 1 and sum(fds_seen) == 1
        assert len(record.body) == int(scgi.header_value(record.headers, b"CONTENT_LENGTH") or 0)
    else:
        assert sum(fds_seen) == 0
        announced = int(scgi.header_value(record.headers, b"CONTENT_LENGTH") or 0)
        assert len(record.body) + record.remaining == announced


def acceptable_handoff(headers: scgi.HeaderList) -> bool:
    """Repeated names are tolerated from nginx fd_pass only, and only HTTP_* ones."""
    names = [name for name, _ in headers]
    repeated = {name for name in names if names.count(name) > 1}
    if not repeated:
        return True
    fd_pass = scgi.header_value(headers, b"SCGI") == b"1+fd_pass"
    return fd_pass and all(name.startswith(b"HTTP_") for name in repeated)


@FUZZ
@given(raw=st.one_of(valid_messages(), structural_mutations()), data=st.data())
def test_handoff_reader_agrees_with_the_reference_at_any_split(
    raw: bytes, data: st.DataObject
) -> None:
    chunks = data.draw(splits(raw))
    reader = HandoffReader(socket.SOCK_STREAM)
    fed = 0
    try:
        for i, chunk in enumerate(chunks):
            reader.receive(chunk, 1 if i == 0 else 0)
            fed += len(chunk)
            record = reader.next_record()
            if record is not NEED_DATA:
                break
        else:
            reader.receive(b"", 0)
            raise AssertionError(f"no record and no error at EOF: {reader.next_record()!r}")
    except ProtocolError:
        expected = reference_decode(raw, allow_duplicates=True)
        assert expected is None or not acceptable_handoff(expected[0]), "valid handoff refused"
        return
    assert isinstance(record, HandoffRecord)
    if not raw[:1].isdigit():  # not a netstring: a one-byte marker, by the detection rules
        assert record == HandoffRecord(Format.BYTE, marker=raw[:1]) and len(chunks[0]) == 1
        return
    assert record.format is Format.SCGI
    # The record is the message; whatever followed it is trailing data or unread.
    message_bytes = raw[: fed - len(reader.trailing_data)]
    assert reader.trailing_data + b"".join(chunks[i + 1 :]) == raw[len(message_bytes) :]
    assert reference_decode(message_bytes, allow_duplicates=True) == (record.headers, record.body)
    assert acceptable_handoff(record.headers)
