"""What both flavours of ``Handoff`` share: answer state and response framing (no I/O).

The asyncio :class:`~fdhandoff.receiver.handoff.Handoff` and the sync
:class:`~fdhandoff.receiver.sync.Handoff` differ only in how they write and
read; which head to send, how to frame a body, when to send ``100 Continue``
and how long a body may be are decided here, once.
"""

from __future__ import annotations

import contextlib
import socket
import time
from enum import Enum
from typing import Final, Protocol

from ..errors import ProtocolError
from ..message import Format, HandoffRecord
from ..websocket import CloseCode, Opcode, encode_close_payload, encode_frame
from ..websocket_handshake import expects_continue
from . import http
from .body import BodyDecoder, framing
from .http import HeaderInput
from .request import MARKER_HEAD_SENT, HandoffInfo
from .sse import CONTENT_TYPE as SSE_CONTENT_TYPE
from .sse import encode_event

__all__ = [
    "COALESCE",
    "HandedStream",
    "HandoffBase",
    "Phase",
    "check_body_size",
    "error_close_frame",
    "fail_stream",
]

#: Bodies up to this size are sent in one write together with the head.
COALESCE: Final = 64 * 1024

#: Every response ends the connection (one request per handoff).
_CLOSE: Final = (b"Connection", b"close")

#: Statuses whose responses never have a body (RFC 9110 sections 15.3.5, 15.4.5).
_NO_BODY_STATUSES: Final = frozenset({204, 304})

#: Reset Content: no content either (RFC 9110 section 15.3.6), but framed:
#: RFC 9112 section 6.3 does not exempt it, so it says ``Content-Length: 0``.
_RESET_CONTENT: Final = 205


class Phase(Enum):
    """Where the answer stands; the engine finishes the connection accordingly."""

    NEW = 1  # nothing sent yet
    STREAMING = 2  # response head sent, body in progress
    DONE = 3  # complete response written
    HANDED_OVER = 4  # owned by a stream or by whoever called detach()


def error_close_frame(status: int) -> bytes:
    """What answers an error ``status`` once the sender has sent the ``101``:
    a close frame (RFC 6455 section 7.4.1), 1011 for a server error, else 1008."""
    code = CloseCode.INTERNAL_ERROR if status >= 500 else CloseCode.POLICY_VIOLATION
    return encode_frame(Opcode.CLOSE, encode_close_payload(code))


def fail_stream(handoff: HandoffBase) -> None:
    """The handler failed after handing its connection to a stream: end it.

    Nothing feeds it any more; left open, an SSE client would wait on a
    silent stream for ever instead of reconnecting (EventSource reconnects
    when the connection closes), a WebSocket client for a message that never
    comes (it gets close 1011 instead, RFC 6455 section 7.4.1).
    """
    stream = handoff.stream
    if stream is not None and not stream.closed:
        stream.fail()


def check_body_size(size: int, limit: int) -> None:
    if size > limit:
        raise ProtocolError(f"request body larger than {limit} bytes", status_hint=413)


class HandedStream(Protocol):
    """What a handoff's connection was handed to (an SSE stream, a WebSocket)."""

    @property
    def closed(self) -> bool: ...

    def fail(self) -> None: ...


