"""The asyncio receiver engine: take handoffs on UNIX sockets, run the handler.

One :class:`Receiver` per process (or per worker).  For every listening socket
it accepts connections concurrently; each new UNIX connection gets a task that
reads one handoff, bounded by ``handoff_timeout`` so a silent sender cannot
stall anyone else.  The format is detected per connection
(:mod:`fdhandoff.message`), and the connection is then treated the way its
sender expects:

* SCGI (fdhandoff front, nginx ``fd_pass``) and PAYLOAD (Apache
  ``mod_socket_handoff``): one handoff per connection; the connection is
  closed as soon as the handoff is read — the fdhandoff front takes that close
  as "taken" and answers 503 itself when it does not come;
* SCGI on a channel (``HANDOFF_CHANNEL=1``, the fdhandoff front): a
  persistent connection carrying many handoffs; each one taken is
  acknowledged with one ``CHANNEL_ACK`` byte, written right after the read
  that finished it, before its handler runs (so the sender's work on it
  overlaps the handler's instead of delaying its next client);
* BYTE markers (``mod_proxy_fdpass``, OpenResty, fd-pass): a persistent
  connection carrying many handoffs, read until the sender closes it;
* plain SCGI (no fd: nginx ``scgi_pass``, Apache ``mod_proxy_scgi``): the
  connection is the client; body and response travel on it.

The handler runs in the same task, then the connection is finished according
to what the handler did (:class:`~fdhandoff.receiver.handoff.Phase`): a
complete response is closed with a lingering close, a stream handed over lives
on without a task, a handler that answered nothing gets a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Protocol

from .. import aio, fdpass, systemd
from ..errors import FdPassError, ProtocolError
from ..message import CHANNEL_ACK, CLOSED, NEED_DATA, Format, HandoffReader, HandoffRecord, Signal
from ..metrics import Metrics, parse_address, serve_metrics
from . import http
from .answer import error_close_frame, fail_stream
from .fdlimit import RESOURCE_ERRNOS, FdReserve
from .handoff import Handoff, Phase
from .options import ACCEPT_BACKOFF, Options, drop_abandoned, sender_allowed
from .stream import ConnectionClosed, Stream

__all__ = ["Handler", "Receiver", "serve"]

#: asyncio.Task(eager_start=True) exists from Python 3.12 (eager task
#: factories); on 3.11 a handler's first step waits for the next loop
#: iteration, measured at about 20 µs of a handoff's latency.
_EAGER: Final = sys.version_info >= (3, 12)

log = logging.getLogger("fdhandoff.receiver")
access_logger = logging.getLogger("fdhandoff.access")

Handler = Callable[[Handoff], Awaitable[None]]


class Held(Protocol):
    """A client connection an adapter serves itself after :meth:`Handoff.detach`.

    Tracked with :meth:`Receiver.track` until it closes, it counts towards
    ``--max-connections``, the connections gauge and the shutdown wait like a
    handoff or a stream.
    """

    def close(self) -> None:
        """Close the connection and :meth:`Receiver.untrack` it."""

    def stopping(self) -> None:
        """The receiver began stopping: close at once if idle between two requests."""


#: Connections accepted per readiness callback before yielding to the loop,
#: so one busy listener cannot starve the others or the streams.
ACCEPT_BATCH: Final = 64


class Receiver:
    """Accepts handoffs on listening sockets and runs ``handler`` for each."""

    def __init__(self, handler: Handler, options: Options | None = None) -> None:
        self.handler = handler
        self.options = options if options is not None else Options()
        self.loop = asyncio.get_running_loop()
        self.stopping = False
        self._listeners: list[socket.socket] = []
        self._accepting = False
        self._backoff: asyncio.TimerHandle | None = None
        #: Handoffs being answered and streams alive: what shutdown waits for.
        self._live: set[Handoff | Stream | Held] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Tasks reading handoffs or running handlers.
        self._tasks: set[asyncio.Task[None]] = set()
        #: Persistent UNIX connections (BYTE markers, SCGI channels) read
        #: from a reader callback, and those paused at --max-connections.
        self._persistent: set[Persistent] = set()
        self._paused: set[Persistent] = set()
        #: Channel acknowledgements not written yet, per UNIX connection.
        self._acks: dict[socket.socket, int] = {}
        #: Channels with a writer registered: their sender stopped reading
        #: its acknowledgements, the rest go out when it reads again.
        self._ack_blocked: set[socket.socket] = set()
        self._reserve = FdReserve()
        #: poll(2) events of the UNIX connection read last, taken before the read.
        self.polled = 0
        #: New UNIX connections whose handoff is still being read.
        self._taking = 0
        self._starved_since: float | None = None
        self.metrics = _receiver_metrics(self)

    # --- listening ----------------------------------------------------------------

    def start(self, listeners: Iterable[socket.socket]) -> None:
        for sock in listeners:
            sock.setblocking(False)
            self._listeners.append(sock)
        self._resume()

    def _resume(self) -> None:
        self._backoff = None
        if self._accepting or self.stopping or self._at_limit():
            return
        if not self._reserve.refill():
            self._back_off("at the open-files limit (EMFILE)")
            return
        self._accepting = True
        for sock in self._listeners:
            self.loop.add_reader(sock.fileno(), self._on_listener, sock)

    def _pause(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        for sock in self._listeners:
            self.loop.remove_reader(sock.fileno())

    def _back_off(self, why: str) -> None:
        # Logged once per episode: at the limit this fires every 100 ms.
        if self._starved_since is None:
            self._starved_since = self.loop.time()
            log.warning("%s: pausing handoffs, retrying every %.0f ms", why, ACCEPT_BACKOFF * 1000)
        self._pause()
        if self._backoff is None and not self.stopping:
            self._backoff = self.loop.call_later(ACCEPT_BACKOFF, self._resume)

    def _at_limit(self) -> bool:
        limit = self.options.max_connections
        return bool(limit) and len(self._live) + self._taking >= limit

    def _on_listener(self, listener: socket.socket) -> None:
        # The raw accept and plain ints: socket.accept() converts the
        # listener's family and type to enums for every connection.
        accept = listener._accept  # type: ignore[attr-defined]
        family, kind = int(listener.family), int(listener.type)
        for _ in range(ACCEPT_BATCH):
            if self._at_limit():
                log.warning(
                    "%d connections live (--max-connections): not accepting for now",
                    self.options.max_connections,
                )
                self._pause()
                return
            try:
                conn = socket.socket(family, kind, 0, accept()[0])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._back_off(f"accept failed: {exc.strerror}")
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                log.error("accept on %s failed: %s", listener.getsockname(), exc)
                return
            if self._starved_since is not None:
                log.warning(
                    "taking handoffs again after %.1f s", self.loop.time() - self._starved_since
                )
                self._starved_since = None
            self._on_connection(conn, kind)

    def _allowed(self, conn: socket.socket) -> bool:
        if sender_allowed(conn, self.options):
            return True
        self.metrics.inc("handoff_errors_total", reason="peer_refused")
        return False

    def _on_connection(self, conn: socket.socket, kind: int) -> None:
        if not self._allowed(conn):
            # Closing the UNIX connection makes the kernel release any fd
            # queued on it (unix(7)), so the refused client is closed too.
            conn.close()
            return
        conn.setblocking(False)
        self._taking += 1  # counts towards --max-connections until it is a Handoff
        # Eager: the handoff is usually in the socket already (the sender
        # connects and sends at once), so it is read and answered right here.
        self.spawn(self._take(conn, kind), eager=True)

    def spawn(self, coro: Awaitable[None], *, eager: bool = False) -> asyncio.Task[None]:
        """Run ``coro`` as a tracked task (cancelled after the shutdown grace).

        ``eager``: on Python 3.12+ the task's first step runs now, inside the
        caller, rather than in the next loop iteration: a handler that answers
        without waiting has answered when this returns, and one that is done
        by then costs no tracking.  For callers that do nothing the task
        depends on after spawning it.
        """
        task: asyncio.Task[None]
        if eager and _EAGER:
            task = asyncio.Task(coro, loop=self.loop, eager_start=True)  # type: ignore[arg-type,call-arg,unused-ignore]
            if task.done():
                return task
        else:
            task = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._check_idle()

    # --- taking handoffs -------------------------------------------------------------

    async def _take(self, conn: socket.socket, kind: int) -> None:
        keep = False  # True when conn became the client (plain SCGI)
        try:
            reader = HandoffReader(kind)
            try:
                got = await self._receive(conn, reader)
            finally:
                self._taking -= 1
            # No await from here to open(): the connection stays counted.
            if got is None:
                self._maybe_resume()
                return
            record, client = got
            # A channel declined (options.channels off) is taken like one
            # handoff: the close acknowledges it, and the front then opens a
            # new connection per handoff.
            channel = record.channel and self.options.channels
            if record.format is Format.BYTE or channel:
                keep = True  # the Persistent reader owns conn from here on
                persistent = Persistent(self, conn, reader)
                self._persistent.add(persistent)
                # The read that finished this handoff may have finished the
                # next ones too (a description split over two sends): they
                # start now, not when the sender next writes.
                persistent.deliver(got)
                persistent.resume()
                return
            if record.format is Format.PLAIN_SCGI:
                keep = True
                client = conn
            else:
                conn.close()  # "taken": the sender may forget the client now
            handoff = self._open(record, client)
            # The handler may run for as long as its connection lives (a
            # stream, a WebSocket): this frame must not keep the reader (its
            # decoder, buffers and a cycle with its assembly) nor the handoff.
            reader.io = None
            del got, record, client, reader
            if handoff is not None:
                run = self._run(handoff)
                del handoff
                await run
        finally:
            if not keep:
                self._finish_conn(conn)

    def _finish_conn(self, conn: socket.socket) -> None:
        """Write the acknowledgements still owed, then close the UNIX connection."""
        self._flush_acks(conn)
        self._acks.pop(conn, None)  # the sender stopped reading: give up
        if conn in self._ack_blocked:
            # Before the close: a writer left on a closed fd would fire with
            # fileno() -1 (or on whatever reuses the number).
            self._ack_blocked.discard(conn)
            self.loop.remove_writer(conn.fileno())
        conn.close()

    def _start(self, conn: socket.socket, taken: list[tuple[HandoffRecord, socket.socket]]) -> None:
        """Acknowledge the channel handoffs of one read, then run each in its own task.

        Acknowledged first, with one write for the lot: the fds are ours from
        the read on, and the sender, woken now, closes its copies while the
        handlers run (on another core) instead of after them, when it would
        compete with its next client's request.
        """
        acks = 0
        for record, _ in taken:
            acks += record.channel and not record.abandoned  # its sender is gone
        if acks:
            self._acks[conn] = self._acks.get(conn, 0) + acks
            if conn not in self._ack_blocked:  # else its writer flushes them
                self._flush_acks(conn)
        for record, client in taken:
            handoff = self._open(record, client)
            if handoff is not None:
                self.spawn(self._run(handoff), eager=True)

    def _flush_acks(self, conn: socket.socket) -> None:
        count = self._acks.pop(conn, 0)
        if not count or conn.fileno() < 0:
            return
        try:
            sent = conn.send(CHANNEL_ACK * count)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # the sender is gone: nobody is waiting
            log.info("channel closed before %d acknowledgement(s): %s", count, exc.strerror)
            return
        if sent < count:
            # The sender is not reading its acknowledgements (hundreds of KiB
            # of them): finish when it does.
            self._acks[conn] = count - sent
            if conn not in self._ack_blocked:
                self._ack_blocked.add(conn)
                self.loop.add_writer(conn.fileno(), self._on_ack_writable, conn)

    def _on_ack_writable(self, conn: socket.socket) -> None:
        self._ack_blocked.discard(conn)
        self.loop.remove_writer(conn.fileno())
        self._flush_acks(conn)

    async def _receive(
        self, conn: socket.socket, reader: HandoffReader
    ) -> tuple[HandoffRecord, socket.socket] | None:
        """The first handoff of a new UNIX connection, or None after logging why
        there is none; ``handoff_timeout`` bounds it."""
        try:
            async with asyncio.timeout(self.options.handoff_timeout):
                got = await self._recv_handoff(conn, reader)
        except TimeoutError:
            log.warning(
                "UNIX connection sent no complete handoff within %.1f s; closed",
                self.options.handoff_timeout,
            )
            self.metrics.inc("handoff_errors_total", reason="timeout")
            return None
        except (FdPassError, ProtocolError, OSError) as exc:
            self._read_failed(exc)
            return None
        if got is None:
            log.info("UNIX connection closed without a handoff")
        return got

    def _read_failed(self, exc: Exception) -> None:
        """Log and count a UNIX connection that delivered no usable handoff."""
        if isinstance(exc, ConnectionResetError):
            # Only a channel sees this: the sender closed with acknowledgement
            # bytes of ours unread (unix(7)), as a front does when it stops.
            # A close, not an error; a handoff cut short is closed with it.
            log.info("sender closed the channel with acknowledgements unread")
            return
        if isinstance(exc, FdPassError | ProtocolError):
            log.warning("invalid handoff: %s", exc)
            self.metrics.inc("handoff_errors_total", reason="invalid")
            return
        self.metrics.inc("handoff_errors_total", reason="os_error")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            self._back_off(f"recvmsg failed: {exc.strerror}")
        else:
            log.warning("reading a handoff failed: %s", exc)

    async def _recv_handoff(
        self, conn: socket.socket, reader: HandoffReader
    ) -> tuple[HandoffRecord, socket.socket] | None:
        """:func:`fdhandoff.aio.recv_handoff` with the spare fd released around
        each ``recvmsg`` (see :class:`FdReserve`)."""
        assembly = fdpass.Assembly.of(conn, reader)
        try:
            got = assembly.next()  # finished by the previous read (a channel)
            while got is NEED_DATA:
                while not self._reserve.held and not self._reserve.refill():
                    await asyncio.sleep(ACCEPT_BACKOFF)  # at the limit: wait for an fd
                # Read before waiting: a sender writes its handoff right after
                # connect() (nginx fd_pass, mod_socket_handoff), so by the
                # accept it is usually there, and a wait would cost a future
                # and a turn of the loop for nothing.
                got = self._read_once(conn, assembly)
                if got is NEED_DATA:
                    await aio.wait_readable(conn)
        except BaseException:
            assembly.close()
            raise
        return got if isinstance(got, tuple) else None

    def _read_once(
        self, conn: socket.socket, assembly: fdpass.Assembly
    ) -> tuple[HandoffRecord, socket.socket] | Signal:
        """One ``recvmsg`` fed to ``assembly``; the spare fd must be held.

        The spare is closed right before the call and reopened after, with no
        await in between (see :class:`FdReserve`).  ``NEED_DATA`` when nothing
        was there yet.  The caller closes ``assembly`` on an exception.
        """
        reserve = self._reserve
        reserve.release()
        try:
            # Before the read: did the sender close first (then what this read
            # finishes was given up: fdpass.Assembly), is an error pending?
            self.polled = events = fdpass.poll_now(conn)
            data, fd_sock = fdpass.recv_fd_nowait(conn, assembly.size, blocking=False)
        except BlockingIOError:
            return NEED_DATA
        finally:
            if not reserve.refill():
                self._back_off("at the open-files limit (EMFILE)")
        return assembly.feed(data, fd_sock, after_close=bool(events & fdpass.HANGUP))

    # --- running the handler ------------------------------------------------------------

    def _open(self, record: HandoffRecord, sock: socket.socket) -> Handoff | None:
        """The tracked Handoff, or None after answering an unusable description
        (or closing the client of a handoff its sender gave up on)."""
        handoff = self._handoff(record, sock)
        if handoff is None:
            # Never a live connection: if reading it had paused accepting
            # (--max-connections counts handoffs being read), resume.
            self._maybe_resume()
            return None
        self.metrics.inc("handoffs_total", format=record.format.value)
        self.track(handoff)
        return handoff

    def _handoff(self, record: HandoffRecord, sock: socket.socket) -> Handoff | None:
        if record.abandoned:
            # Counted before the close: whoever sees the client's end sees the count.
            self.metrics.inc("handoff_errors_total", reason="abandoned")
            drop_abandoned(record, sock)
            return None
        try:
            handoff = Handoff(record, sock, self)
        except ProtocolError as exc:
            log.warning("bad request description in handoff: %s", exc)
            self.metrics.inc("handoff_errors_total", reason="bad_description")
            _reject(sock, exc.status_hint, record.format is Format.PLAIN_SCGI)
            return None
        except OSError as exc:  # pragma: no cover - socket calls on a dead fd
            log.warning("handed-off socket unusable: %s", exc)
            sock.close()
            return None
        return handoff

    async def _run(self, handoff: Handoff) -> None:
        why: str | None = None
        cancelled = False
        try:
            if handoff.ktls_rx_relay:
                await self._refuse_relay(handoff)
            else:
                await self.handler(handoff)
        except ConnectionClosed as exc:
            why = str(exc)
        except ProtocolError as exc:
            why = str(exc)
            log.info("%s: %s", handoff.describe(), exc)
            fail_stream(handoff)
            await _answer_error(handoff, exc.status_hint)
        except asyncio.CancelledError:
            why = "cancelled at shutdown"
            cancelled = True
            raise
        except Exception:
            why = "handler error"
            log.exception("handler failed for %s", handoff.describe())
            fail_stream(handoff)
            await _answer_error(handoff, 500)
        finally:
            then = handoff.pop_continuation()
            if then is not None and (why is not None or cancelled):
                # The handler failed after leaving it: it never starts, and
                # the socket it was to serve (detached) is closed here.
                then.close()
                then = None
                handoff.socket.close()
            self.untrack(handoff)
            await self._complete(handoff, why, cancelled=cancelled)
        if then is not None:
            # Handoff.continue_with: the rest runs here, in this task, without
            # the handoff (and its request description) kept alive by this frame.
            del handoff
            try:
                await then
            except Exception:
                log.exception("the continuation of a handler failed")

    async def _refuse_relay(self, handoff: Handoff) -> None:
        # nginx fd_pass with kTLS TX only relays decrypted client bytes over
        # the UNIX connection (peers.md section 1).  The receiver takes its
        # input from the client socket only, so it refuses such handoffs; the
        # response still reaches the client, encrypted by kTLS TX.
        log.error(
            "%s: nginx handed over a TLS connection without kernel TLS receive "
            "offload (KTLS_RX=0); unsupported, answering 502 - enable kTLS RX "
            "(TLS 1.2, or OpenSSL >= 3.2 for TLS 1.3)",
            handoff.describe(),
        )
        await handoff.respond(502, [("Content-Type", "text/plain")], b"TLS relay not supported\n")

    async def _complete(
        self, handoff: Handoff, why: str | None, *, cancelled: bool = False
    ) -> None:
        """Finish the connection; ``cancelled``: the shutdown cut the handler
        short and the socket closes at once, without lingering."""
        phase = handoff.phase
        if phase is Phase.HANDED_OVER:
            return
        if phase is Phase.NEW and why is None:
            log.error("handler returned without answering %s: 500", handoff.describe())
            await _answer_error(handoff, 500)
            phase = handoff.phase
        if phase is Phase.STREAMING and why is None:
            why = "handler returned before ending its response"
            log.warning("%s: %s", handoff.describe(), why)
        # Logged before the lingering close: the line then times the response,
        # not up to linger_timeout of waiting for the client's FIN, and it is
        # written even if the shutdown cancels this task inside the linger.
        if self.logs_access:
            self.access_log(
                handoff.log_prefix(handoff.status or 0),
                handoff.bytes_sent,
                time.monotonic() - handoff.started,
                why,
            )
        if handoff.phase is Phase.DONE and not cancelled:
            # A complete answer, even an error one (413 for a body too large,
            # 426 for a WebSocket version we do not speak), ends with the
            # lingering close: the client may still be sending, and closing
            # with its bytes unread makes the kernel send a RST that can
            # destroy the answer in flight (RFC 9112 section 9.6, RFC 1122
            # section 4.2.2.13).
            await handoff.linger_close()
        else:
            handoff.socket.close()

    # --- bookkeeping -----------------------------------------------------------------

    def track(self, item: Handoff | Stream | Held) -> None:
        """Count ``item`` as a live connection until :meth:`untrack`."""
        self._live.add(item)
        self._idle.clear()

    def untrack(self, item: Handoff | Stream | Held) -> None:
        self._live.discard(item)
        self._check_idle()
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if self._at_limit():
            return
        if not self._accepting and self._backoff is None:
            self._resume()
        if self._paused:
            for persistent in list(self._paused):
                persistent.resume()

    def _check_idle(self) -> None:
        if not self._live and not self._tasks:
            self._idle.set()

    @property
    def connections(self) -> int:
        """Handoffs being answered, live streams and connections adapters hold."""
        return len(self._live)

    @property
    def logs_access(self) -> bool:
        """True when :meth:`access_log` writes: callers skip building the line otherwise."""
        return self.options.access_log and access_logger.isEnabledFor(logging.INFO)

    def access_log(self, prefix: str, sent: int, duration: float, why: str | None = None) -> None:
        """One line per connection: client, request, status, bytes, duration."""
        if not self.logs_access:
            return
        if why:
            access_logger.info("%s %d %.3fs (%s)", prefix, sent, duration, why)
        else:
            access_logger.info("%s %d %.3fs", prefix, sent, duration)

    # --- stopping ------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Close the listening sockets (their files are the caller's to remove)."""
        self.stopping = True
        self._pause()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        for persistent in list(self._persistent):
            persistent.close()
        # Kept-alive connections waiting for a next request have nothing to
        # finish: they close now instead of holding the grace period.
        for item in list(self._live):
            if not isinstance(item, Handoff | Stream):
                item.stopping()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop taking handoffs, give live connections ``grace`` seconds, close the rest."""
        systemd.stopping()
        self.stop_accepting()
        grace = self.options.grace if grace is None else grace
        if self._live or self._tasks:
            log.info("stopping: %d connections live, waiting up to %.1f s", len(self._live), grace)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        for item in list(self._live):
            if isinstance(item, Stream):
                item.going_away()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(1.0, grace))
        for item in list(self._live):
            if isinstance(item, Stream):
                item._abort("closed at shutdown")
            elif not isinstance(item, Handoff):
                item.close()  # its task was cancelled before it could
        self._reserve.close()


class Persistent:
    """Later handoffs of a persistent UNIX connection (SCGI channel, BYTE markers).

    Read from a reader callback rather than a task: the sender may keep the
    connection for hours, and each handoff then costs one ``recvmsg`` and no
    future, wake-up or ``epoll_ctl``.  Reading pauses at ``--max-connections``
    (the sender's handoffs wait, and it answers 503 at its deadline) and at
    the fd limit, and stops when the sender closes or sends something broken.
    """

    __slots__ = ("assembly", "conn", "fd", "reading", "receiver", "retry")

    def __init__(self, receiver: Receiver, conn: socket.socket, reader: HandoffReader) -> None:
        self.receiver = receiver
        self.conn = conn
        self.fd = conn.fileno()
        self.assembly = fdpass.Assembly.of(conn, reader)
        self.reading = False
        self.retry: asyncio.TimerHandle | None = None

    def resume(self) -> None:
        receiver = self.receiver
        self.retry = None
        receiver._paused.discard(self)
        if self.reading or self.fd < 0:
            return
        if receiver._at_limit():
            receiver._paused.add(self)
            return
        self.reading = True
        receiver.loop.add_reader(self.fd, self._readable)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.receiver.loop.remove_reader(self.fd)

    def _readable(self) -> None:
        receiver = self.receiver
        if receiver._at_limit():
            # --max-connections: stop reading, as accepting stops.
            self._pause()
            receiver._paused.add(self)
            return
        if not receiver._reserve.held and not receiver._reserve.refill():
            self._pause()  # at the fd limit: the handoffs wait in the kernel
            self.retry = receiver.loop.call_later(ACCEPT_BACKOFF, self.resume)
            return
        try:
            got = receiver._read_once(self.conn, self.assembly)
        except (FdPassError, ProtocolError, OSError) as exc:
            receiver._read_failed(exc)
            self.close()
            return
        got = self.deliver(got)
        if self.fd < 0:
            return  # closed: a broken handoff, or a handler that ran eagerly (stop_accepting)
        if got is not NEED_DATA:  # CLOSED: the sender is done with it
            self.close()
        elif receiver.polled & select.POLLERR and self._reset_pending():
            # uvloop (libuv) reports a readiness event that carries an error
            # once, then stops watching the fd.  A sender that closed with our
            # acknowledgements unread leaves exactly that (unix(7): ECONNRESET)
            # behind the handoffs it had sent, each holding a client's fd:
            # SO_ERROR took the error, so watching afresh reads them all, then
            # the end of the connection.  (The poll before the read saw it:
            # no getsockopt per read.)
            self._pause()
            self.resume()

    def deliver(self, got: tuple[HandoffRecord, socket.socket] | Signal) -> Signal:
        """Start ``got`` and every later handoff the reads so far have finished
        (one read can finish several: a burst on a channel); the signal after them.

        A broken handoff behind good ones closes the connection once the good
        ones are started: their clients are owed their answers.
        """
        taken = []
        try:
            while isinstance(got, tuple):
                taken.append(got)
                got = self.assembly.next()
        except (FdPassError, ProtocolError, OSError) as exc:
            self.receiver._start(self.conn, taken)
            self.receiver._read_failed(exc)
            self.close()
            return CLOSED
        self.receiver._start(self.conn, taken)
        return got

    def _reset_pending(self) -> bool:
        """True (and the error cleared) when the socket holds an error (SO_ERROR)."""
        try:
            return self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            return False

    def close(self) -> None:
        """Stop reading, close the fds of unfinished handoffs and the connection."""
        receiver = self.receiver
        receiver._persistent.discard(self)
        receiver._paused.discard(self)
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.fd < 0:
            return
        self._pause()
        self.assembly.close()
        receiver._finish_conn(self.conn)
        self.fd = -1


def _reject(sock: socket.socket, status: int, cgi: bool) -> None:
    """Answer a handoff whose request description is unusable, then close."""
    head = http.response_head(
        status, [("Content-Length", "0"), *([] if cgi else [("Connection", "close")])], cgi=cgi
    )
    try:
        sock.setblocking(False)
        sock.send(head)
    except OSError:
        pass
    finally:
        sock.close()


async def _answer_error(handoff: Handoff, status: int) -> None:
    if handoff.phase is not Phase.NEW or handoff.socket.fileno() < 0:
        return
    if handoff.upgraded:
        # The sender already answered 101: the client reads WebSocket frames
        # now, and an HTTP answer would reach it as garbage.  A close frame
        # says the same (RFC 6455 section 7.4.1).
        handoff.status = 101
        with contextlib.suppress(ConnectionClosed, OSError):
            await handoff.send_raw(error_close_frame(status))
        handoff.phase = Phase.DONE
        return
    body = f"{status} {http.reason(status)}\n".encode()
    with contextlib.suppress(ConnectionClosed, OSError):
        await handoff.respond(status, [("Content-Type", "text/plain; charset=utf-8")], body)


async def serve(
    handler: Handler,
    listeners: Iterable[socket.socket],
    options: Options | None = None,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[Receiver], None] | None = None,
    lifespan: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully.

    A second signal skips the rest of the grace period.  With ``lifespan``, a
    handler that has ``startup()`` / ``shutdown()`` coroutines (the ASGI
    adapter) is started before the first handoff is taken and shut down after
    the last connection ended.
    """
    receiver = Receiver(handler, options)
    # ASGI lifespan (or any handler with startup/shutdown): the app is ready
    # before the first handoff is taken, and shut down after the last one.
    startup = getattr(handler, "startup", None) if lifespan else None
    if startup is not None:
        await startup()
    metrics_server = None
    if receiver.options.metrics:
        host, port = parse_address(receiver.options.metrics)
        metrics_server = await serve_metrics(receiver.metrics, host, port)
    receiver.start(listeners)
    loop = receiver.loop
    stop = stop if stop is not None else asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    # (signal, the handler it had): restored when serving ends.  The loop's
    # removal would leave SIGTERM at its default action, and a signal then,
    # while the caller still cleans up (fdhandoff serve removes its socket
    # files), would kill the process half-way.
    installed: list[tuple[signal.Signals, Any]] = []
    with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
        for signum in (signal.SIGTERM, signal.SIGINT):
            before = signal.getsignal(signum)
            loop.add_signal_handler(signum, on_signal)
            installed.append((signum, before))
    if ready is not None:
        ready(receiver)
    try:
        await stop.wait()
        shutdown = asyncio.ensure_future(receiver.shutdown())
        hurried = asyncio.ensure_future(hurry.wait())
        await asyncio.wait([shutdown, hurried], return_when=asyncio.FIRST_COMPLETED)
        if not shutdown.done():
            log.info("second signal: closing everything now")
            shutdown.cancel()
            await receiver.shutdown(grace=0)
        hurried.cancel()
    finally:
        for signum, before in installed:
            loop.remove_signal_handler(signum)
            if before is not None:  # None: not set from Python, nothing to restore
                signal.signal(signum, before)
        if metrics_server is not None:
            metrics_server.close()
        shutdown_app = getattr(handler, "shutdown", None)
        if startup is not None and shutdown_app is not None:
            await shutdown_app()


def _receiver_metrics(receiver: Receiver) -> Metrics:
    """What a receiver process exposes on ``--metrics`` (docs/operations.md)."""
    metrics = Metrics("fdhandoff_receiver_")
    metrics.counter("handoffs_total", "Handoffs taken, by sender format.")
    metrics.counter(
        "handoff_errors_total",
        "UNIX connections that delivered no usable handoff, by reason "
        "(timeout, invalid, bad_description, peer_refused, os_error).",
    )
    metrics.gauge(
        "connections", "Client connections held: being answered or streaming.",
        lambda: len(receiver._live),
    )  # fmt: skip
    metrics.gauge("handoffs_in_progress", "UNIX connections being read.", lambda: receiver._taking)
    metrics.gauge(
        "accepting", "1 while taking handoffs, 0 when paused (limits, EMFILE, stopping).",
        lambda: int(receiver._accepting),
    )  # fmt: skip
    return metrics
