"""Handoff records: what travels with a client fd, in every peer's format (sans-IO).

Three formats exist in the wild (byte layouts in docs/protocol.md):

``Format.SCGI``
    An SCGI netstring describing the request, the fd attached to its first
    byte, then ``CONTENT_LENGTH`` bytes the sender had already read from the
    client.  One new ``SOCK_STREAM`` connection per handoff.  Sent by nginx's
    ``fd_pass`` module (``SCGI=1+fd_pass``, ``CONTENT_LENGTH=0``) and by the
    fdhandoff front (``SCGI=1``).
``Format.PAYLOAD``
    One ``SOCK_SEQPACKET`` record: an opaque payload (Apache's
    ``X-Handoff-Data`` value), or the single byte ``\\x00`` meaning "no
    payload", with the fd attached.  Sent by Apache ``mod_socket_handoff``.
``Format.BYTE``
    One marker byte per fd, possibly many on one persistent ``SOCK_STREAM``
    connection: ``\\x00`` (Apache ``mod_proxy_fdpass``), ``X`` (OpenResty
    handoff), ``\\x01`` (the fd-pass toy).  Nothing else describes the request.

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
#: netstring.  The fdhandoff front sends none on plain TCP and at most one TLS
#: read (<= 64 KiB) otherwise; nginx fd_pass sends none.  1 MiB leaves room for
#: other senders while bounding what one handoff can make a receiver buffer.
MAX_ALREADY_READ: Final = 1024 * 1024


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
    """

    format: Format
    headers: scgi.HeaderList = field(default_factory=list)
    body: bytes = b""
    payload: bytes = b""
    marker: bytes = b""
    #: PLAIN_SCGI only: body bytes not yet read from the connection.
    remaining: int = 0


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
    not merge repeated request headers; anyone else must follow the spec.

    After an SCGI record the connection is not reused for handoffs; bytes that
    follow (nginx's kTLS-RX-less relay) are in :attr:`trailing_data` and the
    connection is the caller's.
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_decoder",
        "_failed",
        "_format",
        "_headers",
        "_max_body",
        "_record",
        "_scgi_started",
        "_sock_type",
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
        self._max_body = max_body
        self._record: HandoffRecord | _Signal = NEED_DATA
        self._failed = False
        self._scgi_started = False
        self._body_size = 0
        self.trailing_data = b""

    @property
    def format(self) -> Format | None:
        """The detected format, once the first bytes arrived."""
        return self._format

    def receive(self, data: bytes, nfds: int) -> None:
        """Feed what one ``recvmsg`` returned: ``data`` and how many fds came with it."""
        if self._failed:
            raise ProtocolError("handoff reader already failed")
        try:
            self._receive(data, nfds)
        except ProtocolError:
            self._failed = True
            raise

    def _receive(self, data: bytes, nfds: int) -> None:
        if self._record is not NEED_DATA:
            raise RuntimeError("next_record() must be called before feeding more data")
        if not data:
            if nfds:
                raise ProtocolError("fd arrived without data")
            self._eof()
            return
        if self._format is None:
            self._format = detect_format(data, self._sock_type)
        if self._format is Format.PAYLOAD:
            if nfds != 1:
                raise ProtocolError(f"handoff record carries {nfds} fds, expected 1")
            self._record = decode_payload(data)
        elif self._format is Format.BYTE:
            if nfds != 1 or len(data) != 1:
                raise ProtocolError(
                    f"marker handoff delivered {len(data)} bytes with {nfds} fds, expected 1 and 1"
                )
            self._record = decode_byte(data)
        else:  # SCGI or PLAIN_SCGI
            self._receive_scgi(data, nfds)

    def _receive_scgi(self, data: bytes, nfds: int) -> None:
        if not self._scgi_started and nfds == 0:
            self._format = Format.PLAIN_SCGI
        if (
            nfds > 1
            or (self._scgi_started and nfds)
            or (self._format is Format.PLAIN_SCGI and nfds)
        ):
            raise ProtocolError("a second fd arrived inside one SCGI handoff")
        self._scgi_started = True
        self._decoder.receive_data(data)
        self._drain()

    def _eof(self) -> None:
        if self._format in (Format.SCGI, Format.PLAIN_SCGI) and not self._decoder.done:
            self._decoder.receive_data(b"")
            self._drain()  # raises: EOF inside the message
        self._record = CLOSED

    def _drain(self) -> None:
        while True:
            event = self._decoder.next_event()
            if isinstance(event, scgi.Headers):
                _check_duplicates(event.headers)
                if self._format is Format.PLAIN_SCGI:
                    self._headers = event.headers
                    continue
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
                self._record = record_from_scgi(self._headers, b"".join(self._body))
                return
            else:
                # Plain SCGI: release once past the netstring's ',' so the
                # caller reads nothing but body from the connection.
                if self._format is Format.PLAIN_SCGI and self._decoder.in_body:
                    self._release_plain()
                return

    def _release_plain(self) -> None:
        assert self._headers is not None
        total = int(scgi.header_value(self._headers, b"CONTENT_LENGTH") or b"0")
        body = b"".join(self._body)
        self._record = HandoffRecord(
            Format.PLAIN_SCGI, headers=self._headers, body=body, remaining=total - len(body)
        )

    def next_record(self) -> HandoffRecord | _Signal:
        """The record completed by the last :meth:`receive`, ``NEED_DATA`` or ``CLOSED``."""
        record, self._record = self._record, NEED_DATA
        if isinstance(record, HandoffRecord) and record.format in (
            Format.SCGI,
            Format.PLAIN_SCGI,
        ):
            self._record = CLOSED  # one SCGI message per connection
        return record


def _check_duplicates(headers: scgi.HeaderList) -> None:
    if scgi.header_value(headers, b"SCGI") == b"1+fd_pass":
        return
    names = [name for name, _ in headers]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ProtocolError(
            f"duplicate SCGI header names {dupes!r} (only nginx fd_pass may repeat)"
        )
