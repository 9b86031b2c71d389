"""WebSocket (RFC 6455) for the receiver: opening handshake and frame codec, sans-IO.

:class:`WebSocket` turns received bytes into events (:class:`Message`,
:class:`Ping`, :class:`Pong`, :class:`Close`) and events to send into bytes.
It is built to sit on thousands of idle connections: an idle object is a
handful of slots (no buffer, no queue, no ``__dict__``); a receive buffer exists
only while a frame is partly received, and message state only while a message
is.  Payloads are unmasked and UTF-8-checked as they arrive, so a bad or
oversized message is refused as soon as it can be told apart, and a frame
header announcing more than ``max_message_size`` is refused from the header
alone, before a single payload byte is kept.

After a protocol violation the close frame to send is in :meth:`data_to_send`,
:meth:`next_event` raises :class:`WebSocketProtocolError` (a
:class:`~fdhandoff.errors.ProtocolError` carrying ``close_code``), and every
later call raises it again.  The handshake functions live in
:mod:`fdhandoff.websocket_handshake`, the frame layout in
:mod:`fdhandoff.websocket_frames`; both are re-exported here.
"""

from __future__ import annotations

import codecs
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Final

from .errors import ProtocolError
from .websocket_frames import (
    MAX_CONTROL_PAYLOAD,
    MAX_REASON_BYTES,
    CloseCode,
    Opcode,
    apply_mask,
    encode_close_payload,
    encode_frame,
    is_valid_close_code,
)
from .websocket_handshake import (
    CONTINUE,
    GUID,
    SUPPORTED_VERSION,
    accept_key,
    check_key,
    check_upgrade,
    error_headers,
    error_response,
    expects_continue,
    handshake_response,
    is_token,
    parse_subprotocols,
    wants_websocket,
)

__all__ = [
    "CONTINUE",
    "GUID",
    "MAX_CONTROL_PAYLOAD",
    "MAX_MESSAGE_SIZE",
    "MAX_REASON_BYTES",
    "NEED_DATA",
    "SUPPORTED_VERSION",
    "Close",
    "CloseCode",
    "Event",
    "Message",
    "Opcode",
    "Ping",
    "Pong",
    "State",
    "WebSocket",
    "WebSocketProtocolError",
    "accept_key",
    "apply_mask",
    "check_key",
    "check_upgrade",
    "encode_close_payload",
    "encode_frame",
    "error_headers",
    "error_response",
    "expects_continue",
    "handshake_response",
    "is_token",
    "is_valid_close_code",
    "parse_subprotocols",
    "wants_websocket",
]

#: Largest message (sum of its fragments) accepted by default.  Messages are
#: delivered whole, so this bounds what one client can make the receiver hold;
#: 1 MiB is the default of the `websockets` library and wsproto's common
#: setting, ample for chat/LLM traffic.  Pass ``max_message_size`` for bigger
#: uploads.  Exceeding it closes with 1009 (see docs/security.md).
MAX_MESSAGE_SIZE: Final = 1024 * 1024


class State(Enum):
    """Where the closing handshake is (RFC 6455 §7)."""

    OPEN = 1
    CLOSING = 2  # we sent a close frame and wait for the peer's
    CLOSED = 3  # close frames exchanged, connection lost, or protocol violation


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"


#: Returned by :meth:`WebSocket.next_event` when more bytes must be fed first.
NEED_DATA: Final = _NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message: ``str`` for a text message, ``bytes`` for binary."""

    data: bytes | str


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping; the pong answering it is already queued in ``data_to_send()``."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer closed (its close frame, or ``ABNORMAL`` 1006 when the
    connection ended without one; ``NO_STATUS`` 1005 for an empty close frame)."""

    code: int
    reason: str


Event = Message | Ping | Pong | Close


