"""Channels at the reader level: many SCGI handoffs on one UNIX connection.

A channel (``HANDOFF_CHANNEL=1``, docs/protocol.md) carries SCGI handoffs back
to back, each sent with one ``sendmsg`` whose ``SCM_RIGHTS`` rides on its
first byte.  A ``recvmsg`` on a stream socket stops after the data that
carried an fd (unix(7)), so one read never holds the first bytes of two
handoffs, but it can hold the end of one handoff and the start (or the whole)
of the next, with the next one's fd.  The tests below feed
:class:`~fdhandoff.message.HandoffReader` every such cut of a stream (the fd
on the read that holds each handoff's first byte) and check which record
comes out of which read; then :class:`~fdhandoff.fdpass.Assembly` pairs each
record with the right fd; then the blocking and asyncio ``recv_handoff`` take
three handoffs from one real connection, each client fd checked by writing
through it.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import itertools
import socket
import termios
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdhandoff import aio, fdpass, message
from fdhandoff.errors import FdPassError, ProtocolError
from fdhandoff.message import (
    CHANNEL_HEADER,
    CLOSED,
    NEED_DATA,
    Format,
    HandoffReader,
    HandoffRecord,
)

STREAM = socket.SOCK_STREAM
WAIT = 10.0  # generous: the machine is small and shared

T = TypeVar("T")
Result = HandoffRecord | message.Signal
Read = tuple[bytes, int]  # what one recvmsg returned: the bytes and how many fds

# libuv opens a process-wide signal pipe the first time a uvloop loop is
# created and keeps it for the life of the process: create it before any
# fd-leak accounting starts.
uvloop.new_event_loop().close()


# --- building channel streams ------------------------------------------------------------


def handoff(
    n: int, *, body: bytes = b"", channel: bytes | None = b"1"
) -> tuple[bytes, HandoffRecord]:
    """Handoff number ``n`` as the front sends it, and the record it must decode to."""
    pairs = [(b"SCGI", b"1"), (b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/r%d" % n)]
    if channel is not None:
        pairs.append((CHANNEL_HEADER, channel))
    data = message.encode_scgi(pairs, body)
    headers = [(b"CONTENT_LENGTH", b"%d" % len(body)), *pairs]
    record = HandoffRecord(
        Format.SCGI,
        headers=headers,
        body=body,
        channel=channel == b"1",
        waits=channel is not None,
    )
    return data, record


@dataclass(frozen=True)
class Stream:
    """Handoffs back to back as they travel on one connection, then ``tail`` (no fd)."""

    parts: tuple[bytes, ...]
    records: tuple[HandoffRecord, ...]
    tail: bytes = b""

    @classmethod
    def of(cls, *handoffs: tuple[bytes, HandoffRecord], tail: bytes = b"") -> Stream:
        return cls(tuple(h[0] for h in handoffs), tuple(h[1] for h in handoffs), tail)

    @property
    def data(self) -> bytes:
        return b"".join(self.parts) + self.tail

    @property
    def starts(self) -> list[int]:
        """Offset of each handoff's first byte: where its fd rides."""
        return list(itertools.accumulate((len(p) for p in self.parts[:-1]), initial=0))

    @property
    def ends(self) -> list[int]:
        """Offset just past each handoff (its already-read bytes included)."""
        return list(itertools.accumulate(len(p) for p in self.parts))


# A body that looks like the start of another handoff: only CONTENT_LENGTH
# tells the reader it is already-read client bytes.
LOOKALIKE_BODY = b"25:CONTENT_LENGTH\x000\x00SCGI\x001\x00,\x00\xff"

TWO = Stream.of(handoff(1), handoff(2))
THREE = Stream.of(handoff(1), handoff(2, body=LOOKALIKE_BODY), handoff(3))
STREAMS = {"two": TWO, "three-with-body": THREE}


def reads_for(stream: Stream, cuts: Iterable[int]) -> list[Read] | None:
    """The recvmsg results of reading ``stream`` in pieces ending at ``cuts``.

    Each read carries one fd if a handoff starts in it.  None when a read
    would hold the first bytes of two handoffs, which the kernel never
    delivers (a stream ``recvmsg`` stops after the data that carried an fd).
    """
    data = stream.data
    bounds = [0, *sorted(set(cuts)), len(data)]
    reads: list[Read] = []
    for lo, hi in itertools.pairwise(bounds):
        fds = sum(lo <= start < hi for start in stream.starts)
        if fds > 1:
            return None
        reads.append((data[lo:hi], fds))
    return reads