class HandoffBase(HandoffInfo):
    """A handoff being answered: the client socket and what was sent on it."""

    __slots__ = (
        "_body",
        "_continue_sent",
        "bytes_sent",
        "phase",
        "socket",
        "started",
        "status",
        "stream",
    )

    def __init__(self, record: HandoffRecord, sock: socket.socket) -> None:
        super().__init__(record)
        #: The client connection (for plain SCGI: the UNIX connection itself).
        self.socket = sock
        self.status: int | None = None
        self.bytes_sent = 0
        self.started = time.monotonic()
        self.phase = Phase.NEW
        self._body: BodyDecoder | None = None
        self._continue_sent = False
        #: The stream ``sse()`` or ``websocket()`` handed the connection to:
        #: the engine ends it if the handler fails (a stream nobody feeds).
        self.stream: HandedStream | None = None
        if self.client is None or self.server is None:
            self._addresses_from_socket(sock)

    def _addresses_from_socket(self, sock: socket.socket) -> None:
        # PAYLOAD and BYTE handoffs say nothing about the request: the TCP
        # socket itself still knows both ends.
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        with contextlib.suppress(OSError):
            if self.client is None:
                peer = sock.getpeername()
                self.client = (peer[0], peer[1])
            if self.server is None:
                local = sock.getsockname()
                self.server = (local[0], local[1])

    # --- facts ---------------------------------------------------------------------

    @property
    def head_sent_by_sender(self) -> bool:
        """True when the sender already wrote the response head (mod_proxy_fdpass)."""
        return self.format is Format.BYTE and self.marker == MARKER_HEAD_SENT

    @property
    def cgi(self) -> bool:
        """True when answering an SCGI client (``Status:`` head, no connection headers)."""
        return self.format is Format.PLAIN_SCGI

    def log_prefix(self, status: int) -> str:
        """Start of this connection's access-log line."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        return f'{client} "{self.describe()}" {status}'

    # --- heads -----------------------------------------------------------------------

    def _head(self, status: int, headers: HeaderInput, length: int | None, chunked: bool) -> bytes:
        if self.phase is not Phase.NEW:
            raise RuntimeError(f"a response was already started ({self.phase.name})")
        fmt = self.format
        if fmt is Format.BYTE and self.marker == MARKER_HEAD_SENT:
            return b""  # Apache sent it; only the body is ours
        # The connection's fields are ours: it ends after this answer.
        given = http.without_connection_fields(headers)
        if http.has_framing(given):
            raise ValueError("Content-Length and Transfer-Encoding are set by the receiver")
        if length is not None:
            given.append((b"Content-Length", b"%d" % length))
        elif chunked:
            given.append((b"Transfer-Encoding", b"chunked"))
        cgi = fmt is Format.PLAIN_SCGI
        if not cgi:
            given.append(_CLOSE)
        return http.response_head(status, given, version=self.http_version, cgi=cgi)

    def _started(self, status: int) -> None:
        self.status = status
        self.phase = Phase.STREAMING

    def _whole_response(
        self, status: int, headers: HeaderInput, body: bytes
    ) -> tuple[bytes, bytes]:
        """Head and the body to send for :meth:`respond` (HEAD gets no body)."""
        if 100 <= status < 200:
            # The connection ends after this one response (Connection: close),
            # so an interim one would leave the client without its answer.
            raise ValueError(
                f"respond() needs a final status, not the informational {status} "
                "(a WebSocket upgrade is websocket(); a protocol of your own, detach())"
            )
        no_body = status in _NO_BODY_STATUSES
        if body and (no_body or status == _RESET_CONTENT):
            raise ValueError(f"a {status} response has no body")
        head = self._head(status, headers, None if no_body else len(body), False)
        self._started(status)
        return head, b"" if self.method == "HEAD" else body

    def _streamed_head(
        self, status: int, headers: HeaderInput, content_length: int | None
    ) -> tuple[bytes, bool, bool]:
        """Head of a streamed response, whether its body is chunked, and
        whether what is written is dropped (no content goes out).

        Without a length the body is chunked on HTTP/1.1, close-delimited for
        HTTP/1.0, SCGI clients and heads sent by Apache (RFC 9112 section 6.3).
        A 204 or 304 has no content (RFC 9110 sections 15.3.5, 15.4.5) and
        hence no framing either (RFC 9112 section 6.1: no Transfer-Encoding
        in a 204): what is written is dropped, as for ``HEAD``.  So for a 205
        (RFC 9110 section 15.3.6), which says ``Content-Length: 0``.
        """
        if 100 <= status < 200:
            # An interim response is no answer: the final one must follow,
            # and this connection ends after one response.
            raise ValueError(
                f"start_response() needs a final status, not the informational {status}"
            )
        if status in _NO_BODY_STATUSES or status == _RESET_CONTENT:
            length = 0 if status == _RESET_CONTENT else None
            head = self._head(status, headers, length, False)
            self._started(status)
            return head, False, True
        chunked = (
            content_length is None
            and self.http_version == "1.1"
            and not self.cgi
            and not self.head_sent_by_sender
        )
        head = self._head(status, headers, content_length, chunked)
        self._started(status)
        return head, chunked, self.method == "HEAD"

    def _sse_head(self, headers: HeaderInput, status: int, retry: int | None) -> bytes:
        if 100 <= status < 200 or status in _NO_BODY_STATUSES or status == _RESET_CONTENT:
            # A stream is content: after a 204, 205 or 304 head the client
            # reads none (RFC 9110 sections 15.3.5, 15.3.6, 15.4.5), and an
            # interim response is no answer at all.  EventSource treats a 204
            # as "stop reconnecting" (HTML, server-sent events): respond(204).
            raise ValueError(
                f"sse() needs a status with content, not {status}; "
                "to tell an EventSource to stop reconnecting, respond(204)"
            )
        given = list(headers)
        if not http.has_header(given, b"content-type"):
            given.append((b"Content-Type", SSE_CONTENT_TYPE))
        if not http.has_header(given, b"cache-control"):
            given.append((b"Cache-Control", b"no-cache"))
        if self.cgi:
            # nginx buffers SCGI responses unless told not to.
            given.append((b"X-Accel-Buffering", b"no"))
        head = self._head(status, given, None, False)
        # The retry field is content, and HEAD gets none (RFC 9110 section 9.3.2).
        if retry is not None and self.method != "HEAD":
            head += encode_event(retry=retry)
        self._started(status)
        return head

    # --- request body -----------------------------------------------------------------

    def _body_decoder(self) -> BodyDecoder:
        if self._body is not None:
            return self._body
        if self.format is Format.PLAIN_SCGI:
            decoder = BodyDecoder(len(self.already_read) + self.record.remaining, False)
        elif self.has_request:
            length, chunked = framing(self.raw_headers)
            decoder = BodyDecoder(length, chunked)
        else:
            decoder = BodyDecoder(0, False)  # nothing describes a body
        if self.already_read:
            decoder.receive_data(self.already_read)
        self._body = decoder
        return decoder

    def _body_consumed(self) -> bool:
        """True when the request described its body and all of it was read."""
        if self._body is not None:
            return self._body.done
        if not self.has_request or self.format is Format.PLAIN_SCGI or self.upgraded:
            return False
        try:
            return framing(self.raw_headers) == (0, False)
        except ProtocolError:
            return False

    def _body_limit(self, max_size: int) -> int:
        """``max_size``, after refusing (413) a body announced larger."""
        announced = self._body_decoder().length
        if announced is not None and announced > max_size:
            raise ProtocolError(
                f"request body of {announced} bytes is larger than {max_size}", status_hint=413
            )
        return max_size

    def _wants_continue(self) -> bool:
        # RFC 9110 section 10.1.1: a client that sent "Expect: 100-continue"
        # may wait for the interim response before sending the body; the
        # senders never send it, so the receiver does, once, before reading.
        if self._continue_sent or self.phase is not Phase.NEW or self.cgi:
            return False
        self._continue_sent = True
        # Expect is a list (#expectation), possibly over several lines.
        return self.http_version == "1.1" and expects_continue(self.raw_headers)
