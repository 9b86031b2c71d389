"""WebSocket connections (RFC 6455) on handed-off sockets, asyncio flavour.

:func:`accept` completes the opening handshake from the request the sender
described (``check_upgrade`` + ``handshake_response`` of
:mod:`fdhandoff.websocket`), or skips it when the sender already answered 101
(``HANDOFF_UPGRADED=websocket`` from the fdhandoff front, marker ``X`` from
OpenResty).  Client bytes the sender had already read are frames and are
processed first: nothing the client sent together with its upgrade is lost.

A :class:`WebSocket` is a :class:`~fdhandoff.receiver.stream.Stream`: no task
per connection, one reader callback feeding the sans-IO codec, writes straight
to the kernel.  Two ways to consume messages:

* callbacks: ``ws.on_message = fn`` (``fn(ws, message)``), ``ws.on_close``;
  the handler returns and the connection lives on its own (the cheap way);
* coroutines: ``async for message in ws`` / ``await ws.receive()``; messages
  wait in a small queue, and reading from the client pauses while it is full
  (back-pressure instead of unbounded memory).

A client that breaks the protocol (a frame header announcing 2^62 bytes, bad
UTF-8, an unmasked frame) gets the close frame the codec chose (1002, 1007,
1009) and only its own connection ends.

After our last close frame the connection is half-closed (FIN) and the
client's bytes are read and dropped until its own FIN, for at most
``Options.linger_timeout``: the close reply the client must send (RFC 6455
section 5.5.1) then meets an open socket, not a reset.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from .. import websocket
from ..errors import ProtocolError
from ..message import Format
from ..websocket import CloseCode, Opcode, WebSocketProtocolError, encode_frame
from .http import HeaderInput
from .request import HandoffInfo
from .stream import _CLOSED_SEND, ConnectionClosed, Sent, Stream

if TYPE_CHECKING:
    from .engine import Receiver
    from .handoff import Handoff

__all__ = ["CLOSE_TIMEOUT", "INBOX_LIMIT", "WebSocket", "accept"]

log = logging.getLogger("fdhandoff.receiver")

#: Seconds to wait for the client's close frame after sending ours
#: (RFC 6455 section 7.1.1: the server then closes the TCP connection).
CLOSE_TIMEOUT: Final = 5.0

#: Messages queued for ``receive()`` before reading from the client pauses;
#: the `websockets` library's default queue is the same size.
INBOX_LIMIT: Final = 16

Message = str | bytes
MessageCallback = Callable[["WebSocket", Message], None]

#: Close codes after which ``async for`` ends quietly.
_NORMAL: Final = frozenset({CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS})


class _Inbox:
    """Messages waiting for ``receive()``; exists only in the coroutine style."""

    __slots__ = ("messages", "paused", "waiter")

    def __init__(self) -> None:
        self.messages: deque[Message] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class WebSocket(Stream):
    """One WebSocket connection; see the module documentation."""

    __slots__ = (
        "_client_fin",
        "_close_timer",
        "_codec",
        "_inbox",
        "_lingering",
        "_on_message",
        "close_code",
        "subprotocol",
    )

    def __init__(
        self,
        handoff: Handoff,
        codec: websocket.WebSocket,
        subprotocol: str | None,
    ) -> None:
        super().__init__(handoff.socket, handoff.receiver, handoff.log_prefix(101))
        self._codec = codec
        self._on_message: MessageCallback | None = None
        self._inbox: _Inbox | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        # While half-closed after our last frame: the reason to log at the end.
        self._lingering: tuple[str | None] | None = None
        # The client's FIN came after its close frame: nothing to linger for.
        self._client_fin = False
        #: The close code once the connection ended (1006: closed without one).
        self.close_code: int | None = None
        self.subprotocol = subprotocol
        self._sent = handoff.bytes_sent  # the 101 response, for the access log

    # --- state --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once a close frame was sent or received, or the connection ended."""
        return super().closed or self._codec.state is not websocket.State.OPEN

    @property
    def on_message(self) -> MessageCallback | None:
        """``fn(ws, message)`` for each message; setting it delivers queued ones."""
        return self._on_message

    @on_message.setter
    def on_message(self, callback: MessageCallback | None) -> None:
        self._on_message = callback
        inbox = self._inbox
        if callback is None or inbox is None:
            return
        while inbox.messages and self._on_message is callback:
            self._deliver(callback, inbox.messages.popleft())
        if not inbox.messages and self._reply_deferred:
            self._answer_close()
            return
        self._resume_reading(inbox)

    # --- sending ---------------------------------------------------------------------

    @classmethod
    def encode(cls, message: Message) -> bytes:
        """A server frame for ``message`` (text for ``str``), the same for every client."""
        if isinstance(message, str):
            return encode_frame(Opcode.TEXT, message.encode("utf-8"))
        return encode_frame(Opcode.BINARY, bytes(message))

    def _send_encoded(self, data: bytes) -> Sent:
        # Nothing may follow our own close frame (RFC 6455 section 5.5.1).
        # After the client's close frame (or a violation) the codec is
        # CLOSED, but while our last frame waits for the queued messages to
        # be read (_reply_deferred) the application may still answer them;
        # once that frame is sent the stream is closed and _write refuses.
        if self._codec.state is websocket.State.CLOSING:
            return _CLOSED_SEND
        return self._write(data)

    def send(self, message: Message) -> Sent:
        """Send a text (``str``) or binary message; never blocks (await to drain)."""
        return self._send_encoded(self.encode(message))

    def ping(self, payload: bytes = b"") -> Sent:
        if self._codec.state is not websocket.State.OPEN:
            return _CLOSED_SEND
        return self._write(self._codec.send_ping(payload))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection ends when the client
        answers (or after :data:`CLOSE_TIMEOUT`)."""
        if super().closed:
            return
        if self._reply_deferred:
            self._answer_close()  # the client closed first: our reply is the close
            return
        frame = self._codec.send_close(code, reason)
        if not frame:
            return  # a close frame was already sent
        self._write(frame)
        if self._close_timer is None and not super().closed:
            self._close_timer = self._receiver.loop.call_later(
                CLOSE_TIMEOUT, self._abort, "client did not answer the close frame"
            )

    def going_away(self) -> None:
        self.close(CloseCode.GOING_AWAY, "server shutting down")

    def fail(self) -> None:
        self.close(CloseCode.INTERNAL_ERROR, "internal error")

    # --- receiving ------------------------------------------------------------------------

    @property
    def _reply_deferred(self) -> bool:
        """The client's close frame (or a violation) was read and our last
        frame waits for the queued messages (see _closing)."""
        return self._codec.state is websocket.State.CLOSED and not super().closed

    def _on_data(self, data: bytes) -> None:
        if self._reply_deferred or super().closed:
            # Nothing after the client's close frame (RFC 6455 section 5.5.1)
            # or a violation (section 7.1.7) is processed: not while our last
            # frame waits for queued messages or for the socket, nor while
            # lingering (the codec would raise its violation again).
            return
        self._codec.receive_data(data)
        self._pump()

    def _on_eof(self) -> None:
        if self._lingering is not None:
            self._linger_end()  # the client's FIN: both sides are closed
            return
        if self._reply_deferred or super().closed:
            # The FIN came after the client's close frame (or a violation), or
            # while our last frames are written.  It ends only the client's
            # sending side (RFC 9293 section 3.6): the messages queued before
            # its close are still answered, and our close frame still goes
            # (RFC 6455 sections 5.5.1, 7.1.7).  Stop reading (the EOF would
            # be reported again and again), and end without lingering.
            self._client_fin = True
            self._receiver.loop.remove_reader(self._sock.fileno())
            return
        if self.close_code is None:
            self.close_code = CloseCode.ABNORMAL
        self._abort("client closed the connection")

    def _pump(self) -> None:
        codec = self._codec
        while not super().closed:
            try:
                event = codec.next_event()
            except WebSocketProtocolError as exc:
                self.close_code = exc.close_code
                log.info("WebSocket client broke the protocol: %s (close %d)", exc, exc.close_code)
                self._closing()
                return
            if event is websocket.NEED_DATA:
                break
            if isinstance(event, websocket.Message):
                # Pongs for pings that came before this message leave before
                # whatever the callback sends in answer (Autobahn 5.6 checks
                # the order).
                self._flush_replies()
                self._received(event.data)
            elif isinstance(event, websocket.Close):
                self.close_code = event.code
                self._closing()
                return
            # Ping: the pong is queued in the codec; Pong: nothing to do.
        self._flush_replies()

    def _closing(self) -> None:
        """The codec is CLOSED (the client's close frame, or a violation) and
        holds our last frame (the close reply, or the failing close frame)."""
        inbox = self._inbox
        if inbox is not None and inbox.messages and self._close_timer is None:
            # Whole messages that came before still wait for receive(): let
            # the application answer them first, as a callback would have
            # (RFC 6455 section 5.5.1 allows the close reply to wait for the
            # data being sent; Autobahn 7.1.1 expects the echo before the
            # close, 3.2 before the failing close).  The frame goes once the
            # queue is read, or after CLOSE_TIMEOUT.  Not when we had sent a
            # close frame (the timer runs): nothing can be answered then.
            self._close_timer = self._receiver.loop.call_later(CLOSE_TIMEOUT, self._answer_close)
            return
        self._answer_close()

    def _answer_close(self) -> None:
        """Send the codec's last frame and end."""
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._flush_replies()
        error = self._codec.error
        self._end(None if error is None else f"protocol error, close {error.close_code}: {error}")

    def _finish(self, why: str | None, *, clean: bool) -> None:
        # A clean end comes after our last close frame is written: the
        # closing handshake completed, or the connection was failed.
        if clean and self._lingering is None and not self._client_fin and self._half_close():
            self._lingering = (why,)
            return
        super()._finish(why, clean=clean)

    def _half_close(self) -> bool:
        """Send FIN and keep reading until the client's, for a bounded time.

        RFC 6455 section 7.1.1: the server closes the TCP connection first,
        and after our close frame the client still sends its own (section
        5.5.1 requires it), possibly behind frames already in flight.
        Closing the socket outright, such bytes arriving after it (or between
        ``drain_unread`` and ``close``) are answered with a reset (RFC 1122
        4.2.2.13), which can destroy our close frame before the client read
        it.  Half-closed, the FIN goes now and what the client sends is read
        and dropped until its FIN or ``linger_timeout``.
        """
        sock = self._sock
        self._end_tls()
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False  # the connection is gone: close now
        loop = self._receiver.loop
        inbox = self._inbox
        if inbox is not None and inbox.paused:  # back-pressure: the reader was removed
            inbox.paused = False
            loop.add_reader(sock.fileno(), self._on_readable)
        self._close_timer = loop.call_later(self._receiver.options.linger_timeout, self._linger_end)
        return True

    def _linger_end(self) -> None:
        lingering = self._lingering
        assert lingering is not None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        super()._finish(lingering[0], clean=True)

    def _flush_replies(self) -> None:
        out = self._codec.data_to_send()
        if out:
            self._write(out)

    def _received(self, message: Message) -> None:
        callback = self._on_message
        if callback is not None:
            self._deliver(callback, message)
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = _Inbox()
        inbox.messages.append(message)
        inbox.wake()
        if len(inbox.messages) >= INBOX_LIMIT and not inbox.paused:
            inbox.paused = True
            self._receiver.loop.remove_reader(self._sock.fileno())

    def _deliver(self, callback: MessageCallback, message: Message) -> None:
        try:
            callback(self, message)
        except Exception:
            log.exception("on_message callback failed; closing with 1011")
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _reading(self) -> bool:
        inbox = self._inbox
        return super()._reading() and not (inbox is not None and inbox.paused)

    def _resume_reading(self, inbox: _Inbox) -> None:
        if (
            inbox.paused
            and len(inbox.messages) < INBOX_LIMIT // 2
            and not super().closed
            and not self._client_fin
        ):
            inbox.paused = False
            self._receiver.loop.add_reader(self._sock.fileno(), self._on_readable)

    async def receive(self) -> Message:
        """The next message; raises :class:`ConnectionClosed` once the connection ended."""
        while True:
            inbox = self._inbox
            if inbox is None:
                inbox = self._inbox = _Inbox()
            if inbox.messages:
                message = inbox.messages.popleft()
                self._resume_reading(inbox)
                return message
            if self._reply_deferred:
                # Every message that came before the client's close frame
                # was read (and answered, if the application wanted to).
                self._answer_close()
            if super().closed:
                raise ConnectionClosed(f"WebSocket closed (code {self.close_code})")
            inbox.waiter = self._receiver.loop.create_future()
            await inbox.waiter

    def __aiter__(self) -> WebSocket:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    def _ended(self) -> None:
        # Ended without a closing handshake (reset, write failure, abort):
        # RFC 6455 section 7.1.5 calls that 1006, whatever the path was.
        if self.close_code is None:
            self.close_code = CloseCode.ABNORMAL
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._inbox is not None:
            self._inbox.wake()


# --- the opening handshake -------------------------------------------------------------------


def choose_subprotocol(handoff: HandoffInfo, subprotocol: str | None) -> bytes | None:
    if subprotocol is None:
        return None
    offered = websocket.parse_subprotocols(handoff.raw_headers)
    chosen = subprotocol.encode("latin-1")
    if chosen not in offered:
        raise ValueError(f"subprotocol {subprotocol!r} was not offered by the client")
    return chosen


def agreed_subprotocol(handoff: HandoffInfo, wanted: str | None) -> str | None:
    """The subprotocol of a connection whose ``101`` the sender already wrote.

    The fdhandoff front says which one it agreed with the client
    (``HANDOFF_SUBPROTOCOL``, from the route's ``subprotocols``): that one is
    in force whatever the handler asks for, and a different choice only gets a
    warning, since the client cannot be told any more.  A marker handoff
    (OpenResty's ``X``) says nothing: the handler's choice is taken on trust.
    """
    if handoff.format is not Format.SCGI:
        return wanted
    if wanted is not None and wanted != handoff.subprotocol:
        log.warning(
            "%s: the front's 101 named subprotocol %r (the client's first offer among the "
            "route's subprotocols); the handler's %r cannot be sent any more",
            handoff.describe(),
            handoff.subprotocol,
            wanted,
        )
    return handoff.subprotocol


def header_bytes(headers: HeaderInput) -> Iterable[tuple[bytes, bytes]]:
    for name, value in headers:
        yield (
            name.encode("latin-1") if isinstance(name, str) else name,
            value.encode("latin-1") if isinstance(value, str) else value,
        )


async def _handshake(
    handoff: Handoff, subprotocol: str | None, headers: HeaderInput, key: str | None
) -> None:
    from .handoff import Phase  # noqa: PLC0415 - handoff imports this module lazily

    if handoff.format is Format.PLAIN_SCGI:
        raise ProtocolError("WebSocket is not possible over plain SCGI (no upgrade through it)")
    if key is None and not handoff.has_request:
        raise ProtocolError(
            f"a {handoff.format.value} handoff carries no request head: pass the client's "
            "Sec-WebSocket-Key as key="
        )
    try:
        if key is not None:
            # A key from elsewhere (an Apache payload) is held to the header's
            # rule, RFC 6455 §4.2.1 item 5: base64 of 16 bytes, OWS trimmed.
            raw_key = websocket.check_key(_key_bytes(key))
        else:
            assert handoff.method is not None
            raw_key = websocket.check_upgrade(
                handoff.method.encode("latin-1"),
                handoff.http_version.encode(),
                handoff.raw_headers,
            )
    except ProtocolError as exc:
        handoff.status = exc.status_hint
        await handoff.send_raw(websocket.error_response(exc, head_only=handoff.method == "HEAD"))
        handoff.phase = Phase.DONE
        raise
    # RFC 9110 §7.8: a client that sent Expect: 100-continue with its Upgrade
    # gets a 100 (Continue) before the 101 (not counted as response bytes).
    continue_first = websocket.expects_continue(handoff.raw_headers)
    response = websocket.handshake_response(
        raw_key,
        subprotocol=choose_subprotocol(handoff, subprotocol),
        extra_headers=list(header_bytes(headers)),
        continue_first=continue_first,
    )
    handoff.status = 101
    await handoff.send_raw(response)
    if continue_first:
        handoff.bytes_sent -= len(websocket.CONTINUE)


def _key_bytes(key: str) -> bytes:
    try:
        return key.encode("ascii")
    except UnicodeEncodeError:
        raise ProtocolError(f"Sec-WebSocket-Key {key[:32]!r} is not base64 of 16 bytes") from None


async def accept(
    handoff: Handoff,
    subprotocol: str | None = None,
    headers: HeaderInput = (),
    max_message_size: int | None = None,
    key: str | None = None,
) -> WebSocket:
    """Turn ``handoff`` into an open :class:`WebSocket` (see :meth:`Handoff.websocket`)."""
    from .handoff import Phase  # noqa: PLC0415

    if handoff.phase is not Phase.NEW:
        raise RuntimeError(f"a response was already started ({handoff.phase.name})")
    receiver: Receiver = handoff.receiver
    limit = receiver.options.max_ws_message_size if max_message_size is None else max_message_size
    codec = websocket.WebSocket(max_message_size=limit)
    if handoff.upgraded:
        subprotocol = agreed_subprotocol(handoff, subprotocol)
    else:
        await _handshake(handoff, subprotocol, headers, key)
    handoff.status = 101
    ws = WebSocket(handoff, codec, subprotocol)
    handoff.phase = Phase.HANDED_OVER
    handoff.stream = ws
    if handoff.already_read:
        # Frames the client sent right behind its upgrade request.
        ws._on_data(handoff.already_read)
    return ws