def every_reading(stream: Stream) -> Iterator[list[Read]]:
    """Every way worth trying to read ``stream``.

    Whole handoffs; byte by byte; every placement of the boundaries between
    handoffs (the read that brings handoff k's fd may begin anywhere after
    handoff k-1's first byte, so it ends k-1 and starts k); and the
    whole-handoff reading cut once more at every position.
    """
    data, starts = stream.data, stream.starts
    readings: list[Iterable[int]] = [starts[1:], range(1, len(data))]
    readings += itertools.product(*(range(a + 1, b + 1) for a, b in itertools.pairwise(starts)))
    readings += ([*starts[1:], extra] for extra in range(1, len(data)))
    for cuts in readings:
        reads = reads_for(stream, cuts)
        assert reads is not None  # each of these keeps one handoff start per read
        yield reads


def drain(reader: HandoffReader) -> list[Result]:
    """Everything next_record() has now, up to NEED_DATA (left out) or CLOSED."""
    out: list[Result] = []
    while True:
        result = reader.next_record()
        if result is NEED_DATA:
            return out
        out.append(result)
        if result is CLOSED:
            return out


def feed(reader: HandoffReader, reads: Sequence[Read]) -> tuple[list[list[Result]], list[Read]]:
    """Feed reads the way the I/O layer does; per read, what came out of it.

    Stops after CLOSED (nothing may be fed after it) and returns the reads
    left unfed.
    """
    per_read: list[list[Result]] = []
    for index, (data, fds) in enumerate(reads):
        reader.receive(data, fds)
        per_read.append(drain(reader))
        if per_read[-1] and per_read[-1][-1] is CLOSED:
            return per_read, list(reads[index + 1 :])
    return per_read, []


def offsets(reads: Sequence[Read]) -> list[int]:
    """Where each read starts in the stream."""
    return list(itertools.accumulate((len(d) for d, _ in reads[:-1]), initial=0))


def expected_per_read(stream: Stream, reads: Sequence[Read]) -> list[list[Result]]:
    """Each record comes out of the read that holds its last byte, never later."""
    out: list[list[Result]] = []
    hi = 0
    for data, _ in reads:
        lo, hi = hi, hi + len(data)
        out.append(
            [r for r, end in zip(stream.records, stream.ends, strict=True) if lo < end <= hi]
        )
    return out


# --- the reader: successive records at every cut -------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_channel_handoffs_come_out_of_the_read_that_ends_them(name: str) -> None:
    stream = STREAMS[name]
    readings = 0
    for reads in every_reading(stream):
        readings += 1
        reader = HandoffReader(STREAM)
        per_read, unfed = feed(reader, reads)
        assert per_read == expected_per_read(stream, reads), reads
        assert unfed == []
        assert reader.format is Format.SCGI
        assert reader.trailing_data == b""
        # The sender closes between records: a clean end of the channel.
        reader.receive(b"", 0)
        assert reader.next_record() is CLOSED
    assert readings > len(stream.data)  # the cuts were really enumerated


def test_one_read_ends_a_handoff_and_starts_the_next_with_its_fd() -> None:
    (first, first_record), (second, second_record) = handoff(1), handoff(2)
    for cut in range(1, len(first)):
        for into_next in range(1, len(second)):
            reader = HandoffReader(STREAM)
            reader.receive(first[:cut], 1)
            assert reader.next_record() is NEED_DATA
            # The end of the first and the start of the second, with the
            # second's fd: the first comes out, the fd waits for the second.
            reader.receive(first[cut:] + second[:into_next], 1)
            assert drain(reader) == [first_record]
            reader.receive(second[into_next:], 0)
            assert drain(reader) == [second_record]


def test_one_read_ends_a_handoff_and_holds_all_of_the_next() -> None:
    (first, first_record), (second, second_record) = handoff(1), handoff(2, body=LOOKALIKE_BODY)
    for cut in range(1, len(first)):
        reader = HandoffReader(STREAM)
        reader.receive(first[:cut], 1)
        assert reader.next_record() is NEED_DATA
        reader.receive(first[cut:] + second, 1)
        # Two records from one read, in order; the reader then waits again.
        assert drain(reader) == [first_record, second_record]
        assert reader.next_record() is NEED_DATA


