"""Passing fds over UNIX sockets: the only module that calls sendmsg/recvmsg.

Everything that crosses a process boundary with an fd goes through here, so
the rules of unix(7) and cmsg(3) are applied in one place:

* ``SCM_RIGHTS`` ancillary data rides on the first byte of a ``sendmsg``; a
  stream socket may accept only part of the data, and the rest is sent
  *without* the fd, so it is never passed twice.
* ``recvmsg`` always (never plain ``recv``, which makes the kernel silently
  discard attached fds) with ``MSG_CMSG_CLOEXEC``, so a received fd is not
  inherited by child processes.  CPython's ``socket.recv_fds`` ignores its
  flags argument (gh-107898), hence the direct call.
* ``MSG_CTRUNC`` / ``MSG_TRUNC`` are errors, and every fd that did arrive is
  closed before the error is raised: one owner per fd, always.
* A received fd is wrapped as a socket at once and put in the blocking mode
  the caller asked for: the ``O_NONBLOCK`` flag lives on the open file
  description, shared with the sender (Apache hands over non-blocking fds
  while ``gettimeout()`` would claim blocking).

Every function has a blocking form and, where it matters, a ``*_nowait`` form
that raises ``BlockingIOError`` instead of waiting; :mod:`fdhandoff.aio`
builds the asyncio verbs on the latter.
"""

from __future__ import annotations

import _socket
import array
import contextlib
import errno
import os
import select
import selectors
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Final

from .errors import FdPassError
from .message import CLOSED, MAX_PAYLOAD_SIZE, Format, HandoffReader, HandoffRecord, Signal

__all__ = [
    "HANGUP",
    "MAX_FDS_PER_MESSAGE",
    "RECV_SIZE",
    "PeerCredentials",
    "peer_credentials",
    "poll_now",
    "recv_fd",
    "recv_fd_nowait",
    "recv_handoff",
    "recv_size",
    "send_fd",
    "send_fd_nowait",
    "send_tls_close_notify",
    "tls_offloaded",
    "wrap_fd",
]

_FD_SIZE: Final = array.array("i").itemsize

#: Control-buffer room.  Exactly one fd is expected, but the buffer holds more
#: so that a sender passing several is *detected* (and every fd closed) instead
#: of the kernel silently closing the surplus and setting MSG_CTRUNC.
MAX_FDS_PER_MESSAGE: Final = 8
_CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)

#: Bytes read per recvmsg on a stream connection: an nginx fd_pass netstring
#: (~300 bytes for a small request, up to its 32 KiB head limit) in one go.
RECV_SIZE: Final = 64 * 1024

_RECV_NOWAIT: Final = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)

