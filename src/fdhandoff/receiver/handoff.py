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
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any, Final

from .. import aio, fdpass
from ..errors import ProtocolError
from ..message import HandoffRecord
from . import http
from .answer import COALESCE, HandoffBase, Phase, check_body_size
from .body import END, NEED_DATA
from .http import HeaderInput
from .sse import encode_comment, encode_event
from .stream import ConnectionClosed, Sent, Stream

if TYPE_CHECKING:
    from .engine import Receiver
    from .ws import WebSocket

__all__ = ["Handoff", "Phase", "ResponseWriter", "SSEStream"]

#: Bytes read from the client per recv while reading a body.
BODY_READ_SIZE: Final = 64 * 1024

# A plain int: an IntFlag "|" per call costs more than the recv itself.
_PEEK_NOW: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


class Handoff(HandoffBase):
    """One handed-off client connection (asyncio flavour).

    ``socket`` is the client connection, non-blocking.  For plain SCGI it is
    the UNIX connection itself (the response goes back to nginx or Apache).
    ``receiver`` is the engine that runs it (options, access log, stopping).
    """

    __slots__ = ("_then", "receiver")

    def __init__(self, record: HandoffRecord, sock: socket.socket, receiver: Receiver) -> None:
        super().__init__(record, sock)
        self.receiver = receiver
        self._then: Coroutine[Any, Any, None] | None = None

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

    # --- answers -------------------------------------------------------------------------

    async def respond(
        self, status: int = 200, headers: HeaderInput = (), body: bytes = b""
    ) -> None:
        """Send a whole response and finish the connection."""
        head, body = self._whole_response(status, headers, body)
        if len(body) <= COALESCE:
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
        the connection closes (HTTP/1.0, plain SCGI, head sent by Apache).  A
        ``204`` or ``304`` has no content: no framing header goes out and what
        is written is dropped, as for ``HEAD``; a ``205`` neither has content
        but says ``Content-Length: 0``.  An informational status (``1xx``)
        raises ``ValueError``.
        """
        head, chunked, head_only = self._streamed_head(status, headers, content_length)
        writer = ResponseWriter(self, chunked, content_length, head_only)
        if head:
            await self.send_raw(head)
        return writer

    async def sse(
        self, headers: HeaderInput = (), *, retry: int | None = None, status: int = 200
    ) -> SSEStream:
        """Answer with an event stream and return it, registered and idle.

        The handler may return right after (``channel.add(stream)``): the
        stream lives on without a task.  The body is close-delimited, so every
        stream gets the same bytes for one event.  A ``HEAD`` request gets the
        head only (no ``retry`` either): the stream returned is already closed.
        """
        head = self._sse_head(headers, status, retry)
        stream = SSEStream(self.socket, self.receiver, self.log_prefix(status))
        self.phase = Phase.HANDED_OVER
        self.stream = stream
        await stream._write(head)
        if self.method == "HEAD":
            # A HEAD request gets the head and no event (RFC 9110 section
            # 9.3.2): the stream ends once the head is written, and what is
            # sent to it goes nowhere, as to a client that left.
            stream.close()
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
        :meth:`Receiver.access_log`).  To keep counting the connection
        (``--max-connections``, the connections gauge, the shutdown wait),
        register an object with ``close()`` using :meth:`Receiver.track` and
        :meth:`Receiver.untrack` it when the socket closes.  :attr:`already_read` holds the client
        bytes the sender had read beyond the request head.
        """
        if self.phase is Phase.HANDED_OVER:
            raise RuntimeError("the connection was already handed over")
        self.phase = Phase.HANDED_OVER
        # Now, not when the handler returns: an adapter may go on serving the
        # socket in the handler's task, counted as its own connection object.
        self.receiver.untrack(self)
        return self.socket

    def continue_with(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in this handler's task once the handler has returned.

        For an adapter that serves a :meth:`detach`-ed socket for long (a
        WebSocket, a stream, kept-alive requests): awaited from the handler,
        it would keep the handler's frame and this object (the request
        description, kilobytes) alive as long as the connection; run after
        the handler, it keeps only what it holds itself.  No new task, no
        turn of the event loop.  Exceptions it raises are logged.  If the
        handler fails after calling this, ``coro`` never runs and the client
        socket is closed.
        """
        if self._then is not None:
            coro.close()
            raise RuntimeError("continue_with() was already called")
        self._then = coro

    def pop_continuation(self) -> Coroutine[Any, Any, None] | None:
        """What :meth:`continue_with` left for the engine to run (once)."""
        then, self._then = self._then, None
        return then

    # --- request body --------------------------------------------------------------------

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
                    data = await aio.recv(sock, BODY_READ_SIZE)
            except TimeoutError:
                raise ProtocolError(
                    f"request body stalled for {timeout:.0f} s", status_hint=408
                ) from None
            except OSError as exc:
                raise ConnectionClosed(f"client connection lost: {exc.strerror}") from exc
            decoder.receive_data(data)

    async def read_body(self, max_size: int | None = None) -> bytes:
        """The whole request body; 413 (``ProtocolError``) above ``max_size``."""
        limit = self._body_limit(
            self.receiver.options.max_body_size if max_size is None else max_size
        )
        parts: list[bytes] = []
        size = 0
        async for piece in self.iter_body():
            size += len(piece)
            check_body_size(size, limit)
            parts.append(piece)
        return b"".join(parts)

    async def _maybe_continue(self) -> None:
        # RFC 9110 section 10.1.1: a client that sent "Expect: 100-continue"
        # may wait for the interim response before sending the body; the
        # senders never send it, so the receiver does, once, before reading.
        if self._wants_continue():
            await self.send_raw(http.CONTINUE)
            self.bytes_sent -= len(http.CONTINUE)

    # --- ending (engine) ----------------------------------------------------------------

    async def linger_close(self) -> None:
        """Half-close, read what the client still sends for a moment, close.

        As nginx's ``lingering_close auto``: when the request had no body left
        unread and nothing more is buffered, the client has nothing to send
        (the response said ``Connection: close``), so the close is immediate:
        it sends FIN, and a FIN destroys nothing in flight.  That is decided
        before anything is sent: a client that saw our FIN first could send
        again in between and find itself lingered on for nothing.
        """
        sock = self.socket
        try:
            if self.tls:  # kernel TLS (as handed off): end the session first
                fdpass.send_tls_close_notify(sock)
            if self._body_consumed() and not _input_pending(sock):
                return  # the close below sends the FIN
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(self.receiver.options.linger_timeout):
                while await aio.recv(sock, BODY_READ_SIZE):
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            sock.close()


def _input_pending(sock: socket.socket) -> bool:
    """True when the client sent bytes we have not read (EOF counts as none)."""
    try:
        return bool(sock.recv(1, _PEEK_NOW))
    except BlockingIOError:
        return False


def _client_gone(sock: socket.socket) -> bool:
    """True when the client closed or reset the connection (a peek, nothing consumed)."""
    try:
        return not sock.recv(1, _PEEK_NOW)
    except BlockingIOError:
        return False
    except OSError:
        return True


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
        if self._head_only:
            # HEAD (or 204/304): nothing goes out, so no write would notice a
            # client that left, and an endless stream would run for ever: look.
            if _client_gone(handoff.socket):
                raise ConnectionClosed("client closed the connection")
            return
        if not data:
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
