"""One HTTP request/response cycle of the ASGI adapter: ``receive()`` and ``send()``.

``receive()`` hands the request body over as ``http.request`` messages: the
bytes the sender had already read first, then the socket, cut by
:class:`~fdhandoff.receiver.body.BodyDecoder` (Content-Length or chunked),
with ``100 Continue`` sent before the first socket read when the client asked
for it.  Once the body is complete, ``receive()`` waits for the client to go
away (EOF or reset) or for the response to complete, and then returns
``http.disconnect`` (ASGI HTTP spec).

``send()`` writes the response.  The head is held back until the first body
message so that a response given in one piece goes out in one write with a
``Content-Length`` computed here; a streamed response is chunked (HTTP/1.1)
or close-delimited (HTTP/1.0, plain SCGI, payload-only handoffs).  HEAD
requests and 204/304 answers get no body.  Once the client is gone ``send()``
raises :class:`~fdhandoff.receiver.stream.ConnectionClosed`, an ``OSError``
(ASGI spec 2.4), so a streaming app stops at its next write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from .. import aio
from ..errors import ProtocolError
from ..httphead import MAX_HEAD_SIZE
from ..websocket_handshake import expects_continue
from . import http
from .asgi_conn import READ_SIZE, Connection
from .asgi_response import NO_BODY_STATUSES, app_head, error_response, finish_head
from .asgi_scope import Request
from .body import END, NEED_DATA, BodyDecoder
from .stream import ConnectionClosed

__all__ = ["HTTPCycle"]

log = logging.getLogger("fdhandoff.receiver.asgi")

#: Bodies up to this size are written together with the head or chunk framing
#: (one copy, one syscall); bigger ones are written on their own (no copy).
_COALESCE: Final = 64 * 1024


def _disconnect() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class HTTPCycle:
    """``receive``/``send`` for one request; the adapter runs the app with them.

    After :meth:`run`, :meth:`reusable` tells whether the connection may carry
    the next request.  ``on_move`` is called (once, from the event loop) if the
    response completed while the app keeps running (Starlette background
    tasks): the connection then moves on without waiting for the app.
    """

    __slots__ = (
        "_chunked",
        "_continue",
        "_decoder",
        "_head",
        "_length",
        "_no_body",
        "_pause",
        "_reading",
        "_received",
        "_request_done",
        "_started_at",
        "_waiters",
        "_why",
        "_written",
        "can_chunk",
        "cgi",
        "complete",
        "conn",
        "disconnected",
        "keep_alive",
        "moved",
        "on_move",
        "request",
        "running",
        "scope",
        "started",
        "status",
    )

    def __init__(
        self,
        conn: Connection,
        request: Request,
        scope: dict[str, Any],
        body: BodyDecoder | None,
        *,
        keep_alive: bool,
        cgi: bool = False,
        on_move: Callable[[HTTPCycle], None] | None = None,
        access_log: bool = True,
    ) -> None:
        self.conn = conn
        self.request = request
        self.scope = scope
        self.cgi = cgi
        self.keep_alive = keep_alive
        self.on_move = on_move
        # Chunked needs an HTTP/1.1 client we know of; plain SCGI answers and
        # payload-only handoffs (client version unknown) end with the connection.
        self.can_chunk = (
            request.http_version == "1.1" and request.described and not cgi
        ) and not request.head_sent
        # A body of length 0 needs no decoder: the first receive() says so.
        self._decoder = body
        self._request_done = False
        self._received = 0
        self._continue = (
            body is not None
            and not cgi
            and request.http_version == "1.1"
            # RFC 9110 section 10.1.1: Expect is a list, possibly over several lines.
            and expects_continue(request.headers)
        )
        # The receive() calls waiting for the client to leave (rarely more than one).
        self._waiters: asyncio.Future[None] | list[asyncio.Future[None]] | None = None
        self._reading = False
        self._pause = 0.0  # aio.next_pause: readable without data (a partial kTLS record)
        self.disconnected = False
        self.started = False
        self.complete = False
        self.status = 0
        self._head: bytes | None = None  # app headers, until the first body message
        self._length: int | None = None  # Content-Length bytes still to come
        self._no_body = request.method == "HEAD"
        self._chunked = False
        self._written = False
        # -1: no access-log line (already written, or written by the owner).
        self._started_at = time.monotonic() if access_log else -1.0
        self._why: str | None = None
        self.running = False
        self.moved = False

    # --- running the app ---------------------------------------------------------------

    async def run(self, app: Any) -> bool:
        """Run the app for this request; True if the connection moved on meanwhile."""
        self.running = True
        self.conn.bytes_sent = 0  # counted per request for the access log
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.keep_alive = False
            self._why = self._why or "cancelled at shutdown"
            raise
        except Exception as exc:
            await self._app_failed(exc)
        else:
            if not self.started and self._body_cut():
                await self._answer_cut_body()
            elif not self.started:
                log.error("%s: ASGI app returned without a response: 500", self._describe())
                self._why = "app returned without a response"
                await self._send_error(500)
            elif not self.complete and not self.disconnected:
                log.error("%s: ASGI app returned before ending its response", self._describe())
                if self._written:
                    self._abort("app returned before ending its response")
                else:
                    self._why = "app returned without a response body"
                    await self._send_error(500)
        finally:
            self.running = False
            self._wake_waiters()
            self._log_once()
        return self.moved

    async def _app_failed(self, exc: Exception) -> None:
        if self.moved:
            log.error("%s: ASGI app failed after its response", self._describe(), exc_info=exc)
            return
        if self.disconnected:
            # ClientDisconnect and friends: the app stopped because the client left.
            log.debug("%s: app ended after the client left: %r", self._describe(), exc)
            self._why = self._why or "client disconnected"
            self.keep_alive = False
            if not self._written and self._body_cut():
                await self._answer_cut_body()
            return
        log.error("%s: exception in ASGI app", self._describe(), exc_info=exc)
        self._why = "app error"
        if not self._written:
            await self._send_error(500)
        elif self.complete:
            # Starlette answers 500 itself, then re-raises: the answer is
            # whole, but the app's state is unknown, so no further request.
            self.keep_alive = False
        else:
            self._abort("app error during the response")

    def _body_cut(self) -> bool:
        """True when the client ended (EOF) inside its request body."""
        return self.disconnected and self._decoder is not None

    async def _answer_cut_body(self) -> None:
        # The request is incomplete (RFC 9112 section 8), which is not the
        # app's doing: 400, as the front answers it in auth mode, for a
        # client that only half-closed and still reads.
        log.info("%s: client closed inside the request body: 400", self._describe())
        await self._send_error(400)

    def _abort(self, why: str) -> None:
        """The response cannot end well: close without finishing it."""
        self._why = self._why or why
        self.keep_alive = False
        self.conn.broken = True

    def reusable(self) -> bool:
        """True when the next request may be read from this connection."""
        conn = self.conn
        if not (self.complete and self.keep_alive) or self.disconnected or conn.broken:
            return False
        if conn.closed or conn.receiver.stopping:
            return False
        return self._body_consumed()

    def _body_consumed(self) -> bool:
        decoder = self._decoder
        if decoder is None:
            return True
        # The app left (part of) the body unread: skip what already arrived;
        # reading more from the client just to discard it is not worth it.
        try:
            while True:
                event = decoder.next_event()
                if event is END:
                    self._decoder = None
                    self.conn.buf = decoder.trailing_data
                    return True
                if event is NEED_DATA:
                    return False
        except ProtocolError:
            return False

    def _describe(self) -> str:
        client = self.conn.client
        where = f"{client[0]}:{client[1]}" if client else "-"
        return f'{where} "{self.request.describe()}"'

    def _log_once(self) -> None:
        if self._started_at < 0:
            return
        duration = time.monotonic() - self._started_at
        self._started_at = -1.0
        receiver = self.conn.receiver
        if receiver.logs_access:  # the line is not even built otherwise
            receiver.access_log(
                f"{self._describe()} {self.status}", self.conn.bytes_sent, duration, self._why
            )

    # --- receive ---------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if self.disconnected or self.complete:
            return _disconnect()
        if self._decoder is not None:
            return await self._read_body()
        if not self._request_done:
            self._request_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # The body is complete: wait for the client to leave or the response
        # to end.  Look first: an app polling with a receive() it cancels at
        # once (Starlette's is_disconnected) must still learn the client left.
        if len(self.conn.buf) < MAX_HEAD_SIZE and self._check_client():
            return _disconnect()
        # Inline, one future per waiting receive() and no shield: an idle
        # stream keeps this frame alive for hours.
        waiter: asyncio.Future[None] = self.conn.loop.create_future()
        self._add_waiter(waiter)
        try:
            await waiter
        finally:
            self._remove_waiter(waiter)
        return _disconnect()

    async def _read_body(self) -> dict[str, Any]:
        decoder = self._decoder
        assert decoder is not None
        limit = self.conn.options.max_body_size
        if not self._received and (decoder.length or 0) > limit:
            # RFC 9110 section 15.5.14: the announced length is enough to
            # refuse; answered before 100 Continue is sent or a byte is read,
            # instead of waiting for a body the client may never send.
            return await self._body_failed(
                ProtocolError(
                    f"request body of {decoder.length} bytes, larger than {limit}",
                    status_hint=413,
                )
            )
        parts: list[bytes] = []
        while True:
            try:
                event = decoder.next_event()
            except ProtocolError as exc:
                return await self._body_failed(exc)
            if event is END:
                self._decoder = None
                self._request_done = True
                self.conn.buf = decoder.trailing_data
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            if event is NEED_DATA:
                if parts:
                    return {"type": "http.request", "body": b"".join(parts), "more_body": True}
                data = await self._read_more()
                if not data:
                    return _disconnect()
                decoder.receive_data(data)
                continue
            assert isinstance(event, bytes)
            self._received += len(event)
            if self._received > limit:
                return await self._body_failed(
                    ProtocolError(f"request body larger than {limit} bytes", status_hint=413)
                )
            parts.append(event)

    async def _read_more(self) -> bytes:
        """Body bytes from the socket; ``b""`` once the request is over (answered)."""
        if self._continue and not self.started:
            # RFC 9110 section 10.1.1: the client may wait for this before
            # sending the body; the senders never send it themselves.
            self._continue = False
            try:
                await self.conn.write(http.CONTINUE)
            except ConnectionClosed:
                self.disconnected = True
                return b""
        timeout = self.conn.options.body_timeout
        try:
            data = await self.conn.recv(timeout)
        except TimeoutError:
            await self._body_failed(
                ProtocolError(f"request body stalled for {timeout:.0f} s", status_hint=408)
            )
            return b""
        except ConnectionClosed:
            data = b""
        if not data:
            self.disconnected = True
            self._why = "client left inside the request body"
        return data

    async def _body_failed(self, exc: ProtocolError) -> dict[str, Any]:
        log.info("%s: %s", self._describe(), exc)
        self._why = str(exc)
        self.keep_alive = False
        if not self._written:
            await self._send_error(exc.status_hint)
        # From the app's side the client is gone: it gets http.disconnect and
        # its send() raises, as for a client that left.
        self.disconnected = True
        return _disconnect()

    def _add_waiter(self, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters
        if waiters is None:
            self._waiters = waiter
            conn = self.conn
            if not self._reading and len(conn.buf) < MAX_HEAD_SIZE:
                conn.loop.add_reader(conn.sock.fileno(), self._on_readable)
                self._reading = True
        elif isinstance(waiters, list):
            waiters.append(waiter)
        else:  # a second concurrent receive(): rare (sse-starlette + is_disconnected)
            self._waiters = [waiters, waiter]

    def _remove_waiter(self, waiter: asyncio.Future[None]) -> None:
        # After a wake-up or a cancelled receive() (Starlette's is_disconnected
        # cancels it at once): the others keep waiting; nobody left, no reading.
        waiters = self._waiters
        if waiters is waiter:
            self._waiters = None
        elif isinstance(waiters, list) and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                self._waiters = None
        if self._waiters is None:
            self._stop_reading()

    def _check_client(self, *, readiness: bool = False) -> bool:
        """Non-blocking reads: True if the client has left (EOF or reset).

        ``readiness``: called because the socket is readable; if nothing at
        all can be read, that is a partial kTLS record (aio.PARTIAL_RECORD_PAUSE)
        and reading pauses instead of being called again at once.

        Read until EAGAIN, not once: uvloop (libuv) delivers a readiness event
        that carries EPOLLERR once and then stops watching the fd, so a client
        that sends bytes and resets before we read them would otherwise leave
        the reset unreported, and the app waiting for ``http.disconnect``
        (with the connection and its fd) until it writes.
        """
        conn = self.conn
        first = True
        while True:
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                if first and readiness:
                    self._wait_for_record()
                return False
            except OSError:
                data = b""
            if not data:
                break
            first = False
            self._pause = 0.0
            # A pipelined request: keep it for later, up to one head's worth.
            conn.buf += data
            if len(conn.buf) >= MAX_HEAD_SIZE:
                self._stop_reading()
                return False
        self.disconnected = True
        self._why = self._why or "client disconnected"
        return True

    def _on_readable(self) -> None:
        if self._check_client(readiness=True):
            self._wake_waiters()

    def _wait_for_record(self) -> None:
        self._stop_reading()
        self._pause = aio.next_pause(self._pause)
        self.conn.loop.call_later(self._pause, self._read_again)

    def _read_again(self) -> None:
        conn = self.conn
        if (
            self._waiters is not None  # somebody still waits for the client to leave
            and not self._reading
            and not self.disconnected
            and not conn.closed
            and len(conn.buf) < MAX_HEAD_SIZE
        ):
            conn.loop.add_reader(conn.sock.fileno(), self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.conn.loop.remove_reader(self.conn.sock.fileno())

    def _wake_waiters(self) -> None:
        """The client left or the response ended: every waiting receive() returns."""
        self._stop_reading()
        waiters, self._waiters = self._waiters, None
        if waiters is None:
            return
        for waiter in waiters if isinstance(waiters, list) else (waiters,):
            if not waiter.done():
                waiter.set_result(None)

    # --- send ------------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        if self.disconnected:
            raise ConnectionClosed("the client disconnected")
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self._start(message)
            return
        if self.complete:
            raise RuntimeError(f"{kind!r} sent after the response was complete")
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        body = message.get("body") or b""
        if type(body) is not bytes:
            if not isinstance(body, bytearray | memoryview):
                raise TypeError(f"http.response.body needs bytes, not {type(body).__name__}")
            body = bytes(body)
        await self._body(body, bool(message.get("more_body", False)))

    def _start(self, message: dict[str, Any]) -> None:
        head = app_head(message, cgi=self.cgi, head_sent=self.request.head_sent)
        if head.close:
            self.keep_alive = False
        self._head = head.head
        self._length = head.length
        self.status = head.status
        if head.status in NO_BODY_STATUSES:
            self._no_body = True
        self.started = True

    async def _body(self, body: bytes, more: bool) -> None:
        if self._length is not None and not self._no_body:
            self._check_length(len(body), more)
        head = self._head
        if head is not None:
            self._head = None
            head = self._frame(head, len(body), more)
        payload = b"" if self._no_body else self._payload(body, more)
        if self._no_body and more and not head and self._check_client():
            # HEAD (or 204/304): nothing is written, so no write would notice
            # a client that left, and an endless stream would run for ever.
            self.keep_alive = False
            raise ConnectionClosed(self._why or "client disconnected")
        try:
            if head and len(payload) <= _COALESCE:
                await self.conn.write(head + payload)
            else:
                if head:
                    await self.conn.write(head)
                if payload:
                    await self.conn.write(payload)
        except ConnectionClosed as exc:
            self.disconnected = True
            self.keep_alive = False
            self._why = self._why or str(exc)
            raise
        finally:
            self._written = True
        if not more:
            self._completed()

    def _frame(self, head: bytes, size: int, more: bool) -> bytes:
        """Finish the head once the first body message shows how the body ends."""
        if self.request.head_sent:
            self.keep_alive = False
            return b""
        if self.conn.receiver.stopping:
            # This is the last response on the connection: say so in its head.
            self.keep_alive = False
        if not more and self.keep_alive and not self._body_consumed():
            # The response is whole and the app left part of the request body
            # unread: the connection ends after it (reusable()), so its head
            # must say so (RFC 9112 section 9.6), or the client sends its next
            # request on a connection about to close.
            self.keep_alive = False
        length: int | None = None
        if self._no_body or self._length is not None:
            pass
        elif not more:
            length = self._length = size
        elif self.can_chunk:
            self._chunked = True
        else:
            self.keep_alive = False  # close-delimited: the end of the body is the close
        return finish_head(
            head, length=length, chunked=self._chunked, close=not self.keep_alive, cgi=self.cgi
        )

    def _check_length(self, size: int, more: bool) -> None:
        remaining = self._length
        assert remaining is not None
        if size > remaining or (not more and size < remaining):
            self.keep_alive = False
            if self._written:
                self._abort("response does not match its Content-Length")
            raise RuntimeError(
                f"response body of {'more' if size > remaining else 'fewer'} bytes than "
                "its Content-Length"
            )
        self._length = remaining - size

    def _payload(self, body: bytes, more: bool) -> bytes:
        if not self._chunked:
            return body
        if more:
            return http.chunk(body)
        return http.chunk(body) + http.LAST_CHUNK

    def _completed(self) -> None:
        self.complete = True
        self._wake_waiters()
        if not self.keep_alive:
            # FIN now: a close-delimited body ends even if the app runs on.
            self.conn.shutdown_write()
        self._log_once()
        if self.on_move is not None:
            self.conn.loop.call_soon(self._maybe_move)

    def _maybe_move(self) -> None:
        if self.running and not self.moved and self.on_move is not None:
            self.moved = True
            self.on_move(self)

    async def _send_error(self, status: int) -> None:
        """Answer ``status`` ourselves (nothing of the app's answer was written)."""
        self.keep_alive = False
        self.started = True
        self.complete = True
        self.status = status
        self._wake_waiters()
        if self.request.head_sent:
            return  # Apache already sent a head: nothing sensible can follow
        data = error_response(status, cgi=self.cgi, head_only=self.request.method == "HEAD")
        with contextlib.suppress(ConnectionClosed):
            await self.conn.write(data)
        self._written = True