#: poll(2) event of a UNIX connection whose other end has been closed (both
#: directions shut): the bytes it sent before are still there to read
#: (unix(7)), then EOF.  A sender's ``shutdown(SHUT_WR)`` is not one: it still
#: reads what the receiver writes (POLLRDHUP alone).
HANGUP: Final = select.POLLHUP
_CTRUNC: Final = int(socket.MSG_CTRUNC)
_TRUNC: Final = int(socket.MSG_TRUNC)
_SO_PEERCRED_FORMAT: Final = "3i"  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The sending process, as the kernel saw it at connect time (unix(7) SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """``SO_PEERCRED`` of a connected UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack(_SO_PEERCRED_FORMAT, raw)
    return PeerCredentials(pid, uid, gid)


@contextlib.contextmanager
def _no_python_timeout(sock: socket.socket, timeout: float) -> Iterator[None]:
    """Run one call as if ``sock`` had timeout 0.0, then restore ``timeout``.

    On a socket with a positive timeout CPython poll()s for up to that long
    before every send/recv, whatever MSG_DONTWAIT says, so a "nowait" call
    would block and end in TimeoutError instead of BlockingIOError.  The fd
    is O_NONBLOCK for both settings, so only Python's bookkeeping changes.
    """
    sock.settimeout(0.0)
    try:
        yield
    finally:
        sock.settimeout(timeout)


# --- sending -------------------------------------------------------------------


#: Plain ints: the socket module's IntFlag operators cost about a µs per
#: handoff, on the front's hot path.
_SEND_FLAGS: Final = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)


def _rights(fd: int) -> list[tuple[int, int, bytes]]:
    # One C int in native byte order: cmsg(3) SCM_RIGHTS data is an int array.
    return [(_SOL_SOCKET, _SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]


def send_fd_nowait(sock: socket.socket, data: bytes | memoryview, fd: int | None) -> int:
    """One non-blocking ``sendmsg``; attach ``fd`` if given.  Returns bytes sent.

    Raises ``BlockingIOError`` when nothing could be sent (the fd was not
    passed either).  ``EMSGSIZE`` (a SEQPACKET record larger than the socket
    buffer) becomes :class:`FdPassError`.
    """
    if not data:
        raise ValueError("an fd must travel with at least one data byte (unix(7))")
    ancillary = _rights(fd) if fd is not None else []
    flags = _SEND_FLAGS
    timeout = sock.gettimeout()
    try:
        if not timeout:  # None or 0.0: MSG_DONTWAIT alone keeps the call from waiting
            return sock.sendmsg([data], ancillary, flags)
        with _no_python_timeout(sock, timeout):
            return sock.sendmsg([data], ancillary, flags)
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:
            raise FdPassError(
                exc.errno, f"handoff message of {len(data)} bytes is larger than the socket allows"
            ) from exc
        raise


def send_fd(sock: socket.socket, data: bytes, fd: int, *, timeout: float | None = None) -> None:
    """Send ``data`` with ``fd`` attached to its first byte; wait until all is sent.

    A partial send is completed without the fd.  ``timeout`` bounds the whole
    call (``TimeoutError``); the socket's own timeout is not used.  A timeout
    after the first byte went out says so: the peer then holds the fd and an
    incomplete message, and the caller must close the connection.
    """
    if not data:
        raise ValueError("an fd must travel with at least one data byte (unix(7))")
    view = memoryview(data)
    pending_fd: int | None = fd
    deadline = None if timeout is None else _now() + timeout
    while view:
        try:
            sent = send_fd_nowait(sock, view, pending_fd)
        except BlockingIOError:
            try:
                _wait(sock, write=True, deadline=deadline)
            except TimeoutError as exc:
                if pending_fd is None:
                    raise TimeoutError(
                        f"timed out with {len(view)} of {len(data)} bytes unsent; "
                        "the fd was already passed"
                    ) from exc
                raise
            continue
        pending_fd = None
        view = view[sent:]


# --- receiving -----------------------------------------------------------------


def wrap_fd(fd: int, *, blocking: bool = True) -> socket.socket:
    """Own ``fd`` as a socket in the given blocking mode; close it if it is not a socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise FdPassError(exc.errno, f"received fd is not a socket: {exc.strerror}") from exc
    try:
        sock.setblocking(blocking)
    except OSError:
        sock.close()
        raise
    return sock


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check_received(
    data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int, bufsize: int
) -> int | None:
    if not ancdata and not msg_flags:
        return None  # the common case of a message without an fd
    fds = _received_fds(ancdata)
    problem = None
    if msg_flags & _CTRUNC:
        # cmsg(3), unix(7): the kernel sets MSG_CTRUNC both when the fds do
        # not fit the control buffer and when it has no free descriptor slot
        # to install one in (EMFILE); the fd is closed either way.
        problem = (
            f"control data truncated: more than {MAX_FDS_PER_MESSAGE} fds were sent, "
            "or this process is at its open-files limit (the fd was lost)"
        )
    elif msg_flags & _TRUNC:
        problem = f"record larger than the {bufsize}-byte receive buffer was truncated"
    elif len(fds) > 1:
        problem = f"{len(fds)} fds arrived in one message, expected at most 1"
    if problem is not None:
        _close_all(fds)
        raise FdPassError(problem)
    return fds[0] if fds else None


def poll_now(sock: socket.socket) -> int:
    """The poll(2) events of ``sock`` now, without waiting: ``POLLIN``,
    :data:`HANGUP` once the sender has closed, ``POLLERR`` with an error
    pending (``SO_ERROR``), 0 for none.

    Taken *before* a read, it tells whether the sender had closed before that
    read: see :class:`Assembly` (``after_close``).
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)  # POLLHUP and POLLERR always come
    ready = poller.poll(0)
    return ready[0][1] if ready else 0


def recv_fd_nowait(
    sock: socket.socket, bufsize: int = RECV_SIZE, *, blocking: bool = True
) -> tuple[bytes, socket.socket | None]:
    """One non-blocking ``recvmsg``: the bytes and the attached fd as a socket, or None.

    ``(b"", None)`` means EOF.  Raises ``BlockingIOError`` when nothing is
    there, :class:`FdPassError` for truncation, several fds or a non-socket fd.
    """
    flags = _RECV_NOWAIT
    timeout = sock.gettimeout()
    if not timeout:  # None or 0.0: MSG_DONTWAIT alone keeps the call from waiting
        data, ancdata, msg_flags, _ = sock.recvmsg(bufsize, _CMSG_SPACE, flags)
    else:
        with _no_python_timeout(sock, timeout):
            data, ancdata, msg_flags, _ = sock.recvmsg(bufsize, _CMSG_SPACE, flags)
    fd = _check_received(data, ancdata, msg_flags, bufsize)
    return data, (wrap_fd(fd, blocking=blocking) if fd is not None else None)


def recv_fd(
    sock: socket.socket,
    bufsize: int = RECV_SIZE,
    *,
    blocking: bool = True,
    timeout: float | None = None,
) -> tuple[bytes, socket.socket | None]:
    """Blocking form of :func:`recv_fd_nowait`; ``TimeoutError`` after ``timeout`` s."""
    deadline = None if timeout is None else _now() + timeout
    while True:
        try:
            return recv_fd_nowait(sock, bufsize, blocking=blocking)
        except BlockingIOError:
            _wait(sock, write=False, deadline=deadline)


def recv_size(sock: socket.socket) -> int:
    """Receive buffer size for one recvmsg: a whole Apache record on SEQPACKET."""
    return MAX_PAYLOAD_SIZE + 1 if sock.type == socket.SOCK_SEQPACKET else RECV_SIZE


def recv_handoff(
    conn: socket.socket,
    reader: HandoffReader | None = None,
    *,
    blocking: bool = True,
    timeout: float | None = None,
) -> tuple[HandoffRecord, socket.socket] | None:
    """Receive one complete handoff from ``conn``: the record and the client socket.

    Returns None when the sender closed cleanly between records.  For plain
    SCGI (no fd) the returned socket is ``conn`` itself: the request body
    continues on it and the response goes back on it.  Pass the
    same ``reader`` again to take several handoffs from one persistent
    connection (BYTE and PAYLOAD formats, SCGI channels).  ``timeout`` bounds the whole
    handoff.  On any error the received client fd is closed.  A record marked
    ``abandoned`` was given up by its sender, which answered the client: close
    the socket without a word (see :class:`Assembly`).
    """
    if reader is None:
        reader = HandoffReader(conn.type)
    deadline = None if timeout is None else _now() + timeout
    assembly = Assembly.of(conn, reader)
    bufsize = recv_size(conn)
    try:
        got = assembly.next()  # finished by an earlier read (a channel)
        while True:
            if isinstance(got, tuple):
                return got
            if got is CLOSED:
                return None
            after_close = bool(poll_now(conn) & HANGUP)
            try:
                data, fd_sock = recv_fd_nowait(conn, bufsize, blocking=blocking)
            except BlockingIOError:
                _wait(conn, write=False, deadline=deadline)
                continue
            got = assembly.feed(data, fd_sock, after_close=after_close)
    except BaseException:
        assembly.close()
        raise


class Assembly:
    """Handoffs being put together from successive ``recvmsg`` results.

    Shared by the blocking and asyncio receive loops, so the rules live in one
    place.  It owns every client fd that arrived until its record is complete
    (then it belongs to the caller), in arrival order: on a channel one read
    can finish one handoff and bring the fd of the next (see
    :class:`~fdhandoff.message.HandoffReader`).  :meth:`close` releases the
    fds still held, on any error or cancellation.  One per connection: get it
    with :meth:`of`, which keeps it with the connection's reader.

    A sender that waits for its handoffs to be taken (``record.waits``: the
    fdhandoff front) gives up on those it finds unread at its deadline, answers
    their clients ``503`` and closes the connection; the kernel still delivers
    what it had sent.  So the records a read finishes come out ``abandoned``
    when that read began after the close (``after_close``, from
    :func:`poll_now` before the read): the receiver must not answer them a
    second time (and run the request the client was told failed).
    """

    __slots__ = ("after_close", "conn", "fds", "reader", "size")

    def __init__(self, conn: socket.socket, reader: HandoffReader) -> None:
        self.conn = conn
        self.reader = reader
        self.fds: deque[socket.socket] = deque()
        #: The last read began after the sender had closed the connection.
        self.after_close = False
        #: Bytes to ask of each recvmsg (:func:`recv_size`), found once: the
        #: socket type is an enum conversion per look-up.
        self.size = recv_size(conn)

    @classmethod
    def of(cls, conn: socket.socket, reader: HandoffReader) -> Assembly:
        """The connection's assembly, kept on ``reader`` between calls."""
        assembly = reader.io
        if not isinstance(assembly, cls):
            assembly = reader.io = cls(conn, reader)
        return assembly

    @property
    def client(self) -> socket.socket | None:
        """The client fd of the handoff being read, if it has arrived."""
        return self.fds[0] if self.fds else None

    def feed(
        self, data: bytes, fd_sock: socket.socket | None, *, after_close: bool = False
    ) -> tuple[HandoffRecord, socket.socket] | Signal:
        """The next finished handoff (record, client socket), ``NEED_DATA`` or ``CLOSED``.

        ``after_close``: the read that returned ``data`` began after the sender
        closed the connection (``poll_now(conn) & HANGUP`` before it).
        """
        self.after_close = after_close
        if fd_sock is not None:
            self.fds.append(fd_sock)  # the reader checks that it belongs somewhere
        try:
            self.reader.receive(data, 1 if fd_sock is not None else 0)
        except BaseException:
            self.close()
            raise
        return self.next()

    def next(self) -> tuple[HandoffRecord, socket.socket] | Signal:
        """A handoff the last :meth:`feed` finished besides the one it returned."""
        try:
            record = self.reader.next_record()
        except BaseException:  # a broken handoff after good ones: its fd goes
            self.close()
            raise
        if not isinstance(record, HandoffRecord):
            return record
        if self.after_close and record.waits:
            record = replace(record, abandoned=True)
        if record.format is Format.PLAIN_SCGI:
            return record, self.conn  # no fd: the connection itself is the client
        # The reader refuses records without their fd, so there is one.
        return record, self.fds.popleft()

    def close(self) -> None:
        """Close the client fds held for unfinished handoffs."""
        while self.fds:
            self.fds.popleft().close()


# --- waiting -------------------------------------------------------------------


_now = time.monotonic


def _wait(sock: socket.socket, *, write: bool, deadline: float | None) -> None:
    remaining = None if deadline is None else deadline - _now()
    if remaining is not None and remaining <= 0:
        raise TimeoutError("timed out waiting for the UNIX socket")
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ)
        if not sel.select(remaining):
            raise TimeoutError("timed out waiting for the UNIX socket")


