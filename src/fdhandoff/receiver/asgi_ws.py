"""One WebSocket connection of the ASGI adapter: ``receive()`` and ``send()``.

The app receives ``websocket.connect`` first and answers:

* ``websocket.accept``: the adapter writes the ``101 Switching Protocols``
  (RFC 6455 section 4.2.2) with the chosen subprotocol and headers.  When the
  sender already did the handshake (fdhandoff front ``HANDOFF_UPGRADED``,
  OpenResty's ``X`` marker) nothing is written, and a subprotocol or headers
  the app asks for cannot reach the client any more: a warning says so;
* ``websocket.close``: ``403 Forbidden`` (ASGI spec), or, after a handshake
  done by the sender, a close frame with the app's code;
* ``websocket.http.response.start`` / ``.body``: any HTTP answer instead
  (the ``websocket.http.response`` extension).

Frames are decoded by :class:`fdhandoff.websocket.WebSocket` as the app asks
for them, no task of our own; bytes the client sent early (with the upgrade
request) are decoded first.  While the app is not in ``receive()`` (an app
that only sends, a push feed, may never call it) a reader callback goes on
decoding: pings are answered and the client's close frame is answered at once
(RFC 6455 sections 5.5.2, 5.5.1), and messages are held for ``receive()`` -
up to :data:`HELD_LIMIT`, then reading pauses (TCP back-pressure).  A frame
that breaks RFC 6455 ends only this connection, with the close code the codec
chose (1002, 1007 or 1009) and a ``websocket.disconnect`` to the app.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from enum import Enum
from typing import Any, Final

from .. import aio, websocket
from ..websocket import NEED_DATA, Close, CloseCode, Message, WebSocketProtocolError
from .asgi_conn import Connection, wake
from .asgi_http import HTTPCycle
from .asgi_response import error_response
from .asgi_scope import Request
from .stream import ConnectionClosed, drain_unread
from .ws import CLOSE_TIMEOUT, INBOX_LIMIT

__all__ = ["WebSocketCycle"]

log = logging.getLogger("fdhandoff.receiver.asgi")

#: Status in the access log for a connection that became a WebSocket.
_SWITCHED: Final = 101

#: Messages held for an app that is not in receive(); then reading pauses.
#: The native API's inbox bound (as websockets' max_queue).
HELD_LIMIT: Final = INBOX_LIMIT


class _State(Enum):
    CONNECTING = 1  # waiting for the app's accept
    OPEN = 2
    CLOSING = 3  # our close frame is sent, the client's is awaited
    CLOSED = 4  # the client's close frame arrived, or the connection is gone
    ANSWERED = 5  # refused with an HTTP answer (403, 500, denial response)


class WebSocketCycle:
    """``receive``/``send`` for one WebSocket; :meth:`run` ends the connection."""

    __slots__ = (
        "_close",
        "_close_deadline",
        "_close_timer",
        "_connect_sent",
        "_denial",
        "_held",
        "_pause",
        "_started_at",
        "_watching",
        "_why",
        "conn",
        "key",
        "request",
        "scope",
        "state",
        "status",
        "ws",
    )

    def __init__(
        self, conn: Connection, request: Request, scope: dict[str, Any], key: bytes | None
    ) -> None:
        self.conn = conn
        self.request = request
        self.scope = scope
        #: The client's Sec-WebSocket-Key; None when the sender did the handshake.
        self.key = key
        self.state = _State.CONNECTING
        self.status = 0
        self.ws: websocket.WebSocket | None = None
        self._connect_sent = False
        self._close: tuple[int, str] | None = None  # what ended the connection
        self._close_deadline = 0.0  # loop time: once CLOSING, the client's close frame is due
        self._denial: HTTPCycle | None = None
        self._started_at = time.monotonic()
        self._why: str | None = None
        #: Messages read while the app was not in receive(), oldest first;
        #: last, the client's close frame when it came behind them.
        self._held: collections.deque[Message | Close] | None = None
        #: Answers that close frame if the app does not read up to it.
        self._close_timer: asyncio.TimerHandle | None = None
        #: The reader callback that reads while the app is not in receive().
        self._watching = False
        self._pause = 0.0  # aio.next_pause: readable without data (a partial kTLS record)

    def _describe(self) -> str:
        client = self.conn.client
        where = f"{client[0]}:{client[1]}" if client else "-"
        return f'{where} "{self.request.describe()}"'

    # --- running the app ------------------------------------------------------------

    async def run(self, app: Any) -> None:
        """Run the app, then end the connection (closing handshake, close)."""
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            if self.state is _State.OPEN and self.ws is not None:
                # The receiver is stopping: tell the client (RFC 6455 7.4.1).
                with contextlib.suppress(ValueError, RuntimeError, WebSocketProtocolError):
                    self.conn.send_nowait(self.ws.send_close(CloseCode.GOING_AWAY))
            self._why = "cancelled at shutdown"
            self._close_connection()
            self._log()
            raise
        except Exception as exc:
            await self._app_failed(exc)
        else:
            if self.state is _State.CONNECTING:
                log.error(
                    "%s: ASGI app returned without accepting the WebSocket: 500", self._describe()
                )
                self._why = "app returned without accepting"
                await self._server_error()
        await self._finish()

    async def _app_failed(self, exc: Exception) -> None:
        if self.state is _State.CLOSED or self.conn.broken:
            log.debug("%s: app ended after the client left: %r", self._describe(), exc)
            return
        log.error("%s: exception in ASGI app", self._describe(), exc_info=exc)
        self._why = "app error"
        if self.state is _State.CONNECTING:
            await self._server_error()
        elif self.state is _State.OPEN:
            await self._send_close(CloseCode.INTERNAL_ERROR, "")
        elif self.state is _State.ANSWERED:
            self.conn.broken = True  # a denial response cut short

    async def _finish(self) -> None:
        conn = self.conn
        self._unwatch()  # from here on, reads are the closing handshake's
        try:
            if self.state is _State.OPEN:
                await self._send_close(CloseCode.NORMAL, "")
            if self.state is _State.CLOSING and not conn.broken:
                # RFC 6455 section 7.1.1: wait a moment for the client's close
                # frame so that it, not us, sees the TCP close first... then close.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(conn.options.linger_timeout):
                        while self._close is None:
                            await self.receive()
                self._unwatch()  # receive() arms it again on its way out
            if self.state is _State.ANSWERED and not conn.broken:
                self._log()  # times the answer, not the lingering close
                await conn.linger_close()
            elif self._close is not None and self._close[0] != CloseCode.ABNORMAL:
                # Our last close frame is written (the reply, or the failing
                # one).  RFC 6455 section 7.1.1: the server closes the TCP
                # connection first, and the client answers a close frame with
                # its own (section 5.5.1): closing outright, that reply (or
                # frames in flight) would meet a closed socket and a reset
                # (RFC 1122 4.2.2.13) that can destroy our close frame before
                # it is read.  So FIN now, read and drop until the client's
                # FIN, bounded by linger_timeout.  Not after 1006: the client
                # is gone already.
                self._log()
                await conn.linger_close()
        finally:
            self._close_connection()
            self._log()

    def _close_connection(self) -> None:
        self._unwatch()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        conn = self.conn
        if self.ws is not None and not conn.closed and not conn.broken:
            # Unread client bytes (what followed a bad frame, frames after
            # the client's close) would make close() send a reset, which can
            # destroy our close frame in flight (RFC 1122 4.2.2.13); RFC 6455
            # section 7.1.1 wants it delivered.  Bounded, as on the native path.
            drain_unread(conn.sock)
        conn.close()

    def _log(self) -> None:
        if self._started_at < 0:
            return
        duration = time.monotonic() - self._started_at
        self._started_at = -1.0
        why = self._why
        if why is None and self._close is not None:
            why = f"close {self._close[0]}"
        self.conn.receiver.access_log(
            f"{self._describe()} {self.status}", self.conn.bytes_sent, duration, why
        )

    # --- receive ---------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if not self._connect_sent:
            self._connect_sent = True
            return {"type": "websocket.connect"}
        held = self._held
        if held:
            if isinstance(held[0], Close):  # every message before it was read
                return self._answer_held_close()
            message = held.popleft()
            assert isinstance(message, Message)
            self._watch()  # below the bound again
            return _received(message)
        if self._close is not None:
            return _disconnect(*self._close)
        if self.state is _State.CONNECTING:
            raise RuntimeError("receive() called again before websocket.accept")
        if self.state is _State.ANSWERED:
            self._close = (CloseCode.ABNORMAL, "")
            return _disconnect(*self._close)
        ws = self.ws
        assert ws is not None
        # One loop, no helper coroutines: an idle WebSocket sits in here, and
        # every frame of the chain would be kept for as long as it idles.
        self._unwatch()  # this loop reads now; the callback again once it returns
        try:
            woken, pause = False, 0.0
            while True:
                try:
                    event = ws.next_event()
                except WebSocketProtocolError as exc:
                    log.info("%s: closing: %s", self._describe(), exc)
                    self._why = f"client broke RFC 6455: {exc}"
                    await self._write_quietly(ws.data_to_send())
                    return self._closed(exc.close_code, "")
                if event is NEED_DATA:
                    try:
                        data = self.conn.recv_nowait()
                    except ConnectionClosed:
                        data = b""  # the codec turns EOF into close code 1006
                    if data is None:
                        loop, fd = self.conn.loop, self.conn.sock.fileno()
                        waiter: asyncio.Future[None] = loop.create_future()
                        # Nothing after a wake-up: a partial kTLS record, which the
                        # kernel reports readable; listen again only after a pause
                        # (aio.PARTIAL_RECORD_PAUSE).  A timer, not a sleep: no frame.
                        pause = aio.next_pause(pause) if woken else 0.0
                        timer = (
                            loop.call_later(pause, loop.add_reader, fd, wake, waiter)
                            if pause
                            else None
                        )
                        if timer is None:
                            loop.add_reader(fd, wake, waiter)
                        try:
                            if self.state is _State.CLOSING:
                                # Our close frame is sent: RFC 6455 section 7.1.1
                                # lets the server close the TCP connection when
                                # the client does not answer; an app reading on
                                # after websocket.close must not wait forever.
                                async with asyncio.timeout_at(self._close_deadline):
                                    await waiter
                            else:
                                await waiter
                        except TimeoutError:
                            self._why = "client did not answer the close frame"
                            return self._closed(CloseCode.ABNORMAL, "")
                        finally:
                            if timer is not None:
                                timer.cancel()
                            loop.remove_reader(fd)
                        woken = True
                    else:
                        woken = False
                        ws.receive_data(data)
                    continue
                out = ws.data_to_send()  # pongs, our reply to a close frame
                if out:
                    await self._write_quietly(out)
                if isinstance(event, Message):
                    return _received(event)
                if isinstance(event, Close):
                    return self._closed(event.code, event.reason)
                # Ping (already answered) or Pong: nothing for the app.
        finally:
            self._watch()

    # --- reading while the app is elsewhere -------------------------------------------

    def _watch(self) -> None:
        """Read from a callback while the app is not in receive() (see module)."""
        held = self._held
        if (
            self._watching
            or self.state not in (_State.OPEN, _State.CLOSING)
            or self._close is not None
            or self._close_timer is not None
            or (held is not None and len(held) >= HELD_LIMIT)
            or self.conn.closed
            or self.conn.broken
        ):
            return
        self._watching = True
        self.conn.loop.add_reader(self.conn.sock.fileno(), self._on_readable)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.conn.loop.remove_reader(self.conn.sock.fileno())

    def _on_readable(self) -> None:
        ws = self.ws
        assert ws is not None
        try:
            data = self.conn.recv_nowait()
        except ConnectionClosed:
            data = b""  # the codec turns EOF into close code 1006
        if data is None:
            # Readable without data: a partial kTLS record (see receive()).
            self._unwatch()
            self._pause = aio.next_pause(self._pause)
            self.conn.loop.call_later(self._pause, self._watch)
            return
        self._pause = 0.0
        ws.receive_data(data)
        self._decode_held()

    def _decode_held(self) -> None:
        """Decode what the codec holds: answer pings and a close at once, hold messages."""
        ws = self.ws
        assert ws is not None
        while self._close is None and self._close_timer is None:
            self.conn.write_soon(ws.data_to_send())  # pongs, before what comes next
            try:
                event = ws.next_event()
            except WebSocketProtocolError as exc:
                log.info("%s: closing: %s", self._describe(), exc)
                self._why = f"client broke RFC 6455: {exc}"
                self.conn.write_soon(ws.data_to_send())  # the failing close frame
                self._closed(exc.close_code, "")
                break
            if event is NEED_DATA:
                break
            if isinstance(event, Message):
                held = self._held
                if held is None:
                    held = self._held = collections.deque()
                held.append(event)
                if len(held) >= HELD_LIMIT:
                    self._unwatch()  # the app reads again first (TCP back-pressure)
            elif isinstance(event, Close):
                if self._held:
                    # Messages came before it: the app may still answer them,
                    # as it could have in receive() (RFC 6455 section 5.5.1
                    # lets the reply wait for data being sent).  The reply
                    # goes when the app reads up to it, or after CLOSE_TIMEOUT.
                    self._held.append(event)
                    self._close_timer = self.conn.loop.call_later(
                        CLOSE_TIMEOUT, self._answer_held_close
                    )
                    self._unwatch()
                    return
                self.conn.write_soon(ws.data_to_send())  # our reply, at once
                self._closed(event.code, event.reason)
                break
        self.conn.write_soon(ws.data_to_send())  # pongs
        if self._close is not None:
            self._unwatch()

    def _answer_held_close(self) -> dict[str, Any]:
        """Reply to the client's close frame held behind messages; the disconnect."""
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        held = self._held
        if not held or not isinstance(held[-1], Close):  # answered already (timer, receive())
            assert self._close is not None
            return _disconnect(*self._close)
        close = held.pop()
        assert isinstance(close, Close)
        ws = self.ws
        assert ws is not None
        self.conn.write_soon(ws.data_to_send())
        return self._closed(close.code, close.reason)

    async def _write_quietly(self, data: bytes) -> None:
        if not data:
            return
        with contextlib.suppress(ConnectionClosed):
            await self.conn.write(data)

    def _closed(self, code: int, reason: str) -> dict[str, Any]:
        self.state = _State.CLOSED
        self._close = (code, reason)
        return _disconnect(code, reason)

    # --- send ------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        state = self.state
        if state is _State.CONNECTING:
            if kind == "websocket.accept":
                await self._accept(message.get("subprotocol"), message.get("headers") or [])
            elif kind == "websocket.close":
                await self._refuse(message)
            elif kind == "websocket.http.response.start" and self.key is not None:
                await self._deny(message)
            else:
                raise RuntimeError(f"{kind!r} sent before the WebSocket was accepted")
        elif state is _State.OPEN:
            if kind == "websocket.send":
                await self._send_message(message)
            elif kind == "websocket.close":
                await self._send_close(
                    message.get("code", CloseCode.NORMAL), message.get("reason") or ""
                )
            else:
                raise RuntimeError(f"{kind!r} is not a message for an open WebSocket")
        elif state is _State.ANSWERED and kind == "websocket.http.response.body":
            assert self._denial is not None
            await self._denial.send({**message, "type": "http.response.body"})
        elif self._close is not None or self.conn.broken:
            raise ConnectionClosed("the WebSocket connection is closed")
        elif kind == "websocket.close" and state is _State.CLOSING:
            return  # closing already
        else:
            raise RuntimeError(f"{kind!r} sent after the WebSocket was closed")

    async def _accept(self, subprotocol: str | None, headers: list[Any]) -> None:
        if self.key is None:
            request = self.request
            if request.described and subprotocol not in (None, request.subprotocol):
                # The fdhandoff front answered with the route's subprotocol.
                log.warning(
                    "%s: the front's 101 named subprotocol %r (the client's first offer among "
                    "the route's subprotocols); the app's %r cannot be sent any more",
                    self._describe(),
                    request.subprotocol,
                    subprotocol,
                )
            if headers or (subprotocol is not None and not request.described):
                log.warning(
                    "%s: the handshake was done by the sender: the subprotocol %r and "
                    "%d header(s) the app chose cannot be sent any more",
                    self._describe(),
                    subprotocol,
                    len(headers),
                )
        else:
            if subprotocol is not None and subprotocol not in self.scope["subprotocols"]:
                raise ValueError(f"subprotocol {subprotocol!r} was not offered by the client")
            response = websocket.handshake_response(
                self.key,
                subprotocol=subprotocol.encode() if subprotocol is not None else None,
                extra_headers=[(bytes(n), bytes(v)) for n, v in headers],
                # RFC 9110 §7.8: Expect: 100-continue with Upgrade, a 100 before the 101.
                continue_first=websocket.expects_continue(self.request.headers),
            )
            await self._write(response)
        self.status = _SWITCHED
        self.state = _State.OPEN
        ws = self.ws = websocket.WebSocket(max_message_size=self.conn.options.max_ws_message_size)
        early = self.conn.take_buffer()
        if early:  # frames sent right behind the upgrade request
            ws.receive_data(early)
            self._decode_held()
        self._watch()

    async def _refuse(self, message: dict[str, Any]) -> None:
        if self.key is None:
            await self._close_upgraded(
                message.get("code", CloseCode.NORMAL), message.get("reason") or ""
            )
            return
        self._why = "refused by the app"
        await self._answer(error_response(403), 403)

    async def _server_error(self) -> None:
        """The app failed before accepting: 500, or 1011 after the sender's 101."""
        if self.key is None:
            # An HTTP answer after the 101 would reach the client as frame
            # bytes (RFC 6455 section 5.2 garbage): only a close frame fits.
            await self._close_upgraded(CloseCode.INTERNAL_ERROR, "")
            return
        await self._answer(error_response(500), 500)

    async def _close_upgraded(self, code: int, reason: str) -> None:
        """End a connection whose 101 the sender wrote: all that is left is a close frame."""
        self.status = _SWITCHED
        self.state = _State.OPEN
        self.ws = websocket.WebSocket(max_message_size=self.conn.options.max_ws_message_size)
        await self._send_close(code, reason)

    async def _deny(self, message: dict[str, Any]) -> None:
        self.state = _State.ANSWERED
        denial = self._denial = HTTPCycle(
            self.conn, self.request, self.scope, None, keep_alive=False, access_log=False
        )
        await denial.send({**message, "type": "http.response.start"})
        self.status = denial.status

    async def _answer(self, data: bytes, status: int) -> None:
        self.state = _State.ANSWERED
        self.status = status
        with contextlib.suppress(ConnectionClosed):
            await self.conn.write(data)

    async def _send_message(self, message: dict[str, Any]) -> None:
        ws = self.ws
        assert ws is not None
        data = message.get("bytes")
        if data is None:
            data = message.get("text")
            if data is None:
                raise ValueError("websocket.send needs 'bytes' or 'text'")
        if self._close_timer is not None:
            # The client's close frame is held behind messages: the codec has
            # read it, our reply is not sent yet, answers may still go.
            await self._write(_server_frame(data))
            return
        await self._write(ws.send_message(data))

    async def _send_close(self, code: int, reason: str) -> None:
        ws = self.ws
        assert ws is not None
        frame = ws.send_close(code, reason)
        self.state = _State.CLOSING
        self._close_deadline = self.conn.loop.time() + self.conn.options.linger_timeout
        with contextlib.suppress(ConnectionClosed):
            await self._write(frame)

    async def _write(self, data: bytes) -> None:
        try:
            await self.conn.write(data)
        except ConnectionClosed:
            self.state = _State.CLOSED
            self._close = (CloseCode.ABNORMAL, "")
            raise


def _server_frame(data: bytes | str) -> bytes:
    if isinstance(data, str):
        return websocket.encode_frame(websocket.Opcode.TEXT, data.encode("utf-8"))
    return websocket.encode_frame(websocket.Opcode.BINARY, bytes(data))


def _received(message: Message) -> dict[str, Any]:
    if isinstance(message.data, str):
        return {"type": "websocket.receive", "text": message.data}
    return {"type": "websocket.receive", "bytes": message.data}


def _disconnect(code: int, reason: str) -> dict[str, Any]:
    return {"type": "websocket.disconnect", "code": int(code), "reason": reason}
