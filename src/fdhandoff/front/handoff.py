"""Handoffs in flight: sent (or being sent) and waiting for the receiver to take them.

After the one ``sendmsg`` of a handoff the front keeps two things: its copy
of the client fd and the UNIX connection.  The receiver *takes* the handoff
by reading it and closing its end; the front then closes both and keeps
nothing.  Until then the client can still be answered (503) if the receiver
turns out not to take it.

All waiting UNIX connections share one epoll set of their own, registered
with the event loop once.  Per handoff that is one ``epoll_ctl`` and no
removal at all (closing a socket removes it from the set, epoll(7)), instead
of an event-loop handle created and destroyed per handoff; and the event
mask alone tells the outcome, without a ``recv``:

* ``EPOLLHUP`` (the receiver closed, nothing unread): taken;
* ``EPOLLERR`` (``ECONNRESET``: it closed with our message unread, unix(7)):
  not taken;
* ``EPOLLIN`` alone: the receiver wrote something, which the protocol does
  not define; it is read and ignored, only the close counts.

At the deadline (``timeouts.handoff``) a handoff whose bytes the receiver
has read (``SIOCOUTQ`` = 0) counts as taken even if it keeps its end open;
otherwise it is not taken.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import select
import termios
import time
from _socket import socket as Socket
from collections.abc import Callable
from typing import Any, Final

from .. import fdpass
from ..errors import FdPassError

__all__ = ["Handoffs", "InFlight"]

_TAKEN: Final = select.EPOLLHUP
_FAILED: Final = select.EPOLLERR
#: Most events taken from the set per wake-up; the rest come next iteration.
_MAX_EVENTS: Final = 512


def _unread_bytes(sock: Socket) -> int:
    """Bytes sent on a UNIX socket that the peer has not read yet (SIOCOUTQ, unix(7))."""
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)
    return count[0]


def _send_failure(exc: OSError) -> str:
    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
        # The receiver accepted and closed before our sendmsg: nothing was taken.
        return f"receiver closed without taking the connection ({exc.strerror}, before sending)"
    return f"sending the handoff failed: {exc}"


class InFlight:
    """One handoff waiting to be taken.  ``context`` is the caller's (for logs)."""

    __slots__ = ("client", "context", "deadline", "fd", "fd_pending", "rest", "usock")

    def __init__(self, client: Socket, usock: Socket, context: Any, deadline: float) -> None:
        self.client = client
        self.usock = usock
        self.fd = usock.fileno()
        self.context = context
        self.deadline = deadline
        self.rest: memoryview | None = None  # bytes still to send (UNIX buffer was full)
        self.fd_pending = False  # the client fd has not gone out yet


#: ``taken(flight)`` and ``failed(flight, why)``: the caller closes nothing
#: itself in ``taken``; in ``failed`` the client is still open and the
#: caller's to answer and close.
Taken = Callable[[InFlight], None]
Failed = Callable[[InFlight, str], None]


class Handoffs:
    """Every handoff in flight, in deadline order (one timeout for all)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        *,
        taken: Taken,
        failed: Failed,
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._taken = taken
        self._failed = failed
        self._poll = select.epoll()
        self._flights: dict[int, InFlight] = {}  # by UNIX fd, in deadline order
        loop.add_reader(self._poll.fileno(), self._on_events)

    def __len__(self) -> int:
        return len(self._flights)

    def close(self) -> None:
        self._loop.remove_reader(self._poll.fileno())
        self._poll.close()

    def send(
        self,
        client: Socket,
        usock: Socket,
        message: bytes,
        context: Any,
        now: float | None = None,
    ) -> None:
        """One sendmsg of ``message`` with the client fd on its first byte, then wait.

        The deadline counts from ``now`` (default: this moment).
        """
        start = time.monotonic() if now is None else now
        flight = InFlight(client, usock, context, start + self._timeout)
        try:
            # fdpass is typed for socket.socket; the C type has the same sendmsg.
            sent = fdpass.send_fd_nowait(usock, message, client.fileno())  # type: ignore[arg-type]
        except BlockingIOError:
            sent = 0
        except (OSError, FdPassError) as exc:
            usock.close()
            self._failed(flight, _send_failure(exc))
            return
        self._flights[flight.fd] = flight
        if sent == len(message):
            self._poll.register(flight.fd, select.EPOLLIN)
            return
        # The UNIX socket buffer is full (a receiver that is not reading):
        # finish the message when it drains, the fd only with its first byte.
        flight.rest = memoryview(message)[sent:]
        flight.fd_pending = sent == 0
        self._loop.add_writer(flight.fd, self._on_writable, flight)

    def _on_writable(self, flight: InFlight) -> None:
        assert flight.rest is not None
        fd = flight.client.fileno() if flight.fd_pending else None
        try:
            sent = fdpass.send_fd_nowait(flight.usock, flight.rest, fd)  # type: ignore[arg-type]
        except BlockingIOError:
            return
        except (OSError, FdPassError) as exc:
            self._loop.remove_writer(flight.fd)
            self._fail(flight, _send_failure(exc))
            return
        flight.fd_pending = False
        flight.rest = flight.rest[sent:]
        if not flight.rest:
            flight.rest = None
            self._loop.remove_writer(flight.fd)
            self._poll.register(flight.fd, select.EPOLLIN)

    def _on_events(self) -> None:
        flights = self._flights
        for fd, events in self._poll.poll(0, _MAX_EVENTS):
            flight = flights.get(fd)
            if flight is None:
                continue
            if events & _FAILED:
                why = "receiver closed without taking the connection"
                try:
                    flight.usock.recv(1)
                except OSError as exc:  # ECONNRESET, the reason
                    why = f"{why} ({exc.strerror})"
                self._fail(flight, why)
            elif events & _TAKEN:
                self._take(flight)
            else:
                try:
                    data = flight.usock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._fail(flight, f"receiver connection failed ({exc.strerror})")
                    continue
                if not data:  # half-closed: EOF without HUP yet
                    self._take(flight)

    def _take(self, flight: InFlight) -> None:
        del self._flights[flight.fd]
        flight.client.close()
        flight.usock.close()  # also leaves the epoll set
        self._taken(flight)

    def _fail(self, flight: InFlight, why: str) -> None:
        del self._flights[flight.fd]
        flight.usock.close()
        self._failed(flight, why)

    def expire(self, now: float) -> None:
        """Settle every handoff past its deadline."""
        expired = []
        for flight in self._flights.values():
            if flight.deadline > now:
                break  # insertion order is deadline order
            expired.append(flight)
        for flight in expired:
            self._settle(flight)

    def settle_all(self) -> None:
        """Shutdown: settle every handoff now, as if its deadline had come."""
        for flight in list(self._flights.values()):
            self._settle(flight)

    def _settle(self, flight: InFlight) -> None:
        if flight.rest is not None:
            self._loop.remove_writer(flight.fd)
            self._fail(flight, f"receiver did not read the handoff within {self._timeout:g} s")
            return
        try:
            unread = _unread_bytes(flight.usock)
        except OSError:
            unread = 1
        if unread == 0:
            # The receiver read the handoff but keeps its end open: it has the fd.
            self._take(flight)
        else:
            self._fail(flight, f"receiver did not take the connection within {self._timeout:g} s")