def test_records_must_be_taken_before_feeding_more() -> None:
    (first, _), (second, _) = handoff(1), handoff(2)
    reader = HandoffReader(STREAM)
    reader.receive(first[:5], 1)
    assert reader.next_record() is NEED_DATA
    reader.receive(first[5:] + second, 1)
    assert isinstance(reader.next_record(), HandoffRecord)
    # One record is still queued: feeding now would reorder handoffs.
    with pytest.raises(RuntimeError):
        reader.receive(handoff(3)[0], 1)


def test_already_read_bytes_on_a_channel_at_every_split() -> None:
    body = bytes(range(0, 256, 3)) + LOOKALIKE_BODY
    stream = Stream.of(handoff(1, body=body), handoff(2, body=b"x"), handoff(3, body=body))
    for reads in every_reading(stream):
        reader = HandoffReader(STREAM)
        per_read, _ = feed(reader, reads)
        assert per_read == expected_per_read(stream, reads)
        assert [r.body for rs in per_read for r in rs if isinstance(r, HandoffRecord)] == [
            body,
            b"x",
            body,
        ]


@pytest.mark.parametrize("value", [b"0", b"", b"yes", b"11", b"1 "])
def test_only_the_value_1_asks_for_a_channel(value: bytes) -> None:
    data, record = handoff(1, channel=value)
    assert record.channel is False
    reader = HandoffReader(STREAM)
    reader.receive(data + b"after", 1)
    # Not a channel: one handoff, and what follows is the caller's.
    assert drain(reader) == [record, CLOSED]
    assert reader.trailing_data == b"after"


def test_plain_scgi_asking_for_a_channel_is_not_one() -> None:
    """No fd: the connection itself is the client, whatever the header says."""
    data, _ = handoff(1)
    reader = HandoffReader(STREAM)
    reader.receive(data + b"body", 0)
    record = reader.next_record()
    assert isinstance(record, HandoffRecord)
    assert record.format is Format.PLAIN_SCGI
    assert record.channel is False
    assert reader.next_record() is CLOSED


# --- the end of a channel ------------------------------------------------------------------

RELAYED = b"\x17\x03\x03relayed after the last handoff"


def test_a_handoff_without_the_header_ends_the_channel_at_every_split() -> None:
    stream = Stream.of(handoff(1), handoff(2), handoff(3, channel=None), tail=RELAYED)
    last_end = stream.ends[-1]
    for reads in every_reading(stream):
        reader = HandoffReader(STREAM)
        per_read, unfed = feed(reader, reads)
        expected = expected_per_read(stream, reads)
        # CLOSED follows the last record in the same read; nothing is fed after it.
        closing = next(i for i, rs in enumerate(expected) if stream.records[-1] in rs)
        assert per_read == [*expected[:closing], [*expected[closing], CLOSED]]
        assert not stream.records[-1].channel
        # The bytes after it are never dropped: kept, or still on the connection.
        assert reader.trailing_data + b"".join(d for d, _ in unfed) == RELAYED
        fed_to = sum(len(d) for d, _ in reads[: closing + 1])
        assert reader.trailing_data == stream.data[last_end:fed_to]


def test_eof_between_channel_records_is_closed() -> None:
    for reads in every_reading(THREE):
        reader = HandoffReader(STREAM)
        feed(reader, reads)
        reader.receive(b"", 0)
        assert reader.next_record() is CLOSED


def test_eof_inside_any_channel_handoff_is_a_protocol_error(no_fd_leak: None) -> None:
    for stop in range(1, len(THREE.data)):
        if stop in THREE.ends:
            continue  # between records: a clean end, tested above
        reads = reads_for(THREE, [*THREE.starts[1:], stop])
        assert reads is not None
        reader = HandoffReader(STREAM)
        feed(reader, reads[: offsets(reads).index(stop)])  # everything before ``stop``
        with pytest.raises(ProtocolError, match="closed inside"):
            reader.receive(b"", 0)


# --- where the fds may be -----------------------------------------------------------------


def test_a_channel_handoff_without_its_fd_is_refused(no_fd_leak: None) -> None:
    """Every reading of TWO with the fd of the second handoff taken away."""
    for reads in every_reading(TWO):
        second = next(i for i, (_, fds) in enumerate(reads) if fds and i > 0)
        broken = [(d, 0 if i == second else fds) for i, (d, fds) in enumerate(reads)]
        reader = HandoffReader(STREAM)
        feed(reader, broken[:second])
        with pytest.raises(ProtocolError, match="without its fd"):
            reader.receive(*broken[second])
        # A failed reader stays failed: the connection is finished.
        with pytest.raises(ProtocolError, match="already failed"):
            reader.receive(b"", 0)


