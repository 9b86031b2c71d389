"""Request body framing (sans-IO): Content-Length, chunked, or none (RFC 9112 section 6).

The front (or nginx) read only the request head; the body, if any, is still on
the client connection, possibly preceded by bytes the sender had already read.
:func:`framing` decides from the restored headers how long the body is, and
:class:`BodyDecoder` cuts it out of the bytes that follow, decoding the chunked
coding strictly (CRLF line ends, hexadecimal sizes of bounded length).
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from ..errors import ProtocolError
from ..httphead import (
    MAX_CONTENT_LENGTH_DIGITS,
    MAX_TRAILER_SIZE,
    check_trailer_field,
    chunk_size,
)
from .request import RawHeaders

__all__ = ["END", "MAX_CHUNK_LINE", "NEED_DATA", "BodyDecoder", "framing"]

#: Longest chunk-size line (size, extensions, CRLF) or trailer line accepted.
#: Sizes have at most 16 hex digits; extensions are rare.  Same order as
#: h11's and llhttp's limits.
MAX_CHUNK_LINE: Final = 4096

#: Trailer bytes accepted after the last chunk (then ignored): the front's
#: limit (httphead.MAX_TRAILER_SIZE), so both refuse the same bodies.
MAX_TRAILERS: Final = MAX_TRAILER_SIZE


class _Signal(Enum):
    NEED_DATA = "NEED_DATA"
    END = "END"


NEED_DATA: Final = _Signal.NEED_DATA
END: Final = _Signal.END


def framing(headers: RawHeaders) -> tuple[int | None, bool]:
    """``(content_length, chunked)`` for a request (RFC 9112 section 6.3).

    No body at all is ``(0, False)``.  Conflicting framing is refused with 400
    rather than guessed at: it is how request smuggling starts.
    """
    lengths = {v.strip() for n, v in headers if n == b"content-length"}
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    if codings:
        if lengths:
            raise ProtocolError("request has both Transfer-Encoding and Content-Length")
        final = b",".join(codings).split(b",")[-1].strip().lower()
        if final != b"chunked":
            raise ProtocolError("request Transfer-Encoding does not end with chunked")
        return None, True
    if not lengths:
        return 0, False
    if len(lengths) > 1:
        raise ProtocolError("request has conflicting Content-Length values")
    value = lengths.pop()
    # Leading zeros are digits like any other (RFC 9110 §8.6: 1*DIGIT): the
    # limit counts significant ones, as httphead.parse_head does.
    if (
        not value.isdigit()
        or not value.isascii()
        or len(value.lstrip(b"0")) > MAX_CONTENT_LENGTH_DIGITS
    ):
        raise ProtocolError(f"invalid Content-Length {value[:32]!r}")
    return int(value), False


class _State(Enum):
    SIZE = 1
    DATA = 2
    DATA_END = 3
    TRAILER = 4
    DONE = 5


class BodyDecoder:
    """Cuts a request body out of a byte stream.

    ``receive_data(b"")`` means EOF.  :meth:`next_event` returns body bytes,
    :data:`END` once the body is complete (extra bytes then in
    :attr:`trailing_data`), or :data:`NEED_DATA`.
    """

    __slots__ = ("_buf", "_chunked", "_eof", "_remaining", "_state", "_trailer_size")

    def __init__(self, length: int | None, chunked: bool) -> None:
        if chunked == (length is not None):
            raise ValueError("give either a length or chunked=True")
        self._chunked = chunked
        self._remaining = length or 0
        self._buf = bytearray()
        self._eof = False
        self._trailer_size = 0
        self._state = _State.SIZE if chunked else _State.DATA

    @property
    def length(self) -> int | None:
        """The announced body length; None when chunked."""
        return None if self._chunked else self._remaining

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def trailing_data(self) -> bytes:
        """Bytes after the body (a pipelined request), once :attr:`done`."""
        return bytes(self._buf) if self._state is _State.DONE else b""

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> bytes | _Signal:
        while True:
            state = self._state
            if state is _State.DONE:
                return END
            if state is _State.DATA:
                if self._remaining == 0:
                    self._state = _State.DATA_END if self._chunked else _State.DONE
                    continue
                if not self._buf:
                    return self._need()
                piece = bytes(self._buf[: self._remaining])
                del self._buf[: len(piece)]
                self._remaining -= len(piece)
                return piece
            line = self._line()
            if line is None:
                return self._need()
            self._on_line(state, line)

    def _need(self) -> _Signal:
        if self._eof:
            raise ProtocolError("client closed the connection inside the request body")
        return NEED_DATA

    def _line(self) -> bytes | None:
        buf = self._buf
        if self._state is _State.DATA_END:
            # Exactly CRLF after chunk data, refused as soon as it is not.
            if (buf and buf[0] != 0x0D) or (len(buf) >= 2 and buf[1] != 0x0A):
                raise ProtocolError("chunk data not followed by CRLF")
            if len(buf) < 2:
                return None
            del buf[:2]
            return b""
        lf = buf.find(b"\n", 0, MAX_CHUNK_LINE)
        if lf < 0:
            if len(buf) >= MAX_CHUNK_LINE:
                raise ProtocolError("chunked body line too long")
            return None
        if lf == 0 or buf[lf - 1] != 0x0D:
            # RFC 9112 section 2.2 lets a recipient accept a bare LF; a strict
            # one does not, so no two parsers can disagree about the framing.
            raise ProtocolError("chunked body line not ended by CRLF")
        line = bytes(buf[: lf - 1])
        del buf[: lf + 1]
        return line

    def _on_line(self, state: _State, line: bytes) -> None:
        if state is _State.SIZE:
            # The front's grammar (RFC 9112 section 7.1.1), so that the two cut
            # a chunked body at the same place: " 5" or "5;\x00" is refused.
            self._remaining = chunk_size(line)
            self._state = _State.DATA if self._remaining else _State.TRAILER
        elif state is _State.DATA_END:
            if line:
                raise ProtocolError("chunk data not followed by CRLF")
            self._state = _State.SIZE
        else:  # TRAILER: ignored fields up to the empty line
            self._trailer_size += len(line) + 2
            if self._trailer_size > MAX_TRAILERS:
                raise ProtocolError("chunked trailer section too large", status_hint=431)
            if not line:
                self._state = _State.DONE
            else:
                # Dropped, but judged as the front judges them (RFC 9112
                # section 7.1.2): no obs-fold, no control bytes, token names.
                check_trailer_field(line)
