"""The asyncio ``Handoff``: one handed-off client connection and the ways to answer it.

The handler receives a :class:`Handoff`, reads what it needs (request fields
from :class:`~fdhandoff.receiver.request.HandoffInfo`, the body with
:meth:`Handoff.read_body`) and answers in one of these ways:

* :meth:`~Handoff.respond` — a whole response;
* :meth:`~Handoff.start_response` — a streamed one (chunked, Content-Length,
  or close-delimited where chunked does not apply);
* :meth:`~Handoff.sse` — a Server-Sent Events :class:`SSEStream`;
* :meth:`~Handoff.websocket` — a :class:`~fdhandoff.receiver.ws.WebSocket`;
* :meth:`~Handoff.detach` — take the raw socket (adapters such as ASGI).

Every write handles partial writes and ``EAGAIN`` by waiting for the socket to
become writable, so a slow reader gets every byte (the client fd may be
``O_NONBLOCK`` whatever we do: the flag is shared with the sender).  The
response always ends the connection (``Connection: close``): one request per
handoff, the way every sender in use hands them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from enum import Enum
from typing import TYPE_CHECKING, Final

from .. import aio
from ..errors import ProtocolError
from ..message import Format, HandoffRecord
from . import http
from .body import END, NEED_DATA, BodyDecoder, framing
from .http import HeaderInput
from .request import MARKER_HEAD_SENT, HandoffInfo
from .sse import CONTENT_TYPE as SSE_CONTENT_TYPE
from .sse import encode_comment, encode_event
from .stream import ConnectionClosed, Sent, Stream

if TYPE_CHECKING:
    from .engine import Receiver
    from .ws import WebSocket

__all__ = ["Handoff", "ResponseWriter", "SSEStream"]

#: Bytes read from the client per recv while reading a body.
BODY_READ_SIZE: Final = 64 * 1024

#: Bodies up to this size are sent in one write together with the head.
_COALESCE: Final = 64 * 1024

_NO_BODY_STATUSES: Final = frozenset({204, 304})


class Phase(Enum):
    """Where the answer stands; the engine finishes the connection accordingly."""

    NEW = 1  # nothing sent yet
    STREAMING = 2  # response head sent, body in progress
    DONE = 3  # complete response written
    HANDED_OVER = 4  # owned by a stream or by whoever called detach()


class Handoff(HandoffInfo):
    """One handed-off client connection (asyncio flavour).

    ``socket`` is the client connection, non-blocking.  For plain SCGI it is
    the UNIX connection itself (the response goes back to nginx or Apache).
    """

    __slots__ = (
        "_body",
        "_continue_sent",
        "bytes_sent",
        "phase",
        "receiver",
        "socket",
        "started",
        "status",
    )

    def __init__(self, record: HandoffRecord, sock: socket.socket, receiver: Receiver) -> None:
        super().__init__(record)
        self.socket = sock
        self.receiver = receiver
        self.status: int | None = None
        self.bytes_sent = 0
        self.started = time.monotonic()
        self.phase = Phase.NEW
        self._body: BodyDecoder | None = None
        self._continue_sent = False
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

    # --- facts -------------------------------------------------------------------

    @property
    def head_sent_by_sender(self) -> bool:
        """True when the sender already wrote the response head (mod_proxy_fdpass)."""
        return self.format is Format.BYTE and self.marker == MARKER_HEAD_SENT

    @property
    def _cgi(self) -> bool:
        return self.format is Format.PLAIN_SCGI

    def log_prefix(self, status: int) -> str:
        """Start of this connection's access-log line."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
        return f'{client} "{self.describe()}" {status}'

    # --- low-level writing ------------------------------------------------------------

    async def send_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Write bytes as they are, waiting while the client's window is closed.

        Raises :class:`ConnectionClosed` if the client went away or read
        nothing for ``write_timeout`` seconds.
        """
        view = memoryview(data)
        sock = self.socket
        timeout = self.receiver.options.write_timeout
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise ConnectionClosed(f"client connection lost: {exc.strerror}") from exc
            self.bytes_sent += sent
            view = view[sent:]
            if view:
                try:
                    async with asyncio.timeout(timeout):
                        await aio.wait_writable(sock)
                except TimeoutError:
                    raise ConnectionClosed(
                        f"client read nothing for {timeout:.0f} s (write timeout)"
                    ) from None

    def _head(
        self, status: int, headers: HeaderInput, length: int | None, chunked: bool
    ) -> bytes:
        if self.phase is not Phase.NEW:
            raise RuntimeError(f"a response was already started ({self.phase.name})")
        if self.head_sent_by_sender:
            return b""  # Apache sent it; only the body is ours
        given = list(headers)
        if http.has_header(given, b"content-length") or http.has_header(
            given, b"transfer-encoding"
        ):
            raise ValueError("Content-Length and Transfer-Encoding are set by the receiver")
        extra: list[tuple[str | bytes, str | bytes]] = []
        if length is not None:
            extra.append((b"Content-Length", b"%d" % length))
        elif chunked:
            extra.append((b"Transfer-Encoding", b"chunked"))
        if not self._cgi:
            extra.append((b"Connection", b"close"))
        return http.response_head(
            status, given + extra, version=self.http_version, cgi=self._cgi
        )

    def _start(self, status: int) -> None:
        self.status = status
        self.phase = Phase.STREAMING

    # --- answers -------------------------------------------------------------------------

    async def respond(
        self, status: int = 200, headers: HeaderInput = (), body: bytes = b""
    ) -> None:
        """Send a whole response and finish the connection."""
        no_body = status in _NO_BODY_STATUSES or 100 <= status < 200
        if no_body and body:
            raise ValueError(f"a {status} response has no body")
        head = self._head(status, headers, None if no_body else len(body), False)
        self._start(status)
        if self.method == "HEAD":
            body = b""
        if len(body) <= _COALESCE:
            await self.send_raw(head + body)
        else:
            await self.send_raw(head)
            await self.send_raw(body)
        self.phase = Phase.DONE

    async def start_response(
        self,
        status: int = 200,
        headers: HeaderInput = (),
        *,
        content_length: int | None = None,
    ) -> ResponseWriter:
        """Send the head of a streamed response; write the body with the writer.

        Without ``content_length`` the body is chunked (HTTP/1.1) or ends when
        the connection closes (HTTP/1.0, plain SCGI, head sent by Apache).
        """
        chunked = (
            content_length is None
            and self.http_version == "1.1"
            and not self._cgi
            and not self.head_sent_by_sender
        )
        head = self._head(status, headers, content_length, chunked)
        self._start(status)
        writer = ResponseWriter(self, chunked, content_length, self.method == "HEAD")
        if head:
            await self.send_raw(head)
        return writer

    async def sse(
        self, headers: HeaderInput = (), *, retry: int | None = None, status: int = 200
    ) -> SSEStream:
        """Answer with an event stream and return it, registered and idle.

        The handler may return right after (``channel.add(stream)``): the
        stream lives on without a task.  The body is close-delimited, so every
        stream gets the same bytes for one event.
        """
        given = list(headers)
        if not http.has_header(given, b"content-type"):
            given.append((b"Content-Type", SSE_CONTENT_TYPE))
        if not http.has_header(given, b"cache-control"):
            given.append((b"Cache-Control", b"no-cache"))
        if self._cgi:
            # nginx buffers SCGI responses unless told not to.
            given.append((b"X-Accel-Buffering", b"no"))
        head = self._head(status, given, None, False)
        if retry is not None:
            head += encode_event(retry=retry)
        self._start(status)
        stream = SSEStream(self.socket, self.receiver, self.log_prefix(status))
        self.phase = Phase.HANDED_OVER
        await stream._write(head)
        return stream

    async def websocket(
        self,
        subprotocol: str | None = None,
        headers: HeaderInput = (),
        *,
        max_message_size: int | None = None,
        key: str | None = None,
    ) -> WebSocket:
        """Complete the WebSocket handshake (unless the sender already did) and
        return the connection.  See :mod:`fdhandoff.receiver.ws`."""
        from .ws import accept  # noqa: PLC0415 - ws builds on this module

        return await accept(self, subprotocol, headers, max_message_size, key)

    def detach(self) -> socket.socket:
        """Take the client socket; the receiver forgets the connection.

        The caller then owns the socket (and should log its access line with
        :meth:`Receiver.access_log`).  :attr:`already_read` holds the client
        bytes the sender had read beyond the request head.
        """
        if self.phase is Phase.HANDED_OVER:
            raise RuntimeError("the connection was already handed over")
        self.phase = Phase.HANDED_OVER
        return self.socket

    # --- request body --------------------------------------------------------------------

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

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield the request body piece by piece (``body_timeout`` per read)."""
        decoder = self._body_decoder()
        sock = self.socket
        timeout = self.receiver.options.body_timeout
        while True:
            event = decoder.next_event()
            if event is END:
                return
            if event is not NEED_DATA:
                assert isinstance(event, bytes)
                yield event
                continue
            await self._maybe_continue()
            try:
                async with asyncio.timeout(timeout):
                    await aio.wait_readable(sock)
                    data = sock.recv(BODY_READ_SIZE)
            except TimeoutError:
                raise ProtocolError(
                    f"request body stalled for {timeout:.0f} s", status_hint=408
                ) from None
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ConnectionClosed(f"client connection lost: {exc.strerror}") from exc
            decoder.receive_data(data)

    async def read_body(self, max_size: int | None = None) -> bytes:
        """The whole request body; 413 (``ProtocolError``) above ``max_size``."""
        limit = self.receiver.options.max_body_size if max_size is None else max_size
        announced = self._body_decoder().length
        if announced is not None and announced > limit:
            raise ProtocolError(
                f"request body of {announced} bytes is larger than {limit}", status_hint=413
            )
        parts: list[bytes] = []
        size = 0
        async for piece in self.iter_body():
            size += len(piece)
            if size > limit:
                raise ProtocolError(
                    f"request body larger than {limit} bytes", status_hint=413
                )
            parts.append(piece)
        return b"".join(parts)

    async def _maybe_continue(self) -> None:
        # RFC 9110 section 10.1.1: a client that sent "Expect: 100-continue"
        # may wait for the interim response before sending the body; the
        # senders never send it, so the receiver does, once, before reading.
        if self._continue_sent or self.phase is not Phase.NEW or self._cgi:
            return
        self._continue_sent = True
        expect = self.header("expect")
        if expect is not None and expect.lower() == "100-continue" and self.http_version == "1.1":
            await self.send_raw(http.CONTINUE)
            self.bytes_sent -= len(http.CONTINUE)

    # --- ending (engine) ----------------------------------------------------------------

    async def linger_close(self) -> None:
        """Half-close, read what the client still sends for a moment, close."""
        sock = self.socket
        try:
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(self.receiver.options.linger_timeout):
                while True:
                    await aio.wait_readable(sock)
                    try:
                        if not sock.recv(BODY_READ_SIZE):
                            break
                    except BlockingIOError:
                        continue
        except (OSError, TimeoutError):
            pass
        finally:
            sock.close()


