"""Handoff records: what travels with a client fd, in every peer's format (sans-IO).

Three formats exist in the wild (byte layouts in docs/protocol.md):

``Format.SCGI``
    An SCGI netstring describing the request, the fd attached to its first
    byte, then ``CONTENT_LENGTH`` bytes the sender had already read from the
    client.  One new ``SOCK_STREAM`` connection per handoff.  Sent by nginx's
    ``fd_pass`` module (``SCGI=1+fd_pass``, ``CONTENT_LENGTH=0``) and by the
    fdhandoff front (also ``SCGI=1+fd_pass``: SCGI 1 with the fd attached).
``Format.PAYLOAD``
    One ``SOCK_SEQPACKET`` record: an opaque payload (Apache's
    ``X-Handoff-Data`` value), or the single byte ``\\x00`` meaning "no
    payload", with the fd attached.  Sent by Apache ``mod_socket_handoff``.
``Format.BYTE``
    One marker byte per fd, possibly many on one persistent ``SOCK_STREAM``
    connection: ``\\x00`` (Apache ``mod_proxy_fdpass``), ``X`` (OpenResty
    handoff), ``\\x01`` (the fd-pass toy).  Nothing else describes the request.

An SCGI handoff whose description carries ``HANDOFF_CHANNEL`` = ``1`` asks
for a *channel* (docs/protocol.md): the receiver keeps the connection, writes
one :data:`CHANNEL_ACK` byte per handoff it has taken, and reads the next
SCGI handoff from the same connection.  A receiver that does not know the
header takes one handoff and closes, which the sender also understands.

Detection (:func:`detect_format`): a ``SOCK_SEQPACKET`` connection carries
PAYLOAD records; on ``SOCK_STREAM`` a first byte that is an ASCII digit starts
an SCGI netstring, any other byte is a BYTE marker.  No marker in use is a
digit, and a netstring always starts with one.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from . import scgi
from .errors import ProtocolError

__all__ = [
    "APACHE_EMPTY_PAYLOAD",
    "CHANNEL_ACK",
    "CHANNEL_HEADER",
    "CLOSED",
    "MAX_ALREADY_READ",
    "MAX_PAYLOAD_SIZE",
    "NEED_DATA",
    "Format",
    "HandoffReader",
    "HandoffRecord",
    "Signal",
    "decode_payload",
    "detect_format",
    "encode_byte",
    "encode_payload",
    "encode_scgi",
]

#: Apache mod_socket_handoff's largest payload: the sender's SO_SNDBUF (212992
#: by default on Linux) minus 32 bytes of record overhead.  A receiver's
#: SEQPACKET buffer must hold this much, or records are truncated (MSG_TRUNC).
MAX_PAYLOAD_SIZE: Final = 212960

#: What Apache sends when there is no X-Handoff-Data: one NUL byte, because an
#: empty SEQPACKET record cannot carry an fd on every kernel.
APACHE_EMPTY_PAYLOAD: Final = b"\x00"

#: Marker bytes known per sender, for logs and docs.
KNOWN_MARKERS: Final = {
    b"\x00": "mod_proxy_fdpass",
    b"X": "openresty",
    b"\x01": "fd-pass",
}


#: Largest number of already-read client bytes accepted after an SCGI handoff
#: netstring.  The fdhandoff front sends none (it never reads past the head)
#: and nginx fd_pass sends none.  1 MiB leaves room for other senders while
#: bounding what one handoff can make a receiver buffer.
MAX_ALREADY_READ: Final = 1024 * 1024


#: SCGI header by which a sender offers a channel (value ``1``): more handoffs
#: follow on this connection once the receiver acknowledges this one.  With
#: ``0`` (or ``1``) it also says that the sender waits for that acknowledgement
#: (the ACK, or the close) and answers the client itself if it gives up.
CHANNEL_HEADER: Final = b"HANDOFF_CHANNEL"

#: What a receiver writes on a channel for each handoff it has taken, in
#: order: ASCII ACK.  Any other byte is a protocol error.
CHANNEL_ACK: Final = b"\x06"


class _Signal(Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


#: The type of :data:`NEED_DATA` and :data:`CLOSED`.
Signal = _Signal

#: :meth:`HandoffReader.next_record`: feed more bytes first.
NEED_DATA: Final = _Signal.NEED_DATA
#: :meth:`HandoffReader.next_record`: the sender closed cleanly between records.
CLOSED: Final = _Signal.CLOSED


class Format(Enum):
    SCGI = "scgi"
    PAYLOAD = "payload"
    BYTE = "byte"
    #: Plain SCGI, no fd: the request (and its body) arrive on the UNIX
    #: connection itself and the response goes back on it (nginx scgi_pass,
    #: Apache mod_proxy_scgi, any SCGI client).
    PLAIN_SCGI = "plain-scgi"


@dataclass(frozen=True, slots=True)
class HandoffRecord:
    """What arrived with one fd.

    ``headers``: SCGI pairs in wire order (SCGI only).  ``body``: bytes the
    sender already read from the client (the SCGI body).  ``payload``: the raw
    PAYLOAD record (``b""`` when Apache sent its empty marker).  ``marker``:
    the BYTE format's byte.  ``remaining``: see :class:`HandoffReader`.
    ``channel``: an SCGI handoff that came on a channel (acknowledge it with
    :data:`CHANNEL_ACK`; more may follow on the connection).  ``waits``: its
    sender (the fdhandoff front, :data:`CHANNEL_HEADER` present) holds the
    client until the handoff is taken, and answers it ``503`` itself if that
    takes too long.  ``abandoned``: such a handoff read only after its sender
    had closed the connection, so after it gave up on it: the client has its
    answer already and must get no other (see
    :class:`~fdhandoff.fdpass.Assembly`).
    """

    format: Format
    headers: scgi.HeaderList = field(default_factory=list)
    body: bytes = b""
    payload: bytes = b""
    marker: bytes = b""
    #: PLAIN_SCGI only: body bytes not yet read from the connection.
    remaining: int = 0
    channel: bool = False
    waits: bool = False
    abandoned: bool = False


def detect_format(first: bytes, sock_type: int) -> Format:
    """Tell the format from the socket type and the first byte received."""
    if sock_type == socket.SOCK_SEQPACKET:
        return Format.PAYLOAD
    if sock_type != socket.SOCK_STREAM:
        raise ProtocolError(
            f"handoffs arrive on SOCK_STREAM or SOCK_SEQPACKET, not type {sock_type}"
        )
    if not first:
        raise ProtocolError("no bytes arrived with the fd")
    if first[:1].isdigit():
        return Format.SCGI
    return Format.BYTE


def encode_scgi(
    headers: scgi.HeaderList | list[tuple[str | bytes, str | bytes]],
    already_read: bytes = b"",
) -> bytes:
    """SCGI handoff message; ``already_read`` follows it, counted by CONTENT_LENGTH."""
    return scgi.encode(headers, already_read)


def encode_payload(payload: bytes) -> bytes:
    """Apache mod_socket_handoff record: the payload verbatim, ``\\x00`` if empty."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"handoff payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return payload or APACHE_EMPTY_PAYLOAD