def test_two_handoffs_starting_in_one_read_with_one_fd_are_refused() -> None:
    (first, _), (second, _) = handoff(1), handoff(2)
    with pytest.raises(ProtocolError, match="without its fd"):
        HandoffReader(STREAM).receive(first + second, 1)


def test_an_fd_arriving_inside_a_channel_handoff_is_refused(no_fd_leak: None) -> None:
    data, starts = TWO.data, TWO.starts
    for extra in range(1, len(data)):
        if extra in starts:
            continue  # that is where the fds belong
        cuts = sorted({*starts[1:], extra})
        reads = reads_for(TWO, cuts)
        assert reads is not None
        index = offsets(reads).index(extra)
        reader = HandoffReader(STREAM)
        feed(reader, reads[:index])
        with pytest.raises(ProtocolError, match="second fd"):
            reader.receive(reads[index][0], 1)


@pytest.mark.parametrize("cut", [1, 10, 30])
def test_two_fds_in_one_read_are_refused(cut: int, no_fd_leak: None) -> None:
    (first, _), (second, _) = handoff(1), handoff(2)
    reader = HandoffReader(STREAM)
    with pytest.raises(ProtocolError, match="2 fds"):
        reader.receive(first, 2)
    reader = HandoffReader(STREAM)
    reader.receive(first[:cut], 1)
    assert reader.next_record() is NEED_DATA
    with pytest.raises(ProtocolError, match="2 fds"):
        reader.receive(first[cut:] + second, 2)


def test_an_fd_with_the_bytes_after_the_last_handoff_is_refused(no_fd_leak: None) -> None:
    """After a handoff without the header nothing more may start on the connection."""
    (first, _), (last, _) = handoff(1), handoff(2, channel=None)
    reader = HandoffReader(STREAM)
    reader.receive(first, 1)
    record = reader.next_record()
    assert isinstance(record, HandoffRecord) and record.channel
    reader.receive(last[:7], 1)
    assert reader.next_record() is NEED_DATA
    with pytest.raises(ProtocolError, match="fd"):
        reader.receive(last[7:] + handoff(3)[0], 1)


# --- a property over random channels ------------------------------------------------------

NAME = st.sampled_from([b"HTTP_HOST", b"HTTP_X_A", b"REMOTE_ADDR", b"QUERY_STRING", b"HTTP_COOKIE"])
VALUE = st.binary(max_size=30).filter(lambda v: b"\x00" not in v)


@st.composite
def channel_streams(draw: st.DrawFn) -> Stream:
    """1-5 channel handoffs, maybe closed by one without the header and relayed bytes."""
    handoffs = []
    count = draw(st.integers(1, 5))
    ends_channel = draw(st.booleans())
    for n in range(count):
        pairs = draw(st.dictionaries(NAME, VALUE, max_size=4))
        headers = [(b"SCGI", b"1"), (b"REQUEST_URI", b"/p%d" % n), *pairs.items()]
        last = n == count - 1 and ends_channel
        if not last:
            headers.append((CHANNEL_HEADER, b"1"))
        body = draw(st.binary(max_size=40))
        data = message.encode_scgi(headers, body)
        full = [(b"CONTENT_LENGTH", b"%d" % len(body)), *headers]
        record = HandoffRecord(Format.SCGI, full, body=body, channel=not last, waits=not last)
        handoffs.append((data, record))
    tail = draw(st.binary(max_size=20)) if ends_channel else b""
    return Stream.of(*handoffs, tail=tail)


