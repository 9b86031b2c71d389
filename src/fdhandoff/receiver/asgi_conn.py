"""The client socket under the ASGI adapter: reads with timeouts, ordered writes.

One :class:`Connection` per handed-off client, for as long as it lives (every
request of a keep-alive connection, or one WebSocket).  It holds what the
connection needs between requests and nothing else: the socket, the bytes
read but not consumed yet (a pipelined request), and the facts about the
client that every scope repeats.

Writes go straight to the kernel with ``sock.send``.  When the kernel takes
only part (a slow reader, an ``O_NONBLOCK`` fd from Apache), the writer waits
for the socket to become writable, at most ``write_timeout`` seconds each
time.  A second coroutine writing meanwhile (a WebSocket app sending while the
receive side answers a ping) appends to a queue that the first writer flushes
in order, so frames never interleave.  Nothing is allocated for this while the
connection is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Any, Final

from .. import aio, fdpass
from .stream import ConnectionClosed

if TYPE_CHECKING:
    from .engine import Receiver
    from .options import Options

__all__ = ["READ_SIZE", "Connection", "wake"]

#: Bytes asked of the kernel per ``recv``: big enough for a request head
#: with its body start, or a burst of WebSocket frames, in one call.
READ_SIZE: Final = 64 * 1024


class Connection:
    """A handed-off client socket (non-blocking) and what is known about its client."""

    __slots__ = (
        "_idle",
        "_queue",
        "_queued",
        "_tls_ended",
        "broken",
        "buf",
        "bytes_sent",
        "client",
        "closed",
        "extensions",
        "loop",
        "receiver",
        "scheme",
        "server",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        receiver: Receiver,
        *,
        buf: bytes,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        tls: bool,
        extensions: dict[str, Any],
    ) -> None:
        self.sock = sock
        self.receiver = receiver
        self.loop = receiver.loop
        #: Client bytes read but not consumed yet: a request body's start,
        #: pipelined requests, WebSocket frames sent with the upgrade.
        self.buf = buf
        self.client = client
        self.server = server
        self.scheme = "https" if tls else "http"
        #: ``scope["extensions"]`` for every scope of this connection.
        self.extensions = extensions
        self.bytes_sent = 0
        self.closed = False
        self._tls_ended = False  # end_tls() sent its close_notify
        #: Set when a write stopped half way (cancelled, timed out, failed):
        #: the byte stream is cut inside a message and must not be continued.
        self.broken = False
        # Bytes of other writers queued behind a write that waits for the
        # kernel, and the future those writers wait on; None when idle.
        self._queue: bytearray | None = None
        self._queued: asyncio.Future[bool] | None = None
        # What recv_idle() waits on between two requests; None otherwise.
        self._idle: asyncio.Future[None] | None = None
        # The connection left the Handoff (detach()): tracked here instead, so
        # that --max-connections, the connections gauge and the shutdown wait
        # see it until it closes.
        receiver.track(self)

    @property
    def options(self) -> Options:
        """The receiver's limits (timeouts, sizes) that apply to this connection."""
        return self.receiver.options

    # --- reading --------------------------------------------------------------------

    def recv_nowait(self) -> bytes | None:
        """What the kernel has right now (``b""`` at EOF), None if nothing yet."""
        try:
            return self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise ConnectionClosed(f"client connection lost: {exc.strerror}") from exc

    async def readable(self) -> None:
        """Wait until the socket has data, EOF or an error to report."""
        loop = self.loop
        fd = self.sock.fileno()
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(fd)

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next bytes from the client, ``b""`` at EOF.

        Raises :class:`TimeoutError` after ``timeout`` seconds without data and
        :class:`ConnectionClosed` if the connection was reset.
        """
        data = self.recv_nowait()
        if data is not None:
            return data
        async with asyncio.timeout(timeout):
            pause = 0.0
            while True:
                await self.readable()
                data = self.recv_nowait()
                if data is not None:
                    return data
                # Readable without data: a partial kTLS record (aio.PARTIAL_RECORD_PAUSE).
                pause = aio.next_pause(pause)
                await asyncio.sleep(pause)

    async def recv_idle(self, timeout: float) -> bytes | None:
        """:meth:`recv` between two requests; None once the receiver is stopping.

        :meth:`stopping` ends the wait at once: a connection with no request
        in progress has nothing to finish within the shutdown grace.
        """
        loop = self.loop
        async with asyncio.timeout(timeout):
            pause = -1.0  # no wait yet
            while not self.receiver.stopping:
                data = self.recv_nowait()
                if data is not None:
                    return data
                if pause >= 0:  # readable without data: a partial kTLS record
                    pause = aio.next_pause(pause)
                    await asyncio.sleep(pause)
                    if self.receiver.stopping:
                        break
                else:
                    pause = 0.0
                fd = self.sock.fileno()
                waiter: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, wake, waiter)
                self._idle = waiter
                try:
                    await waiter
                finally:
                    self._idle = None
                    loop.remove_reader(fd)
        return None

    def stopping(self) -> None:
        """The receiver began stopping: end a :meth:`recv_idle` wait."""
        waiter = self._idle
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_buffer(self) -> bytes:
        data, self.buf = self.buf, b""
        return data

    # --- writing --------------------------------------------------------------------

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self.broken = True
            raise ConnectionClosed(f"client connection lost: {exc.strerror}") from exc
        self.bytes_sent += sent
        return sent

    async def write(self, data: bytes | bytearray) -> None:
        """Write all of ``data``, in order with every other write.

        Raises :class:`ConnectionClosed` if the client went away or read
        nothing for ``write_timeout`` seconds; the connection is then broken.
        """
        if self.closed or self.broken:
            raise ConnectionClosed("the client connection is closed")
        if self._queue is not None:
            # Another write waits for the kernel: go after it.
            self._queue += data
            assert self._queued is not None
            if not await asyncio.shield(self._queued):
                raise ConnectionClosed("the client connection failed during a write")
            return
        sent = self._send(data)
        if sent == len(data):
            return
        self._queue = bytearray()
        self._queued = self.loop.create_future()
        await self._write_rest(memoryview(data)[sent:])

    async def _write_rest(self, view: memoryview) -> None:
        """Flush ``view`` and the queue behind it; the queue was just opened."""
        ok = False
        try:
            await self._flush(view)
            ok = True
        finally:
            if not ok:
                self.broken = True
            queued, self._queued, self._queue = self._queued, None, None
            assert queued is not None
            queued.set_result(ok)

    def write_soon(self, data: bytes) -> None:
        """Write ``data`` in order with every other write, without waiting: a
        pong or a close reply from a reader callback.  What the kernel does not
        take at once follows the write in progress, or is flushed by a task of
        its own (bounded by ``write_timeout``); failures only break the
        connection, as for :meth:`write`."""
        if self.closed or self.broken or not data:
            return
        if self._queue is not None:
            self._queue += data
            return
        try:
            sent = self._send(data)
        except ConnectionClosed:
            return
        if sent < len(data):
            self._queue = bytearray()
            self._queued = self.loop.create_future()
            self.receiver.spawn(self._flush_quietly(memoryview(data)[sent:]))

    async def _flush_quietly(self, view: memoryview) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._write_rest(view)

    async def _flush(self, view: memoryview) -> None:
        timeout = self.options.write_timeout
        while True:
            while view:
                try:
                    async with asyncio.timeout(timeout):
                        await aio.wait_writable(self.sock)
                except TimeoutError:
                    raise ConnectionClosed(
                        f"client read nothing for {timeout:.0f} s (write timeout)"
                    ) from None
                view = view[self._send(view) :]
            queue = self._queue
            if not queue:
                return
            # Hand the queued bytes to a view and start a new queue: a
            # bytearray with a live view cannot grow.
            self._queue = bytearray()
            view = memoryview(queue)[self._send(queue) :]

    def send_nowait(self, data: bytes) -> None:
        """One attempt to write ``data`` (a last close frame); errors ignored."""
        if self.closed or self.broken or self._queue is not None:
            return
        with contextlib.suppress(OSError):
            if self.sock.send(data) != len(data):
                self.broken = True

    # --- ending -----------------------------------------------------------------------

    def shutdown_write(self) -> None:
        """Send FIN: the client sees the end of a close-delimited body now."""
        self.end_tls()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def end_tls(self) -> None:
        """On kernel TLS (``HTTPS=on``), end the TLS session with close_notify,
        once, before the FIN (RFC 8446 §6.1): a client reading to the end then
        knows the end is real.  Never after a write was cut short: that end
        is a truncation, and must look like one."""
        if self.scheme == "https" and not self._tls_ended and not self.broken:
            self._tls_ended = True
            fdpass.send_tls_close_notify(self.sock)

    async def linger_close(self) -> None:
        """Half-close, read what the client still sends for a moment, then close.

        Without it the kernel answers unread client bytes (a body the app did
        not read, a pipelined request) with a RST that can destroy the
        response still in flight (RFC 9112 section 9.6).
        """
        if self.closed:
            return
        self.shutdown_write()
        try:
            async with asyncio.timeout(self.options.linger_timeout):
                while await self.recv():
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            self.receiver.untrack(self)


def wake(waiter: asyncio.Future[None]) -> None:
    """Reader callback: resolve ``waiter`` (a plain function, so no closure per wait)."""
    if not waiter.done():
        waiter.set_result(None)
