"""Strict, sans-IO SCGI codec.

An SCGI request (https://python.ca/scgi/protocol.txt) is a netstring whose
payload is a block of NUL-terminated name/value strings, followed by exactly
``CONTENT_LENGTH`` body bytes::

    <len>":"<name>NUL<value>NUL ... ","<body>

The spec requires ``CONTENT_LENGTH`` to be the first header (decimal digits,
``0`` when there is no body), ``SCGI`` to be ``1``, and header names to be
unique.  This module accepts exactly that, plus two documented compatibility
points: ``SCGI`` may be ``1+fd_pass`` (what nginx's ``fd_pass`` module sends)
or absent (nginx ``scgi_pass`` without ``scgi_params``), and duplicate names
are accepted when the caller asks for it (``allow_duplicates=True``), because
nginx ``fd_pass`` sends one ``HTTP_*`` pair per header line without merging.

Everything here is bytes in, values out: no sockets, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, NoReturn

from .errors import ProtocolError

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_CONTENT_LENGTH_DIGITS",
    "MAX_LENGTH_DIGITS",
    "NEED_DATA",
    "Body",
    "Decoder",
    "End",
    "Event",
    "HeaderList",
    "Headers",
    "decode",
    "encode",
    "encode_netstring",
    "header_value",
]

# --- limits (see docs/security.md) -----------------------------------------

#: Largest header block accepted.  nginx's biggest request head is
#: 1k + 4 x 8k (large_client_header_buffers); Apache mod_socket_handoff payloads
#: reach 212960 bytes (SO_SNDBUF - 32) and travel as HANDOFF_DATA when a route
#: asks for SCGI.  256 KiB covers both with room for the CGI variables.
MAX_BLOCK_SIZE: Final = 256 * 1024

#: Digits allowed in the netstring length prefix.  Checked while reading, so an
#: endless run of digits is refused before any block is buffered; 9 digits are
#: far above any block limit a caller could sensibly set.
MAX_LENGTH_DIGITS: Final = 9

#: Digits allowed in CONTENT_LENGTH (< 10**18 bytes fits a signed 64-bit off_t,
#: the same bound HTTP servers apply to Content-Length).
MAX_CONTENT_LENGTH_DIGITS: Final = 18

#: SCGI values this codec understands: the spec's "1" and nginx fd_pass's.
SCGI_VERSIONS: Final = (b"1", b"1+fd_pass")

HeaderList = list[tuple[bytes, bytes]]
_Text = str | bytes


# --- events -----------------------------------------------------------------


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by :meth:`Decoder.next_event` when more bytes must be fed first.
NEED_DATA: Final = _NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Headers:
    """The complete header block, pairs in wire order."""

    headers: HeaderList
    content_length: int


@dataclass(frozen=True, slots=True)
class Body:
    """A fragment of the request body (never empty)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """The message is complete; bytes after it are in ``Decoder.trailing_data``."""


Event = Headers | Body | End


# --- encoding -----------------------------------------------------------------


def _as_bytes(value: _Text, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"SCGI {what} must be str or bytes, not {type(value).__name__}")


def encode_netstring(payload: bytes) -> bytes:
    """``<len>:<payload>,`` with the length in decimal, no leading zeros."""
    return b"%d:%s," % (len(payload), payload)


