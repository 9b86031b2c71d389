"""Sync streams: SSE and WebSocket written from any thread, and channels of them."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from ... import aio, fdpass, websocket
from ...websocket import CloseCode, WebSocketProtocolError
from ..sse import encode_comment, encode_event
from ..stream import ConnectionClosed
from ..ws import CLOSE_TIMEOUT
from ..ws import WebSocket as AsyncWebSocket

if TYPE_CHECKING:
    from .handoff import Handoff

__all__ = ["Channel", "SSEStream", "WebSocket"]

log = logging.getLogger("fdhandoff.receiver")

#: Bytes read per recv.
READ_SIZE: Final = 64 * 1024


class _SyncStream:
    """A client connection written from any thread (writes are serialised)."""

    def __init__(self, handoff: Handoff) -> None:
        self._handoff = handoff
        self._sock = handoff.socket
        self._lock = threading.Lock()
        self._closed = False
        self._tls_ended = False
        self._channels: set[Channel] = set()
        #: Called once with the stream when it has ended.
        self.on_close: Callable[[Any], None] | None = None
        handoff.receiver._track(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def _end_tls(self) -> None:
        """As the asyncio flavour's: close_notify on kernel TLS, once, on a clean end."""
        if not self._tls_ended:
            self._tls_ended = True
            fdpass.send_tls_close_notify(self._sock)

    @property
    def bytes_sent(self) -> int:
        return self._handoff.bytes_sent

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise ConnectionClosed("the stream is closed")
            try:
                self._handoff.send_raw(data)
            except ConnectionClosed as exc:
                self._finish(str(exc))
                raise

    def close(self) -> None:
        with self._lock:
            self._finish(None)

    def going_away(self) -> None:
        self.close()

    def fail(self) -> None:
        """End it because what fed it failed (WebSocket: close code 1011)."""
        self.close()

    def _finish(self, why: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        handoff = self._handoff
        if why is None:
            self._end_tls()
        # As the asyncio flavour: unread client bytes (what followed a bad
        # frame) would turn the close into a reset that can destroy the close
        # frame just sent (RFC 1122 4.2.2.13, RFC 6455 7.1.1).
        _drain_unread(self._sock)
        with contextlib.suppress(OSError):
            self._sock.close()
        handoff.receiver._untrack(self)
        handoff.receiver.access_log(
            handoff.log_prefix(handoff.status or 0),
            handoff.bytes_sent,
            time.monotonic() - handoff.started,
            why,
        )
        for channel in list(self._channels):
            channel.discard(self)
        callback, self.on_close = self.on_close, None
        if callback is not None:
            try:
                callback(self)
            except Exception:
                log.exception("on_close callback of %r failed", self)

    @classmethod
    def encode(cls, *args: Any, **kwargs: Any) -> bytes:
        raise NotImplementedError

    def _send_encoded(self, data: bytes) -> None:
        self._write(data)


class SSEStream(_SyncStream):
    """A Server-Sent Events stream; ``send`` blocks until the kernel took the event."""

    @classmethod
    def encode(
        cls,
        data: str | bytes | None = None,
        *,
        event: str | None = None,
        id: str | None = None,  # the standard's field name
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
    ) -> None:
        """Send one event; raises :class:`ConnectionClosed` once the client left."""
        self._write(encode_event(data, event=event, id=id, retry=retry))

    def comment(self, text: str = "") -> None:
        """A comment, e.g. a heartbeat (it is also how a departed client is noticed)."""
        self._write(encode_comment(text))


class WebSocket(_SyncStream):
    """A WebSocket connection: ``for message in ws``, ``ws.send()`` from any thread."""

    def __init__(self, handoff: Handoff, codec: websocket.WebSocket, subprotocol: str | None):
        super().__init__(handoff)
        self._codec = codec
        self._read_lock = threading.Lock()
        self.subprotocol = subprotocol
        #: The close code once the connection ended (1006: closed without one).
        self.close_code: int | None = None
        self._close_deadline: float | None = None

    @property
    def closed(self) -> bool:
        return self._closed or self._codec.state is not websocket.State.OPEN

    @classmethod
    def encode(cls, message: str | bytes) -> bytes:
        return AsyncWebSocket.encode(message)  # the same frames in both flavours

    def send(self, message: str | bytes) -> None:
        if self._codec.state is not websocket.State.OPEN:
            raise ConnectionClosed(f"WebSocket closed (code {self.close_code})")
        self._write(self.encode(message))

    def _send_encoded(self, data: bytes) -> None:
        if self._codec.state is not websocket.State.OPEN:
            raise ConnectionClosed(f"WebSocket closed (code {self.close_code})")
        self._write(data)

    def ping(self, payload: bytes = b"") -> None:
        with self._lock:
            frame = self._codec.send_ping(payload)
        self._write(frame)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Closing handshake: send our close frame, wait for the client's, close.

        If another thread is receiving, it sees the reply (or the
        :data:`CLOSE_TIMEOUT`) and ends the connection; this call returns at once.
        """
        if self._closed:
            return
        with self._lock:
            frame = self._codec.send_close(code, reason) if not self._codec.error else b""
        if not frame:
            return
        self._close_deadline = time.monotonic() + CLOSE_TIMEOUT
        with contextlib.suppress(ConnectionClosed):
            self._write(frame)
        if not self._read_lock.acquire(blocking=False):
            return  # the receiving thread finishes the handshake
        try:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while not self._closed:
                    self._next(self._close_deadline)
        finally:
            self._read_lock.release()
        with self._lock:
            self._finish(None)

    def going_away(self) -> None:
        self.close(CloseCode.GOING_AWAY, "server shutting down")

    def fail(self) -> None:
        self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def receive(self, timeout: float | None = None) -> str | bytes:
        """The next message; :class:`ConnectionClosed` once the connection ended,
        ``TimeoutError`` when ``timeout`` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._read_lock:
            while True:
                message = self._next(deadline)
                if message is not None:
                    return message

    def _next(self, deadline: float | None) -> str | bytes | None:
        codec = self._codec
        try:
            with self._lock:
                event = codec.next_event()
                replies = codec.data_to_send()
        except WebSocketProtocolError as exc:
            self.close_code = exc.close_code
            log.info("WebSocket client broke the protocol: %s (close %d)", exc, exc.close_code)
            self._send_quietly(codec.data_to_send())
            self._half_close()
            with self._lock:
                self._finish(f"protocol error, close {exc.close_code}: {exc}")
            raise ConnectionClosed(f"protocol error: {exc}") from None
        if replies:
            self._send_quietly(replies)
        if isinstance(event, websocket.Message):
            return event.data
        if isinstance(event, websocket.Close):
            if self.close_code is None:
                self.close_code = event.code
            if event.code != CloseCode.ABNORMAL:  # 1006: EOF already, or no reply in time
                self._half_close()
            with self._lock:
                self._finish(None)
            raise ConnectionClosed(f"WebSocket closed (code {event.code})")
        if event is websocket.NEED_DATA:
            if self._closed:
                raise ConnectionClosed(f"WebSocket closed (code {self.close_code})")
            codec.receive_data(self._recv(deadline))
        return None

    def _half_close(self) -> None:
        """After our last close frame: FIN now, then read and drop what the
        client sends until its FIN, for at most ``linger_timeout``.

        RFC 6455 section 7.1.1: the server closes the TCP connection first;
        section 5.5.1: the client answers our close frame with its own.
        Closing the socket outright, that reply (or frames already in flight)
        arriving after it, or between ``_drain_unread`` and ``close``, is
        answered with a reset (RFC 1122 4.2.2.13) that can destroy our close
        frame before the client read it.  Writers are refused meanwhile: the
        codec is no longer OPEN.
        """
        sock = self._sock
        self._end_tls()
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self._handoff.receiver.options.linger_timeout
            while (left := deadline - time.monotonic()) > 0:
                if not recv_within(sock, READ_SIZE, left):
                    return  # the client's FIN
        except (OSError, ValueError):  # gone, or closed by another thread
            return

    def _recv(self, deadline: float | None) -> bytes:
        """Bytes from the client; ``b""`` at EOF or when the stream must end."""
        sock = self._sock
        while True:
            if self._closed:
                raise ConnectionClosed(f"WebSocket closed (code {self.close_code})")
            close_by = self._close_deadline
            if close_by is not None and time.monotonic() > close_by:
                log.debug("client did not answer the close frame")
                return b""
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("no WebSocket message in time")
            try:
                # Waits in slices so that close() from another thread is seen.
                return recv_within(sock, READ_SIZE, 1.0 if left is None else min(left, 1.0))
            except TimeoutError:
                continue
            except (OSError, ValueError):  # ValueError: closed by another thread
                if self.close_code is None:
                    self.close_code = CloseCode.ABNORMAL
                return b""

    def _send_quietly(self, data: bytes) -> None:
        if data:
            with contextlib.suppress(ConnectionClosed):
                self._write(data)

    def __iter__(self) -> Iterator[str | bytes]:
        while True:
            try:
                yield self.receive()
            except ConnectionClosed:
                return


#: Most unread input dropped before closing (bytes per recv, recvs).
_DRAIN_READ: Final = 65536
_DRAIN_READS: Final = 4


def _drain_unread(sock: socket.socket) -> None:
    """Read what the client sent and we did not, without waiting for more.

    Only what is there now: the socket may have a timeout, under which Python
    turns MSG_DONTWAIT's EAGAIN into a wait.  Bounded: a client that keeps
    sending gets the reset.
    """
    try:
        poller = select.poll()  # not select(): fds above 1024 are common here
        poller.register(sock, select.POLLIN)
        for _ in range(_DRAIN_READS):
            # os.read: EAGAIN (a partial kTLS record) ends it, where recv()
            # under a timeout would retry (recv_within).  The socket is not
            # closed yet, so its fd number is still this connection's.
            if not poller.poll(0) or not os.read(sock.fileno(), _DRAIN_READ):
                return
    except (OSError, ValueError):  # gone, or closed by another thread
        return


def recv_within(sock: socket.socket, size: int, timeout: float | None) -> bytes:
    """Bytes from ``sock`` (``b""`` at EOF); TimeoutError after ``timeout`` seconds.

    Not ``settimeout`` and ``recv``: CPython answers an EAGAIN that follows a
    readiness by polling again at once, so on a kTLS socket whose poll reports
    a partial record (aio.PARTIAL_RECORD_PAUSE) this thread would spin until
    the record is whole.  A duplicate of the socket, without a timeout of its
    own, reads with MSG_DONTWAIT and gets the EAGAIN back, and a growing
    pause follows instead.  The duplicate also keeps this call on the
    connection it began with: another thread may close ``sock`` meanwhile,
    and its fd number may be a new client's by then.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.0
    with socket.socket(fileno=os.dup(sock.fileno())) as own:
        poller = select.poll()  # not select(): fds above 1024 are common here
        poller.register(own, select.POLLIN)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("timed out")
            if not poller.poll(None if left is None else math.ceil(left * 1000)):
                continue
            try:
                return own.recv(size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pause = aio.next_pause(pause)
                time.sleep(pause if left is None else min(pause, left))


class Channel:
    """A thread-safe set of streams that receive the same messages.

    A member that cannot take a message (gone, stalled past the write timeout)
    is dropped; the broadcast goes on to the others.
    """

    def __init__(self) -> None:
        self._members: set[_SyncStream] = set()
        self._lock = threading.Lock()

    def add(self, stream: _SyncStream) -> None:
        with self._lock:
            if not stream.closed:
                self._members.add(stream)
                stream._channels.add(self)

    def discard(self, stream: _SyncStream) -> None:
        with self._lock:
            self._members.discard(stream)
            stream._channels.discard(self)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[_SyncStream]:
        with self._lock:
            return iter(list(self._members))

    def send(self, *args: Any, **kwargs: Any) -> int:
        """Send one message to every member; returns how many took it."""
        encoded: dict[type[_SyncStream], bytes] = {}
        count = 0
        for stream in list(self):
            cls = type(stream)
            data = encoded.get(cls)
            if data is None:
                data = encoded[cls] = cls.encode(*args, **kwargs)
            try:
                stream._send_encoded(data)
            except ConnectionClosed:
                continue
            count += 1
        return count

    def close(self) -> None:
        for stream in list(self):
            stream.close()


