"""asyncio verbs for fd passing, built on :mod:`fdhandoff.fdpass`.

asyncio (3.11-3.13) and uvloop have no awaitable ``sendmsg``/``recvmsg`` with
ancillary data, so these wait for readiness with ``loop.add_reader`` /
``add_writer`` on a non-blocking socket and then call the ``*_nowait`` forms.
This works the same under the default loop and uvloop.  The sockets passed
in must be non-blocking (``sock.setblocking(False)``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final

from . import fdpass
from .message import CLOSED, HandoffReader, HandoffRecord

__all__ = [
    "PARTIAL_RECORD_PAUSE",
    "next_pause",
    "recv",
    "recv_fd",
    "recv_handoff",
    "send_fd",
    "wait_readable",
    "wait_writable",
]

#: The first and the longest wait after a readiness event that found nothing
#: to read.  On a kernel-TLS socket, kernels whose kTLS has no poll of its own
#: (Debian 12's 6.1, for one; newer ones wait for a whole record) report the
#: socket readable as soon as part of a TLS record has arrived, while recv()
#: returns EAGAIN until the record is whole: a level-triggered reader would spin at 100 % CPU for
#: as long as a client leaves a record unfinished.  Waiting instead, doubling
#: from 1 ms, finds a record that completes in time t after at most about 2t,
#: and a record that never completes costs four wake-ups a second.  Plain
#: sockets never take this path: readiness there means bytes, EOF or an error.
PARTIAL_RECORD_PAUSE: Final = (0.001, 0.25)


def next_pause(pause: float) -> float:
    """The wait after another readiness without data (0.0: none so far)."""
    first, longest = PARTIAL_RECORD_PAUSE
    return min(max(pause * 2, first), longest)


# fds some task is waiting on, per direction (one waiter each: see _wait).
_WAITING_READ: set[int] = set()
_WAITING_WRITE: set[int] = set()


async def _wait(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    # add_reader/add_writer keep ONE callback per fd and direction: a second
    # waiter would silently replace the first, which then never wakes.
    waiters = _WAITING_WRITE if write else _WAITING_READ
    if fd in waiters:
        raise RuntimeError(
            f"another task is already waiting for fd {fd} to become "
            f"{'writable' if write else 'readable'}"
        )

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    waiters.add(fd)
    try:
        if write:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        await future
    finally:
        waiters.discard(fd)
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def wait_readable(sock: socket.socket) -> None:
    """Return once ``sock`` is readable (data, EOF or error pending)."""
    await _wait(sock, write=False)


async def recv(sock: socket.socket, size: int, flags: int = 0) -> bytes:
    """``sock.recv(size, flags)`` once there is something to return (``b""`` at EOF).

    A readiness that finds nothing to read (a partial kTLS record, see
    :data:`PARTIAL_RECORD_PAUSE`) is followed by a growing pause, not by a
    spin.  Errors are the socket's own (OSError).
    """
    pause = 0.0
    try:
        return sock.recv(size, flags)
    except BlockingIOError:
        pass
    while True:
        await _wait(sock, write=False)
        try:
            return sock.recv(size, flags)
        except BlockingIOError:
            pause = next_pause(pause)
            await asyncio.sleep(pause)


async def wait_writable(sock: socket.socket) -> None:
    """Return once ``sock`` is writable."""
    await _wait(sock, write=True)


async def send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    """Send ``data`` with ``fd`` on its first byte; a partial send finishes without the fd."""
    if not data:
        raise ValueError("an fd must travel with at least one data byte (unix(7))")
    view = memoryview(data)
    pending_fd: int | None = fd
    while view:
        try:
            sent = fdpass.send_fd_nowait(sock, view, pending_fd)
        except BlockingIOError:
            await _wait(sock, write=True)
            continue
        pending_fd = None
        view = view[sent:]


async def recv_fd(
    sock: socket.socket, bufsize: int = fdpass.RECV_SIZE, *, blocking: bool = False
) -> tuple[bytes, socket.socket | None]:
    """One ``recvmsg``; the attached fd comes back as a socket (non-blocking by default)."""
    while True:
        try:
            return fdpass.recv_fd_nowait(sock, bufsize, blocking=blocking)
        except BlockingIOError:
            await _wait(sock, write=False)


async def recv_handoff(
    conn: socket.socket,
    reader: HandoffReader | None = None,
    *,
    blocking: bool = False,
) -> tuple[HandoffRecord, socket.socket] | None:
    """asyncio twin of :func:`fdhandoff.fdpass.recv_handoff`.

    Bound it with ``asyncio.timeout()``; a cancelled call closes any client fd
    it had already received.
    """
    if reader is None:
        reader = HandoffReader(conn.type)
    assembly = fdpass.Assembly.of(conn, reader)
    bufsize = fdpass.recv_size(conn)
    try:
        got = assembly.next()  # finished by an earlier read (a channel)
        while True:
            if isinstance(got, tuple):
                return got
            if got is CLOSED:
                return None
            after_close = bool(fdpass.poll_now(conn) & fdpass.HANGUP)
            try:
                data, fd_sock = fdpass.recv_fd_nowait(conn, bufsize, blocking=blocking)
            except BlockingIOError:
                await _wait(conn, write=False)
                continue
            got = assembly.feed(data, fd_sock, after_close=after_close)
    except BaseException:
        assembly.close()
        raise