def encode(
    headers: Iterable[tuple[_Text, _Text]],
    body: bytes = b"",
    *,
    allow_duplicates: bool = False,
    max_block: int = MAX_BLOCK_SIZE,
) -> bytes:
    """Encode one SCGI request.

    ``CONTENT_LENGTH`` is placed first.  When ``headers`` do not give it, it is
    ``len(body)``; when they do, the given value is kept (so a sender may
    stream the body separately after encoding only the head) but must equal
    ``len(body)`` whenever ``body`` is not empty.  ``str`` names and values are
    encoded as UTF-8.  Raises ``ValueError`` for empty names, NUL bytes, a bad
    ``CONTENT_LENGTH``, an ``SCGI`` value :func:`decode` refuses, a repeated
    ``SCGI``, duplicate names (unless ``allow_duplicates``), or a header block
    larger than ``max_block`` (which :func:`decode` would refuse).  A given
    ``CONTENT_LENGTH`` is written in canonical form (``"05"`` becomes ``5``).
    """
    pairs: HeaderList = []
    content_length: bytes | None = None
    seen: set[bytes] = set()
    for raw_name, raw_value in headers:
        name = _as_bytes(raw_name, "header name")
        value = _as_bytes(raw_value, "header value")
        if not name:
            raise ValueError("SCGI header name must not be empty")
        if b"\x00" in name or b"\x00" in value:
            raise ValueError(f"SCGI header {name!r} contains a NUL byte")
        if name == b"CONTENT_LENGTH":
            if content_length is not None:
                raise ValueError("CONTENT_LENGTH given twice")
            # raises ProtocolError (a ValueError); re-encoded so no leading zeros
            content_length = b"%d" % _parse_content_length(value)
            continue
        # Never produce a message decode() refuses: SCGI is unique and one of
        # the versions this codec speaks, whatever allow_duplicates says.
        if name == b"SCGI" and (value not in SCGI_VERSIONS or name in seen):
            raise ValueError(f"SCGI header must appear once with a value in {SCGI_VERSIONS!r}")
        if name in seen and not allow_duplicates:
            raise ValueError(f"duplicate SCGI header name {name!r}")
        seen.add(name)
        pairs.append((name, value))
    if content_length is None:
        content_length = b"%d" % len(body)
    elif body and int(content_length) != len(body):
        raise ValueError(
            f"CONTENT_LENGTH {content_length.decode()} does not match a {len(body)}-byte body"
        )
    parts = [b"CONTENT_LENGTH\x00", content_length, b"\x00"]
    for name, value in pairs:
        parts += (name, b"\x00", value, b"\x00")
    block = b"".join(parts)
    if len(block) > max_block:
        raise ValueError(
            f"SCGI header block of {len(block)} bytes exceeds the limit of {max_block}"
        )
    return encode_netstring(block) + body


# --- decoding -----------------------------------------------------------------


def _parse_content_length(value: bytes) -> int:
    # Decimal digits only: int() would also take "+0", " 1", "1_0" and "٣".
    if not value or not value.isdigit() or not value.isascii():
        raise ProtocolError(f"CONTENT_LENGTH is not a decimal number: {value!r}")
    if len(value) > MAX_CONTENT_LENGTH_DIGITS:
        raise ProtocolError(f"CONTENT_LENGTH has more than {MAX_CONTENT_LENGTH_DIGITS} digits")
    return int(value)


def _check_repeats(names: list[bytes], allow_duplicates: bool) -> None:
    """Raise for the first repeated name that is not allowed (names has repeats)."""
    if allow_duplicates:
        # nginx fd_pass repeats request headers, never these two.
        for name in (b"CONTENT_LENGTH", b"SCGI"):
            if names.count(name) > 1:
                raise ProtocolError(f"duplicate SCGI header name {name!r}")
        return
    seen: set[bytes] = set()
    for name in names:  # one pass: a block may hold thousands of names
        if name in seen:
            raise ProtocolError(f"duplicate SCGI header name {name!r}")
        seen.add(name)


def parse_block(block: bytes, *, allow_duplicates: bool = False) -> tuple[HeaderList, int]:
    """Split a netstring payload into header pairs; return them and CONTENT_LENGTH."""
    if not block:
        raise ProtocolError("empty SCGI header block: CONTENT_LENGTH is missing")
    if not block.endswith(b"\x00"):
        raise ProtocolError("SCGI header block does not end with NUL (length ends mid-string)")
    strings = block[:-1].split(b"\x00")
    if len(strings) % 2:
        raise ProtocolError("SCGI header block holds an odd number of strings")
    names = strings[::2]
    values = strings[1::2]
    if names[0] != b"CONTENT_LENGTH":
        raise ProtocolError(f"first SCGI header is {names[0]!r}, not CONTENT_LENGTH")
    content_length = _parse_content_length(values[0])
    # Whole-list operations rather than a loop per pair: this runs once per
    # handoff on the receiver's hot path.
    if b"" in names:
        raise ProtocolError("empty SCGI header name")
    if len(set(names)) != len(names):
        _check_repeats(names, allow_duplicates)
    if b"SCGI" in names:
        version = values[names.index(b"SCGI")]
        if version not in SCGI_VERSIONS:
            raise ProtocolError(f"unsupported SCGI version {version!r}")
    return list(zip(names, values, strict=True)), content_length


