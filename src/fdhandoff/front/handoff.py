"""Handoffs in flight: sent (or being sent) and waiting for the receiver to take them.

Every handoff goes out as one ``sendmsg`` of its SCGI description with the
client fd on a UNIX connection to the receiver.  Until the receiver has
*taken* it the front keeps its copy of the client fd, so the client can still
be answered (503) if the receiver turns out not to take it; once taken the
front closes that copy and keeps nothing.

A UNIX connection (:class:`Link`) is one of two things:

* a *channel*: a persistent connection on which the receiver acknowledges
  each handoff with one ``CHANNEL_ACK`` byte, in order (the description
  carries ``HANDOFF_CHANNEL=1``, docs/protocol.md).  Handoffs to a backend go
  to its least-busy channel; a new connection is opened while every channel
  is busy, up to ``limits.channels`` of them.  A channel saves the
  ``connect``/``accept`` pair and a wake-up of the receiver per handoff;
* a *one-shot* connection: a receiver written for nginx ``fd_pass`` reads one
  handoff and closes.  That close is its acknowledgement.

Every new connection offers a channel; the receiver's answer (an ACK byte or
a close) tells which kind it is, so both kinds of receiver work without
configuration.

All connections share one epoll set of their own, registered with the event
loop once: one ``epoll_ctl`` per connection and none per handoff on a
channel.  What the receiver does tells the outcome:

* ACK bytes: that many handoffs taken, oldest first;
* EOF (it closed with nothing of ours unread): every handoff left is taken;
* ``ECONNRESET`` (it closed with our bytes unread, unix(7)): those left are
  not taken — the kernel closed the fds that were in flight;
* any other byte: ignored on a one-shot connection (the protocol defines
  none), an error on a channel.

At the deadline (``timeouts.handoff``) the connection is settled: handoffs
whose bytes the receiver has read (``SIOCOUTQ``) are taken, the others are
not, and the connection is closed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import logging
import select
import socket
import termios
import time
from _socket import socket as Socket
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .. import fdpass
from ..errors import FdPassError
from ..message import CHANNEL_ACK

__all__ = ["Handoffs", "InFlight", "Link", "open_backend"]

log = logging.getLogger("fdhandoff.front")

#: Most events taken from the set per wake-up; the rest come next iteration.
_MAX_EVENTS: Final = 512
#: Bytes read per recv from a receiver (acknowledgements: one byte each).
_ACK_READ: Final = 4096
_ACK: Final = CHANNEL_ACK[0]
# Plain ints: IntEnum/IntFlag operators cost more than the socket call itself.
_AF_UNIX: Final = int(socket.AF_UNIX)
_NONBLOCK: Final = int(socket.SOCK_NONBLOCK)
_TROUBLE: Final = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP


def open_backend(path: str, sock_type: int) -> Socket:
    """A new non-blocking UNIX connection to ``path`` (``OSError`` if it fails)."""
    usock = Socket(_AF_UNIX, sock_type | _NONBLOCK)
    try:
        # Non-blocking: a full backlog is EAGAIN at once (unix(7)), never a wait.
        usock.connect(path)
    except OSError:
        usock.close()
        raise
    return usock


def _unread_bytes(sock: Socket) -> int:
    """Bytes sent on a UNIX socket that the peer has not read yet (SIOCOUTQ, unix(7))."""
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)
    return count[0]


def _send_failure(exc: OSError) -> str:
    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
        # The receiver closed before our sendmsg: nothing was taken.
        return f"receiver closed without taking the connection ({exc.strerror}, before sending)"
    return f"sending the handoff failed: {exc}"


class InFlight:
    """One handoff waiting to be taken.  ``context`` is the caller's (for logs)."""

    __slots__ = ("client", "context", "deadline", "size", "timeout")

    def __init__(
        self, client: Socket, context: Any, deadline: float, size: int, timeout: float
    ) -> None:
        self.client = client
        self.context = context
        self.deadline = deadline
        self.size = size  # bytes of its message
        #: ``timeouts.handoff`` when it was sent: a reload changes later ones only.
        self.timeout = timeout