# --- kernel TLS on a handed-off socket -------------------------------------------------------
# A TLS connection is handed off once the kernel holds its record layer
# (kTLS): its holder reads and writes plain bytes, and ends the session with
# a close_notify alert, which only an ancillary-data sendmsg can ask the
# kernel to send.

#: linux/tcp.h TCP_ULP, linux/socket.h SOL_TLS, linux/tls.h TLS_TX / TLS_RX /
#: TLS_SET_RECORD_TYPE (the socket module names none of them).
TCP_ULP: Final = 31
SOL_TLS: Final = 282
TLS_TX: Final = 1
TLS_RX: Final = 2
TLS_SET_RECORD_TYPE: Final = 1

#: An alert record (RFC 5246 §6.2.1, content type 21) carrying close_notify
#: (RFC 5246 §7.2.1, RFC 8446 §6.1: level warning = 1, close_notify = 0).
_ALERT_RECORD: Final = [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes((21,)))]
_CLOSE_NOTIFY: Final = [bytes((1, 0))]


def tls_offloaded(sock: socket.socket) -> str | None:
    """None if the kernel carries both directions of ``sock``'s TLS; else why not.

    ``getsockopt(SOL_TLS, TLS_TX|TLS_RX)`` with room for the 4-byte
    ``tls_crypto_info`` header succeeds once that direction's keys are in the
    kernel, and fails (EBUSY) before (net/tls/tls_main.c).
    """
    try:
        ulp = sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16).rstrip(b"\x00")
    except OSError as exc:
        return f"TCP_ULP: {exc.strerror}"
    if ulp != b"tls":
        return "the kernel's tls layer is not attached"
    missing = []
    for name, option in (("send", TLS_TX), ("receive", TLS_RX)):
        try:
            sock.getsockopt(SOL_TLS, option, 4)
        except OSError:
            missing.append(name)
    return f"no kernel offload for {' and '.join(missing)}" if missing else None


def send_tls_close_notify(sock: _socket.socket) -> bool:
    """End the TLS session of a kTLS socket with close_notify, before its FIN.

    Without it, a client reading to the end of the connection cannot tell
    the end from a truncation (OpenSSL 3 reports "unexpected eof").  Only
    on a socket whose send side the kernel encrypts: on any other the alert
    would go out as two plain bytes.  False if nothing was sent.
    """
    try:
        sock.getsockopt(SOL_TLS, TLS_TX, 4)
        sent = sock.sendmsg(_CLOSE_NOTIFY, _ALERT_RECORD, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except OSError:
        return False
    return sent == len(_CLOSE_NOTIFY[0])