@st.composite
def stream_and_reads(draw: st.DrawFn) -> tuple[Stream, list[Read]]:
    """A stream and a way the kernel could deliver it: random cuts, plus one
    cut between every two handoff starts where the random ones left none."""
    stream = draw(channel_streams())
    size = len(stream.data)
    cuts = set(draw(st.lists(st.integers(1, max(1, size - 1)), max_size=12)))
    cuts.discard(size)
    for start, following in itertools.pairwise(stream.starts):
        if not any(start < cut <= following for cut in cuts):
            cuts.add(draw(st.integers(start + 1, following)))
    reads = reads_for(stream, cuts)
    assert reads is not None
    return stream, reads


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_and_reads())
def test_any_delivery_of_a_channel_gives_its_records_in_order(
    case: tuple[Stream, list[Read]],
) -> None:
    stream, reads = case
    reader = HandoffReader(STREAM)
    per_read, unfed = feed(reader, reads)
    expected = expected_per_read(stream, reads)
    if stream.records[-1].channel:
        assert per_read == expected and unfed == []
        reader.receive(b"", 0)
        assert reader.next_record() is CLOSED
    else:
        closing = len(per_read) - 1
        assert per_read == [*expected[:closing], [*expected[closing], CLOSED]]
        assert reader.trailing_data + b"".join(d for d, _ in unfed) == stream.tail


# --- Assembly: each record with its own fd ---------------------------------------------------


@pytest.fixture
def tokens(no_fd_leak: None) -> Iterator[list[socket.socket]]:
    """Three real sockets standing for three client fds (identity is what counts)."""
    pairs = [socket.socketpair() for _ in range(3)]
    yield [a for a, _ in pairs]
    for a, b in pairs:
        a.close()
        b.close()


def test_assembly_gives_each_record_the_fd_of_the_read_with_its_first_byte(
    tokens: list[socket.socket],
) -> None:
    conn, conn_peer = socket.socketpair()  # never read: Assembly.feed does no I/O
    with conn, conn_peer:
        check_every_reading(conn, tokens)


def check_every_reading(conn: socket.socket, tokens: list[socket.socket]) -> None:
    for reads in every_reading(THREE):
        reader = HandoffReader(STREAM)
        assembly = fdpass.Assembly.of(conn, reader)
        assert fdpass.Assembly.of(conn, reader) is assembly  # kept on reader.io
        fds = iter(tokens)
        got: list[tuple[HandoffRecord, socket.socket]] = []
        for data, nfds in reads:
            result = assembly.feed(data, next(fds) if nfds else None)
            while isinstance(result, tuple):
                got.append(result)
                result = assembly.next()
            assert result is NEED_DATA
        assert [record for record, _ in got] == list(THREE.records)
        assert [fd for _, fd in got] == tokens  # the same objects, in order
        assert not assembly.fds


def test_assembly_closes_every_fd_it_holds_on_error(no_fd_leak: None) -> None:
    first, _ = handoff(1)
    one, one_peer = socket.socketpair()
    two, two_peer = socket.socketpair()
    with one_peer, two_peer:
        reader = HandoffReader(STREAM)
        assembly = fdpass.Assembly.of(one_peer, reader)
        assert assembly.feed(first[:9], one) is NEED_DATA
        assert assembly.client is one
        # A second fd before the first handoff ended: both go.
        with pytest.raises(ProtocolError, match="second fd"):
            assembly.feed(first[9:20], two)
        assert one.fileno() == -1 and two.fileno() == -1
        assert not assembly.fds


# --- real connections: fdpass.recv_handoff and aio.recv_handoff --------------------------------


def unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (SIOCINQ, unix(7))."""
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


class Clients:
    """Distinguishable client connections to hand off, closed at the end."""

    def __init__(self, count: int) -> None:
        self.pairs = [socket.socketpair() for _ in range(count)]

    def handed(self, index: int) -> socket.socket:
        """What the sender passes for handoff ``index``."""
        return self.pairs[index][0]

    def check(self, index: int, got: socket.socket) -> None:
        """``got`` is client ``index``'s connection: bytes written through it come out there."""
        got.setblocking(True)
        got.sendall(b"to client %d" % index)
        peer = self.pairs[index][1]
        peer.settimeout(WAIT)
        assert peer.recv(100) == b"to client %d" % index

    def close(self) -> None:
        for a, b in self.pairs:
            a.close()
            b.close()


@pytest.fixture
def clients(no_fd_leak: None) -> Iterator[Clients]:
    made = Clients(3)
    yield made
    made.close()


@pytest.fixture
def channel(no_fd_leak: None) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver): one UNIX stream connection."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, STREAM)
    yield sender, receiver
    sender.close()
    receiver.close()


Send = Callable[[socket.socket, list[bytes], Clients], None]


def send_whole(sender: socket.socket, parts: list[bytes], clients: Clients) -> None:
    """One sendmsg per handoff, its fd on it: what the front does."""
    for index, part in enumerate(parts):
        fdpass.send_fd(sender, part, clients.handed(index).fileno(), timeout=WAIT)