def decode_payload(record: bytes) -> HandoffRecord:
    """Decode one SEQPACKET record (Apache format)."""
    if not record:
        raise ProtocolError("empty handoff record")
    payload = b"" if record == APACHE_EMPTY_PAYLOAD else record
    return HandoffRecord(Format.PAYLOAD, payload=payload)


def encode_byte(marker: bytes = b"\x01") -> bytes:
    """One marker byte (BYTE format); must not be an ASCII digit."""
    if len(marker) != 1 or marker.isdigit():
        raise ValueError("a BYTE-format marker is one byte that is not an ASCII digit")
    return marker


def decode_byte(marker: bytes) -> HandoffRecord:
    """Decode one BYTE-format marker."""
    if len(marker) != 1 or marker.isdigit():
        raise ProtocolError(f"not a handoff marker byte: {marker!r}")
    return HandoffRecord(Format.BYTE, marker=marker)


def record_from_scgi(headers: scgi.HeaderList, body: bytes) -> HandoffRecord:
    """Wrap a decoded SCGI message."""
    return HandoffRecord(Format.SCGI, headers=headers, body=body)


class HandoffReader:
    """Turns what one UNIX connection delivers into :class:`HandoffRecord` s (sans-IO).

    The I/O layer calls :meth:`receive` once per ``recvmsg`` with the bytes and
    the number of fds that came with them (``b""`` = EOF), then
    :meth:`next_record`.  It enforces where fds may appear: every PAYLOAD
    record and every BYTE marker carries exactly one, an SCGI handoff carries
    one on its first bytes and none after.  For SCGI, duplicate header names
    are accepted only from nginx ``fd_pass`` (``SCGI=1+fd_pass``), which does
    not merge repeated request headers, and on plain SCGI (no fd), which
    nginx ``scgi_pass`` before 1.23 sends with repeats too; anyone else must
    follow the spec.

    After an SCGI record the connection is not reused for handoffs; bytes that
    follow (nginx's kTLS-RX-less relay) are in :attr:`trailing_data` and the
    connection is the caller's.  Except on a channel (``HANDOFF_CHANNEL``):
    there the bytes after one handoff are the next handoff, whose fd comes
    with the ``recvmsg`` in which its first byte arrives.  A ``recvmsg`` on a
    stream socket stops after the data that carried an fd (unix(7)), so one
    read holds at most the end of one handoff and the start of the next, and
    its fd is the next one's.  One read can therefore complete two records;
    :meth:`next_record` hands them out in order.

    ``io`` is for the I/O layer: :class:`fdhandoff.fdpass.Assembly` keeps the
    fds of records not yet handed out there, so they survive between calls.
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_channel",
        "_closed",
        "_decoder",
        "_error",
        "_failed",
        "_format",
        "_headers",
        "_max_block",
        "_max_body",
        "_records",
        "_scgi_started",
        "_sock_type",
        "io",
        "trailing_data",
    )

    def __init__(
        self,
        sock_type: int,
        *,
        max_block: int = scgi.MAX_BLOCK_SIZE,
        max_body: int = MAX_ALREADY_READ,
    ) -> None:
        self._sock_type = sock_type
        self._format: Format | None = None
        self._decoder = scgi.Decoder(max_block=max_block, allow_duplicates=True)
        self._headers: scgi.HeaderList | None = None
        self._body: list[bytes] = []
        self._max_block = max_block
        self._max_body = max_body
        self._records: list[HandoffRecord] = []
        self._closed = False
        self._failed = False
        self._error: ProtocolError | None = None
        self._scgi_started = False
        self._channel = False
        self._body_size = 0
        self.trailing_data = b""
        self.io: object = None

    @property
    def format(self) -> Format | None:
        """The detected format, once the first bytes arrived."""
        return self._format

    def receive(self, data: bytes, nfds: int) -> None:
        """Feed what one ``recvmsg`` returned: ``data`` and how many fds came with it.

        An error in a handoff that starts in the same read as the end of a good
        one is raised by :meth:`next_record` once the good one has been handed
        out: the outcome of a handoff never depends on where the kernel cut the
        stream.
        """
        if self._failed:
            raise ProtocolError("handoff reader already failed")
        try:
            self._receive(data, nfds)
        except ProtocolError:
            self._failed = True
            raise

    def _receive(self, data: bytes, nfds: int) -> None:
        if self._records or self._closed:
            raise RuntimeError("next_record() must be called before feeding more data")
        if not data:
            if nfds:
                raise ProtocolError("fd arrived without data")
            self._eof()
            return
        first = self._format is None
        if first:
            self._format = detect_format(data, self._sock_type)
        if self._format is Format.PAYLOAD:
            if nfds != 1:
                raise ProtocolError(f"handoff record carries {nfds} fds, expected 1")
            self._records.append(decode_payload(data))
        elif self._format is Format.BYTE:
            if nfds != 1 or len(data) != 1:
                if first and nfds == 1:
                    # The first read: what was sent is most likely a broken
                    # netstring (a sign, a space), not a run of markers.
                    raise ProtocolError(
                        f"handoff starting {data[:16]!r} is neither an SCGI netstring (the "
                        "length must start with a digit) nor a one-byte marker "
                        f"({len(data)} bytes came with the fd)"
                    )
                raise ProtocolError(
                    f"marker handoff delivered {len(data)} bytes with {nfds} fds, expected 1 and 1"
                )
            self._records.append(decode_byte(data))
        else:  # SCGI or PLAIN_SCGI
            self._receive_scgi(data, nfds)

    def _receive_scgi(self, data: bytes, nfds: int) -> None:
        if nfds > 1:
            raise ProtocolError(f"{nfds} fds arrived with one handoff, expected 1")
        if nfds and not self._scgi_started and self._format is Format.SCGI and self._whole(data):
            return
        unclaimed = nfds  # the fd of the handoff that starts in this read
        if not self._scgi_started:
            if self._channel:
                unclaimed = self._claim_fd(unclaimed)
            elif nfds == 0:
                self._format = Format.PLAIN_SCGI
            else:
                unclaimed = 0
            self._scgi_started = True
        self._decoder.receive_data(data)
        self._drain()
        # On a channel the bytes past one handoff start the next.
        while self._channel and not self._scgi_started and self.trailing_data:
            data, self.trailing_data = self.trailing_data, b""
            unclaimed = self._claim_fd(unclaimed)
            self._scgi_started = True
            try:
                self._decoder.receive_data(data)
                self._drain()
            except ProtocolError as exc:
                if not self._records:
                    raise
                # This handoff is broken, not the one this read finished:
                # that one is still handed out, then the error is raised.
                self._failed = True
                self._error = exc
                return
        if unclaimed:
            raise ProtocolError("a second fd arrived inside one SCGI handoff")

    def _whole(self, data: bytes) -> bool:
        """Record a handoff that starts and ends in ``data`` with its fd; True if done.

        The usual case (one ``sendmsg`` per handoff) without the incremental
        decoder.  False, with nothing changed, for anything else: the decoder,
        still fresh, then reads the same bytes and gives the verdict, so both
        paths accept and refuse the same handoffs.
        """
        parsed = scgi.parse_whole(data, self._max_block)
        if parsed is None:
            return False
        headers, length, end = parsed
        rest = len(data) - end - length
        if length > self._max_body or rest < 0:
            return False  # 413, or the body is still on its way
        # One dict instead of a scan per name looked up: the hot path.
        env = dict(headers)
        if len(env) != len(headers):  # repeated names: only nginx fd_pass may
            try:
                _check_duplicates(headers)
            except ProtocolError:
                return False
            env = dict(reversed(headers))  # the first value counts, as header_value
        offer = env.get(CHANNEL_HEADER)
        channel = offer == b"1"
        if channel and rest:
            return False  # bytes of another handoff without its fd: an error
        body = data[end : end + length] if length else b""
        record = HandoffRecord(
            Format.SCGI, headers=headers, body=body, channel=channel, waits=offer is not None
        )
        self._records.append(record)
        self._channel = channel
        if not channel:
            self._closed = True  # one SCGI message per connection
            self.trailing_data = data[end + length :]
        return True

    @staticmethod
    def _claim_fd(unclaimed: int) -> int:
        if not unclaimed:
            raise ProtocolError("a handoff on a channel arrived without its fd")
        return 0

    def _eof(self) -> None:
        scgi_format = self._format in (Format.SCGI, Format.PLAIN_SCGI)
        if scgi_format and self._scgi_started and not self._decoder.done:
            self._decoder.receive_data(b"")
            self._drain()  # raises: EOF inside the message
        self._closed = True

    def _drain(self) -> None:
        while True:
            event = self._decoder.next_event()
            if isinstance(event, scgi.Headers):
                if self._format is Format.PLAIN_SCGI:
                    # nginx scgi_pass before 1.23 (Debian 12 ships 1.22) sends
                    # one HTTP_* pair per header line: repeats are kept, in order.
                    _check_duplicates(event.headers, http_repeats=True)
                    self._headers = event.headers
                    continue
                _check_duplicates(event.headers)
                if event.content_length > self._max_body:
                    raise ProtocolError(
                        f"handoff announces {event.content_length} already-read bytes, "
                        f"more than the limit of {self._max_body}",
                        status_hint=413,
                    )
                self._headers = event.headers
            elif isinstance(event, scgi.Body):
                self._body.append(event.data)
                self._body_size += len(event.data)
                if self._body_size > self._max_body:
                    raise ProtocolError(
                        f"more than {self._max_body} already-read bytes follow the handoff",
                        status_hint=413,
                    )
            elif isinstance(event, scgi.End):
                assert self._headers is not None
                # Bytes past the message are never dropped, whatever the format.
                self.trailing_data = self._decoder.trailing_data
                if self._format is Format.PLAIN_SCGI:
                    self._release_plain()
                    return
                self._finish_scgi(self._headers)
                return
            else:
                # Plain SCGI: release once past the netstring's ',' so the
                # caller reads nothing but body from the connection.
                if self._format is Format.PLAIN_SCGI and self._decoder.in_body:
                    self._release_plain()
                return

    def _finish_scgi(self, headers: scgi.HeaderList) -> None:
        offer = scgi.header_value(headers, CHANNEL_HEADER)
        channel = offer == b"1"
        body = b"".join(self._body)
        self._records.append(
            HandoffRecord(
                Format.SCGI, headers=headers, body=body, channel=channel, waits=offer is not None
            )
        )
        self._channel = channel
        if not channel:
            self._closed = True  # one SCGI message per connection
            return
        # Ready for the next handoff on the channel.
        self._decoder = scgi.Decoder(max_block=self._max_block, allow_duplicates=True)
        self._headers = None
        self._body = []
        self._body_size = 0
        self._scgi_started = False

    def _release_plain(self) -> None:
        assert self._headers is not None
        total = int(scgi.header_value(self._headers, b"CONTENT_LENGTH") or b"0")
        body = b"".join(self._body)
        self._records.append(
            HandoffRecord(
                Format.PLAIN_SCGI, headers=self._headers, body=body, remaining=total - len(body)
            )
        )
        self._closed = True  # the connection is the client from here on

    def next_record(self) -> HandoffRecord | _Signal:
        """The next record completed by :meth:`receive`, ``NEED_DATA`` or ``CLOSED``.

        Raises the :class:`ProtocolError` of a later, broken handoff once the
        records completed before it have been handed out.
        """
        if self._records:
            return self._records.pop(0)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return CLOSED if self._closed else NEED_DATA


def _check_duplicates(headers: scgi.HeaderList, *, http_repeats: bool = False) -> None:
    """Refuse repeated names, but for the ``HTTP_*`` repeats of the senders that
    send one pair per header line (nginx ``fd_pass``, ``http_repeats``: nginx
    ``scgi_pass`` before 1.23).  A repeated CGI variable (two ``REQUEST_METHOD``
    or ``REMOTE_ADDR``) has no such excuse: whichever one a reader takes, another
    component may take the other (the SCGI specification: names are unique)."""
    names = [name for name, _ in headers]
    if len(set(names)) == len(names):
        return
    dupes = sorted({n for n in names if names.count(n) > 1})
    if http_repeats or scgi.header_value(headers, b"SCGI") == b"1+fd_pass":
        dupes = [name for name in dupes if not name.startswith(b"HTTP_")]
        if not dupes:
            return
        raise ProtocolError(f"duplicate SCGI header names {dupes!r} (only HTTP_* may repeat)")
    raise ProtocolError(f"duplicate SCGI header names {dupes!r} (only nginx fd_pass may repeat)")
