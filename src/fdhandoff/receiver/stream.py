"""Long-lived client streams without a task: the base of SSE and WebSocket streams.

An idle handed-off connection must cost as little as the process allows
(docs/receiver.md, "Memory per connection").  A :class:`Stream` is therefore a
small slotted object and nothing else:

* no task and no coroutine frame: the client going away (or sending frames) is
  noticed by one ``loop.add_reader`` callback on the socket;
* no buffer: writes go straight to the kernel with ``sock.send``; a user-space
  buffer (:class:`_Backlog`) exists only while the kernel send buffer is full,
  with a timer that ends a client that stopped reading;
* sending never blocks and never loses data: what the kernel did not take is
  queued and written by an ``add_writer`` callback (an ``O_NONBLOCK`` fd from
  Apache behaves like any other).

``send()`` returns an awaitable: ignore it for fire-and-forget broadcasting, or
``await`` it to wait until the kernel took the bytes (coroutine style, raises
:class:`ConnectionClosed` if the client went away first).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Generator
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from .. import aio, fdpass
from ..errors import FdHandoffError

if TYPE_CHECKING:
    from .engine import Receiver

__all__ = ["Channel", "ConnectionClosed", "Sent", "Stream"]

log = logging.getLogger("fdhandoff.receiver")

#: Bytes read per recv when a client sends something on a stream.
READ_SIZE: Final = 16 * 1024

#: Most recvs per readable callback; past it the next batch is read on the next
#: loop iteration, so one client streaming bytes cannot starve the others.
MAX_READS_PER_CALLBACK: Final = 16

#: errno values meaning "the client is gone" rather than "something is wrong".
_GONE: Final = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT}
)



#: Most unread input dropped before a clean close (bytes per recv, recvs).
_DRAIN_READ: Final = 65536
_DRAIN_READS: Final = 4


def drain_unread(sock: socket.socket) -> None:
    """Read what the client sent and we did not, so close() sends FIN, not RST.

    Closing with unread input makes the kernel reset the connection (RFC 1122
    4.2.2.13), and a reset can destroy what we wrote last in flight: the
    WebSocket close frame after a protocol error (RFC 6455 section 7.1.1
    wants it delivered), the end of an event stream.  Bounded: a client that
    keeps sending gets the reset.
    """
    try:
        for _ in range(_DRAIN_READS):
            if not sock.recv(_DRAIN_READ, socket.MSG_DONTWAIT):
                return
    except OSError:  # EAGAIN (nothing unread, the usual case) or the peer is gone
        return

class ConnectionClosed(FdHandoffError, ConnectionError):
    """The client connection ended (client left, stream closed, slow consumer)."""


class _State(Enum):
    OPEN = 1
    CLOSING = 2  # close() called: flush the backlog, then close
    CLOSED = 3  # everything sent was written
    ABORTED = 4  # ended early: client gone, stalled, slow consumer, error


class Sent:
    """What ``send()`` returns: await it to wait until the kernel took the data.

    Created only when the data had to be queued; otherwise a shared instance
    that completes at once.  Never awaiting it is fine.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream | None) -> None:
        self._stream = stream

    def __await__(self) -> Generator[Any, None, None]:
        if self._stream is not None:
            yield from self._stream.drain().__await__()


_SENT: Final = Sent(None)


class _ClosedSend(Sent):
    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        raise ConnectionClosed("the stream is closed")
        yield  # pragma: no cover - makes this a generator


_CLOSED_SEND: Final = _ClosedSend(None)


class _Backlog:
    """Bytes the kernel did not take yet, with their stall timer and waiters."""

    __slots__ = ("data", "limit", "timer", "waiters", "why")

    def __init__(self, data: bytes, timer: asyncio.TimerHandle, extra: int) -> None:
        self.data = bytearray(data)
        #: Most bytes it may hold: the write that started it plus ``extra``
        #: (``max_stream_buffer``), lowered as it drains, never raised.  One
        #: large write (a 16 MiB WebSocket message) is the application's own
        #: choice and already in memory; what the cap stops is messages piling
        #: up behind a client that does not read, and a pong or close frame
        #: queued behind that large write is not such a pile.
        self.limit = len(data) + extra
        self.timer = timer
        self.waiters: list[asyncio.Future[None]] = []
        self.why: str | None = None  # set when closing: logged once written