def send_split(sender: socket.socket, parts: list[bytes], clients: Clients) -> None:
    """Each handoff's first bytes with its fd, the rest without (a partial
    sendmsg completed later): the rest and the next handoff meet in one read."""
    for index, part in enumerate(parts):
        fdpass.send_fd(sender, part[:7], clients.handed(index).fileno(), timeout=WAIT)
        sender.sendall(part[7:])


def send_merged(sender: socket.socket, parts: list[bytes], clients: Clients) -> None:
    """The first handoff split, the others whole: the read that ends the first
    holds all of the second, so one read completes two records."""
    send_split(sender, parts[:1], clients)
    for index, part in enumerate(parts[1:], start=1):
        fdpass.send_fd(sender, part, clients.handed(index).fileno(), timeout=WAIT)


SENDS: dict[str, Send] = {"whole": send_whole, "split": send_split, "merged": send_merged}


@pytest.mark.parametrize("how", SENDS)
def test_recv_handoff_takes_three_handoffs_from_one_connection(
    channel: tuple[socket.socket, socket.socket], clients: Clients, how: str
) -> None:
    sender, receiver = channel
    SENDS[how](sender, list(THREE.parts), clients)
    sender.shutdown(socket.SHUT_WR)
    reader = HandoffReader(STREAM)
    for index, expected in enumerate(THREE.records):
        got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
        assert got is not None
        record, client = got
        with client:
            assert record == expected
            clients.check(index, client)
    # The sender closed between records: the end of the channel.
    assert fdpass.recv_handoff(receiver, reader, timeout=WAIT) is None