def parse_whole(data: bytes, max_block: int = MAX_BLOCK_SIZE) -> tuple[HeaderList, int, int] | None:
    """``(headers, CONTENT_LENGTH, end of the netstring)`` when ``data`` starts
    with one whole, valid netstring; None for anything else.

    The fast path for a message that arrived in one read, as every sender
    writes it (one ``sendmsg`` per handoff): one scan instead of the
    :class:`Decoder`'s event steps.  It accepts exactly what the Decoder
    accepts (same length rules, same :func:`parse_block`, duplicates allowed)
    and says None rather than raising, so a caller falls back to the Decoder
    for the verdict on anything incomplete or invalid: one source of errors.
    """
    colon = data.find(b":", 0, MAX_LENGTH_DIGITS + 1)
    if colon < 1:
        return None
    digits = data[:colon]
    # Netstring length: ASCII digits, no leading zero.
    if not (digits.isdigit() and digits.isascii()) or (colon > 1 and data[0] == 0x30):
        return None
    end = colon + 1 + int(digits)
    if end - colon - 1 > max_block or len(data) <= end or data[end] != 0x2C:  # ','
        return None
    try:
        headers, length = parse_block(data[colon + 1 : end], allow_duplicates=True)
    except ProtocolError:
        return None
    return headers, length, end + 1


class _State(Enum):
    LENGTH = 1
    BLOCK = 2
    BODY = 3
    DONE = 4
    FAILED = 5