class Stream:
    """A client connection owned by the application, driven by callbacks.

    Subclasses decide what incoming bytes mean (:meth:`_on_data`).  Set
    :attr:`on_close` to learn when the stream ends, whatever the reason.
    """

    __slots__ = (
        "_backlog",
        "_channels",
        "_log",
        "_pause",
        "_receiver",
        "_sent",
        "_sock",
        "_started",
        "_state",
        "_tls_ended",
        "on_close",
    )

    def __init__(self, sock: socket.socket, receiver: Receiver, log_prefix: str | None) -> None:
        self._sock = sock
        self._receiver = receiver
        self._state = _State.OPEN
        self._backlog: _Backlog | None = None
        self._channels: Channel | list[Channel] | None = None
        self._log = log_prefix
        self._started = time.monotonic()
        self._sent = 0
        self._pause = 0.0  # aio.next_pause: readiness without data (partial kTLS record)
        self._tls_ended = False
        #: Called once with the stream when it has ended.
        self.on_close: Callable[[Any], None] | None = None
        receiver.track(self)
        receiver.loop.add_reader(sock.fileno(), self._on_readable)

    # --- state ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the stream ended or :meth:`close` was called."""
        return self._state is not _State.OPEN

    @property
    def bytes_sent(self) -> int:
        return self._sent

    @property
    def buffered(self) -> int:
        """Bytes queued in user space because the client is not reading fast enough."""
        return len(self._backlog.data) if self._backlog is not None else 0

    # --- writing -----------------------------------------------------------------

    def _write(self, data: bytes) -> Sent:
        """Send ``data`` now or queue it; never blocks."""
        if self._state is not _State.OPEN:
            return _CLOSED_SEND
        backlog = self._backlog
        if backlog is not None:
            backlog.data += data
            if len(backlog.data) > backlog.limit:
                self._abort("slow consumer: send buffer limit exceeded")
                return _CLOSED_SEND
            return Sent(self)
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._abort(_describe(exc))
            return _CLOSED_SEND
        self._sent += sent
        if sent == len(data):
            return _SENT
        self._queue(data[sent:])
        return Sent(self)

    def _queue(self, rest: bytes) -> None:
        loop = self._receiver.loop
        timer = loop.call_later(self._receiver.options.write_timeout, self._stalled)
        self._backlog = _Backlog(rest, timer, self._receiver.options.max_stream_buffer)
        loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        backlog = self._backlog
        if backlog is None:  # pragma: no cover - writer removed with the backlog
            return
        try:
            sent = self._sock.send(backlog.data)
        except BlockingIOError:
            return
        except OSError as exc:
            self._abort(_describe(exc))
            return
        self._sent += sent
        del backlog.data[:sent]
        if backlog.data:
            backlog.limit = min(
                backlog.limit, len(backlog.data) + self._receiver.options.max_stream_buffer
            )
            backlog.timer.cancel()
            backlog.timer = self._receiver.loop.call_later(
                self._receiver.options.write_timeout, self._stalled
            )
            return
        why = backlog.why
        self._drop_backlog()
        if self._state is _State.CLOSING:
            self._finish(why, clean=True)

    def _drop_backlog(self) -> None:
        backlog = self._backlog
        if backlog is None:
            return
        self._backlog = None
        backlog.timer.cancel()
        self._receiver.loop.remove_writer(self._sock.fileno())
        for waiter in backlog.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _stalled(self) -> None:
        self._abort(
            f"client read nothing for {self._receiver.options.write_timeout:.0f} s "
            "(write timeout)"
        )

    async def drain(self) -> None:
        """Wait until everything sent so far is in the kernel's hands.

        Raises :class:`ConnectionClosed` if the stream ended before that.
        """
        while self._backlog is not None:
            waiter = self._receiver.loop.create_future()
            self._backlog.waiters.append(waiter)
            await waiter
        if self._state is _State.ABORTED:
            raise ConnectionClosed("the client connection ended before the data was sent")

    # --- reading -----------------------------------------------------------------

    def _on_readable(self, readiness: bool = True) -> None:
        # Read until the kernel has nothing more to say (EAGAIN, EOF or an
        # error), not once per callback: uvloop (libuv) delivers a readiness
        # event that carries EPOLLERR once and then stops watching the fd.
        # A client that sends bytes and resets the connection before we read
        # them produces exactly that event: after one recv of the bytes the
        # reset would never be reported, and the stream, its fd and its
        # handler would stay until the receiver stops.
        for attempt in range(MAX_READS_PER_CALLBACK):
            try:
                data = self._sock.recv(READ_SIZE)
            except BlockingIOError:
                if attempt == 0 and readiness:  # readable, yet nothing at all
                    self._wait_for_record()
                return
            except OSError as exc:
                self._abort(_describe(exc))
                return
            if not data:
                self._on_eof()
                return
            self._pause = 0.0
            self._on_data(data)
            if not self._reading():
                return  # closed, or paused for back-pressure (resuming re-arms the reader)
        # More is pending: read it on the next iteration instead of waiting
        # for a readiness event that may not come (see above).
        self._receiver.loop.call_soon(self._read_more)

    def _wait_for_record(self) -> None:
        """Readable, yet nothing to read: a partial kTLS record on a kernel whose
        poll reports it (aio.PARTIAL_RECORD_PAUSE).  Stop listening for a
        growing pause instead of being called again at once, in a loop."""
        self._pause = aio.next_pause(self._pause)
        loop = self._receiver.loop
        loop.remove_reader(self._sock.fileno())
        loop.call_later(self._pause, self._listen_again)

    def _listen_again(self) -> None:
        if self._reading():  # not ended meanwhile, nor paused for back-pressure
            self._receiver.loop.add_reader(self._sock.fileno(), self._on_readable)

    def _read_more(self) -> None:
        if self._reading():
            self._on_readable(readiness=False)

    def _reading(self) -> bool:
        """True while the reader callback is installed on the socket."""
        return self._state is _State.OPEN or self._state is _State.CLOSING

    def _on_data(self, data: bytes) -> None:
        """Bytes from the client; the base class ignores them."""

    def _on_eof(self) -> None:
        self._abort("client closed the connection")

    # --- ending --------------------------------------------------------------------

    def close(self) -> None:
        """End the stream once what was sent is written (bounded by the write timeout)."""
        self._end(None)

    def going_away(self) -> None:
        """Close because the receiver is stopping (WebSocket: close code 1001)."""
        self.close()

    def fail(self) -> None:
        """End it because what fed it failed (WebSocket: close code 1011)."""
        self.close()

    def _end(self, why: str | None) -> None:
        """Close cleanly after the backlog is written; ``why`` goes to the log."""
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        if self._backlog is None:
            self._finish(why, clean=True)
        else:
            self._backlog.why = why

    def _abort(self, why: str) -> None:
        """End at once, dropping what is queued."""
        if self._state in (_State.CLOSED, _State.ABORTED):
            return
        self._finish(why, clean=False)

    def _finish(self, why: str | None, *, clean: bool) -> None:
        self._state = _State.CLOSED if clean else _State.ABORTED
        loop = self._receiver.loop
        fd = self._sock.fileno()
        if fd >= 0:
            loop.remove_reader(fd)
        self._drop_backlog()
        if clean:
            self._end_tls()
            drain_unread(self._sock)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._receiver.untrack(self)
        self._log_end(why)
        self._leave_channels()
        self._ended()
        callback, self.on_close = self.on_close, None
        if callback is not None:
            try:
                callback(self)
            except Exception:
                log.exception("on_close callback of %r failed", self)

    def _end_tls(self) -> None:
        """On kernel TLS, a clean end is also the TLS session's: close_notify
        before the FIN (RFC 8446 §6.1), once.  An aborted stream gets none: its
        end must read as the truncation it is.  Costs one failed getsockopt
        on plain TCP (fdpass.send_tls_close_notify checks for kTLS)."""
        if not self._tls_ended:
            self._tls_ended = True
            fdpass.send_tls_close_notify(self._sock)

    def _ended(self) -> None:
        """Subclass hook: the connection is closed; release what is held."""

    def _log_end(self, why: str | None) -> None:
        prefix, self._log = self._log, None
        if why is not None:
            log.debug("stream ended: %s", why)
        if prefix is not None:
            self._receiver.access_log(prefix, self._sent, time.monotonic() - self._started, why)

    def _leave_channels(self) -> None:
        channels, self._channels = self._channels, None
        if isinstance(channels, Channel):
            channels._members.discard(self)
        elif channels is not None:
            for channel in channels:
                channel._members.discard(self)

    def _join(self, channel: Channel) -> None:
        current = self._channels
        if current is None:
            self._channels = channel
        elif isinstance(current, Channel):
            if current is not channel:
                self._channels = [current, channel]
        elif channel not in current:
            current.append(channel)

    def _part(self, channel: Channel) -> None:
        current = self._channels
        if current is channel:
            self._channels = None
        elif isinstance(current, list) and channel in current:
            current.remove(channel)

    # --- broadcasting ---------------------------------------------------------------

    @classmethod
    def encode(cls, *args: Any, **kwargs: Any) -> bytes:
        """Wire bytes of one message, shared by every stream of this class."""
        raise NotImplementedError

    def _send_encoded(self, data: bytes) -> Sent:
        return self._write(data)


