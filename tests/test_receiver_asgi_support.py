"""Helpers for the ASGI adapter tests (no tests here).

* :class:`ASGIReceiver`: the asyncio engine with the ASGI adapter in a thread,
  the app's lifespan run around it;
* :func:`hand_over`: a real loopback TCP connection handed over with SCGI
  headers as the fdhandoff front sends them;
* :class:`MiniFront`: a TCP listener that reads each request head exactly
  (nothing past it) and hands the connection over, the way the front's pass
  mode does, so that curl, httpx and the ``websockets`` client can be used;
* :class:`ResponseReader`: reads successive HTTP/1.1 responses from one
  connection (Content-Length, chunked or close-delimited bodies).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fdhandoff.httphead import find_head_end, parse_head
from fdhandoff.receiver import Options
from fdhandoff.receiver.asgi import ASGIAdapter
from fdhandoff.receiver.listeners import Bind
from fdhandoff.websocket import check_upgrade, handshake_response, wants_websocket
from test_receiver_support import MarkerSender, ReceiverThread, front_headers, send_scgi, tcp_pair

IO_TIMEOUT = 10.0


class ASGIReceiver(ReceiverThread):
    """Engine + ASGI adapter in a thread; lifespan startup before, shutdown after."""

    engine_lifespan = False  # the lifespan is driven here, or deliberately not at all

    def __init__(
        self,
        app: Any,
        path: str | Bind,
        options: Options | None = None,
        *,
        loop: str = "asyncio",
        keepalive_timeout: float | None = None,
        lifespan: bool = True,
    ) -> None:
        self.adapter = ASGIAdapter(app, options, keepalive_timeout=keepalive_timeout)
        self.run_lifespan = lifespan
        bind = path if isinstance(path, Bind) else Bind(path)
        super().__init__(self.adapter, [bind], options, loop)

    async def _serve(self) -> None:
        if self.run_lifespan:
            await self.adapter.startup()
        try:
            await super()._serve()
        finally:
            if self.run_lifespan:
                await self.adapter.shutdown()


def hand_over(
    path: str,
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    already_read: bytes = b"",
    **extra: str,
) -> socket.socket:
    """Hand a fresh loopback connection over; returns the client end."""
    client, server_side = tcp_pair()
    client.settimeout(IO_TIMEOUT)
    all_headers = [("Host", "test.local"), *headers]
    scgi_headers = front_headers(method, target, all_headers, already_read)
    # Extra SCGI variables replace the front's own (SERVER_PROTOCOL...) or are added.
    scgi_headers = [(n, extra.pop(n, v)) for n, v in scgi_headers] + list(extra.items())
    send_scgi(path, scgi_headers, server_side, already_read)
    return client


# --- reading responses ------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ResponseReader:
    """Successive responses from one client connection."""

    def __init__(self, sock: socket.socket, timeout: float = IO_TIMEOUT) -> None:
        self.sock = sock
        self.buf = b""
        self.timeout = timeout
        sock.settimeout(timeout)

    def _more(self) -> bytes:
        data = self.sock.recv(1 << 16)
        self.buf += data
        return data

    def read(self, *, head_request: bool = False) -> Response:
        while find_head_end(self.buf) < 0:
            if not self._more():
                raise ConnectionError(f"closed before a response head: {self.buf!r}")
        end = find_head_end(self.buf)
        head, self.buf = self.buf[:end], self.buf[end:]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
        found = dict(headers)
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "content-length" in found:
            size = int(found["content-length"])
            while len(self.buf) < size:
                if not self._more():
                    raise ConnectionError("closed inside a Content-Length body")
            body, self.buf = self.buf[:size], self.buf[size:]
        elif found.get("transfer-encoding") == "chunked":
            body = self._chunked()
        else:
            while self._more():
                pass
            body, self.buf = self.buf, b""
        return Response(status, headers, body, head)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._more():
                raise ConnectionError("closed inside a chunked body")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():
                    pass
                return body
            while len(self.buf) < size + 2:
                if not self._more():
                    raise ConnectionError("closed inside a chunk")
            body += self.buf[:size]
            assert self.buf[size : size + 2] == b"\r\n"
            self.buf = self.buf[size + 2 :]

    def closed(self, timeout: float = IO_TIMEOUT) -> bool:
        """True once the server closed the connection (nothing more to read)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(self.timeout)
        self.buf += data
        return not data


def read_one(sock: socket.socket, *, head_request: bool = False) -> Response:
    return ResponseReader(sock).read(head_request=head_request)


# --- a minimal front -------------------------------------------------------------------------


class MiniFront:
    """Accepts TCP connections and hands each over with its request head as SCGI.

    Like the front's pass mode it reads the head and not a byte more (MSG_PEEK
    first, then exactly the head), so bodies, pipelined requests and early
    WebSocket frames stay in the socket for the receiver.
    """

    def __init__(self, path: str, mode: str = "pass") -> None:
        """``mode``: ``pass`` hands the request over as it is; ``websocket``
        answers a WebSocket upgrade itself first (the front's websocket mode,
        ``HANDOFF_UPGRADED``); ``openresty`` does the same and hands over
        with the ``X`` marker byte only."""
        self.path = path
        self.mode = mode
        self.marker_sender: MarkerSender | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handed = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> MiniFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(10)
        self.listener.close()
        if self.marker_sender is not None:
            self.marker_sender.close()

    def _run(self) -> None:
        while not self._stop:
            if not select.select([self.listener], [], [], 0.05)[0]:
                continue
            conn, _ = self.listener.accept()
            try:
                self._hand_over(conn)
            except Exception:
                conn.close()

    def _hand_over(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            peeked = conn.recv(1 << 16, socket.MSG_PEEK)
            end = find_head_end(peeked)
            if end > 0:
                break
            if not peeked or time.monotonic() > deadline:
                conn.close()
                return
            time.sleep(0.005)
        head = b""
        while len(head) < end:
            head += conn.recv(end - len(head))
        request = parse_head(head)
        upgraded = self.mode != "pass" and wants_websocket(request.headers)
        if upgraded:
            key = check_upgrade(request.method, request.version, request.headers)
            conn.sendall(handshake_response(key))
            if self.mode == "openresty":
                if self.marker_sender is None:
                    self.marker_sender = MarkerSender(self.path)
                self.marker_sender.send(b"X", conn)
                self.handed += 1
                return
        peer = conn.getpeername()
        local = conn.getsockname()
        merged: dict[str, str] = {}
        for raw_name, raw_value in request.headers:
            key = "HTTP_" + raw_name.decode("latin-1").upper().replace("-", "_")
            value = raw_value.decode("latin-1")
            if key in merged:
                value = merged[key] + ("; " if key == "HTTP_COOKIE" else ", ") + value
            merged[key] = value
        scgi_headers = [
            ("CONTENT_LENGTH", "0"),
            ("SCGI", "1"),
            ("REMOTE_ADDR", peer[0]),
            ("REMOTE_PORT", str(peer[1])),
            ("REQUEST_METHOD", request.method.decode()),
            ("REQUEST_URI", request.target.decode("latin-1")),
            ("SERVER_ADDR", local[0]),
            ("SERVER_PORT", str(local[1])),
            ("QUERY_STRING", request.query.decode("latin-1")),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("SERVER_NAME", request.host.decode("latin-1")),
            ("HANDOFF_ROUTE", "/"),
            *([("HANDOFF_UPGRADED", "websocket")] if upgraded else []),
            *merged.items(),
        ]
        send_scgi(self.path, scgi_headers, conn)
        self.handed += 1
