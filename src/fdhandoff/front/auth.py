"""Auth mode: ask the application first, hand off if it says so (mod_socket_handoff's pattern).

The request (head and body) goes to the upstream application over HTTP/1.1,
one upstream connection per request (``Connection: close``).  If the
response carries ``X-Socket-Handoff: /path``, the application has decided
that a daemon takes the client from here:

* the path must be absolute, its ``os.path.realpath`` (symlinks resolved:
  Apache's module compares the text only, so a symlink inside the prefix
  could point anywhere) must lie inside the route's ``allowed_prefix``, and
  it must be a socket: else 403, with the reason in the log;
* the application's response is dropped (its body read and discarded, up to
  ``limits.max_discard_size``);
* the client fd goes to the daemon with the ``X-Handoff-Data`` value: by
  default in Apache's format (one ``SOCK_SEQPACKET`` record, the value
  verbatim or ``\\x00`` when absent), so mod_socket_handoff daemons work
  unchanged; or, with ``handoff_format = "scgi"``, as the SCGI description
  with ``HANDOFF_DATA``.

Otherwise the response is relayed to the client as it came, minus those two
headers and with ``Connection: close`` (the front closes after one response
in this mode).  ``X-Socket-Handoff``/``X-Handoff-Data`` sent by the *client*
are removed before the request goes upstream, so a client can trigger
nothing.  The request body has been read by the front to send it upstream:
after a handoff the daemon gets the payload only, as with Apache.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
from _socket import socket as Socket
from typing import TYPE_CHECKING, Any, Final

from .. import aio
from ..errors import ProtocolError
from ..httphead import (
    ChunkedReader,
    RequestHead,
    ResponseHead,
    http_date,
    is_cgi_header_name,
    parse_response_head,
)
from ..message import MAX_PAYLOAD_SIZE, encode_payload
from ..websocket_handshake import expects_continue
from .config import Address, HandoffFormat, RouteConfig
from .describe import Endpoint, describe
from .handoff import open_backend

if TYPE_CHECKING:
    from .server import Front, Request

__all__ = ["check_handoff_path", "serve_auth"]

log = logging.getLogger("fdhandoff.front")

#: Request headers never forwarded upstream: hop-by-hop ones (RFC 9110 §7.6.1;
#: the front sets its own Connection and framing) and the two handoff headers,
#: which only the application may send.
_DROP_REQUEST: Final = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"x-socket-handoff",
        b"x-handoff-data",
        b"x-forwarded-proto",
    )
)
#: Request fields kept whatever the client's Connection names: Content-Length
#: frames the body the front forwards (dropping it would leave the body to be
#: read upstream as a next request), and an HTTP/1.1 request must carry the
#: Host it was routed by (RFC 9112 §3.2).
_KEPT_REQUEST: Final = frozenset((b"content-length", b"host"))
#: Response headers the client never sees: the handoff fields and the
#: hop-by-hop ones (RFC 9110 section 7.6.1; the front adds Connection: close,
#: relays no trailers and switches no protocol: a 101 is an error).
_DROP_RESPONSE: Final = frozenset(
    (
        b"x-socket-handoff",
        b"x-handoff-data",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    )
)

#: stat() errors for a handoff path that no daemon can ever listen on.
_NEVER_A_SOCKET: Final = frozenset((errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR))

#: The fields that say where a relayed body ends (RFC 9112 §6.3).
_FRAMING: Final = frozenset((b"content-length", b"transfer-encoding"))

#: Bytes per read when relaying bodies.
_CHUNK: Final = 64 * 1024

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Upstream:
    """The connection to the application: its socket and what was read from it.

    Not an asyncio stream on purpose.  An application may answer without
    reading the whole request body and close; its kernel then resets the
    connection (RFC 1122 §4.2.2.13), often right behind the answer.  The
    front's kernel still holds the answer (a read returns it before the reset
    error), but a transport whose write fails closes the socket at once, and
    a stream reader holding an error raises it before the bytes it buffered:
    either way the answer would be lost.  Here a failed write closes nothing,
    and a reset reads as the end of the data: what came before it is read as
    usual, and a head or body cut short by it is still an error.
    """

    __slots__ = ("buf", "eof", "loop", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    @classmethod
    async def open(cls, loop: asyncio.AbstractEventLoop, upstream: Address) -> _Upstream:
        """Connect to the application (each address of its name in turn)."""
        targets: list[tuple[int, Any]]
        if upstream.is_unix:
            targets = [(socket.AF_UNIX, upstream.path)]
        else:
            try:  # an address needs no lookup (getaddrinfo runs in a thread)
                version = ipaddress.ip_address(upstream.host).version
                literal = socket.AF_INET6 if version == 6 else socket.AF_INET
                targets = [(literal, (upstream.host, upstream.port))]
            except ValueError:
                infos = await loop.getaddrinfo(
                    upstream.host, upstream.port, type=socket.SOCK_STREAM
                )
                targets = [(info[0], info[4]) for info in infos]
        failure: OSError = OSError(errno.EADDRNOTAVAIL, "no address for the upstream")
        for family, address in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                if family != socket.AF_UNIX:
                    # Heads and small bodies go out at once (Nagle would hold
                    # a write that follows an unacknowledged one).
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # connect_ex, not loop.sock_connect: uvloop's resolves even
                # an address, in a thread, on every call.
                error = sock.connect_ex(address)
                if error == errno.EINPROGRESS:  # TCP: done when writable
                    await aio.wait_writable(sock)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            return cls(loop, sock)
        raise failure

    async def _fill(self) -> None:
        # Wait, then read: never loop.sock_recv.  A read the wait for the
        # body cancels (the body went out first) must lose nothing, and
        # sock_recv can take bytes off the socket and then be cancelled
        # before its caller resumes: the answer would vanish.  Here the
        # only await is the wait; the read happens after it, at once.
        while True:
            try:
                data = self.sock.recv(_CHUNK)
                break
            except BlockingIOError:
                await aio.wait_readable(self.sock)
            except OSError:  # a reset: everything before it has been read
                data = b""
                break
        if data:
            self.buf += data
        else:
            self.eof = True

    async def readuntil(self, separator: bytes, limit: int) -> bytes:
        """Bytes through ``separator``; ProtocolError when there is none within
        ``limit`` bytes, EOFError when the data ends first."""
        start = 0
        while True:
            found = self.buf.find(separator, start)
            if found >= 0:
                end = found + len(separator)
                if end > limit:
                    break
                data = bytes(self.buf[:end])
                del self.buf[:end]
                return data
            if len(self.buf) > limit:
                break
            if self.eof:
                raise EOFError
            start = max(0, len(self.buf) - len(separator) + 1)
            await self._fill()
        raise ProtocolError(f"no {separator!r} within {limit} bytes")

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes, waiting for some; b"" at the end of the data."""
        if not self.buf and not self.eof:
            await self._fill()
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    async def sendall(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


class _Answer(Exception):
    """Stop and answer the client with ``status`` (the text is logged and shown)."""

    def __init__(self, status: int, text: str, *, retry: bool = False) -> None:
        super().__init__(text)
        self.status = status
        self.retry = retry  # the daemon may be restarting: worth another try


#: Pauses before trying a daemon's socket again when it is missing or nobody
#: listens (a restart): mod_socket_handoff's two retries, 10 ms * 2**n.
CONNECT_RETRY_DELAYS: Final = (0.01, 0.02)
_RETRY_ERRNOS: Final = frozenset((errno.ENOENT, errno.ECONNREFUSED))


def _dropped_fields(response: ResponseHead) -> frozenset[bytes]:
    """The response fields that do not reach the client.

    The handoff fields, and, RFC 9110 §7.6.1, the fields the application's
    Connection header names: hop-by-hop, like Connection itself.  The framing
    fields stay whatever it names: the body is relayed as framed.
    """
    named = {
        token.strip(b" \t").lower()
        for value in response.values(b"connection")
        for token in value.split(b",")
    }
    return _DROP_RESPONSE | (named - _FRAMING)


def _authority(server: Endpoint) -> bytes:
    """``Host`` for the address a client reached (``[::1]:8080``, ``localhost`` for UNIX)."""
    addr, port = server
    if not port:
        return b"localhost"
    return b"[%s]:%s" % (addr, port) if b":" in addr else b"%s:%s" % (addr, port)


def _relayed_head(response: ResponseHead, drop: frozenset[bytes]) -> list[bytes]:
    """The status line and the fields of ``response`` not in ``drop``.

    A final response without ``Date`` gets one: RFC 9110 §6.6.1, a recipient
    with a clock that forwards a response lacking it MUST add it (nginx puts
    its own on every response it relays).  An interim one is left as it is.
    """
    kept = [(name, value) for name, value in response.headers if name.lower() not in drop]
    lines = [b"HTTP/1.1 %d %s" % (response.status, response.reason)]
    lines += [name + b": " + value for name, value in kept]
    if response.status >= 200 and not any(name.lower() == b"date" for name, _ in kept):
        lines.append(b"Date: " + http_date())
    return lines


def check_handoff_path(value: bytes, allowed_prefix: str) -> str:
    """The resolved socket path an application named, or ``_Answer`` 403/503 saying why."""
    try:
        text = value.strip().decode("utf-8")
    except UnicodeDecodeError:
        raise _Answer(403, "X-Socket-Handoff is not UTF-8") from None
    if not text.startswith("/") or "\x00" in text:
        raise _Answer(403, f"X-Socket-Handoff {text[:200]!r} is not an absolute path")
    real = os.path.realpath(text)
    allowed = os.path.realpath(allowed_prefix)
    if os.path.commonpath([real, allowed]) != allowed:
        raise _Answer(
            403,
            f"X-Socket-Handoff {text[:200]!r} resolves to {real[:200]!r}, "
            f"outside allowed_prefix {allowed_prefix!r}",
        )
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        # Missing (a daemon restarting) or unreadable for now: 503.  A path
        # that can never name a socket (a symlink loop, a name too long, a
        # file used as a directory) is the application's error: 403.
        status = 403 if exc.errno in _NEVER_A_SOCKET else 503
        raise _Answer(
            status,
            f"handoff socket {real[:200]!r}: {exc.strerror}",
            retry=exc.errno == errno.ENOENT,
        ) from None
    if not stat.S_ISSOCK(mode):
        raise _Answer(403, f"X-Socket-Handoff {real[:200]!r} is not a socket")
    return real


async def serve_auth(
    front: Front,
    client: Socket,
    head: RequestHead,
    route: RouteConfig,
    req: Request,
    *,
    peer: Endpoint,
    server: Endpoint,
) -> None:
    """Run one auth-mode request to its end; the client is answered, relayed or handed off."""
    # asyncio's socket verbs want a socket.socket (the hot path uses the C type).
    client = socket.socket(client.family, client.type, client.proto, client.detach())
    exchange = _Exchange(front, client, head, route, req, peer=peer, server=server)
    try:
        await exchange.run()
    except _Answer as answer:
        exchange.close_upstream()
        await exchange.end_dropping(cancel=True)
        if not exchange.owned:
            return
        if exchange.replied:  # part of a response is out: all that is left is to close
            exchange.abort(str(answer))
            return
        if answer.status >= 500 or answer.status == 403:  # the client sees no details
            log.warning("%s %s: %d %s", req.client, _show(head.target), answer.status, answer)
        exchange.owned = False
        front.reject(client, req, answer.status, str(answer))
    except asyncio.CancelledError:
        exchange.close_upstream()
        if exchange.dropping is not None:
            exchange.dropping.cancel()  # its wait ends with the loop
        exchange.abort("front shutting down")
        raise
    except Exception:
        log.exception("internal error in auth mode for %s", req.client)
        exchange.close_upstream()
        await exchange.end_dropping(cancel=True)
        exchange.abort("internal error")


def _show(target: bytes) -> str:
    return target[:200].decode("ascii", "replace")


class _Exchange:
    """One request to the application and what follows from its answer."""

    def __init__(
        self,
        front: Front,
        client: socket.socket,
        head: RequestHead,
        route: RouteConfig,
        req: Request,
        *,
        peer: Endpoint,
        server: Endpoint,
    ) -> None:
        self.front = front
        self.client = client
        self.head = head
        self.route = route
        self.req = req
        self.peer = peer
        self.server = server
        self.timeouts = front.config.timeouts
        self.limits = front.config.limits
        self.upstream: _Upstream | None = None
        #: The request body still to be read from the client: bytes for a
        #: Content-Length, the reader's state for a chunked one.
        self.body_left = 0 if head.chunked else (head.content_length or 0)
        self.chunks = ChunkedReader() if head.chunked else None
        self.body_total = 0  # chunked data bytes so far, against max_body_size
        #: Reads and drops the rest of the body while an early answer is relayed.
        self.dropping: asyncio.Task[None] | None = None
        self.replied = False  # bytes of a response already went to the client
        self.owned = True  # False once the client was handed off or closed

    # --- the steps ------------------------------------------------------------------------

    async def run(self) -> None:
        self.client.setblocking(False)
        head = self.head
        if head.content_length is not None and head.content_length > self.limits.max_body_size:
            raise _Answer(413, f"request body larger than {self.limits.max_body_size} bytes")
        await self._connect()
        # RFC 9110 §10.1.1: 100-continue in an HTTP/1.0 request MUST be ignored
        # (a 1.0 client does not know 1xx answers); Expect is a list.
        if head.has_body and head.version == b"1.1" and expects_continue(head.headers):
            # The application never sees Expect: the front asks for the body itself.
            await self._send_client(_CONTINUE, interim=True)
        await self._send_upstream(
            self._upstream_head() + (self._body_at_hand() if head.has_body else b"")
        )
        if head.has_body:
            sent = await self._send_body_watching()
            response = sent if isinstance(sent, ResponseHead) else await self._final_head(sent)
            if self.body_left or (self.chunks is not None and not self.chunks.done):
                self.dropping = asyncio.ensure_future(self._drop_body())
        else:
            response = await self._final_head()
        targets = response.values(b"x-socket-handoff")
        if targets:
            await self._handoff(response, targets)
        else:
            await self._relay(response)

    async def _connect(self) -> None:
        upstream = self.route.upstream
        assert upstream is not None
        try:
            async with asyncio.timeout(self.timeouts.upstream_connect):
                self.upstream = await _Upstream.open(self.front.loop, upstream)
        except TimeoutError:
            raise _Answer(
                504,
                f"upstream {upstream.text}: no connection within "
                f"{self.timeouts.upstream_connect:g} s",
            ) from None
        except OSError as exc:
            raise _Answer(502, f"upstream {upstream.text}: {exc.strerror or exc}") from None

    def _upstream_head(self) -> bytes:
        head = self.head
        target = head.target
        if not target.startswith(b"/") and target != b"*":  # absolute-form → origin-form
            target = head.path + (b"?" + head.query if head.query else b"")
        lines = [b"%s %s HTTP/1.1" % (head.method, target)]
        connection_named = {
            token.strip().lower()
            for value in head.values(b"connection")
            for token in value.split(b",")
        } - _KEPT_REQUEST
        forwarded_for: list[bytes] = []
        dropped: list[bytes] = []
        for name, value in head.headers:
            lower = name.lower()
            if lower in _DROP_REQUEST or lower in connection_named:
                continue
            if not is_cgi_header_name(name):
                # The rule of pass mode and of nginx's proxy defaults: an
                # application behind a CGI-style server reads "X_Forwarded_Proto"
                # as HTTP_X_FORWARDED_PROTO, beside (or instead of) the
                # X-Forwarded-Proto the front sets below.
                dropped.append(name)
                continue
            if lower == b"x-forwarded-for":
                forwarded_for.append(value)
                continue
            lines.append(name + b": " + value)
        if dropped:
            self.front.log_dropped(self.req, dropped)
        if not head.values(b"host"):
            # An HTTP/1.0 client may leave Host out; the request goes on as
            # HTTP/1.1, which must carry one (RFC 9112 section 3.2): the
            # address the client reached, as nginx's proxy_pass does.
            lines.append(b"Host: " + _authority(self.server))
        client_addr = self.peer.addr if self.peer.port else b"unix"
        lines.append(b"X-Forwarded-For: " + b", ".join([*forwarded_for, client_addr]))
        lines.append(b"X-Forwarded-Proto: https" if self.req.https else b"X-Forwarded-Proto: http")
        if head.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _send_body(self, *, forward: bool = True, wait: float | None = None) -> None:
        """Read the request body from the client and send it upstream, or
        drop it (``forward`` False; ``wait``: for each read).  What is left of
        it is kept on the exchange as it is read, so a drop can take over
        where a send stopped.
        """
        while self.body_left or (self.chunks is not None and not self.chunks.done):
            if self.chunks is not None:
                data = await self._recv_client(_CHUNK, peek=True, wait=wait)
                framed = self._dechunk_some(data)
            else:
                # Exactly what the body still owes: a pipelined request after
                # it is not read (nothing past the request is ever consumed).
                data = await self._recv_client(min(self.body_left, _CHUNK), wait=wait)
                self.body_left -= len(data)
                framed = data
            if forward:
                await self._send_upstream(framed)

    def _body_at_hand(self) -> bytes:
        """The body bytes already received, consumed now, framed for upstream.

        They go out in one write with the request head: an application that
        answers on the head alone and stops reading would otherwise have the
        body's first write arrive after its answer, and the reset its close
        then sends can cut its own answer short (uvicorn does this).
        """
        try:
            if self.chunks is not None:
                data = self.client.recv(_CHUNK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                return self._dechunk_some(data) if data else b""
            if not self.body_left:
                return b""
            data = self.client.recv(min(self.body_left, _CHUNK), socket.MSG_DONTWAIT)
        except OSError:  # nothing yet, or the client failed: the body task will tell
            return b""
        self.body_left -= len(data)
        return data

    def _dechunk_some(self, data: bytes) -> bytes:
        """Consume the chunked body's bytes in ``data`` (peeked); them, re-chunked."""
        assert self.chunks is not None
        try:
            used, pieces = self.chunks.feed(data)
        except ProtocolError as exc:  # 400, or 431 for a trailer section too large
            raise _Answer(exc.status_hint, f"malformed chunked body: {exc}") from None
        self.client.recv(used)  # consume exactly the body's bytes (peeked above)
        for piece in pieces:
            self.body_total += len(piece)
        if self.body_total > self.limits.max_body_size:
            raise _Answer(413, f"request body larger than {self.limits.max_body_size} bytes")
        framed = b"".join([b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces])
        return framed + b"0\r\n\r\n" if self.chunks.done else framed

    async def _drop_body(self) -> None:
        """The rest of the request body, read and dropped, after an early answer.

        A client may send the whole body before it reads anything (Python's
        http.client does): while the answer is relayed, what it still sends
        is read, each read bounded by ``timeouts.body``, as nginx discards a
        body it no longer needs.  Otherwise that client and the front would
        wait on each other, and the close would meet unread bytes: a reset
        that destroys the answer's tail still in flight (RFC 9112 §9.6).
        """
        # As after the front's own answers, a client that sends nothing for
        # timeouts.linger is taken to be done; the whole drop is bounded by
        # timeouts.body (nginx bounds its lingering the same way).
        with contextlib.suppress(_Answer, TimeoutError):
            async with asyncio.timeout(self.timeouts.body):
                await self._send_body(forward=False, wait=self.timeouts.linger)

    async def _send_body_watching(self) -> ResponseHead | asyncio.Task[ResponseHead]:
        """Send the request body, watching for an answer that comes first.

        An application may answer before it has read the whole body (401,
        413...), then close or stop reading.  Sending the body first and only
        then reading would turn that answer into a 502 (the upload fails on
        the closed connection) or a 504 (it stalls until timeouts.upstream).
        So the response head is read while the body goes out, and a final
        answer that arrives first is returned at once: it is relayed with
        ``Connection: close`` and the rest of the client's body is read and
        dropped while lingering (RFC 9112 §9.6), as nginx does with an early
        upstream response.  Once the body has gone out whole, the read under
        way is returned to be awaited further: it is never stopped and
        started again, so it cannot drop what it was reading.
        """
        body = asyncio.ensure_future(self._send_body())
        reading: asyncio.Task[ResponseHead] | None = None
        try:
            while True:
                reading = asyncio.ensure_future(self._read_head())
                await asyncio.wait((body, reading), return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    if body.exception() is None:
                        pending, reading = reading, None
                        return pending
                    return await self._after_failed_upload(body, reading)
                response = reading.result()  # its _Answer (502) is the outcome
                if 100 <= response.status < 200:
                    await self._interim(response)
                    continue
                if response.values(b"x-socket-handoff"):
                    # The daemon takes the client as it stands: the body owed
                    # to the application must have gone to it, or the daemon
                    # would read its rest as the client's next bytes.
                    await body
                return response
        finally:
            # Ended before the caller goes on: a task left waiting on the
            # upstream's fd after it is closed could stop watching a new
            # socket given the same number.
            for task in (body, reading):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait((task,))
            # Taken, so that an upload failing next to an answer already
            # chosen is not reported as an exception nobody retrieved.
            if not body.cancelled():
                body.exception()

    async def _after_failed_upload(
        self, body: asyncio.Future[None], reading: asyncio.Future[ResponseHead]
    ) -> ResponseHead:
        """The body ended first, with an error; an answer may still come."""
        failure = body.exception()
        assert failure is not None
        if not (isinstance(failure, _Answer) and failure.status == 502):
            raise failure
        # The connection to the application failed while the body was going
        # out (it closed, or reset).  What it answered before is still to be
        # read; only when there is none is the failed upload the outcome.
        try:
            async with asyncio.timeout(self.timeouts.upstream):
                response = await reading
        except (TimeoutError, _Answer):
            raise failure from None
        if 100 <= response.status < 200 or response.values(b"x-socket-handoff"):
            # A handoff needs the whole body to have reached the application.
            raise failure
        return response

    async def _read_head(self) -> ResponseHead:
        """One response head from the application, without a deadline."""
        assert self.upstream is not None
        upstream = self.route.upstream
        assert upstream is not None
        try:
            raw = await self.upstream.readuntil(b"\r\n\r\n", self.limits.max_response_head_size)
        except ProtocolError:
            raise _Answer(
                502,
                f"upstream {upstream.text}: response head larger than "
                f"{self.limits.max_response_head_size} bytes",
            ) from None
        except EOFError:
            raise _Answer(
                502, f"upstream {upstream.text}: closed before a complete response head"
            ) from None
        try:
            return parse_response_head(raw)
        except ProtocolError as exc:
            raise _Answer(502, f"upstream {upstream.text}: {exc}") from None

    async def _final_head(self, reading: asyncio.Task[ResponseHead] | None = None) -> ResponseHead:
        """The final response head, interim answers passed on as they come;
        ``reading``: a read of the first head already under way."""
        upstream = self.route.upstream
        assert upstream is not None
        # One deadline for the final head, interim answers included: an
        # application sending 1xx after 1xx must not hold the client forever.
        deadline = self.front.loop.time() + self.timeouts.upstream
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    # Cancelled by the deadline, the task awaited is cancelled too.
                    response = await (reading or self._read_head())
                reading = None
            except TimeoutError:
                raise _Answer(
                    504,
                    f"upstream {upstream.text}: no response within {self.timeouts.upstream:g} s",
                ) from None
            if not 100 <= response.status < 200:
                return response
            await self._interim(response)

    async def _interim(self, response: ResponseHead) -> None:
        """Pass on a 1xx answer where HTTP allows it; a 101 is an error."""
        upstream = self.route.upstream
        assert upstream is not None
        if response.status == 101:
            # The front never passes Upgrade on (hop-by-hop): a switch it
            # did not ask for leaves nothing it could relay.
            raise _Answer(
                502,
                f"upstream {upstream.text}: 101 Switching Protocols to a request without "
                "Upgrade (hand WebSockets off with X-Socket-Handoff or a websocket route)",
            )
        if response.status != 100 and self.head.version == b"1.1":
            # RFC 9110 §15.2: a proxy MUST forward the 1xx answers it did
            # not ask for (103 Early Hints...), and MUST NOT send any to an
            # HTTP/1.0 client.  A 100 is not forwarded: the front sends no
            # Expect upstream and answered the client's itself.
            lines = _relayed_head(response, _dropped_fields(response))
            await self._send_client(b"\r\n".join(lines) + b"\r\n\r\n", interim=True)

    # --- handoff --------------------------------------------------------------------------

    async def _handoff(self, response: ResponseHead, targets: list[bytes]) -> None:
        if len(targets) > 1:
            raise _Answer(502, "the application sent X-Socket-Handoff more than once")
        data_values = response.values(b"x-handoff-data")
        if len(data_values) > 1:
            # Which one the application meant is unknowable (Apache's module
            # takes the first silently); the daemon must not get a guess.
            raise _Answer(502, "the application sent X-Handoff-Data more than once")
        # RFC 9110 §5.5: a field value excludes leading and trailing
        # whitespace; llhttp drops the leading, not the trailing.
        data = data_values[0].rstrip(b" \t") if data_values else None
        if self.route.handoff_format is HandoffFormat.APACHE:
            sock_type = socket.SOCK_SEQPACKET
            try:
                message = encode_payload(data or b"")
            except ValueError:
                raise _Answer(
                    500, f"X-Handoff-Data is larger than {MAX_PAYLOAD_SIZE} bytes"
                ) from None
        else:
            sock_type = socket.SOCK_STREAM
            try:
                message, _ = describe(
                    self.head,
                    remote=self.peer,
                    server=self.server,
                    route=self.route.prefix.encode("utf-8"),
                    https=self.req.https,
                    ktls=self.req.tls,
                    handoff_data=data,
                    body_consumed=True,  # it went to the application
                )
            except ProtocolError as exc:
                raise _Answer(exc.status_hint, str(exc)) from None
        usock = await self._connect_daemon(targets[0], sock_type)
        self.owned = False  # answered 503, or about to be handed off: the front's now
        if usock is not None:
            # O_NONBLOCK lives on the open file description the daemon will
            # share: hand it over blocking, as pass mode does.  Apache hands
            # over a non-blocking fd, and daemons written for blocking writes
            # silently lose data with slow clients.
            self.client.setblocking(True)
            handoffs = self.front.handoffs
            # One handoff per connection: a daemon named by the application
            # is not offered a channel (its path changes per response).
            handoffs.send(handoffs.open(usock, None), self.client, message, self.req)
        await self._discard(response)

    async def _connect_daemon(self, target: bytes, sock_type: int) -> Socket | None:
        """Check the named path and connect to it; None once answered 503.

        A daemon being restarted has no socket file, or one nobody listens on,
        for a moment: like mod_socket_handoff, try again after 10 and 20 ms
        before answering 503.  A full backlog is 503 at once (EAGAIN).
        """
        for delay in (*CONNECT_RETRY_DELAYS, None):
            path = None
            try:
                path = check_handoff_path(target, self.route.allowed_prefix)
                return open_backend(path, sock_type)
            except _Answer as answer:
                if not answer.retry or delay is None:
                    raise
            except OSError as exc:
                assert path is not None
                if exc.errno not in _RETRY_ERRNOS or delay is None:
                    self.front.handoff_refused(self.client, self.req, path, exc)
                    return None
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt answers or returns")

    async def _discard(self, response: ResponseHead) -> None:
        """Read and drop the application's response body, bounded, then close."""
        assert self.upstream is not None
        budget = self.limits.max_discard_size
        if response.content_length is not None:
            budget = min(budget, response.content_length)
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(self.timeouts.linger):
                while budget > 0:
                    data = await self.upstream.read(min(budget, _CHUNK))
                    if not data:
                        break
                    budget -= len(data)
        self.close_upstream()

    # --- relaying -------------------------------------------------------------------------

    async def _relay(self, response: ResponseHead) -> None:
        if self.head.version != b"1.1":
            codings = [
                token.strip(b" \t").lower()
                for value in response.values(b"transfer-encoding")
                for token in value.split(b",")
            ]
            other = [c for c in codings if c and c != b"chunked"]
            if other:
                # RFC 9112 §6.1: no Transfer-Encoding to an HTTP/1.0 client.
                # Chunked can be undone; another coding would reach it as if
                # it were the content, with nothing to say so.
                upstream = self.route.upstream
                assert upstream is not None
                raise _Answer(
                    502,
                    f"upstream {upstream.text}: transfer coding "
                    f"{b', '.join(other).decode('latin-1')!r} for an HTTP/1.0 client",
                )
        # An HTTP/1.0 client cannot read chunked (RFC 9112 §6.1: it MUST NOT
        # be sent one): its body goes decoded, delimited by the close that
        # follows every relayed response anyway (RFC 9112 §6.3, rule 8).
        dechunk = (
            self.head.version != b"1.1" and response.chunked and response.content_length is None
        )
        drop = _dropped_fields(response)
        if dechunk:
            drop |= {b"transfer-encoding"}
        if response.status == 204:
            # RFC 9110 §8.6 and RFC 9112 §6.1: a 204 carries neither
            # Content-Length nor Transfer-Encoding (its body is not relayed).
            drop |= {b"content-length", b"transfer-encoding"}
        lines = _relayed_head(response, drop)
        lines.append(b"Connection: close")
        await self._send_client(b"\r\n".join(lines) + b"\r\n\r\n")
        if self.head.method != b"HEAD" and response.status not in (204, 304):
            await self._relay_body(response, dechunk=dechunk)
        self.close_upstream()
        await self.end_dropping(cancel=False)  # the linger below reads the client next
        self.owned = False
        self.front.log_request(self.req, f"relayed {response.status}")
        self.front.send_and_linger(self.client, b"", tls=self.req.tls)

    async def _relay_body(self, response: ResponseHead, *, dechunk: bool = False) -> None:
        assert self.upstream is not None
        remaining = response.content_length
        chunked = ChunkedReader() if response.chunked and remaining is None else None
        relayed = 0  # bytes of a chunked body read so far, as the reader counts them
        trailer = b""  # the trailer section, held back until it is whole
        while remaining is None or remaining > 0:
            size = _CHUNK if remaining is None else min(remaining, _CHUNK)
            try:
                async with asyncio.timeout(self.timeouts.upstream):
                    data = await self.upstream.read(size)
            except TimeoutError:
                raise _Answer(504, "upstream stalled inside the response body") from None
            if not data:
                if remaining or (chunked is not None and not chunked.done):
                    raise _Answer(502, "upstream closed inside the response body")
                return
            if chunked is not None:
                try:
                    used, pieces = chunked.feed(data)
                except ProtocolError as exc:
                    raise _Answer(502, f"upstream sent a malformed chunked body: {exc}") from None
                if dechunk:
                    data = b"".join(pieces)
                else:
                    # Trailer fields are fields too: the handoff ones must
                    # not reach the client from there either.
                    data, start, relayed = data[:used], chunked.trailer_start, relayed + used
                    if start is not None:
                        cut = max(0, len(data) - (relayed - start))
                        data, trailer = data[:cut], trailer + data[cut:]
                        if chunked.done:
                            data += _without_handoff_fields(trailer)
            if remaining is not None:
                remaining -= len(data)
            if data:
                await self._send_client(data)
            if chunked is not None and chunked.done:
                return

    # --- client I/O -----------------------------------------------------------------------

    async def _recv_client(
        self, size: int, *, peek: bool = False, wait: float | None = None
    ) -> bytes:
        """Client bytes, waiting at most ``wait`` (default ``timeouts.body``)."""
        flags = socket.MSG_PEEK if peek else 0
        try:
            async with asyncio.timeout(self.timeouts.body if wait is None else wait):
                data = await aio.recv(self.client, size, flags)
        except TimeoutError:
            raise _Answer(
                408, f"request body not received within {self.timeouts.body:g} s"
            ) from None
        except OSError as exc:
            raise _Answer(400, f"client connection failed: {exc.strerror}") from None
        if not data:
            raise _Answer(400, "client closed inside the request body")
        return data

    async def _send_client(self, data: bytes, *, interim: bool = False) -> None:
        self.replied = self.replied or not interim
        try:
            async with asyncio.timeout(self.timeouts.upstream):
                await self.front.loop.sock_sendall(self.client, data)
        except TimeoutError:
            raise _Answer(499, f"client took nothing within {self.timeouts.upstream:g} s") from None
        except OSError as exc:
            raise _Answer(499, f"client stopped reading: {exc}") from None

    async def _send_upstream(self, data: bytes) -> None:
        assert self.upstream is not None
        try:
            async with asyncio.timeout(self.timeouts.upstream):
                await self.upstream.sendall(data)
        except TimeoutError:
            raise _Answer(504, "upstream stopped reading the request body") from None
        except OSError as exc:
            raise _Answer(502, f"upstream connection failed: {exc.strerror or exc}") from None

    # --- endings --------------------------------------------------------------------------

    async def end_dropping(self, *, cancel: bool) -> None:
        """Wait for the drop of the body to end (``cancel``: stop it first), so
        that nothing waits on the client's fd when it is lingered on or closed."""
        if self.dropping is not None:
            if cancel:
                self.dropping.cancel()
            await asyncio.wait((self.dropping,))
            self.dropping = None

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def abort(self, why: str) -> None:
        """Close the client without an answer (one was already partly sent)."""
        if not self.owned:
            return
        self.owned = False
        self.front.log_request(self.req, f'closed "{why}"')
        self.client.close()


def _without_handoff_fields(trailer: bytes) -> bytes:
    """A whole trailer section (field lines, then the empty line) without the
    handoff fields; the reader has checked every line's form (RFC 9112 §7.1.2)."""
    lines = trailer.split(b"\r\n")
    kept = [
        line
        for line in lines
        if line.partition(b":")[0].strip().lower() not in (b"x-socket-handoff", b"x-handoff-data")
    ]
    return trailer if len(kept) == len(lines) else b"\r\n".join(kept)