def _describe(exc: OSError) -> str:
    if exc.errno in _GONE:
        return f"client connection lost ({exc.strerror})"
    return f"socket error: {exc}"


class Channel:
    """A set of streams that receive the same messages (a hub, a chat room).

    ``channel.add(stream)``, then ``channel.send(...)`` encodes the message
    once per stream class and writes it to every member without waiting; a
    member that ended leaves by itself.  A stream may be in several channels.
    """

    __slots__ = ("_members",)

    def __init__(self) -> None:
        self._members: set[Stream] = set()

    def add(self, stream: Stream) -> None:
        if stream.closed:
            return
        self._members.add(stream)
        stream._join(self)

    def discard(self, stream: Stream) -> None:
        self._members.discard(stream)
        stream._part(self)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, stream: object) -> bool:
        return stream in self._members

    def __iter__(self) -> Any:
        return iter(list(self._members))

    def send(self, *args: Any, **kwargs: Any) -> int:
        """Send one message to every member; returns how many it was sent to.

        Arguments are those of the members' ``send()`` (SSE: data, event, id,
        retry; WebSocket: the message).
        """
        encoded: dict[type[Stream], bytes] = {}
        count = 0
        for stream in list(self._members):
            cls = type(stream)
            data = encoded.get(cls)
            if data is None:
                data = encoded[cls] = cls.encode(*args, **kwargs)
            if stream._send_encoded(data) is not _CLOSED_SEND:
                count += 1
        return count

    def close(self) -> None:
        """Close every member."""
        for stream in list(self._members):
            stream.close()
