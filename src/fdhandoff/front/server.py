"""The front's engine: accept, read the head without over-reading, route, hand off.

Built on readiness callbacks (``loop.add_reader``), not on a task or a
stream per connection: a connection whose head is already in the kernel when
it is accepted (the usual case, thanks to TCP_DEFER_ACCEPT) is peeked,
parsed, routed and handed off inside the accept callback, and the front keeps
nothing of it once the receiver has taken it.  Only auth mode, which talks
HTTP to an application, runs a coroutine (:mod:`.auth`).

Reading the head never consumes a byte past it (the body and any pipelined
request stay in the kernel for the receiver, RFC 9112 §9.3):

1. ``recv(MSG_PEEK)`` whatever is buffered, into one shared buffer;
2. if the blank line that ends the head is there, ``recv`` exactly up to it;
3. if not, everything peeked is head, so it is consumed into a per-connection
   buffer (a peek alone would leave the socket readable and spin the loop)
   and the connection waits for more, under the head timeout.

A handoff is one ``sendmsg`` (through :mod:`fdhandoff.fdpass`) of the SCGI
description with the client fd on a UNIX connection to the receiver, then the
*taken acknowledgement* (:mod:`.handoff`): on a channel, a persistent
connection the receiver accepted, one ACK byte per handoff; on a one-shot
connection, the receiver closing its end once it has read the handoff (as
receivers written for nginx fd_pass do).  Only then does the front close its
copy of the client fd.  A receiver that closes without reading
(``ECONNRESET``) or does not acknowledge within ``timeouts.handoff`` has not
taken the connection: the client gets 503 (or a WebSocket close 1013 after a
101).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import ssl
import time
from _socket import socket as Socket  # the C socket type, see _on_accept
from collections.abc import Callable
from typing import Final, TypeVar

from .. import aio, proxyproto, systemd, websocket
from ..errors import ConfigError, ProtocolError
from ..fdpass import send_tls_close_notify, tls_offloaded
from ..httphead import (
    HEAD_END,
    RequestHead,
    empty_lines_end,
    incomplete_head_error,
    parse_head,
    reason_phrase,
)
from ..metrics import Metrics, parse_address, serve_metrics, worker_address
from ..routing import Router, normalize_path
from .accesslog import AccessLog
from .auth import serve_auth
from .config import DEFAULT_BACKLOG, Address, FrontConfig, Mode, RouteConfig
from .describe import Endpoint, describe
from .handoff import Handoffs, InFlight, Link, open_backend
from .listeners import (
    Listener,
    Proxied,
    close_listener,
    open_listener,
    peer_endpoint,
    server_endpoint,
)
from .responses import error_response
from .tls import probe_offload, server_context

__all__ = ["Front", "Request"]

_T = TypeVar("_T")

log = logging.getLogger("fdhandoff.front")

# --- constants (docs/security.md, "Front") ------------------------------------------

#: Connections accepted per wake-up of a listener before other work runs:
#: bounds how long a connection storm can starve handoffs already under way.
ACCEPT_BATCH: Final = 64


#: How long accepting stops after EMFILE/ENFILE (out of fds): the pending
#: connections wait in the kernel backlog while handoffs finish and fds free
#: up, instead of the loop spinning on a listener it cannot serve (trio's
#: serve_listeners does the same).
EMFILE_PAUSE: Final = 0.1

#: While fds stay short, one reminder line per this many seconds (a line per
#: pause would be ten a second and bury everything else in the log).
EMFILE_LOG_EVERY: Final = 10.0

#: Housekeeping period: expires head/handoff/linger deadlines, flushes the
#: access log.  Deadlines are therefore honoured within this much.
TICK: Final = 0.1

#: After an error answer, at most this many bytes the client is still sending
#: are read and dropped before closing (lingering close, as nginx does): a
#: close with unread data sends RST, which can destroy the answer in flight.
LINGER_MAX_BYTES: Final = 256 * 1024

#: The bytes read per recv while lingering.
_LINGER_READ: Final = 64 * 1024

#: WebSocket close code sent when the handoff fails after the 101 was sent
#: (RFC 6455 §7.4 registry: 1013 Try Again Later).
WS_TRY_AGAIN: Final = 1013

# Plain ints: the socket module's IntEnum/IntFlag operators cost more than
# the rest of what is done with them on the hot path.
_PEEK: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_STREAM: Final = int(socket.SOCK_STREAM)
_NOWAIT: Final = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_DONTWAIT: Final = int(socket.MSG_DONTWAIT)
#: Answers whose reason names the server's insides (socket paths, the
#: upstream's address, the allowed prefix): the body says only the phrase.
_DETAILS_LOGGED_ONLY: Final = frozenset((403, 500, 502, 503, 504))
#: Bytes peeked on a new TLS connection to tell a handshake from a plain
#: request line (enough for the access log's method and target).
_TLS_SNIFF: Final = 1024
_HANDSHAKE_RECORD: Final = 22
_ACCEPT_PAUSE_ERRNOS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_BACKEND_REASONS: Final = {
    errno.ENOENT: "socket file missing",
    errno.ECONNREFUSED: "nobody listening",
    errno.EAGAIN: "backlog full",
    errno.EACCES: "permission denied",
    errno.ENOTSOCK: "not a socket",
    errno.EMFILE: "front out of file descriptors",
    errno.ENFILE: "system out of file descriptors",
}


def _close_frame(code: int, reason: bytes) -> bytes:
    # RFC 6455 §5.5.1: server frames are unmasked; payload = code + reason (< 126).
    payload = code.to_bytes(2, "big") + reason[:123]
    return bytes((0x88, len(payload))) + payload


class Request:
    """What the access log needs about one request while it is in flight.

    The client's label is formatted only when a line is written: with the
    access log off, most requests never need it.
    """

    __slots__ = ("addr", "listener", "method", "route", "start", "target", "tls", "upgraded")

    def __init__(self, listener: Listener, addr: object, start: float, tls: bool) -> None:
        self.listener = listener
        #: The client speaks TLS (kernel TLS by now): answers end with close_notify.
        #: Known from the connection, not from its listener, which a reload
        #: may turn from TLS to plain while the head is arriving.
        self.tls = tls
        self.addr = addr
        self.start = start
        self.method = b""
        self.target = b""
        self.route: str | None = None
        self.upgraded = False  # a 101 went out: failures become a WebSocket close

    @property
    def client(self) -> str:
        return _client_label(self.listener, self.addr)

    @property
    def https(self) -> bool:
        """The client used TLS: to the front, or to a balancer (PROXY protocol)."""
        return self.tls or (type(self.addr) is Proxied and self.addr.https)


class _Pending:
    """A connection whose head has not fully arrived."""

    __slots__ = ("addr", "buf", "fd", "listener", "pause", "sock", "start", "tls")

    def __init__(self, sock: Socket, addr: object, listener: Listener, start: float, tls: bool):
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.listener = listener
        self.buf = bytearray()
        self.start = start
        self.tls = tls
        #: aio.next_pause: readable without data (a partial kTLS record).
        self.pause = 0.0


class _Handshake:
    """A TLS connection whose handshake is under way (TLS listeners only)."""

    __slots__ = ("addr", "fd", "listener", "start", "tls", "waiting")

    def __init__(self, tls: ssl.SSLSocket, addr: object, listener: Listener, start: float):
        self.tls = tls
        self.fd = tls.fileno()
        self.addr = addr
        self.listener = listener
        self.start = start
        #: The readiness the handshake waits for: "", "read" or "write".
        self.waiting = ""


class _ProxyWait:
    """A connection whose PROXY protocol header has not fully arrived."""

    __slots__ = ("addr", "buf", "fd", "listener", "sock", "start")

    def __init__(self, sock: Socket, addr: object, listener: Listener, start: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.listener = listener
        self.start = start
        #: The header's bytes read so far (all of them header: nothing follows yet).
        self.buf = b""


class _Linger:
    __slots__ = ("budget", "fd", "pause", "sock")

    def __init__(self, sock: Socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.budget = LINGER_MAX_BYTES
        self.pause = 0.0  # as _Pending.pause


def _client_label(listener: Listener, addr: object) -> str:
    # A UNIX listener's client has no address, unless a PROXY header gave one.
    if not isinstance(addr, tuple):
        return "unix"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _request_line(head: bytes) -> tuple[bytes, bytes]:
    """Method and target of an unparseable head, best effort, for the access log."""
    line = head.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    return parts[0][:32], (parts[1] if len(parts) > 1 else b"")


class Front:
    """One front server: its listeners, routes, and the connections in flight."""

    def __init__(
        self,
        config: FrontConfig,
        reload: Callable[[], FrontConfig] | None = None,
        *,
        worker: bool = False,
    ) -> None:
        #: Reads the configuration again (SIGHUP); ConfigError if it is invalid.
        self._reload_source = reload
        #: One of several worker processes (``workers``): the listeners, and
        #: their socket files, are the supervisor's; so is SIGHUP.
        self.worker = worker
        self._apply(config)
        self.access = AccessLog(config.log.access)
        self.metrics = _front_metrics(self)
        self.listeners: list[Listener] = []
        self._pending: dict[_Pending, float] = {}
        #: TLS connections among them: their deadlines count from the accept,
        #: before a handshake of any length, so _pending is then not in
        #: deadline order and is expired by a full scan.
        self._tls_heads = 0
        self._handshaking: dict[_Handshake, float] = {}
        #: proxy_protocol listeners: connections whose PROXY header is arriving.
        self._proxy_waiting: dict[_ProxyWait, float] = {}
        self._proxy_buf = bytearray(proxyproto.MAX_HEADER_SIZE)
        self._handoffs: Handoffs | None = None
        #: Sockets passed by the service manager that no listener uses now.
        self._inherited = systemd.Inherited()
        self._lingering: dict[_Linger, float] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._resume_handle: asyncio.TimerHandle | None = None
        # Out-of-fds stretch: when it began, pauses so far, last line logged.
        self._short_since: float | None = None
        self._short_pauses = 0
        self._short_logged = 0.0

    def _apply(self, config: FrontConfig) -> None:
        """Take the settings a reload can change (routes, limits, timeouts)."""
        self.config = config
        self.timeouts = config.timeouts
        self.head_limits = config.limits.head
        self.router: Router[RouteConfig] = Router((r.prefix, r.host, r) for r in config.routes)
        self._prefix_bytes = {r.prefix: r.prefix.encode("utf-8") for r in config.routes}
        #: Offer channels (HANDOFF_CHANNEL) in pass and websocket modes.
        self._channels = config.limits.channels > 0
        self._max_head = self.head_limits.max_head_size
        self._buf = bytearray(self._max_head)  # used synchronously only: safe to replace

    # --- life cycle -------------------------------------------------------------------

    def open(self) -> None:
        """Bind every listener, or take the socket systemd passed for it
        (ConfigError on failure, nothing left open)."""
        inherited = self._inherited = systemd.Inherited.from_environ()
        try:
            for address, backlog, context, proxy in _listen_settings(self.config):
                listener = open_listener(address, backlog, inherited)
                listener.tls = context
                listener.proxy = proxy
                self.listeners.append(listener)
            if inherited.unclaimed():
                # systemd listens on it and would queue clients there that no
                # one ever accepts: refuse to start rather than let them hang.
                raise ConfigError(
                    f"socket activation passed {', '.join(inherited.unclaimed())}, which no "
                    "[[listen]] address names: add it to the configuration or remove it "
                    "from the .socket unit"
                )
        except BaseException:
            for listener in self.listeners:
                close_listener(listener)
            self.listeners.clear()
            inherited.close()
            raise

    def close_listeners(self) -> None:
        """Close every listener and remove its socket file; give back the sockets
        the service manager passed (a supervisor of ``workers``, at the end)."""
        for listener in self.listeners:
            close_listener(listener)
        self.listeners.clear()
        self._inherited.close()

    @property
    def handoffs(self) -> Handoffs:
        assert self._handoffs is not None, "the front is not running"
        return self._handoffs

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the front is not running"
        return self._loop

    async def serve(self) -> int:
        """Serve until SIGTERM/SIGINT, then shut down cleanly; return the exit status."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if not self.listeners:
            self.open()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._handoffs = Handoffs(
            self.loop,
            self.timeouts.handoff,
            taken=self._handoff_taken,
            failed=self._handoff_failed,
            channels=self.config.limits.channels,
        )
        metrics_server = None
        if self.config.metrics:
            metrics_server = await serve_metrics(
                self.metrics, *parse_address(self.config.metrics), reuse_port=self.worker
            )
        self._resume_accepting()
        self._tick_handle = self.loop.call_later(TICK, self._tick)
        labels = self._labels()
        log.info("ready, listening on %s", labels)
        systemd.notify("READY=1", f"STATUS=listening on {labels}")
        try:
            await self._stop_event.wait()
            await self._shutdown()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.loop.remove_signal_handler(signum)
            # remove_signal_handler restores SIGHUP's default action, which
            # kills: a reload sent while the front stops must not.  Blocked
            # until it is ignored, so none lands in between (an ignored
            # signal that was pending is discarded, signal(7)).
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            self.loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            if self._tick_handle is not None:
                self._tick_handle.cancel()
            self.handoffs.close()
            self.access.close()
            self._inherited.close()
            if metrics_server is not None:
                metrics_server.close()
        return 0

    def stop(self) -> None:
        """Begin a clean shutdown (signal handler)."""
        if self._stop_event is not None:
            self._stop_event.set()

    def reload(self) -> None:
        """Read the configuration again and apply it, dropping no connection (SIGHUP).

        All or nothing: an invalid configuration, a new listen address that
        cannot be bound or an access log that cannot be opened leaves the
        running configuration as it was, with the reason in the log.  Kept
        addresses keep their listening socket (their backlog is not reset);
        requests whose head is still arriving are routed with the new routes;
        handoffs in flight and auth exchanges finish as they began.  Channels
        are retired: each closes once its handoffs are taken, and later
        handoffs open new ones.  The access log file is reopened (log rotation).
        The metrics address is only read at start.
        """
        if self._stopping or self._reload_source is None or self.worker:
            why = "stopping" if self._stopping else "nothing to reload"
            if self.worker:  # the supervisor reloads, then replaces its workers
                why = f"a worker; send it to the supervisor (pid {os.getppid()})"
            log.info("SIGHUP ignored: %s", why)
            return
        systemd.reloading()
        try:
            self.reload_config()
        finally:
            # Refused or applied, the front serves again: systemd's reload
            # job ends here (a refusal is in the log, not a failed unit).
            systemd.notify("READY=1", "STATUS=listening on " + self._labels())

    def _labels(self) -> str:
        return ", ".join(listener.label for listener in self.listeners)

    def reload_config(self) -> bool:
        """Read the configuration again and apply it: True, or False (logged) if refused.

        Also what the supervisor of ``workers`` does to its own, never
        serving, Front at SIGHUP: the new workers are forked from it.
        """
        assert self._reload_source is not None
        try:
            config = self._reload_source()
            if config.metrics != self.config.metrics:
                log.warning("reload: a new metrics address takes effect at the next restart")
                config = dataclasses.replace(config, metrics=self.config.metrics)
            if (config.workers > 1) != (self.config.workers > 1):
                # One process or a supervisor: decided at start.
                log.warning("reload: workers = %d takes effect at the next restart", config.workers)
                config = dataclasses.replace(config, workers=self.config.workers)
            access = AccessLog(config.log.access)
        except (ConfigError, OSError) as exc:
            log.error("reload refused, the running configuration stays: %s", _one_line(exc))
            return False
        try:
            kept, added = self._listeners_for(config)
        except (ConfigError, OSError) as exc:
            access.close()
            log.error("reload refused, the running configuration stays: %s", _one_line(exc))
            return False
        for listener, backlog, context, proxy in kept:
            listener.sock.listen(backlog)  # listen(2) again only sets the backlog
            listener.tls = context  # certificates read again: renewals apply now
            # Connections accepted already keep what they were accepted with.
            listener.proxy = proxy
        for listener in self.listeners:
            if not any(listener is still for still, _, _, _ in kept):
                if self._accepting:
                    self.loop.remove_reader(listener.sock.fileno())
                if listener.inherited:
                    log.warning(
                        "reload: %s is no longer configured, but the service manager still "
                        "listens on it (socket activation): connections there wait unanswered "
                        "until it is configured again; remove it from the .socket unit",
                        listener.label,
                    )
                self._release(listener)
        if self._accepting:
            for listener in added:
                self.loop.add_reader(listener.sock.fileno(), self._on_accept, listener)
        self.listeners = [listener for listener, _, _, _ in kept] + added
        self._shorten_deadlines(config)
        self._apply(config)
        if self._handoffs is not None:  # None in a supervisor: it hands nothing off
            self._handoffs.reconfigure(config.timeouts.handoff, config.limits.channels)
        self.access.close()
        self.access = access
        # Logged before the new level applies: a reload to "warning" still says it worked.
        log.info(
            "configuration reloaded: listening on %s, %d route(s)",
            self._labels(),
            len(config.routes),
        )
        logging.getLogger("fdhandoff").setLevel(config.log.level.upper())
        return True

    def as_worker(self, slot: int) -> None:
        """In worker process ``slot`` (``workers``): its own metrics port, PORT + slot."""
        if self.config.metrics:
            metrics = worker_address(self.config.metrics, slot)
            self.config = dataclasses.replace(self.config, metrics=metrics)

    def _shorten_deadlines(self, config: FrontConfig) -> None:
        """A lowered head or linger timeout applies to what is waiting now, too.

        Each dict must stay in deadline order where ``_expired`` stops at the
        first live entry: a deadline moved to ``start + new`` (heads and
        handshakes, in accept order) or ``now + new`` (lingering closes) keeps
        it, as both are monotone (heads of TLS connections are scanned whole).
        """
        head, linger = config.timeouts.head, config.timeouts.linger
        if head < self.timeouts.head:
            self._pending = {p: min(d, p.start + head) for p, d in self._pending.items()}
            self._handshaking = {h: min(d, h.start + head) for h, d in self._handshaking.items()}
        if linger < self.timeouts.linger:
            until = time.monotonic() + linger
            self._lingering = {item: min(d, until) for item, d in self._lingering.items()}

    def _listeners_for(
        self, config: FrontConfig
    ) -> tuple[list[tuple[Listener, int, ssl.SSLContext | None, bool]], list[Listener]]:
        """The running listeners ``config`` keeps, with their new backlog and TLS
        context (set by the caller once nothing can fail), and those it adds,
        bound now; ConfigError or OSError, with the added ones closed, if one fails."""
        running = {listener.address: listener for listener in self.listeners}
        kept: list[tuple[Listener, int, ssl.SSLContext | None, bool]] = []
        added: list[Listener] = []
        try:
            for address, backlog, context, proxy in _listen_settings(config):
                listener = running.pop(address, None)
                if listener is None:
                    listener = open_listener(address, backlog, self._inherited)
                    listener.tls = context
                    listener.proxy = proxy
                    added.append(listener)
                else:
                    kept.append((listener, backlog, context, proxy))
        except BaseException:
            for listener in added:
                self._release(listener)
            raise
        return kept, added

    def _release(self, listener: Listener) -> None:
        """Close a listener a reload drops; one systemd passed is kept for later:
        it keeps listening there whatever this process does."""
        if listener.inherited:
            self._inherited.give_back(listener.sock)
        else:
            close_listener(listener)

    def in_flight(self) -> int:
        handoffs = len(self._handoffs) if self._handoffs is not None else 0
        return (
            len(self._pending)
            + len(self._proxy_waiting)
            + len(self._handshaking)
            + handoffs
            + len(self._lingering)
            + len(self.tasks)
        )

    async def _shutdown(self) -> None:
        self._stopping = True
        systemd.stopping()
        self._pause_accepting()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        for listener in self.listeners:
            if self.worker:
                # Only this process's copy: the supervisor, or the next
                # generation of workers, still accepts there.
                listener.sock.close()
            else:
                close_listener(listener)
        self.listeners.clear()
        log.info(
            "shutting down: listeners closed, finishing %d connection(s) in flight",
            self.in_flight(),
        )
        deadline = time.monotonic() + self.timeouts.shutdown
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(TICK / 2)
        if self.in_flight():
            log.warning("shutdown timeout: closing %d connections in flight", self.in_flight())
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for pending in list(self._pending):
            self._drop_pending(pending)
            pending.sock.close()
        for handshake in list(self._handshaking):
            self._end_handshake(handshake)
            handshake.tls.close()
        for waiting in list(self._proxy_waiting):
            self._end_proxy_wait(waiting)
            waiting.sock.close()
        self.handoffs.settle_all()
        for linger in list(self._lingering):
            self._end_linger(linger)
        log.info("stopped")

    # --- accepting ----------------------------------------------------------------------

    def _resume_accepting(self) -> None:
        self._resume_handle = None
        if self._accepting or self._stopping:
            return
        for listener in self.listeners:
            self.loop.add_reader(listener.sock.fileno(), self._on_accept, listener)
        self._accepting = True

    def _pause_accepting(self) -> None:
        if not self._accepting:
            return
        for listener in self.listeners:
            self.loop.remove_reader(listener.sock.fileno())
        self._accepting = False

    def _on_accept(self, listener: Listener) -> None:
        """Accept until the queue is empty (at most ACCEPT_BATCH per wake-up).

        Measured both ways: one accept per readiness event saves the final,
        failing accept (EAGAIN), but costs a loop iteration and often a
        sleep and wake-up per connection; draining the queue handled 20-30%
        more requests per second.

        The raw accept and the C socket type, not socket.socket.accept():
        its wrapper (enum conversions of family and type, a Python __init__,
        a Python close) costs several µs per connection on a path that does
        little else.  Every method used on a client (recv_into, recv, send,
        shutdown, close, fileno) is the C type's own.
        """
        accept = listener.accept
        family = listener.family
        tls = listener.tls
        proxy = listener.proxy
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(listener, exc)
                return
            if self._short_since is not None:
                self._fds_back()
            sock = Socket(family, _STREAM, 0, fd)
            try:
                if proxy:
                    self._begin_proxy(sock, addr, listener, tls)
                elif tls is None:
                    self._start(sock, addr, listener)
                else:
                    self._begin_tls(sock, addr, listener, tls)
            except Exception:  # never let one connection take the loop down
                log.exception("internal error on a new connection from %r", addr)
                if sock.fileno() >= 0:
                    sock.close()

    def _accept_failed(self, listener: Listener, exc: OSError) -> None:
        if exc.errno in _ACCEPT_PAUSE_ERRNOS:
            now = time.monotonic()
            if self._short_since is None:
                self._short_since, self._short_pauses, self._short_logged = now, 0, now
                log.warning(
                    "accept on %s: %s; pausing accepts %d ms at a time until it passes",
                    listener.label,
                    exc.strerror,
                    EMFILE_PAUSE * 1000,
                )
            elif now - self._short_logged >= EMFILE_LOG_EVERY:
                self._short_logged = now
                log.warning(
                    "accept on %s: still %s after %.0f s (%d pauses)",
                    listener.label,
                    exc.strerror,
                    now - self._short_since,
                    self._short_pauses,
                )
            self._short_pauses += 1
            self._pause_accepting()
            if self._resume_handle is None:
                self._resume_handle = self.loop.call_later(EMFILE_PAUSE, self._resume_accepting)
        elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
            log.error("accept on %s: %s", listener.label, exc)

    def _fds_back(self) -> None:
        assert self._short_since is not None
        log.warning(
            "accepting again after %.1f s short of fds (%d pauses)",
            time.monotonic() - self._short_since,
            self._short_pauses,
        )
        self._short_since = None

    # --- PROXY protocol header (proxy_protocol listeners, fdhandoff.proxyproto) -------------

    def _begin_proxy(
        self, sock: Socket, addr: object, listener: Listener, tls: ssl.SSLContext | None
    ) -> None:
        waiting = _ProxyWait(sock, addr, listener, time.monotonic())
        if self._proxy_step(waiting, tls):
            self.loop.add_reader(waiting.fd, self._on_proxy_readable, waiting, tls)
            self._proxy_waiting[waiting] = waiting.start + self.timeouts.head

    def _on_proxy_readable(self, waiting: _ProxyWait, tls: ssl.SSLContext | None) -> None:
        self._proxy_step(waiting, tls)

    def _end_proxy_wait(self, waiting: _ProxyWait) -> None:
        if self._proxy_waiting.pop(waiting, None) is not None:
            self.loop.remove_reader(waiting.fd)

    def _proxy_step(self, waiting: _ProxyWait, tls: ssl.SSLContext | None) -> bool:
        """Read the header as far as it has arrived; True while it is incomplete.

        Peek, parse, then read exactly the header: the request (or the TLS
        ClientHello) behind it stays in the socket.  Bytes of an incomplete
        header are all header, so they are read too (a level-triggered
        reader would otherwise fire again at once for bytes already seen).
        The TLS context is the listener's at accept time, as for a plain
        TLS connection.  Once it returns False the connection is no longer
        waiting here (reader removed before the next step adds its own).
        """
        sock, have = waiting.sock, waiting.buf
        buf = self._proxy_buf
        try:
            n = sock.recv_into(buf, proxyproto.MAX_HEADER_SIZE - len(have), _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            n = 0
        if n == 0:
            self._end_proxy_wait(waiting)
            sock.close()
            if have:
                self._proxy_failed(
                    waiting, "client closed inside the PROXY protocol header", "invalid"
                )
            return False
        data = have + buf[:n]
        try:
            header = proxyproto.parse(data)
        except ProtocolError as exc:
            self._end_proxy_wait(waiting)
            sock.close()
            self._proxy_failed(waiting, str(exc), "invalid")
            return False
        want = n if header is None else header.length - len(have)
        try:
            taken = sock.recv(want, _DONTWAIT)
        except OSError:
            taken = b""
        if len(taken) != want:  # the peeked bytes are ours: only a reset loses them
            self._end_proxy_wait(waiting)
            sock.close()
            return False
        if header is None:
            waiting.buf = data
            return True
        self._end_proxy_wait(waiting)
        addr = waiting.addr
        if header.source is not None:
            addr = Proxied(header.source[0], header.source[1], header.ssl)
        elif header.ssl and isinstance(addr, tuple):
            addr = Proxied(addr[0], addr[1], True)
        if tls is None:
            self._start(sock, addr, waiting.listener, waiting.start)
        else:
            self._begin_tls(sock, addr, waiting.listener, tls, waiting.start)
        return False

    def _proxy_failed(self, waiting: _ProxyWait, why: str, reason: str) -> None:
        """A connection dropped before its request: the PROXY protocol allows no
        answer to a bad header.  A log line naming the balancer, and a count."""
        self.metrics.inc("proxy_protocol_failures_total", reason=reason)
        log.warning("%s: %s; connection closed", _client_label(waiting.listener, waiting.addr), why)

    # --- TLS handshake (TLS listeners, fdhandoff.front.tls) ------------------------------

    def _begin_tls(
        self,
        sock: Socket,
        addr: object,
        listener: Listener,
        context: ssl.SSLContext,
        start: float = 0.0,
    ) -> None:
        start = start or time.monotonic()  # after a PROXY header: since the accept
        try:
            first = sock.recv(_TLS_SNIFF, _PEEK)
        except BlockingIOError:
            first = b"?"  # nothing yet: the handshake waits for it
        except OSError:
            first = b""
        if not first:
            sock.close()
            return
        # A TLS connection starts with a handshake record (RFC 8446 §5.1,
        # content type 22); a request line starts with a method's letters.
        if first[0] != _HANDSHAKE_RECORD and first[:1].isalpha():
            req = Request(listener, addr, start, tls=False)  # answered in plain text
            req.method, req.target = _request_line(first)
            self.reject(sock, req, 400, "plain HTTP sent to a TLS port: use https://")
            return
        raw = socket.socket(listener.family, socket.SOCK_STREAM, 0, sock.detach())
        raw.setblocking(False)  # do_handshake() must not wait: the loop calls back
        try:
            tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            raw.close()
            log.info("%s: TLS: %s", _client_label(listener, addr), exc)
            return
        handshake = _Handshake(tls, addr, listener, start)
        self._handshaking[handshake] = start + self.timeouts.head
        self._tls_step(handshake)

    def _tls_step(self, handshake: _Handshake) -> None:
        tls = handshake.tls
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._tls_wait(handshake, "read")
            return
        except ssl.SSLWantWriteError:
            self._tls_wait(handshake, "write")
            return
        except Exception as exc:  # SSLError, OSError; anything else ends only this one
            self._end_handshake(handshake)
            tls.close()
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            self._tls_failed(handshake, f"handshake failed: {reason}", "failed")
            return
        self._end_handshake(handshake)
        problem = tls_offloaded(tls)
        if problem is not None:
            # Not handed off half-encrypted; the answer goes through OpenSSL.
            self._tls_failed(handshake, f"{problem} ({tls.version()}, {_cipher(tls)})", "offload")
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.send(error_response(500, reason_phrase(500).decode("ascii")))
            tls.close()
            return
        # The kernel holds the record layer now: OpenSSL's state is dropped
        # (no close_notify, the connection goes on) and the socket is read
        # like any other.  Blocking again, as every accepted socket is.
        sock = Socket(handshake.listener.family, _STREAM, 0, tls.detach())
        try:
            sock.setblocking(True)
            self._start(sock, handshake.addr, handshake.listener, handshake.start, tls=True)
        except Exception:  # as in _on_accept: one connection never takes the loop down
            log.exception("internal error on a new TLS connection from %r", handshake.addr)
            if sock.fileno() >= 0:
                sock.close()

    def _tls_wait(self, handshake: _Handshake, want: str) -> None:
        if handshake.waiting == want:
            return
        self._tls_unwatch(handshake)
        if want == "read":
            self.loop.add_reader(handshake.fd, self._tls_step, handshake)
        else:
            self.loop.add_writer(handshake.fd, self._tls_step, handshake)
        handshake.waiting = want

    def _tls_unwatch(self, handshake: _Handshake) -> None:
        if handshake.waiting == "read":
            self.loop.remove_reader(handshake.fd)
        elif handshake.waiting == "write":
            self.loop.remove_writer(handshake.fd)
        handshake.waiting = ""

    def _end_handshake(self, handshake: _Handshake) -> None:
        self._tls_unwatch(handshake)
        self._handshaking.pop(handshake, None)

    def _tls_failed(self, handshake: _Handshake, why: str, reason: str) -> None:
        """A TLS connection that never became a request: no access-log line
        (there was no request), a log line and a count."""
        self.metrics.inc("tls_failures_total", reason=reason)
        client = _client_label(handshake.listener, handshake.addr)
        if reason == "offload":
            log.error("%s: TLS connection refused, it cannot be handed off: %s", client, why)
        else:
            log.info("%s: TLS %s", client, why)

    # --- reading the head -----------------------------------------------------------------

    def _start(
        self, sock: Socket, addr: object, listener: Listener, start: float = 0.0, tls: bool = False
    ) -> None:
        start = start or time.monotonic()  # TLS: since the accept, handshake included
        buf = self._buf
        try:
            n = sock.recv_into(buf, self._max_head, _PEEK)
        except BlockingIOError:
            n = -1
        except OSError:
            sock.close()
            return
        if n == 0:  # connected and closed without a byte: nothing to answer or log
            sock.close()
            return
        if n > 0:
            end = buf.find(HEAD_END, 0, n)
            # The whole head is there: take exactly it (inline: hot path).  At
            # 0 it is empty lines before the request line (RFC 9112 §2.2), not
            # an empty head: _absorb skips them and looks further.
            if end > 0:
                length = end + 4
                try:
                    head = sock.recv(length, _DONTWAIT)
                except OSError:
                    head = b""
                if len(head) != length:  # the peeked bytes are ours: only a reset loses them
                    sock.close()
                    return
                self._dispatch(sock, head, addr, listener, start, tls=tls)
                return
        pending = _Pending(sock, addr, listener, start, tls)
        if n > 0 and not self._absorb(pending, n):
            return
        self.loop.add_reader(pending.fd, self._on_readable, pending)
        self._pending[pending] = start + self.timeouts.head
        self._tls_heads += tls

    def _on_readable(self, pending: _Pending) -> None:
        room = self._max_head - len(pending.buf)
        if room <= 0:  # a reload lowered max_head_size below what this head holds
            error = incomplete_head_error(pending.buf, self.head_limits)
            assert error is not None  # a head at the size limit is an error
            self._refuse_pending(pending, error)
            return
        try:
            n = pending.sock.recv_into(self._buf, room, _PEEK)
        except BlockingIOError:
            # Readable, yet nothing to read: a partial kTLS record on a kernel
            # whose poll reports it (aio.PARTIAL_RECORD_PAUSE).  Listening again
            # at once would call this in a loop until the record is whole.
            pending.pause = aio.next_pause(pending.pause)
            self.loop.remove_reader(pending.fd)
            self.loop.call_later(pending.pause, self._listen_again, pending)
            return
        except OSError:
            n = 0
        pending.pause = 0.0
        if n == 0:
            self._drop_pending(pending)
            req = Request(pending.listener, pending.addr, pending.start, pending.tls)
            req.method, req.target = _request_line(bytes(pending.buf))
            self.log_request(req, 'closed "client closed inside the request head"')
            pending.sock.close()
            return
        if self._absorb(pending, n):
            return  # still incomplete, still registered
        # done (dispatched or answered): _absorb unregistered it

    def _listen_again(self, pending: _Pending) -> None:
        if pending in self._pending:  # not answered, timed out or dropped meanwhile
            self.loop.add_reader(pending.fd, self._on_readable, pending)

    def _absorb(self, pending: _Pending, n: int) -> bool:
        """Take ``n`` peeked bytes; True if the head is still incomplete (keep waiting)."""
        before = len(pending.buf)
        combined = pending.buf + self._buf[:n]
        search = max(0, before - 3)
        if combined[:1] == b"\r":  # empty lines first (RFC 9112 §2.2): not the head's end
            search = max(search, empty_lines_end(combined))
        end = combined.find(HEAD_END, search)
        sock = pending.sock
        if end >= 0:
            end += 4
            self._drop_pending(pending)
            try:
                rest = sock.recv(end - before, _DONTWAIT)
            except OSError:
                rest = b""
            if len(rest) != end - before:
                sock.close()
                return False
            self._dispatch(
                sock,
                bytes(combined[:end]),
                pending.addr,
                pending.listener,
                pending.start,
                tls=pending.tls,
            )
            return False
        try:  # every peeked byte is head: consume it so the socket stops being readable
            taken = sock.recv(n, _DONTWAIT)
        except OSError:
            taken = b""
        if len(taken) != n:
            self._drop_pending(pending)
            sock.close()
            return False
        pending.buf = combined
        error = incomplete_head_error(combined, self.head_limits)
        if error is None:
            return True
        self._refuse_pending(pending, error)
        return False

    def _refuse_pending(self, pending: _Pending, error: ProtocolError) -> None:
        """Answer a head that cannot become a request with ``error``'s status."""
        self._drop_pending(pending)
        req = Request(pending.listener, pending.addr, pending.start, pending.tls)
        req.method, req.target = _request_line(bytes(pending.buf))
        self.reject(pending.sock, req, error.status_hint, str(error))

    def _drop_pending(self, pending: _Pending) -> None:
        if self._pending.pop(pending, None) is not None:
            self.loop.remove_reader(pending.fd)
            self._tls_heads -= pending.tls

    # --- dispatch ---------------------------------------------------------------------------

    def _dispatch(
        self, sock: Socket, raw: bytes, addr: object, listener: Listener, start: float, *, tls: bool
    ) -> None:
        req = Request(listener, addr, start, tls)
        try:
            # HTTP/1.0 too: the receiver learns it from SERVER_PROTOCOL and
            # answers in kind (RFC 9110 §6.2: 1.0 is a minor version of ours).
            head = parse_head(raw, self.head_limits, http10=True)
        except ProtocolError as exc:
            req.method, req.target = _request_line(raw)
            self.reject(sock, req, exc.status_hint, str(exc))
            return
        req.method, req.target = head.method, head.target
        try:
            path = normalize_path(head.path)
        except ProtocolError as exc:
            self.reject(sock, req, exc.status_hint, str(exc))
            return
        # RFC 9110 §9.3.7: "OPTIONS *" asks about the server as a whole, not
        # a resource; it goes where "/" goes (the target stays "*"), rather
        # than being a 404 for a path no route can have.
        match = self.router.match(path if path != b"*" else b"/", head.host)
        if match is None:
            self.reject(sock, req, 404, f"no route for {path.decode('utf-8', 'replace')}")
            return
        route = match.value
        req.route = route.prefix
        peer = peer_endpoint(listener, addr)
        server = server_endpoint(listener, sock)
        if route.mode is Mode.PASS:
            message = self._describe(sock, head, route, req, peer=peer, server=server)
            if message is not None:
                self._send(route.backend, sock, message, req)
        elif route.mode is Mode.WEBSOCKET:
            self._websocket(sock, head, route, req, peer=peer, server=server)
        else:
            task = self.loop.create_task(
                serve_auth(self, sock, head, route, req, peer=peer, server=server)
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _describe(
        self,
        sock: Socket,
        head: RequestHead,
        route: RouteConfig,
        req: Request,
        *,
        peer: Endpoint,
        server: Endpoint,
        subprotocol: bytes | None = None,
        upgraded: bytes | None = None,
    ) -> bytes | None:
        """The SCGI description to hand off; None once answered (too large)."""
        try:
            message, dropped = describe(
                head,
                remote=peer,
                server=server,
                route=self._prefix_bytes[route.prefix],
                https=req.https,
                ktls=req.tls,
                upgraded=upgraded,
                subprotocol=subprotocol,
                channel=self._channels,
            )
        except ProtocolError as exc:  # larger than receivers accept (before any 101)
            self.reject(sock, req, exc.status_hint, str(exc))
            return None
        if dropped:
            self.log_dropped(req, dropped)
        return message

    def _websocket(
        self,
        sock: Socket,
        head: RequestHead,
        route: RouteConfig,
        req: Request,
        *,
        peer: Endpoint,
        server: Endpoint,
    ) -> None:
        try:
            key = websocket.check_upgrade(head.method, head.version, head.headers)
            if route.allowed_origins:
                _check_origin(head, route.allowed_origins)
            subprotocol = _subprotocol(head, route.subprotocols)
        except ProtocolError as exc:
            self.log_request(req, f'{exc.status_hint} "{exc}"')
            head_only = head.method == b"HEAD"
            self.send_and_linger(
                sock, websocket.error_response(exc, head_only=head_only), tls=req.tls
            )
            return
        message = self._describe(
            sock,
            head,
            route,
            req,
            peer=peer,
            server=server,
            subprotocol=subprotocol,
            upgraded=b"websocket",
        )
        if message is None:
            return
        # Connect first: while the backend can still refuse, the client can
        # still get a plain 503 instead of a 101 followed by a close.
        link = self._link(route.backend, sock, req)
        if link is None:
            return
        # RFC 9110 §7.8: with Expect: 100-continue, a 100 goes before the 101.
        response = websocket.handshake_response(
            key,
            subprotocol=subprotocol,
            continue_first=websocket.expects_continue(head.headers),
        )
        try:
            sent = sock.send(response, _NOWAIT)
        except OSError:
            sent = -1
        if sent != len(response):  # a fresh socket takes ~150 bytes, unless it is gone
            sock.close()
            self.log_request(req, 'closed "client gone before the 101 was sent"')
            return
        req.upgraded = True
        if not self.handoffs.send(link, sock, message, req):
            self._send(route.backend, sock, message, req, fresh=True)

    # --- handing off ----------------------------------------------------------------------

    def _send(
        self, backend: str, client: Socket, message: bytes, req: Request, *, fresh: bool = False
    ) -> None:
        """Hand off on a channel or a new connection (a new one if a channel
        turns out to have just closed: the receiver restarted)."""
        handoffs = self.handoffs
        link = None if fresh else handoffs.channel(backend)
        if link is None:
            link = self._link(backend, client, req, fresh=True)
        if link is not None and not handoffs.send(link, client, message, req):
            link = self._link(backend, client, req, fresh=True)
            if link is not None:
                handoffs.send(link, client, message, req)

    def _link(
        self, backend: str, client: Socket, req: Request, *, fresh: bool = False
    ) -> Link | None:
        """A channel to ``backend``, or a new connection; on failure answer 503, None."""
        handoffs = self.handoffs
        link = None if fresh else handoffs.channel(backend)
        if link is None:
            usock = self.connect_backend(backend, _STREAM, client, req)
            if usock is None:
                return None
            link = handoffs.open(usock, backend)
        return link

    def connect_backend(
        self,
        path: str,
        sock_type: int,
        client: Socket,
        req: Request,
    ) -> Socket | None:
        """A new non-blocking UNIX connection to ``path``; on failure answer 503, None."""
        try:
            return open_backend(path, sock_type)
        except OSError as exc:
            self.handoff_refused(client, req, path, exc)
            return None

    def handoff_refused(self, client: Socket, req: Request, path: str, exc: OSError) -> None:
        reason = _BACKEND_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        text = f"backend {path}: {reason}"
        log.warning("%s %s: 503 %s", req.client, req.target.decode("ascii", "replace"), text)
        self.fail_client(client, req, 503, text, req.upgraded)

    def _handoff_taken(self, flight: InFlight) -> None:
        req: Request = flight.context
        self.log_request(req, "101 handed-off" if req.upgraded else "handed-off")

    def _handoff_failed(self, flight: InFlight, why: str) -> None:
        req: Request = flight.context
        log.warning("%s %s: 503 %s", req.client, req.target.decode("ascii", "replace"), why)
        self.fail_client(flight.client, req, 503, why, req.upgraded)

    # --- answering ------------------------------------------------------------------------

    def fail_client(
        self, client: Socket, req: Request, status: int, text: str, upgraded: bool
    ) -> None:
        """Answer ``status``; after a 101 that is a WebSocket close 1013 instead."""
        if not upgraded:
            self.reject(client, req, status, text)
            return
        self.log_request(req, f'101 closed-1013 "{text}"')
        self.send_and_linger(
            client, _close_frame(WS_TRY_AGAIN, b"backend unavailable"), tls=req.tls
        )

    def reject(self, sock: Socket, req: Request, status: int, text: str) -> None:
        """Answer the client with an error of the front's own and close (lingering).

        An answer about the client's own request names the problem in the body,
        so a person with curl sees why.  One about the server side (socket paths,
        the upstream's address: :data:`_DETAILS_LOGGED_ONLY`) gives the client
        only the reason phrase; the log has the details.
        """
        self.log_request(req, f'{status} "{text}"')
        if status in _DETAILS_LOGGED_ONLY:
            text = reason_phrase(status).decode("ascii")
        # RFC 9110 §9.3.2 / RFC 9112 §6.3: an answer to HEAD has no content.
        head_only = req.method == b"HEAD"
        self.send_and_linger(sock, error_response(status, text, head_only=head_only), tls=req.tls)

    def send_and_linger(self, sock: Socket, data: bytes, *, tls: bool) -> None:
        """Send a final answer, then read and drop what the client still sends until
        it closes (bounded in bytes and time), so our answer is not lost to an RST.

        ``tls``: the kernel holds the connection's TLS; a close_notify goes
        before the FIN, so the client sees a clean end, not a truncation.
        """
        try:
            sent = sock.send(data, _NOWAIT) if data else 0
            if tls and sent == len(data):  # a cut answer must not look complete
                send_tls_close_notify(sock)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        linger = _Linger(sock)
        self.loop.add_reader(linger.fd, self._on_linger, linger)
        self._lingering[linger] = time.monotonic() + self.timeouts.linger

    def _on_linger(self, linger: _Linger) -> None:
        try:
            data = linger.sock.recv(_LINGER_READ, _DONTWAIT)
        except BlockingIOError:  # a partial kTLS record: as in _on_readable
            linger.pause = aio.next_pause(linger.pause)
            self.loop.remove_reader(linger.fd)
            self.loop.call_later(linger.pause, self._linger_again, linger)
            return
        except OSError:
            data = b""
        linger.pause = 0.0
        linger.budget -= len(data)
        if not data or linger.budget <= 0:
            self._end_linger(linger)

    def _linger_again(self, linger: _Linger) -> None:
        if linger in self._lingering:
            self.loop.add_reader(linger.fd, self._on_linger, linger)

    def _end_linger(self, linger: _Linger) -> None:
        if self._lingering.pop(linger, None) is not None:
            self.loop.remove_reader(linger.fd)
        linger.sock.close()

    # --- housekeeping ---------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for pending in _expired(self._pending, now, ordered=not self._tls_heads):
            allowed = self._pending[pending] - pending.start  # the timeout it had
            self._drop_pending(pending)
            req = Request(pending.listener, pending.addr, pending.start, pending.tls)
            req.method, req.target = _request_line(bytes(pending.buf))
            self.reject(pending.sock, req, 408, f"request head not complete within {allowed:.3g} s")
        for waiting in _expired(self._proxy_waiting, now):
            allowed = self._proxy_waiting[waiting] - waiting.start
            self._end_proxy_wait(waiting)
            waiting.sock.close()
            self._proxy_failed(
                waiting, f"no complete PROXY protocol header within {allowed:.3g} s", "timeout"
            )
        for handshake in _expired(self._handshaking, now):
            allowed = self._handshaking[handshake] - handshake.start
            self._end_handshake(handshake)
            handshake.tls.close()
            self._tls_failed(handshake, f"handshake not complete within {allowed:.3g} s", "timeout")
        self.handoffs.expire(now)
        for linger in _expired(self._lingering, now):
            self._end_linger(linger)
        self.access.flush()
        self._tick_handle = self.loop.call_later(TICK, self._tick)

    def log_request(self, req: Request, outcome: str) -> None:
        """Count the request's outcome and write its access-log line."""
        self.metrics.inc("requests_total", outcome=_outcome_label(outcome))
        if self.access.enabled:  # the client's label is formatted only for a line
            self.access.log(
                req.client, req.method, req.target, route=req.route, outcome=outcome,
                start=req.start,
            )  # fmt: skip

    def log_dropped(self, req: Request, dropped: list[bytes]) -> None:
        """Log the header names not passed on (httphead.is_cgi_header_name), in every mode."""
        names = ", ".join(name.decode("ascii", "replace") for name in dropped)
        log.info(
            "%s: dropped header(s) whose name is not letters, digits and '-': %s",
            req.client,
            names,
        )


def _one_line(exc: Exception) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines())


def _check_origin(head: RequestHead, allowed: tuple[bytes, ...]) -> None:
    """403 unless the page that opens the WebSocket is of an allowed origin.

    RFC 6455 §10.2: browsers send ``Origin`` with every WebSocket handshake,
    and a server that only serves some origins SHOULD answer others 403;
    the front sends the 101 itself, so this is the last moment a page on
    another site (cross-site WebSocket hijacking, which rides on the user's
    cookies) can be refused with a status.  A request without ``Origin``
    does not come from a browser page and is not refused here.
    """
    origins = head.values(b"origin")
    if not origins:
        return
    origin = origins[0].strip(b" \t").lower()
    if len(origins) > 1 or origin not in allowed:
        shown = origin if len(origins) == 1 else b", ".join(origins)
        raise ProtocolError(
            f"Origin {shown[:200]!r} may not open WebSockets on this route", status_hint=403
        )


def _subprotocol(head: RequestHead, supported: tuple[bytes, ...]) -> bytes | None:
    """The client's first offer the route's backend speaks, or None (RFC 6455 §4.2.2).

    The client lists its offers in order of preference (§4.1 item 10).  A
    client that offered some must get one back: browsers fail the connection
    otherwise.  With no match the upgrade still goes on without one, as the
    RFC allows; the client then decides.  Offers are only read (400 when not
    tokens) for a route that lists ``subprotocols``.
    """
    if not supported:
        return None
    for offer in websocket.parse_subprotocols(head.headers):
        if offer in supported:
            return offer
    return None


def _outcome_label(outcome: str) -> str:
    """The metrics label of an access-log outcome: ``handed_off``, ``relayed``,
    ``closed`` or the status the front answered (``404``, ``503``...)."""
    if outcome.endswith("handed-off"):
        return "handed_off"
    if outcome.startswith("101 closed-1013"):
        return "503"  # the backend failed after the 101: a WebSocket close 1013
    return outcome.split(" ", 1)[0]


def _front_metrics(front: Front) -> Metrics:
    """What the front exposes on ``[metrics] address`` (docs/operations.md)."""
    metrics = Metrics("fdhandoff_front_")
    metrics.counter(
        "requests_total",
        "Requests by outcome: handed_off, relayed (auth mode), closed, or the status "
        "the front answered itself.",
    )
    metrics.counter(
        "tls_failures_total",
        "TLS connections that never became a request: handshake failed, timed out, "
        "or not offloaded to the kernel (offload).",
    )
    metrics.counter(
        "proxy_protocol_failures_total",
        "Connections of proxy_protocol listeners closed before a request: an invalid "
        "PROXY header (invalid) or none complete within timeouts.head (timeout).",
    )
    metrics.gauge("in_flight", "Connections being read, handed off or answered.", front.in_flight)
    metrics.gauge(
        "channels",
        "Channels (persistent UNIX connections) open to receivers, idle or busy.",
        lambda: front._handoffs.channels if front._handoffs is not None else 0,
    )
    metrics.gauge(
        "accepting", "1 while accepting connections, 0 when paused or stopping.",
        lambda: int(front._accepting),
    )  # fmt: skip
    return metrics


def _cipher(tls: ssl.SSLSocket) -> str:
    cipher = tls.cipher()
    return cipher[0] if cipher else "no cipher"


def _listen_settings(
    config: FrontConfig,
) -> list[tuple[Address, int, ssl.SSLContext | None, bool]]:
    """Per ``[[listen]]``: address, backlog, TLS context and PROXY protocol flag
    (ConfigError if a certificate cannot be loaded: see :func:`_tls_contexts`)."""
    count = len(config.listen)
    return list(
        zip(
            config.listen,
            config.backlog or (DEFAULT_BACKLOG,) * count,
            _tls_contexts(config),
            config.proxy_protocol or (False,) * count,
            strict=False,
        )
    )


def _tls_contexts(config: FrontConfig) -> list[ssl.SSLContext | None]:
    """Each listener's TLS context (None: plain HTTP); ConfigError if a certificate
    cannot be loaded, or if this system cannot hand TLS connections off at all
    (checked once, with a loopback handshake: no kernel TLS, or an OpenSSL
    without it)."""
    contexts: list[ssl.SSLContext | None] = []
    probed = False
    files_per_listener = config.tls or (None,) * len(config.listen)
    for address, files in zip(config.listen, files_per_listener, strict=False):
        if files is None:
            contexts.append(None)
            continue
        try:
            context = server_context(files)
        except ConfigError as exc:
            raise ConfigError(f"listen {address.text}: {exc}") from None
        if not probed:
            problem = probe_offload(context)
            if problem is not None:
                raise ConfigError(f"listen {address.text}: TLS cannot be handed off: {problem}")
            probed = True
        contexts.append(context)
    return contexts


def _expired(deadlines: dict[_T, float], now: float, *, ordered: bool = True) -> list[_T]:
    """Entries past their deadline.

    ``ordered``: the dict holds one timeout counted from insertion, so
    insertion order is deadline order and the scan stops at the first live
    entry.  Heads waiting (``_pending``) are not so while TLS connections are
    among them (``Front._tls_heads``): they are all looked at then.
    """
    found = []
    for item, deadline in deadlines.items():
        if deadline <= now:
            found.append(item)
        elif ordered:
            break
    return found