class Decoder:
    """Incremental SCGI decoder (sans-IO).

    Feed bytes with :meth:`receive_data` (``b""`` means EOF), then call
    :meth:`next_event` until it returns :data:`NEED_DATA`.  Events come in the
    order ``Headers``, ``Body``\\* , ``End``.  ``Headers`` comes only once the
    netstring's closing ``,`` has arrived, so a caller never acts on a
    malformed message.  Body bytes are handed out by the next
    :meth:`next_event`, never accumulated; only the header block is buffered,
    up to ``max_block`` bytes, and a length prefix longer than
    :data:`MAX_LENGTH_DIGITS` is refused as it is fed.  Bytes fed after the end
    of the message are kept in :attr:`trailing_data` (nginx fd_pass relays
    decrypted client bytes there when only kTLS TX is offloaded).  After a
    :class:`ProtocolError` the decoder stays failed and raises again on every
    call.
    """

    __slots__ = (
        "_allow_duplicates",
        "_block_len",
        "_buf",
        "_eof",
        "_error",
        "_max_block",
        "_remaining",
        "_state",
        "_trailing",
    )

    def __init__(self, *, max_block: int = MAX_BLOCK_SIZE, allow_duplicates: bool = False) -> None:
        self._max_block = max_block
        self._allow_duplicates = allow_duplicates
        self._buf = bytearray()
        self._state = _State.LENGTH
        self._block_len = 0
        self._remaining = 0
        self._eof = False
        self._error: ProtocolError | None = None
        self._trailing = bytearray()

    @property
    def trailing_data(self) -> bytes:
        """Bytes fed after the end of the message."""
        return bytes(self._trailing)

    @property
    def done(self) -> bool:
        """True once :class:`End` has been returned."""
        return self._state is _State.DONE

    @property
    def in_body(self) -> bool:
        """True once the netstring (headers and ',') has been consumed."""
        return self._state in (_State.BODY, _State.DONE)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes; ``b""`` signals end of input."""
        if self._error is not None:
            raise self._error
        if self._eof and data:
            raise RuntimeError("receive_data() called after EOF")
        if not data:
            self._eof = True
        elif self._state is _State.DONE:
            self._trailing += data
        else:
            self._buf += data
            if (
                self._state is _State.LENGTH
                and len(self._buf) > MAX_LENGTH_DIGITS
                and self._buf.find(b":", 0, MAX_LENGTH_DIGITS + 1) < 0
            ):
                # Refuse a runaway length prefix now, not when the caller
                # next asks for an event: nothing unbounded is kept.  With no
                # ':' in reach, _read_length() can only raise here.
                self.next_event()

    def next_event(self) -> Event | _NeedData:
        """Return the next event, or :data:`NEED_DATA`."""
        if self._error is not None:
            raise self._error
        try:
            return self._step()
        except ProtocolError as exc:
            self._fail(exc)

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self._state = _State.FAILED
        self._error = exc
        self._buf.clear()
        raise exc

    def _step(self) -> Event | _NeedData:
        state = self._state
        if state is _State.LENGTH:
            return self._read_length()
        if state is _State.BLOCK:
            return self._read_block()
        if state is _State.BODY:
            return self._read_body()
        return NEED_DATA  # DONE: nothing more ever

    def _need(self, where: str) -> _NeedData:
        if self._eof:
            raise ProtocolError(f"connection closed inside the SCGI {where}")
        return NEED_DATA

    def _read_length(self) -> Event | _NeedData:
        buf = self._buf
        colon = buf.find(b":", 0, MAX_LENGTH_DIGITS + 1)
        digits = bytes(buf[:colon]) if colon >= 0 else bytes(buf[: MAX_LENGTH_DIGITS + 1])
        # Netstring length: ASCII digits only, no sign, no spaces, no leading zero.
        if not (digits.isdigit() and digits.isascii()) and digits:
            raise ProtocolError(f"SCGI netstring length is not decimal digits: {digits[:16]!r}")
        if len(digits) > 1 and digits.startswith(b"0"):
            raise ProtocolError("SCGI netstring length has a leading zero")
        if colon < 0:
            if len(digits) > MAX_LENGTH_DIGITS:
                raise ProtocolError("SCGI netstring length prefix is too long", status_hint=431)
            return self._need("netstring length")
        if not digits:
            raise ProtocolError("SCGI netstring has no length before ':'")
        self._block_len = int(digits)
        if self._block_len > self._max_block:
            raise ProtocolError(
                f"SCGI header block of {self._block_len} bytes exceeds the limit of "
                f"{self._max_block}",
                status_hint=431,
            )
        del buf[: colon + 1]
        self._state = _State.BLOCK
        return self._read_block()

    def _read_block(self) -> Event | _NeedData:
        # The block and its closing ',' must both be here before anything is
        # released (netstring framing, SCGI spec section "Protocol").
        if len(self._buf) <= self._block_len:
            return self._need(
                "header block" if len(self._buf) < self._block_len else "netstring terminator"
            )
        if self._buf[self._block_len] != ord(","):
            raise ProtocolError("SCGI netstring is not terminated by ','")
        block = bytes(self._buf[: self._block_len])
        headers, self._remaining = parse_block(block, allow_duplicates=self._allow_duplicates)
        del self._buf[: self._block_len + 1]
        self._state = _State.BODY
        return Headers(headers, self._remaining)

    def _read_body(self) -> Event | _NeedData:
        if self._remaining == 0:
            self._state = _State.DONE
            self._trailing = self._buf
            self._buf = bytearray()
            return End()
        if not self._buf:
            return self._need("body")
        chunk = bytes(self._buf[: self._remaining])
        del self._buf[: len(chunk)]
        self._remaining -= len(chunk)
        return Body(chunk)


def decode(
    data: bytes, *, allow_duplicates: bool = False, max_block: int = MAX_BLOCK_SIZE
) -> tuple[HeaderList, bytes]:
    """Decode one complete SCGI message; return ``(headers, body)``.

    Raises :class:`~fdhandoff.errors.ProtocolError` if the message is invalid,
    incomplete, or followed by extra bytes.
    """
    decoder = Decoder(max_block=max_block, allow_duplicates=allow_duplicates)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    headers: HeaderList = []
    body: list[bytes] = []
    while True:
        event = decoder.next_event()
        if isinstance(event, Headers):
            headers = event.headers
        elif isinstance(event, Body):
            body.append(event.data)
        elif isinstance(event, End):
            break
        else:  # NEED_DATA after EOF cannot happen: _need() raises instead
            raise ProtocolError("incomplete SCGI message")
    if decoder.trailing_data:
        raise ProtocolError(f"{len(decoder.trailing_data)} unexpected bytes after the SCGI message")
    return headers, b"".join(body)


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` in ``headers``, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None