def test_recv_handoff_returns_a_record_finished_by_an_earlier_read(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    """The second read ends handoff 1 and holds all of handoff 2 with fd 2:
    recv_handoff returns 1, keeps 2 (and its fd) and returns it next without I/O."""
    sender, receiver = channel
    send_merged(sender, list(THREE.parts), clients)
    reader = HandoffReader(STREAM)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    with got[1]:
        assert got[0] == THREE.records[0]
        clients.check(0, got[1])
    # Handoff 2 was read along with the end of 1; only handoff 3 is left.
    assert unread(receiver) == len(THREE.parts[2])
    assert len(fdpass.Assembly.of(receiver, reader).fds) == 1
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    with got[1]:
        assert got[0] == THREE.records[1]
        clients.check(1, got[1])
    assert unread(receiver) == len(THREE.parts[2])  # no read was needed
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    with got[1]:
        assert got[0] == THREE.records[2]
        clients.check(2, got[1])


# -- error paths on a real connection: every fd that arrived is closed ---------------------------


def assert_closed_everywhere(clients: Clients, index: int) -> None:
    """No copy of handed(index) is open any more: its peer reads EOF."""
    clients.pairs[index][0].close()  # the sender's copy
    peer = clients.pairs[index][1]
    peer.settimeout(WAIT)
    assert peer.recv(1) == b""


def test_recv_handoff_refuses_a_channel_handoff_without_its_fd(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    sender, receiver = channel
    fdpass.send_fd(sender, THREE.parts[0], clients.handed(0).fileno(), timeout=WAIT)
    sender.sendall(THREE.parts[1])  # no fd
    reader = HandoffReader(STREAM)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    got[1].close()
    with pytest.raises(ProtocolError, match="without its fd"):
        fdpass.recv_handoff(receiver, reader, timeout=WAIT)


def test_recv_handoff_closes_both_fds_when_one_arrives_mid_handoff(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    sender, receiver = channel
    fdpass.send_fd(sender, THREE.parts[0], clients.handed(0).fileno(), timeout=WAIT)
    fdpass.send_fd(sender, THREE.parts[1][:12], clients.handed(1).fileno(), timeout=WAIT)
    fdpass.send_fd(sender, THREE.parts[1][12:], clients.handed(2).fileno(), timeout=WAIT)
    reader = HandoffReader(STREAM)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    got[1].close()
    with pytest.raises(ProtocolError, match="second fd"):
        fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert_closed_everywhere(clients, 1)
    assert_closed_everywhere(clients, 2)


def test_recv_handoff_closes_the_fd_of_a_handoff_cut_by_eof(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    sender, receiver = channel
    fdpass.send_fd(sender, THREE.parts[0][:20], clients.handed(0).fileno(), timeout=WAIT)
    # The end of handoff 1, the start of 2 with its fd, then EOF.
    fdpass.send_fd(
        sender, THREE.parts[0][20:] + THREE.parts[1][:30], clients.handed(1).fileno(), timeout=WAIT
    )
    sender.close()
    reader = HandoffReader(STREAM)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    with got[1]:
        clients.check(0, got[1])
    with pytest.raises(ProtocolError, match="closed inside"):
        fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert_closed_everywhere(clients, 1)


def test_recv_handoff_closes_every_fd_when_two_come_in_one_read(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    """Handoff 1 half read (its fd held), then two fds at once: all three closed."""
    sender, receiver = channel
    fdpass.send_fd(sender, THREE.parts[0][:20], clients.handed(0).fileno(), timeout=WAIT)
    rights = array.array("i", [clients.handed(1).fileno(), clients.handed(2).fileno()])
    sender.sendmsg(
        [THREE.parts[0][20:] + THREE.parts[1]],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights.tobytes())],
    )
    with pytest.raises(FdPassError, match="2 fds"):
        fdpass.recv_handoff(receiver, HandoffReader(STREAM), timeout=WAIT)
    for index in range(3):
        assert_closed_everywhere(clients, index)


#: Not a valid start of a handoff: a netstring length has no leading zero.
BAD_START = b"024:"


def test_a_bad_handoff_after_a_finished_one_fails_only_itself(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    """Handoff 1 whole in its own read, then a broken handoff 2: 1 is delivered,
    the error comes with 2 and closes its fd."""
    sender, receiver = channel
    fdpass.send_fd(sender, THREE.parts[0], clients.handed(0).fileno(), timeout=WAIT)
    fdpass.send_fd(sender, BAD_START, clients.handed(1).fileno(), timeout=WAIT)
    reader = HandoffReader(STREAM)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    with got[1]:
        clients.check(0, got[1])
    with pytest.raises(ProtocolError):
        fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert_closed_everywhere(clients, 1)


def test_a_bad_handoff_starting_in_the_read_that_ends_one_fails_only_itself(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    """The same bytes as above, cut so that one read ends handoff 1 and brings
    the broken start of 2 with its fd: the outcome must not depend on the cut."""
    sender, receiver = channel
    fdpass.send_fd(sender, THREE.parts[0][:20], clients.handed(0).fileno(), timeout=WAIT)
    fdpass.send_fd(
        sender, THREE.parts[0][20:] + BAD_START, clients.handed(1).fileno(), timeout=WAIT
    )
    reader = HandoffReader(STREAM)
    try:
        got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
        assert got is not None
        with got[1]:
            clients.check(0, got[1])
        with pytest.raises(ProtocolError):
            fdpass.recv_handoff(receiver, reader, timeout=WAIT)
        assert_closed_everywhere(clients, 1)
    finally:
        fdpass.Assembly.of(receiver, reader).close()  # whatever it still holds


def test_recv_handoff_timeout_inside_a_channel_handoff_closes_its_fd(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    sender, receiver = channel
    fdpass.send_fd(sender, THREE.parts[0], clients.handed(0).fileno(), timeout=WAIT)
    fdpass.send_fd(sender, THREE.parts[1][:10], clients.handed(1).fileno(), timeout=WAIT)
    reader = HandoffReader(STREAM)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None
    got[1].close()
    with pytest.raises(TimeoutError):
        fdpass.recv_handoff(receiver, reader, timeout=0.2)  # the rest never comes
    assert_closed_everywhere(clients, 1)


# -- the asyncio twin, under asyncio's own loop and uvloop ---------------------------------------

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop: str, coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, WAIT * 3)

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(bounded())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("how", SENDS)
def test_aio_recv_handoff_takes_three_handoffs_from_one_connection(
    channel: tuple[socket.socket, socket.socket], clients: Clients, how: str, loop: str
) -> None:
    sender, receiver = channel
    receiver.setblocking(False)

    async def take_all() -> list[tuple[HandoffRecord, socket.socket] | None]:
        reader = HandoffReader(STREAM)
        # Start reading before anything is sent: the handoffs arrive while it waits.
        first = asyncio.ensure_future(aio.recv_handoff(receiver, reader))
        await asyncio.sleep(0)
        SENDS[how](sender, list(THREE.parts), clients)
        sender.shutdown(socket.SHUT_WR)
        taken = [await first]
        for _ in range(3):
            taken.append(await aio.recv_handoff(receiver, reader))
        return taken

    taken = run_on(loop, take_all())
    assert taken[-1] is None  # the clean end of the channel
    for index, got in enumerate(taken[:-1]):
        assert got is not None
        record, client = got
        with client:
            assert record == THREE.records[index]
            clients.check(index, client)


@pytest.mark.parametrize("loop", LOOPS)
def test_aio_recv_handoff_cancelled_inside_a_channel_handoff_closes_its_fd(
    channel: tuple[socket.socket, socket.socket], clients: Clients, loop: str
) -> None:
    sender, receiver = channel
    receiver.setblocking(False)
    fdpass.send_fd(sender, THREE.parts[0], clients.handed(0).fileno(), timeout=WAIT)
    fdpass.send_fd(sender, THREE.parts[1][:10], clients.handed(1).fileno(), timeout=WAIT)

    async def take() -> None:
        reader = HandoffReader(STREAM)
        got = await aio.recv_handoff(receiver, reader)
        assert got is not None
        got[1].close()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the rest of handoff 2 never comes
                await aio.recv_handoff(receiver, reader)

    run_on(loop, take())
    assert_closed_everywhere(clients, 1)


# --- handoffs read after the sender closed ---------------------------------------------------


def recv_blocking(receiver: socket.socket, reader: HandoffReader) -> Any:
    return fdpass.recv_handoff(receiver, reader, timeout=WAIT)


def recv_asyncio(receiver: socket.socket, reader: HandoffReader) -> Any:
    receiver.setblocking(False)

    async def take() -> Any:
        async with asyncio.timeout(WAIT):
            return await aio.recv_handoff(receiver, reader)

    return asyncio.run(take())


@pytest.mark.parametrize("recv", [recv_blocking, recv_asyncio], ids=["blocking", "asyncio"])
@pytest.mark.parametrize(
    ("offer", "abandoned"),
    [(b"1", True), (b"0", True), (None, False)],
    ids=["channel", "no-channel", "nginx"],
)
def test_a_handoff_read_after_the_sender_closed_comes_out_abandoned(
    channel: tuple[socket.socket, socket.socket],
    clients: Clients,
    recv: Callable[[socket.socket, HandoffReader], Any],
    offer: bytes | None,
    abandoned: bool,
) -> None:
    """The fdhandoff front (HANDOFF_CHANNEL, either value) closes the connection
    when it gives up on handoffs left unread, and answers their clients 503
    itself; the kernel still delivers them.  nginx fd_pass closes right after
    every sendmsg: its handoffs are never abandoned."""
    sender, receiver = channel
    data, expected = handoff(1, channel=offer)
    fdpass.send_fd(sender, data, clients.handed(0).fileno(), timeout=WAIT)
    sender.close()
    got = recv(receiver, HandoffReader(STREAM))
    assert got is not None
    record, client = got
    with client:
        assert record.waits is (offer is not None)
        assert record.abandoned is abandoned
        assert record.headers == expected.headers
        clients.check(0, client)  # the fd itself comes out either way: the caller closes it


def test_a_half_close_is_not_giving_up_and_only_reads_after_the_close_are_abandoned(
    channel: tuple[socket.socket, socket.socket], clients: Clients
) -> None:
    """A sender's shutdown(SHUT_WR) still reads acknowledgements: its handoffs
    are taken.  Of the handoffs on a channel, those read before the close are
    not abandoned, those read after it are."""
    sender, receiver = channel
    reader = HandoffReader(STREAM)
    fdpass.send_fd(sender, handoff(1)[0], clients.handed(0).fileno(), timeout=WAIT)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None and not got[0].abandoned
    got[1].close()
    fdpass.send_fd(sender, handoff(2)[0], clients.handed(1).fileno(), timeout=WAIT)
    fdpass.send_fd(sender, handoff(3)[0], clients.handed(2).fileno(), timeout=WAIT)
    sender.shutdown(socket.SHUT_WR)
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None and not got[0].abandoned
    got[1].close()
    sender.close()
    got = fdpass.recv_handoff(receiver, reader, timeout=WAIT)
    assert got is not None and got[0].abandoned
    got[1].close()
    assert fdpass.recv_handoff(receiver, reader, timeout=WAIT) is None
