"""ASGI 3 adapter: serve an unchanged ASGI app (Starlette, FastAPI...) on handed-off connections.

``fdhandoff serve app:app`` (``--interface asgi``, the default) wraps the app
with :func:`make_asgi_handler`.  For every handoff the adapter takes the
client socket from the :class:`~fdhandoff.receiver.handoff.Handoff`
(``detach()``) and serves it in a task of its own, so nothing of the handoff
(record, reader, engine frames) stays alive with the connection:

* the first request is the one the handoff describes (its body starts with
  the bytes the sender had already read); :mod:`.asgi_http` runs the ``http``
  cycle, :mod:`.asgi_ws` the ``websocket`` one;
* keep-alive: after a complete response, when neither side asked to close and
  the request body was consumed, the adapter reads the next request head from
  the socket itself (:func:`fdhandoff.httphead.parse_head`, same limits and
  answers as the front: 400/414/431/505) and serves it with the same app,
  pipelined requests included.  Only SCGI handoffs (fdhandoff front, nginx
  ``fd_pass``) keep the connection: other formats describe no request (or,
  for plain SCGI, the connection is the sender's);
* lifespan (:mod:`.asgi_lifespan`): :meth:`ASGIAdapter.startup` and
  :meth:`ASGIAdapter.shutdown` for a caller that runs them around the
  receiver; when nobody called ``startup()``, the first handoff runs it
  (before the app sees any request) and the shutdown runs when the event
  loop is torn down.

See docs/howto-asgi.md.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from .. import websocket
from ..errors import ConfigError, ProtocolError
from ..httphead import (
    HeadLimits,
    empty_lines_end,
    find_head_end,
    incomplete_head_error,
    parse_head,
)
from ..message import Format
from ..routing import normalize_path
from . import http
from .asgi_conn import Connection
from .asgi_http import HTTPCycle
from .asgi_lifespan import Lifespan
from .asgi_scope import (
    Request,
    connection_tokens,
    extension_for,
    http_scope,
    request_from_handoff,
    request_from_head,
    websocket_scope,
)
from .asgi_ws import WebSocketCycle
from .body import BodyDecoder, framing
from .handoff import Handoff
from .options import KEEPALIVE_TIMEOUT, MAX_SECONDS, Options
from .stream import ConnectionClosed

__all__ = ["HEAD_TIMEOUT", "KEEPALIVE_TIMEOUT", "ASGIAdapter", "make_asgi_handler"]

log = logging.getLogger("fdhandoff.receiver.asgi")

#: Longest time from the first byte of a next request to the end of its head
#: (408 after it): a client trickling a head must not hold a connection.
HEAD_TIMEOUT: Final = 10.0

#: ``scope["subprotocols"]`` when the client offers none (most do): shared.
_NO_SUBPROTOCOLS: Final[list[str]] = []

#: (content_length, chunked) of a request body, as body.framing() gives it.
_Framing = tuple[int | None, bool]


def make_asgi_handler(app: Any, options: Options | None = None) -> ASGIAdapter:
    """The handler ``fdhandoff serve --interface asgi`` runs for every handoff."""
    return ASGIAdapter(app, options)


class ASGIAdapter:
    """An async handler taking a :class:`Handoff`, serving it with an ASGI 3 app."""

    def __init__(
        self,
        app: Any,
        options: Options | None = None,
        *,
        keepalive_timeout: float | None = None,
        head_limits: HeadLimits | None = None,
    ) -> None:
        if not callable(app):
            raise ConfigError(f"--interface asgi: {app!r} is not an ASGI application (callable)")
        self.options = options if options is not None else Options()
        if keepalive_timeout is not None and not 0 <= keepalive_timeout <= MAX_SECONDS:
            raise ConfigError(
                f"the keep-alive timeout must be between 0 and {MAX_SECONDS:g} seconds"
            )
        self.app = app
        #: Overrides of the receiver's ``keepalive_timeout`` and
        #: ``head_limits`` (its Options: ``--keepalive-timeout``, the head
        #: flags), None to use them.  A timeout of 0 turns keep-alive off.
        self.keepalive_timeout = keepalive_timeout
        self.head_limits = head_limits
        self.lifespan = Lifespan(app)
        self._starting: asyncio.Task[None] | None = None
        self._on_move = self._move  # one bound method for every cycle

    # --- lifespan ------------------------------------------------------------------------

    async def startup(self) -> None:
        """The app's lifespan startup; raises :class:`ConfigError` if it failed.

        Idempotent: the engine calls it before taking handoffs, and a program
        that started the adapter itself may have called it already.
        """
        if self._starting is not None:
            await asyncio.shield(self._starting)
        elif not self.lifespan.started and not self.lifespan.starting:
            await self.lifespan.startup()

    async def shutdown(self) -> None:
        """The app's lifespan shutdown (call once the connections are done).

        Bounded by the shutdown grace (``--grace``): an app stuck in its
        cleanup must not keep the process from exiting.
        """
        await self.lifespan.shutdown(max(self.options.grace, 1.0))

    async def _startup_on_first_handoff(self) -> None:
        if self._starting is None:
            log.debug("running the app's lifespan startup before the first request")
            self._starting = asyncio.get_running_loop().create_task(self._startup_logged())
        await asyncio.shield(self._starting)

    async def _startup_logged(self) -> None:
        try:
            await self.lifespan.startup()
        except ConfigError as exc:
            log.error("%s: every request gets 503", exc)

    # --- taking a handoff ------------------------------------------------------------------

    async def __call__(self, handoff: Handoff) -> None:
        if not self.lifespan.started:
            await self._startup_on_first_handoff()
        if self.lifespan.failed:
            await handoff.respond(503, [("Content-Type", "text/plain")], b"503 startup failed\n")
            return
        request = request_from_handoff(handoff)
        cgi = handoff.format is Format.PLAIN_SCGI
        # HANDOFF_DATA comes only from the front's auth mode: the application
        # that decided this handoff has read the body, and it decided for this
        # request alone, so the next one must go through the front again.
        decided = handoff.format is Format.SCGI and any(
            name == b"HANDOFF_DATA" for name, _ in handoff.record.headers
        )
        if cgi:
            body: _Framing = (len(handoff.already_read) + handoff.record.remaining, False)
        elif request.described and not decided:
            body = framing(request.headers)  # ProtocolError: the engine answers 400
        else:
            body = (0, False)
        conn = Connection(
            handoff.detach(),
            handoff.receiver,
            buf=handoff.already_read,
            client=handoff.client,
            server=handoff.server,
            tls=handoff.tls,
            extensions={"fdhandoff": extension_for(handoff)},
        )
        # Only an SCGI handoff leaves the client's next request to us.
        persistent = (
            handoff.format is Format.SCGI
            and not decided
            and self._keepalive_timeout(handoff.receiver.options) > 0
        )
        # In this task, not a new one (a task and a loop iteration less per
        # request), but after this handler returns: awaited here, this frame
        # and the handoff would stay as long as the connection (kilobytes per
        # idle WebSocket).  _serve handles its own errors.
        handoff.continue_with(self._serve(conn, request, body, persistent, cgi))

    def _keepalive_timeout(self, options: Options) -> float:
        given = self.keepalive_timeout
        return options.keepalive_timeout if given is None else given

    def _head_limits(self, options: Options) -> HeadLimits:
        return options.head_limits if self.head_limits is None else self.head_limits

    # --- serving a connection -------------------------------------------------------------

    async def _serve(
        self, conn: Connection, request: Request, body: _Framing, persistent: bool, cgi: bool
    ) -> None:
        """Serve requests on ``conn`` until it ends or moves to another task."""
        moved = False
        try:
            while True:
                if request.is_websocket and not cgi and not request.head_sent:
                    try:
                        ws_cycle = self._websocket(conn, request)
                    except ProtocolError as exc:
                        await self._refuse_upgrade(conn, request, exc)
                        return
                    await ws_cycle.run(self.app)
                    return
                cycle = self._http_cycle(conn, request, body, persistent, cgi)
                if await cycle.run(self.app):
                    moved = True
                    return
                following = await self._next(cycle)
                if following is None:
                    return
                request, body = following
        except Exception:
            log.exception("internal error serving %s", request.describe())
        finally:
            if not moved:
                conn.close()

    def _http_cycle(
        self, conn: Connection, request: Request, body: _Framing, persistent: bool, cgi: bool
    ) -> HTTPCycle:
        keep_alive = (
            persistent
            and request.http_version == "1.1"
            and b"close" not in connection_tokens(request.headers)
        )
        decoder: BodyDecoder | None = None
        length, chunked = body
        if chunked or length:
            decoder = BodyDecoder(length, chunked)
            early = conn.take_buffer()
            if early:
                decoder.receive_data(early)
        scope = http_scope(
            request,
            scheme=conn.scheme,
            client=conn.client,
            server=conn.server,
            state=self.lifespan.state,
            extensions=conn.extensions,
        )
        return HTTPCycle(
            conn,
            request,
            scope,
            decoder,
            keep_alive=keep_alive,
            cgi=cgi,
            on_move=self._on_move if keep_alive else None,
        )

    def _move(self, cycle: HTTPCycle) -> None:
        # The response is complete but the app runs on (background tasks):
        # the connection goes on in a task of its own.
        cycle.conn.receiver.spawn(self._continue(cycle))

    async def _continue(self, cycle: HTTPCycle) -> None:
        conn = cycle.conn
        try:
            following = await self._next(cycle)
        except Exception:
            log.exception("internal error on a kept-alive connection")
            conn.close()
            return
        if following is None:
            conn.close()
            return
        await self._serve(conn, *following, persistent=True, cgi=False)

    async def _next(self, cycle: HTTPCycle) -> tuple[Request, _Framing] | None:
        """The next request on the connection, or None once it is closed."""
        conn = cycle.conn
        if not cycle.reusable():
            if cycle.complete and not conn.broken:
                await conn.linger_close()
            else:
                conn.close()
            return None
        head: bytes | None = None
        try:
            head = await self._read_head(conn)
            if head is None:
                # Idle, or the client ended: on TLS its close_notify reads as
                # EIO, and ours answers it (RFC 8446 §6.1).
                conn.end_tls()
                conn.close()
                return None
            # An HTTP/1.0 request after a 1.1 one is answered in 1.0 and ends
            # the connection (RFC 9112 section 9.3), as the first one would.
            parsed = parse_head(head, self._head_limits(conn.options), http10=True)
            # The front refuses a path with malformed percent-encoding, an
            # encoded NUL or dot segments above the root (400) before routing
            # it; a later request on this connection never passes the front,
            # so the same judgement is made here (RFC 3986 sections 2.1, 5.2.4).
            normalize_path(parsed.path)
            request, dropped = request_from_head(parsed)
            if dropped:
                _log_dropped(conn, dropped)
            return request, framing(request.headers)
        except ProtocolError as exc:
            await self._refuse(conn, exc, head if head is not None else conn.take_buffer())
            return None

    async def _read_head(self, conn: Connection) -> bytes | None:
        """The next request head (CRLF CRLF included); None when the client is done.

        :data:`HEAD_TIMEOUT` is a deadline for the whole head, counted from its
        first byte (empty lines included), not a limit per read: a client
        sending a byte now and then must not hold the connection for ever.
        """
        buf = conn.take_buffer()
        searched = 0
        skipped = 0  # empty lines dropped: they count towards the head's size
        limits = self._head_limits(conn.options)
        idle_timeout = self._keepalive_timeout(conn.options)
        deadline = conn.loop.time() + HEAD_TIMEOUT if buf else None
        while True:
            # RFC 9112 section 2.2: empty lines (CRLF) before a request line are
            # ignored.  A bare LF stays, and parse_head refuses it as the front
            # does; a lone CR may be the first half of the next CRLF.
            if buf[:1] == b"\r":
                skip = empty_lines_end(buf)
                if skip:
                    buf = buf[skip:]
                    searched = 0
                    skipped += skip
            end = find_head_end(buf, max(0, searched - 3))
            limit = limits.max_head_size
            if skipped and (skipped + end > limit if end > 0 else skipped + len(buf) >= limit):
                # As the front counts them (parse_head, incomplete_head_error):
                # endless empty lines are a head too large, not a free ride.
                conn.buf = buf  # the refusal's log line names the request from it
                raise ProtocolError(
                    f"request head larger than {limit} bytes",
                    status_hint=431,
                )
            if end > 0:
                conn.buf = buf[end:]
                return buf[:end]
            error = incomplete_head_error(buf, limits)
            if error is not None:
                conn.buf = buf
                raise error
            searched = len(buf)
            timeout = idle_timeout if deadline is None else deadline - conn.loop.time()
            try:
                if deadline is None:
                    # Nothing of a next request yet: idle, closed at once when
                    # the receiver stops.
                    idle = await conn.recv_idle(timeout)
                    if idle is None:
                        return None
                    data = idle
                elif timeout <= 0:
                    raise TimeoutError
                else:
                    data = await conn.recv(timeout)
            except TimeoutError:
                if deadline is not None:
                    conn.buf = buf
                    raise ProtocolError(
                        f"request head incomplete after {HEAD_TIMEOUT:.0f} s", status_hint=408
                    ) from None
                return None  # idle keep-alive connection: closed quietly
            except ConnectionClosed:
                return None
            if not data:
                if buf:
                    log.info("client closed inside a request head (%d bytes)", len(buf))
                return None
            if deadline is None:
                deadline = conn.loop.time() + HEAD_TIMEOUT
            buf += data

    async def _refuse(self, conn: Connection, exc: ProtocolError, head: bytes) -> None:
        """Answer a bad next request (400, 408, 414, 431, 501, 505) and close.

        ``head`` is what arrived of it.  As the front's answers: the body
        names the problem, an answer to HEAD has none (RFC 9110 section
        9.3.2), and the log line names the request as far as it is known.
        """
        client = f"{conn.client[0]}:{conn.client[1]}" if conn.client else "-"
        method, target = _request_line(head)
        request = f"{_printable(method)} {_printable(target)}" if method else "-"
        log.info('%s "%s": bad request on a kept-alive connection: %s', client, request, exc)
        conn.bytes_sent = 0
        try:
            await conn.write(_refusal(exc, head_only=method == b"HEAD"))
        except ConnectionClosed:
            conn.close()
            return
        conn.receiver.access_log(
            f'{client} "{request}" {exc.status_hint}', conn.bytes_sent, 0.0, str(exc)
        )
        await conn.linger_close()

    # --- WebSocket -------------------------------------------------------------------------

    def _websocket(self, conn: Connection, request: Request) -> WebSocketCycle:
        """The cycle for an upgrade request; ProtocolError (400/426) if it is invalid."""
        key: bytes | None = None
        try:
            if not request.upgraded:
                key = websocket.check_upgrade(
                    request.method.encode("latin-1"),
                    request.http_version.encode(),
                    request.headers,
                )
            offered = websocket.parse_subprotocols(request.headers)
        except ProtocolError:
            if not request.upgraded:
                raise
            offered = []  # the sender accepted the upgrade: the app decides
        if request.upgraded and request.described:
            # The fdhandoff front's 101 already named the subprotocol (or
            # none): that is the only choice left, and an app that picks from
            # the list, as most do, picks what the client was told.
            agreed = request.subprotocol
            offered = [agreed.encode("latin-1")] if agreed is not None else []
        if key is not None:
            # The last scope of this connection: its dict can take the key.
            conn.extensions["websocket.http.response"] = {}
        scope = websocket_scope(
            request,
            [p.decode("latin-1") for p in offered] if offered else _NO_SUBPROTOCOLS,
            scheme=conn.scheme,
            client=conn.client,
            server=conn.server,
            state=self.lifespan.state,
            extensions=conn.extensions,
        )
        return WebSocketCycle(conn, request, scope, key)

    async def _refuse_upgrade(self, conn: Connection, request: Request, exc: ProtocolError) -> None:
        client = f"{conn.client[0]}:{conn.client[1]}" if conn.client else "-"
        log.info('%s "%s": WebSocket upgrade refused: %s', client, request.describe(), exc)
        conn.bytes_sent = 0
        try:
            await conn.write(websocket.error_response(exc, head_only=request.method == "HEAD"))
        except ConnectionClosed:
            return
        conn.receiver.access_log(
            f'{client} "{request.describe()}" {exc.status_hint}', conn.bytes_sent, 0.0, str(exc)
        )
        await conn.linger_close()


def _log_dropped(conn: Connection, dropped: list[bytes]) -> None:
    """The line the front logs for the same names in a first request."""
    client = f"{conn.client[0]}:{conn.client[1]}" if conn.client else "-"
    names = ", ".join(name.decode("ascii", "replace") for name in dropped)
    log.info("%s: dropped header(s) whose name is not letters, digits and '-': %s", client, names)


#: Most bytes of a refused request's method and target put in a log line.
_MAX_LOGGED: Final = 256


def _request_line(head: bytes) -> tuple[bytes, bytes]:
    """Method and target of a head that did not parse, best effort, for the log."""
    line = head.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    return parts[0][:32], (parts[1] if len(parts) > 1 else b"")


def _printable(value: bytes) -> str:
    """``value`` for a log line: control bytes, quotes and non-ASCII escaped, so a
    client cannot forge a line or a field (as the front's access log does)."""
    clipped = value[:_MAX_LOGGED]
    text = "".join(
        chr(byte) if 0x20 < byte < 0x7F and byte not in b'"\\' else f"\\x{byte:02x}"
        for byte in clipped
    )
    return text + ("..." if len(value) > _MAX_LOGGED else "")


def _refusal(exc: ProtocolError, *, head_only: bool) -> bytes:
    """The answer to a bad next request: its status, the problem as the body
    (as the front's answers name it), ``Connection: close``; without the body
    for HEAD (RFC 9110 section 9.3.2: the same head a GET would get)."""
    body = str(exc)[:512].encode("utf-8", "backslashreplace") + b"\n"
    head = http.response_head(
        exc.status_hint,
        [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Connection", b"close"),
        ],
    )
    return head if head_only else head + body