class Link:
    """One UNIX connection to a receiver and the handoffs sent on it, oldest first."""

    __slots__ = (
        "backend",
        "channel",
        "fd",
        "fd_pending",
        "flights",
        "pooled",
        "progress",
        "rest",
        "usock",
    )

    def __init__(self, usock: Socket, backend: str | None) -> None:
        self.usock = usock
        self.fd = usock.fileno()
        #: The backend whose channel pool it may join (None: one handoff only).
        self.backend = backend
        #: True once the receiver acknowledged a handoff on it.
        self.channel = False
        #: One of its backend's channels (else it closes when its handoffs are).
        self.pooled = False
        self.flights: deque[InFlight] = deque()
        self.rest: memoryview | None = None  # bytes still to send (UNIX buffer was full)
        self.fd_pending = False  # the newest handoff's client fd has not gone out yet
        #: When the receiver last acknowledged a handoff on it (monotonic).
        self.progress = 0.0


#: ``taken(flight)`` and ``failed(flight, why)``: the caller closes nothing
#: itself in ``taken``; in ``failed`` the client is still open and the
#: caller's to answer and close.
Taken = Callable[[InFlight], None]
Failed = Callable[[InFlight, str], None]


class Handoffs:
    """Every UNIX connection with handoffs in flight, and the idle channels."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        *,
        taken: Taken,
        failed: Failed,
        channels: int = 0,
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._taken = taken
        self._failed = failed
        self._max_channels = channels
        self._poll = select.epoll()
        self._links: dict[int, Link] = {}  # by UNIX fd
        self._channels: dict[str, list[Link]] = {}  # confirmed, per backend
        self._flights = 0
        loop.add_reader(self._poll.fileno(), self._on_events)

    def __len__(self) -> int:
        """Handoffs in flight (not idle channels)."""
        return self._flights

    @property
    def channels(self) -> int:
        """Channels open, idle or not."""
        return sum(len(links) for links in self._channels.values())

    def reconfigure(self, timeout: float, channels: int) -> None:
        """New settings (configuration reload) for the handoffs sent from now on.

        Every channel is retired: an idle one closes now, a busy one once its
        handoffs are taken (as a connection beyond the channel limit does),
        and the next handoff to a backend opens a new one, to the backend
        the configuration names now.
        """
        self._timeout = timeout
        self._max_channels = channels
        retired = [link for links in self._channels.values() for link in links]
        self._channels.clear()
        for link in self._links.values():
            # Also those not acknowledged yet: none may join a pool later.
            link.backend = None
        for link in retired:
            link.pooled = False
            if not link.flights:
                self._drop(link)

    def close(self) -> None:
        """Close every connection (after :meth:`settle_all`) and the epoll set."""
        for link in list(self._links.values()):
            self._drop(link)
        self._loop.remove_reader(self._poll.fileno())
        self._poll.close()

    # --- sending ---------------------------------------------------------------------

    def channel(self, backend: str) -> Link | None:
        """The channel for the next handoff to ``backend``, or None: connect a new one.

        The least busy channel that is not blocked; an idle one at once.  While
        all are busy a new connection is opened, up to ``channels`` of them,
        and beyond that handoffs queue on the least busy one.
        """
        links = self._channels.get(backend)
        if not links:
            return None
        best: Link | None = None
        for link in links:
            if link.rest is None and (best is None or len(link.flights) < len(best.flights)):
                if not link.flights:
                    return link
                best = link
        if best is None or len(links) < self._max_channels:
            return None
        return best

    def open(self, usock: Socket, backend: str | None) -> Link:
        """Track a new connection; ``backend`` lets it become a channel of that backend."""
        link = Link(usock, backend if self._max_channels else None)
        self._links[link.fd] = link
        self._poll.register(link.fd, select.EPOLLIN | select.EPOLLRDHUP)
        return link

    def send(
        self,
        link: Link,
        client: Socket,
        message: bytes,
        context: Any,
        now: float | None = None,
    ) -> bool:
        """One sendmsg of ``message`` with the client fd on its first byte, then wait.

        The deadline counts from ``now`` (default: this moment).  Returns False,
        having sent nothing and told nobody, when ``link`` is a channel the
        receiver has just closed (it restarted): the caller sends again on a new
        connection.  Any other failure goes to ``failed``.
        """
        start = time.monotonic() if now is None else now
        timeout = self._timeout
        flight = InFlight(client, context, start + timeout, len(message), timeout)
        try:
            # fdpass is typed for socket.socket; the C type has the same sendmsg.
            sent = fdpass.send_fd_nowait(link.usock, message, client.fileno())  # type: ignore[arg-type]
        except BlockingIOError:
            sent = 0
        except (OSError, FdPassError) as exc:
            closed = isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET)
            retry = closed and link.pooled
            self._broken(link)
            if retry:
                return False
            self._failed(flight, _send_failure(exc))
            return True
        link.flights.append(flight)
        self._flights += 1
        if sent == len(message):
            self._sent_whole(link)
            return True
        # The UNIX socket buffer is full (a receiver that is not reading):
        # finish the message when it drains, the fd only with its first byte.
        link.rest = memoryview(message)[sent:]
        link.fd_pending = sent == 0
        self._loop.add_writer(link.fd, self._on_writable, link)
        return True

    def _on_writable(self, link: Link) -> None:
        assert link.rest is not None
        fd = link.flights[-1].client.fileno() if link.fd_pending else None
        try:
            sent = fdpass.send_fd_nowait(link.usock, link.rest, fd)  # type: ignore[arg-type]
        except BlockingIOError:
            return
        except (OSError, FdPassError):
            self._broken(link)
            return
        link.fd_pending = False
        link.rest = link.rest[sent:]
        if not link.rest:
            link.rest = None
            self._loop.remove_writer(link.fd)
            self._sent_whole(link)

    @staticmethod
    def _sent_whole(link: Link) -> None:
        """The handoff on a one-handoff connection is all out: half-close it.

        Apache and nginx close right after their sendmsg, and a daemon may
        read until EOF before it serves; the front still waits for the
        receiver's close (or reads the rest of its answer), so it shuts down
        only its sending side (a FIN, not a close: a receiver sees POLLRDHUP,
        never the POLLHUP of a sender that gave up).
        """
        if link.backend is None:
            with contextlib.suppress(OSError):
                link.usock.shutdown(socket.SHUT_WR)

    # --- what the receiver did -------------------------------------------------------

    def _on_events(self) -> None:
        links = self._links
        for fd, events in self._poll.poll(0, _MAX_EVENTS):
            link = links.get(fd)
            if link is not None:
                self._on_link(link, events)

    def _on_link(self, link: Link, events: int) -> None:
        acks = other = 0
        end: OSError | bool | None = False  # False: open; None: EOF; OSError: reset
        while True:
            try:
                data = link.usock.recv(_ACK_READ)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNRESET: it closed with our bytes unread
                end = exc
                break
            if not data:
                end = None
                break
            count = data.count(_ACK)
            acks += count
            other += len(data) - count
            if len(data) < _ACK_READ and not events & _TROUBLE:
                break  # all there was; level-triggered epoll reports more
        if acks:
            self._acknowledged(link, acks)
        if other and link.channel and end is False:
            log.warning(
                "receiver wrote %d byte(s) other than acknowledgements on a channel; closing it",
                other,
            )
            self._settle(link, "receiver broke the channel protocol")
            return
        if end is None or isinstance(end, OSError):
            self._end(link, end)

    def _broken(self, link: Link) -> None:
        """A send failed: the receiver has closed (EPIPE) or the connection is
        unusable.  What it read before closing is still taken."""
        self._on_link(link, select.EPOLLHUP)
        if link.fd in self._links:  # not closed after all
            self._settle(link, "the connection to the receiver failed")

    def _acknowledged(self, link: Link, acks: int) -> None:
        if not link.channel:
            link.channel = True  # a receiver that keeps channels
            if link.backend is not None:
                links = self._channels.setdefault(link.backend, [])
                if len(links) < self._max_channels:  # else enough: it closes when done
                    link.pooled = True
                    links.append(link)
        flights = link.flights
        if acks > len(flights):
            log.warning(
                "receiver acknowledged %d handoff(s) more than were sent", acks - len(flights)
            )
            acks = len(flights)
        if link.rest is not None and acks == len(flights):
            acks -= 1  # the newest is not even sent whole: not that one
        link.progress = time.monotonic()
        for _ in range(acks):
            self._take(flights.popleft())
        if not link.pooled and not flights:
            self._drop(link)

    def _end(self, link: Link, end: OSError | None) -> None:
        """The connection is over: EOF (None) or an error.  Settle what is left."""
        flights = link.flights
        if link.rest is not None:
            # Half sent: the receiver cannot have taken the newest.
            self._fail(flights.pop(), "receiver closed before the handoff was sent whole")
        while flights:
            flight = flights.popleft()
            if end is None:
                self._take(flight)  # it read everything and closed: taken
            else:
                why = "receiver closed without taking the connection"
                if end.strerror:
                    why = f"{why} ({end.strerror})"
                self._fail(flight, why)
        self._drop(link)

    # --- deadlines -------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Settle every connection whose oldest handoff is past its deadline.

        The timeout is for a receiver that does not take handoffs, not for a
        queue: while the receiver keeps acknowledging on a channel (a burst of
        thousands of WebSockets queued on it), its oldest handoff waits for its
        turn, and the deadline counts from the last acknowledgement.
        """
        late = [
            link
            for link in self._links.values()
            if link.flights
            and link.flights[0].deadline <= now
            and link.progress <= now - link.flights[0].timeout
        ]
        for link in late:
            self._settle(link, None)

    def settle_all(self) -> None:
        """Shutdown: settle every handoff now, as if its deadline had come."""
        for link in list(self._links.values()):
            self._settle(link, None)

    def _settle(self, link: Link, why: str | None) -> None:
        """Close ``link``: handoffs whose bytes the receiver read are taken, the
        others (a byte unread, or not sent whole) are not."""
        try:
            unread = _unread_bytes(link.usock)
        except OSError:
            unread = 1 << 62
        flights = link.flights
        if link.rest is not None:
            unread -= flights[-1].size - len(link.rest)
            flight = flights.pop()
            self._fail(flight, why or self._late("read", flight))
        unread_flights: list[InFlight] = []
        while flights and unread > 0:
            flight = flights.pop()
            unread -= flight.size
            unread_flights.append(flight)
        for flight in flights:
            self._take(flight)  # read by the receiver, which has the fd
        flights.clear()
        for flight in reversed(unread_flights):
            self._fail(flight, why or self._late("take", flight))
        self._drop(link)

    @staticmethod
    def _late(what: str, flight: InFlight) -> str:
        return f"receiver did not {what} the connection within {flight.timeout:g} s"

    # --- bookkeeping -----------------------------------------------------------------

    def _take(self, flight: InFlight) -> None:
        self._flights -= 1
        flight.client.close()
        self._taken(flight)

    def _fail(self, flight: InFlight, why: str) -> None:
        self._flights -= 1
        self._failed(flight, why)

    def _drop(self, link: Link) -> None:
        if self._links.pop(link.fd, None) is None:
            return
        if link.rest is not None:
            self._loop.remove_writer(link.fd)
            link.rest = None
        if link.pooled:
            assert link.backend is not None
            links = self._channels[link.backend]
            links.remove(link)
            if not links:
                del self._channels[link.backend]
        link.usock.close()  # also leaves the epoll set