class ResponseWriter:
    """Body of a response started with :meth:`Handoff.start_response`."""

    __slots__ = ("_chunked", "_handoff", "_head_only", "_remaining")

    def __init__(
        self, handoff: Handoff, chunked: bool, length: int | None, head_only: bool
    ) -> None:
        self._handoff = handoff
        self._chunked = chunked
        self._remaining = length
        self._head_only = head_only

    async def write(self, data: bytes) -> None:
        """Write part of the body; waits while the client is not reading."""
        handoff = self._handoff
        if handoff.phase is not Phase.STREAMING:
            raise RuntimeError("the response is already complete")
        if self._remaining is not None:
            if len(data) > self._remaining:
                raise ValueError("more body bytes than the announced Content-Length")
            self._remaining -= len(data)
        if not data or self._head_only:
            return
        await handoff.send_raw(http.chunk(data) if self._chunked else data)

    async def end(self) -> None:
        """Finish the body (last chunk); the engine then closes the connection."""
        handoff = self._handoff
        if handoff.phase is not Phase.STREAMING:
            return
        if self._remaining:
            raise ValueError(f"{self._remaining} body bytes announced but not written")
        if self._chunked and not self._head_only:
            await handoff.send_raw(http.LAST_CHUNK)
        handoff.phase = Phase.DONE

    @property
    def complete(self) -> bool:
        return self._handoff.phase is Phase.DONE


class SSEStream(Stream):
    """A Server-Sent Events stream: send events, comments; notices the client leaving.

    ``send()`` and ``comment()`` never block: fire and forget, or ``await``
    them to wait until the kernel took the bytes.
    """

    __slots__ = ()

    @classmethod
    def encode(
        cls,
        data: str | bytes | None = None,
        *,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
    ) -> bytes:
        return encode_event(data, event=event, id=id, retry=retry)

    def send(
        self,
        data: str | bytes | None = None,
        *,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
    ) -> Sent:
        """Send one event (multi-line data becomes several ``data:`` lines)."""
        return self._write(encode_event(data, event=event, id=id, retry=retry))

    def comment(self, text: str = "") -> Sent:
        """Send a comment, e.g. a heartbeat that keeps proxies from timing out."""
        return self._write(encode_comment(text))
