"""The sync engine: accept in the calling thread, one thread per connection."""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from ... import fdpass, systemd
from ...errors import FdPassError, ProtocolError
from ...message import CHANNEL_ACK, Format, HandoffReader, HandoffRecord
from .. import http
from ..answer import Phase, error_close_frame, fail_stream
from ..fdlimit import RESOURCE_ERRNOS
from ..options import ACCEPT_BACKOFF, Options, drop_abandoned, sender_allowed
from ..stream import ConnectionClosed
from .handoff import Handoff
from .streams import _SyncStream

__all__ = ["DEFAULT_MAX_THREADS", "Handler", "Receiver", "serve"]

log = logging.getLogger("fdhandoff.receiver")
access_logger = logging.getLogger("fdhandoff.access")

#: Connection threads at most when ``max_connections`` is 0: past a few
#: hundred threads the asyncio flavour is the better tool.
DEFAULT_MAX_THREADS: Final = 512

Handler = Callable[[Handoff], object]


class Receiver:
    """Accepts handoffs in the calling thread; one thread per connection."""

    def __init__(self, handler: Handler, options: Options | None = None) -> None:
        self.handler = handler
        self.options = options if options is not None else Options()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._live: set[Handoff | _SyncStream] = set()
        self._threads: set[threading.Thread] = set()
        #: UNIX connections carrying many handoffs (channels, BYTE markers).
        self._persistent: set[socket.socket] = set()
        self._full_logged = False
        limit = self.options.max_connections or DEFAULT_MAX_THREADS
        self._slots = threading.BoundedSemaphore(limit)
        #: Threads holding one of the slots (a channel's reader gives its own back).
        self._slotted: set[threading.Thread] = set()

    # --- bookkeeping -------------------------------------------------------------------

    def _track(self, item: Handoff | _SyncStream) -> None:
        with self._lock:
            self._live.add(item)

    def _untrack(self, item: Handoff | _SyncStream) -> None:
        with self._lock:
            self._live.discard(item)

    def access_log(self, prefix: str, sent: int, duration: float, why: str | None = None) -> None:
        if not self.options.access_log or not access_logger.isEnabledFor(logging.INFO):
            return
        if why:
            access_logger.info("%s %d %.3fs (%s)", prefix, sent, duration, why)
        else:
            access_logger.info("%s %d %.3fs", prefix, sent, duration)

    def _wait_slot(self) -> bool:
        """Take a slot once one is free; False if the receiver stops first."""
        while not self._slots.acquire(timeout=0.2):
            if self.stopping.is_set():
                return False
        return True

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        """Run ``target(*args)`` in a new thread that owns the slot its caller took."""

        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)
                self._free_slot(thread)

        thread = threading.Thread(target=run, daemon=True, name="fdhandoff-connection")
        with self._lock:
            self._threads.add(thread)
            self._slotted.add(thread)
        thread.start()

    def _free_slot(self, thread: threading.Thread) -> None:
        with self._lock:
            if thread not in self._slotted:
                return
            self._slotted.discard(thread)
        self._slots.release()

    # --- accepting ---------------------------------------------------------------------

    def serve(self, listeners: Iterable[socket.socket]) -> None:
        """Accept until :attr:`stopping` is set, then shut down gracefully.

        A new UNIX connection gets a thread only once its first bytes have
        arrived: until then it waits here, in the selector, for at most
        ``handoff_timeout``.  Senders write a handoff right after connecting,
        so this costs them nothing, and connections that stay silent hold an
        fd for a while, not the threads every handoff needs.
        """
        socks = list(listeners)
        limit = self.options.max_connections
        #: Accepted, silent so far: connection -> when it is given up.
        waiting: dict[socket.socket, float] = {}
        with selectors.DefaultSelector() as sel:
            for sock in socks:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            accepting = True
            while not self.stopping.is_set():
                for key, _ in sel.select(0.2):
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    if key.data is None:  # a listener
                        if accepting and (new := self._accept(conn)) is not None:
                            sel.register(new, selectors.EVENT_READ, data=True)
                            waiting[new] = time.monotonic() + self.options.handoff_timeout
                        continue
                    # A slot before a thread: at the limit the connection stays
                    # in the selector (its handoff queued in the kernel) and a
                    # stop is still noticed within 0.2 s.
                    if not self._slots.acquire(timeout=0.2):
                        self._note_full()
                        break
                    self._full_logged = False
                    sel.unregister(conn)
                    deadline = waiting.pop(conn)
                    self._start(self._take, conn, deadline)
                self._expire(sel, waiting)
                # --max-connections counts the waiting ones too, as in the
                # asyncio engine: at the limit accepting pauses and senders
                # queue in the kernel's backlog.  Without it, only the fd
                # limit bounds them (accept backs off on EMFILE).
                with self._lock:
                    room = not limit or len(waiting) + len(self._slotted) < limit
                if accepting != room:
                    accepting = not accepting
                    for sock in socks:
                        if accepting:
                            sel.register(sock, selectors.EVENT_READ)
                        else:
                            sel.unregister(sock)
        for conn in waiting:
            conn.close()
        for sock in socks:
            sock.close()
        self._shutdown()

    def _expire(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, float]) -> None:
        now = time.monotonic()
        for conn in [conn for conn, deadline in waiting.items() if deadline <= now]:
            del waiting[conn]
            sel.unregister(conn)
            conn.close()
            log.warning(
                "UNIX connection sent no complete handoff within %.1f s; closed",
                self.options.handoff_timeout,
            )

    def _note_full(self) -> None:
        if not self._full_logged:
            self._full_logged = True
            log.warning(
                "%d connections live (--max-connections): not accepting for now",
                self.options.max_connections or DEFAULT_MAX_THREADS,
            )

    def _accept(self, listener: socket.socket) -> socket.socket | None:
        """Accept one connection from an allowed sender, non-blocking, or None."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                log.warning(
                    "accept failed: %s: pausing %.0f ms", exc.strerror, ACCEPT_BACKOFF * 1000
                )
                time.sleep(ACCEPT_BACKOFF)
            elif exc.errno not in (errno.ECONNABORTED, errno.EINTR):
                log.error("accept failed: %s", exc)
            return None
        if not sender_allowed(conn, self.options):
            conn.close()
            return None
        conn.setblocking(False)
        return conn

    def _take(self, conn: socket.socket, deadline: float) -> None:
        keep = False
        try:
            conn.setblocking(True)
            reader = HandoffReader(conn.type)
            # What is left of handoff_timeout after waiting for the first bytes.
            got = self._receive(conn, reader, max(0.001, deadline - time.monotonic()))
            if got is None:
                return
            record, client = got
            channel = record.channel and self.options.channels  # else declined: one handoff
            if record.format is Format.BYTE or channel:
                # Persistent: BYTE markers, or a channel (one ACK per handoff).
                with self._lock:
                    self._persistent.add(conn)
                # The reader is not a connection: each handoff waits for a
                # slot of its own, so readers holding slots cannot starve them.
                self._free_slot(threading.current_thread())
                while True:
                    if record.abandoned:  # the sender is gone: nothing to acknowledge
                        drop_abandoned(record, client)
                    else:
                        if not self._wait_slot():
                            client.close()  # stopping: never acknowledged
                            return
                        self._start(self._run, record, client)
                        if record.channel and not _ack(conn):
                            return
                    if self.stopping.is_set():
                        return
                    got = self._receive(conn, reader, None)
                    if got is None:
                        return
                    record, client = got
            elif record.format is Format.PLAIN_SCGI:
                keep = True
                self._run(record, conn)
            else:
                conn.close()  # "taken"
                if record.abandoned:
                    drop_abandoned(record, client)
                else:
                    self._run(record, client)
        finally:
            with self._lock:
                self._persistent.discard(conn)
            if not keep:
                conn.close()

    def _receive(
        self, conn: socket.socket, reader: HandoffReader, timeout: float | None
    ) -> tuple[HandoffRecord, socket.socket] | None:
        try:
            return fdpass.recv_handoff(conn, reader, blocking=True, timeout=timeout)
        except TimeoutError:
            log.warning(
                "UNIX connection sent no complete handoff within %.1f s; closed",
                self.options.handoff_timeout,
            )
        except (ProtocolError, FdPassError) as exc:
            log.warning("invalid handoff: %s", exc)
        except OSError as exc:
            log.warning("reading a handoff failed: %s", exc)
        return None

    # --- running -----------------------------------------------------------------------------

    def _run(self, record: HandoffRecord, sock: socket.socket) -> None:
        try:
            handoff = Handoff(record, sock, self)
        except ProtocolError as exc:
            log.warning("bad request description in handoff: %s", exc)
            _reject(sock, exc.status_hint, record.format is Format.PLAIN_SCGI)
            return
        self._track(handoff)
        why: str | None = None
        try:
            if handoff.ktls_rx_relay:
                log.error(
                    "%s: TLS handed over without kernel TLS receive offload (KTLS_RX=0); "
                    "unsupported, answering 502",
                    handoff.describe(),
                )
                handoff.respond(502, [("Content-Type", "text/plain")], b"TLS relay not supported\n")
            else:
                self.handler(handoff)
        except ConnectionClosed as exc:
            why = str(exc)
        except ProtocolError as exc:
            why = str(exc)
            log.info("%s: %s", handoff.describe(), exc)
            fail_stream(handoff)
            _answer_error(handoff, exc.status_hint)
        except Exception:
            why = "handler error"
            log.exception("handler failed for %s", handoff.describe())
            fail_stream(handoff)
            _answer_error(handoff, 500)
        finally:
            self._untrack(handoff)
        self._complete(handoff, why)

    def _complete(self, handoff: Handoff, why: str | None) -> None:
        if handoff.phase is Phase.HANDED_OVER:
            return
        if handoff.phase is Phase.NEW and why is None:
            log.error("handler returned without answering %s: 500", handoff.describe())
            _answer_error(handoff, 500)
        if handoff.phase is Phase.STREAMING and why is None:
            why = "handler returned before ending its response"
        # Logged before the lingering close, so the line times the response
        # and not up to linger_timeout of waiting for the client's FIN.
        self.access_log(
            handoff.log_prefix(handoff.status or 0),
            handoff.bytes_sent,
            time.monotonic() - handoff.started,
            why,
        )
        if handoff.phase is Phase.DONE:
            # A complete answer, even an error one (413, 426 after a refused
            # WebSocket upgrade), ends with the lingering close: closing with
            # client bytes unread sends a RST that can destroy the answer in
            # flight (RFC 9112 section 9.6, RFC 1122 section 4.2.2.13).
            handoff.linger_close()
        else:
            handoff.socket.close()

    # --- stopping ------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        systemd.stopping()
        with self._lock:
            persistent = list(self._persistent)
        for conn in persistent:
            # Wakes its reader with EOF; what the sender queued but we did not
            # read is refused when it closes (ECONNRESET: the front answers 503).
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        grace = self.options.grace
        with self._lock:
            count = len(self._live)
        if count:
            log.info("stopping: %d connections live, waiting up to %.1f s", count, grace)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._threads and not self._live:
                    return
            time.sleep(0.05)
        with self._lock:
            live = list(self._live)
        for item in live:
            if isinstance(item, _SyncStream):
                with contextlib.suppress(Exception):
                    item.going_away()
            else:
                with contextlib.suppress(OSError):
                    item.socket.shutdown(socket.SHUT_RDWR)  # unblocks its thread
        with self._lock:
            threads = list(self._threads)
        # One deadline for all: a thread that ignores its closed socket (a
        # handler sleeping, computing) is left to end with the process.
        deadline = time.monotonic() + max(1.0, grace)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _ack(conn: socket.socket) -> bool:
    """Acknowledge one channel handoff (blocking); False if the sender is gone."""
    try:
        conn.sendall(CHANNEL_ACK)
    except OSError as exc:
        log.info("channel closed before its acknowledgement: %s", exc.strerror)
        return False
    return True


def _reject(sock: socket.socket, status: int, cgi: bool) -> None:
    extra = [] if cgi else [("Connection", "close")]
    head = http.response_head(status, [("Content-Length", "0"), *extra], cgi=cgi)
    try:
        sock.settimeout(1.0)
        sock.sendall(head)
    except OSError:
        pass
    finally:
        sock.close()


def _answer_error(handoff: Handoff, status: int) -> None:
    if handoff.phase is not Phase.NEW or handoff.socket.fileno() < 0:
        return
    if handoff.upgraded:
        # The sender already answered 101: the client reads WebSocket frames
        # now, and an HTTP answer would reach it as garbage.  A close frame
        # says the same (RFC 6455 section 7.4.1).
        handoff.status = 101
        with contextlib.suppress(ConnectionClosed, OSError):
            handoff.send_raw(error_close_frame(status))
        handoff.phase = Phase.DONE
        return
    body = f"{status} {http.reason(status)}\n".encode()
    with contextlib.suppress(ConnectionClosed, OSError):
        handoff.respond(status, [("Content-Type", "text/plain; charset=utf-8")], body)


def serve(
    handler: Handler,
    listeners: Iterable[socket.socket],
    options: Options | None = None,
    *,
    stop: threading.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (main thread) or until ``stop`` is set."""
    receiver = Receiver(handler, options)
    if stop is not None:
        receiver.stopping = stop
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: receiver.stopping.set())
    try:
        receiver.serve(listeners)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