class WebSocketProtocolError(ProtocolError):
    """The peer broke RFC 6455; ``close_code`` is the code of the close frame
    queued in ``data_to_send()`` (1002, 1007 or 1009)."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


def _violation(message: str, code: int = CloseCode.PROTOCOL_ERROR) -> WebSocketProtocolError:
    return WebSocketProtocolError(message, code)


_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_KNOWN_OPCODES: Final = frozenset(int(op) for op in Opcode)
# Bits of the two first header bytes (§5.2).
_FIN, _RSV, _OPCODE, _MASK, _LEN7 = 0x80, 0x70, 0x0F, 0x80, 0x7F
_LEN16, _LEN64 = 126, 127


class _Frame:
    """The frame whose payload is being received."""

    __slots__ = ("control", "fin", "mask", "offset", "opcode", "remaining")

    def __init__(self, opcode: int, fin: bool, length: int, mask: bytes | None) -> None:
        self.opcode = opcode
        self.fin = fin
        self.remaining = length
        self.mask = mask
        self.offset = 0  # payload bytes already unmasked: position in the mask
        self.control = b""  # a control frame's payload (<= 125 bytes)


class _Message:
    """The data message being received, possibly over several fragments.

    Payload goes into one bytearray, not a list of pieces: a message sent as
    one-byte fragments must not cost ~40 bytes of object per payload byte.
    """

    __slots__ = ("data", "decoder", "opcode")

    def __init__(self, opcode: int) -> None:
        self.opcode = opcode
        self.data = bytearray()
        # For text: checks UTF-8 as the pieces arrive, to fail fast (§8.1).
        self.decoder: codecs.IncrementalDecoder | None = None


class WebSocket:
    """One WebSocket connection, server side unless ``client=True`` (sans-IO).

    Feed received bytes to :meth:`receive_data` (``b""`` at EOF), then call
    :meth:`next_event` until it returns :data:`NEED_DATA`; after each batch
    write :meth:`data_to_send` (automatic pongs and close replies).  The
    ``send_*`` methods return the bytes to write.  A server requires masked
    frames and sends unmasked ones; ``client=True`` reverses both (§5.1).
    """

    __slots__ = (
        "_buf",
        "_client",
        "_eof",
        "_error",
        "_frame",
        "_max_size",
        "_msg",
        "_out",
        "_pos",
        "_state",
    )

    def __init__(self, *, max_message_size: int = MAX_MESSAGE_SIZE, client: bool = False) -> None:
        if isinstance(max_message_size, bool) or max_message_size < 0:
            raise ValueError(f"max_message_size must be >= 0, not {max_message_size!r}")
        self._max_size = max_message_size
        self._client = client
        self._state = State.OPEN
        # Unparsed bytes from self._pos on; None when there are none.  A single
        # receive_data() is kept as the caller's bytes object (no copy); only
        # bytes that must wait for more are copied into a bytearray.
        self._buf: bytes | bytearray | None = None
        self._pos = 0
        self._frame: _Frame | None = None
        self._msg: _Message | None = None
        self._out = b""  # queued automatic replies
        self._eof = False
        self._error: WebSocketProtocolError | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def error(self) -> WebSocketProtocolError | None:
        """The violation that failed the connection, if any."""
        return self._error

    # --- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; ``b""`` signals EOF."""
        if self._error is not None:
            raise self._error
        if self._eof:
            if data:
                raise RuntimeError("receive_data() called after EOF")
            return
        buf = self._buf
        if not data:
            self._eof = True
        elif self._state is State.CLOSED:
            pass  # after the peer's close frame nothing more is read (§5.5.1)
        elif buf is None:
            self._buf = data if type(data) is bytes else bytes(data)
        else:
            if isinstance(buf, bytearray):
                if self._pos:
                    del buf[: self._pos]  # cheap: bytearray moves its start, no copy
            else:
                buf = self._buf = bytearray(memoryview(buf)[self._pos :])
            self._pos = 0
            buf += data

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA`.  Raises :class:`WebSocketProtocolError`."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except WebSocketProtocolError as exc:
            self._fail(exc)
            raise

    def _next(self) -> Event | _NeedData:
        while self._state is not State.CLOSED:
            frame = self._frame
            if frame is None:
                header = self._parse_header()
                if header is None:
                    break
                opcode, fin, length, mask = header
                if fin and opcode != Opcode.CONTINUATION and self._available() >= length:
                    # Fast path: a whole unfragmented message or control frame.
                    payload = self._take(length)
                    if mask is not None:
                        payload = apply_mask(payload, mask)
                    if opcode >= Opcode.CLOSE:
                        return self._control(opcode, bytes(payload))
                    return self._whole_message(opcode, payload)
                if opcode != Opcode.CONTINUATION and opcode < Opcode.CLOSE:
                    self._msg = _Message(opcode)
                frame = self._frame = _Frame(opcode, fin, length, mask)
            event = self._read_payload(frame)
            if event is not None:
                return event
            if self._frame is not None:
                break  # payload incomplete
        if self._eof and self._state is not State.CLOSED:
            return self._lost()
        if self._pos:
            # Waiting with a partial header: keep just its bytes, not the whole
            # chunk the caller received it in.
            self._buf, self._pos = self._buf[self._pos :], 0  # type: ignore[index]
        return NEED_DATA

    def _available(self) -> int:
        return 0 if self._buf is None else len(self._buf) - self._pos

    def _take(self, n: int) -> bytes | bytearray:
        """Remove and return up to ``n`` buffered bytes."""
        buf, pos = self._buf, self._pos
        if buf is None:
            return b""
        end = pos + n
        if end >= len(buf):
            self._buf, self._pos = None, 0  # drop the buffer: idle connections hold none
            return buf[pos:] if pos else buf
        self._pos = end
        return buf[pos:end]

    def _parse_header(self) -> tuple[int, bool, int, bytes | None] | None:
        """The next frame header, validated and consumed; None until all of it is here."""
        buf, pos = self._buf, self._pos
        if buf is None:
            return None
        avail = len(buf) - pos
        if avail < 2:
            return None
        first, second = buf[pos], buf[pos + 1]
        # Every check that the first two bytes allow is made before waiting for
        # the rest of the header.
        if first & _RSV:
            raise _violation("RSV bits set but no extension was negotiated (RFC 6455 §5.2)")
        opcode, fin, masked, length = (
            first & _OPCODE,
            bool(first & _FIN),
            second & _MASK,
            second & _LEN7,
        )
        if opcode not in _KNOWN_OPCODES:
            raise _violation(f"reserved opcode {opcode} (RFC 6455 §5.2)")
        if masked and self._client:
            raise _violation("masked frame from the server (RFC 6455 §5.1)")
        if not masked and not self._client:
            raise _violation("unmasked frame from the client (RFC 6455 §5.1)")
        if opcode >= Opcode.CLOSE:
            if not fin:
                raise _violation("fragmented control frame (RFC 6455 §5.5)")
            if length > MAX_CONTROL_PAYLOAD:
                raise _violation("control frame payload over 125 bytes (RFC 6455 §5.5)")
        elif opcode == Opcode.CONTINUATION:
            if self._msg is None:
                raise _violation("continuation frame with no message to continue (RFC 6455 §5.4)")
        elif self._msg is not None:
            raise _violation("new data frame inside a fragmented message (RFC 6455 §5.4)")
        size = 2
        if length == _LEN16:
            if avail < 4:
                return None
            length, size = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            if length < _LEN16:
                raise _violation("non-minimal 16-bit payload length (RFC 6455 §5.2)")
        elif length == _LEN64:
            if avail < 10:
                return None
            length, size = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if length >> 63:
                raise _violation("64-bit payload length with the top bit set (RFC 6455 §5.2)")
            if length <= 0xFFFF:
                raise _violation("non-minimal 64-bit payload length (RFC 6455 §5.2)")
        if opcode < Opcode.CLOSE:
            # Refused from the header alone: nothing of the payload is kept.
            total = length + (len(self._msg.data) if self._msg is not None else 0)
            if total > self._max_size:
                raise _violation(
                    f"message of {total} bytes or more exceeds the limit of {self._max_size}",
                    CloseCode.MESSAGE_TOO_BIG,
                )
        mask = None
        if masked:
            if avail < size + 4:
                return None
            mask = bytes(buf[pos + size : pos + size + 4])
            size += 4
        self._take(size)
        return opcode, fin, length, mask

    def _whole_message(self, opcode: int, payload: bytes | bytearray) -> Message:
        if opcode == Opcode.BINARY:
            return Message(bytes(payload))
        try:
            return Message(payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _violation(
                f"text message is not UTF-8: {exc.reason}", CloseCode.INVALID_DATA
            ) from None

    def _read_payload(self, frame: _Frame) -> Event | None:
        """Take what is here of ``frame``'s payload; the event once it is complete."""
        taken = self._take(frame.remaining) if frame.remaining else b""
        if frame.mask is None:
            chunk = bytes(taken)
        else:
            chunk = apply_mask(taken, frame.mask, frame.offset)
            frame.offset += len(chunk)
        frame.remaining -= len(chunk)
        done = frame.remaining == 0
        if frame.opcode >= Opcode.CLOSE:
            frame.control += chunk
            if not done:
                return None
            self._frame = None
            return self._control(frame.opcode, frame.control)
        if not chunk and not done:
            return None
        self._data(chunk, done and frame.fin)
        if not done:
            return None
        self._frame = None
        if not frame.fin:
            return None  # more fragments follow
        msg = self._msg
        assert msg is not None  # created with the message's first frame header
        self._msg = None
        return self._whole_message(msg.opcode, msg.data)

    def _data(self, chunk: bytes, last: bool) -> None:
        msg = self._msg
        assert msg is not None
        msg.data += chunk
        if msg.opcode != Opcode.TEXT or last:
            return  # the last piece is checked with the whole message
        if msg.decoder is None:
            msg.decoder = _Utf8Decoder()
        try:
            msg.decoder.decode(chunk, False)
        except UnicodeDecodeError as exc:
            raise _violation(
                f"text message is not UTF-8: {exc.reason}", CloseCode.INVALID_DATA
            ) from None
        _check_pending(msg.decoder)

    def _control(self, opcode: int, payload: bytes) -> Event:
        if opcode == Opcode.PING:
            if self._state is State.OPEN:  # nothing may follow our close frame (§5.5.1)
                self._out += encode_frame(Opcode.PONG, payload, mask=self._mask())
            return Ping(payload)
        if opcode == Opcode.PONG:
            return Pong(payload)
        code, reason = _parse_close(payload)
        if self._state is State.OPEN:
            # §5.5.1: answer with a close frame, echoing the status code.
            reply = b"" if code == CloseCode.NO_STATUS else code.to_bytes(2, "big")
            self._out += encode_frame(Opcode.CLOSE, reply, mask=self._mask())
        self._closed()
        return Close(code, reason)

    def _lost(self) -> Close:
        """EOF without a close frame: 1006, which is never sent (§7.1.5)."""
        if self._frame is not None or self._msg is not None:
            reason = "connection closed in the middle of a message"
        elif self._buf is not None:
            reason = "connection closed in the middle of a frame header"
        else:
            reason = ""
        self._closed()
        return Close(CloseCode.ABNORMAL, reason)

    def _closed(self) -> None:
        self._state = State.CLOSED
        self._buf = self._frame = self._msg = None
        self._pos = 0

    def _fail(self, exc: WebSocketProtocolError) -> None:
        if self._state is State.OPEN:  # §7.1.7: fail the connection with a close frame
            reason = str(exc).encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
            payload = encode_close_payload(exc.close_code, reason)
            self._out += encode_frame(Opcode.CLOSE, payload, mask=self._mask())
        self._closed()
        self._error = exc

    # --- sending ---------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Automatic replies queued by :meth:`next_event` (pongs, close frames).

        Works after a violation too: it then holds the failing close frame.
        """
        out, self._out = self._out, b""
        return out

    def _mask(self) -> bytes | None:
        # Client frames are masked with a fresh unpredictable key (§5.3, §10.3).
        return secrets.token_bytes(4) if self._client else None

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state is not State.OPEN:
            raise RuntimeError(f"cannot send in state {self._state.name}: a close frame was sent")

    def send_message(self, data: bytes | str) -> bytes:
        """A text (``str``) or binary message as one frame."""
        self._check_open()
        if isinstance(data, str):
            return encode_frame(Opcode.TEXT, data.encode("utf-8"), mask=self._mask())
        return encode_frame(Opcode.BINARY, bytes(data), mask=self._mask())

    def send_ping(self, payload: bytes = b"") -> bytes:
        self._check_open()
        return encode_frame(Opcode.PING, _control_payload(payload), mask=self._mask())

    def send_pong(self, payload: bytes = b"") -> bytes:
        self._check_open()
        return encode_frame(Opcode.PONG, _control_payload(payload), mask=self._mask())

    def send_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
        """Start the closing handshake; ``b""`` if a close frame was already sent.

        ``code`` 1005 (``NO_STATUS``) sends a close frame without a code.
        Raises ``ValueError`` for a code that must not be sent or a reason
        over 123 UTF-8 bytes.
        """
        if self._error is not None:
            raise self._error
        payload = encode_close_payload(code, reason)
        if self._state is not State.OPEN:
            return b""
        self._state = State.CLOSING
        return encode_frame(Opcode.CLOSE, payload, mask=self._mask())


def _control_payload(payload: bytes) -> bytes:
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(f"control frame payload of {len(payload)} bytes; the limit is 125")
    return bytes(payload)


def _check_pending(decoder: codecs.IncrementalDecoder) -> None:
    """Fail fast on a surrogate lead (ED A0-BF) the codec keeps pending.

    CPython's incremental decoder rejects every other invalid prefix at once,
    but holds ED A0 until its third byte arrives.
    """
    pending = decoder.getstate()[0]
    if len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
        raise _violation("text message is not UTF-8: surrogate code point", CloseCode.INVALID_DATA)


def _parse_close(payload: bytes) -> tuple[int, str]:
    """Code and reason of a received close frame (§5.5.1, §7.4)."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise _violation("close frame payload of 1 byte (RFC 6455 §5.5.1)")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise _violation(f"invalid close code {code} (RFC 6455 §7.4)")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _violation("close reason is not UTF-8", CloseCode.INVALID_DATA) from None
    return code, reason
