"""The sync ``Handoff``: blocking answers on a handed-off connection (see the package doc)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from ... import fdpass, websocket
from ...errors import ProtocolError
from ...message import Format, HandoffRecord
from .. import http
from ..answer import COALESCE, HandoffBase, Phase, check_body_size
from ..body import END, NEED_DATA
from ..http import HeaderInput
from ..stream import ConnectionClosed
from ..ws import agreed_subprotocol, choose_subprotocol, header_bytes
from .streams import SSEStream, WebSocket, recv_within

if TYPE_CHECKING:
    from .engine import Receiver

__all__ = ["READ_SIZE", "Handoff", "ResponseWriter"]

#: Bytes read per recv.
READ_SIZE: Final = 64 * 1024


class Handoff(HandoffBase):
    """One handed-off client connection (sync flavour); the socket is blocking
    with ``write_timeout`` as its timeout."""

    __slots__ = ("receiver",)

    def __init__(self, record: HandoffRecord, sock: socket.socket, receiver: Receiver) -> None:
        super().__init__(record, sock)
        self.receiver = receiver
        sock.settimeout(receiver.options.write_timeout)

    def send_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; :class:`ConnectionClosed` if the client is gone or stalled."""
        try:
            self.socket.sendall(data)
        except TimeoutError:
            raise ConnectionClosed(
                f"client read nothing for {self.receiver.options.write_timeout:.0f} s "
                "(write timeout)"
            ) from None
        except OSError as exc:
            raise ConnectionClosed(f"client connection lost: {exc.strerror}") from exc
        self.bytes_sent += len(data)

    def respond(self, status: int = 200, headers: HeaderInput = (), body: bytes = b"") -> None:
        """Send a whole response and finish the connection."""
        head, body = self._whole_response(status, headers, body)
        if len(body) <= COALESCE:
            self.send_raw(head + body)
        else:
            self.send_raw(head)
            self.send_raw(body)
        self.phase = Phase.DONE

    def start_response(
        self,
        status: int = 200,
        headers: HeaderInput = (),
        *,
        content_length: int | None = None,
    ) -> ResponseWriter:
        """Send the head of a streamed response; write the body with the writer.

        As the asyncio flavour's: a ``204`` or ``304`` gets no framing header
        (a ``205`` ``Content-Length: 0``) and what is written is dropped; an
        informational status raises ``ValueError``.
        """
        head, chunked, head_only = self._streamed_head(status, headers, content_length)
        writer = ResponseWriter(self, chunked, content_length, head_only)
        if head:
            self.send_raw(head)
        return writer

    def sse(
        self, headers: HeaderInput = (), *, retry: int | None = None, status: int = 200
    ) -> SSEStream:
        """Answer with an event stream (close-delimited) and return it.

        A ``HEAD`` request gets the head only: the stream returned is already
        closed, and ``send()`` raises :class:`ConnectionClosed` as it does once a
        client left.
        """
        head = self._sse_head(headers, status, retry)
        stream = SSEStream(self)
        self.phase = Phase.HANDED_OVER
        self.stream = stream
        stream._write(head)
        if self.method == "HEAD":
            stream.close()  # no content for HEAD (RFC 9110 section 9.3.2)
        return stream

    def websocket(
        self,
        subprotocol: str | None = None,
        headers: HeaderInput = (),
        *,
        max_message_size: int | None = None,
        key: str | None = None,
    ) -> WebSocket:
        """Complete the WebSocket handshake (unless already done) and return the connection."""
        if self.phase is not Phase.NEW:
            raise RuntimeError(f"a response was already started ({self.phase.name})")
        options = self.receiver.options
        limit = options.max_ws_message_size if max_message_size is None else max_message_size
        codec = websocket.WebSocket(max_message_size=limit)
        if self.upgraded:
            subprotocol = agreed_subprotocol(self, subprotocol)
        else:
            self._handshake(subprotocol, headers, key)
        self.status = 101
        ws = WebSocket(self, codec, subprotocol)
        self.phase = Phase.HANDED_OVER
        self.stream = ws
        if self.already_read:
            codec.receive_data(self.already_read)
        return ws

    def _handshake(self, subprotocol: str | None, headers: HeaderInput, key: str | None) -> None:
        if self.format is Format.PLAIN_SCGI:
            raise ProtocolError("WebSocket is not possible over plain SCGI (no upgrade through it)")
        if key is not None:
            raw_key = key.encode("latin-1")
        elif not self.has_request or self.method is None:
            raise ProtocolError(
                f"a {self.format.value} handoff carries no request head: pass the client's "
                "Sec-WebSocket-Key as key="
            )
        else:
            try:
                raw_key = websocket.check_upgrade(
                    self.method.encode("latin-1"), self.http_version.encode(), self.raw_headers
                )
            except ProtocolError as exc:
                self.status = exc.status_hint
                self.send_raw(websocket.error_response(exc, head_only=self.method == "HEAD"))
                self.phase = Phase.DONE
                raise
        response = websocket.handshake_response(
            raw_key,
            subprotocol=choose_subprotocol(self, subprotocol),
            extra_headers=list(header_bytes(headers)),
        )
        self.status = 101
        self.send_raw(response)

    def detach(self) -> socket.socket:
        """Take the client socket; the receiver forgets the connection."""
        if self.phase is Phase.HANDED_OVER:
            raise RuntimeError("the connection was already handed over")
        self.phase = Phase.HANDED_OVER
        return self.socket

    # --- request body ---------------------------------------------------------------------

    def iter_body(self) -> Iterator[bytes]:
        """Yield the request body piece by piece (``body_timeout`` per read)."""
        decoder = self._body_decoder()
        sock = self.socket
        timeout = self.receiver.options.body_timeout
        while True:
            event = decoder.next_event()
            if event is END:
                return
            if event is not NEED_DATA:
                assert isinstance(event, bytes)
                yield event
                continue
            if self._wants_continue():
                self.send_raw(http.CONTINUE)
                self.bytes_sent -= len(http.CONTINUE)
            try:
                data = recv_within(sock, READ_SIZE, timeout)
            except TimeoutError:
                raise ProtocolError(
                    f"request body stalled for {timeout:.0f} s", status_hint=408
                ) from None
            except OSError as exc:
                raise ConnectionClosed(f"client connection lost: {exc.strerror}") from exc
            decoder.receive_data(data)

    def read_body(self, max_size: int | None = None) -> bytes:
        """The whole request body; 413 (``ProtocolError``) above ``max_size``."""
        limit = self._body_limit(
            self.receiver.options.max_body_size if max_size is None else max_size
        )
        parts: list[bytes] = []
        size = 0
        for piece in self.iter_body():
            size += len(piece)
            check_body_size(size, limit)
            parts.append(piece)
        return b"".join(parts)

    def linger_close(self) -> None:
        """Half-close, read what the client still sends for a moment, close."""
        sock = self.socket
        deadline = time.monotonic() + self.receiver.options.linger_timeout
        try:
            if self.tls:  # kernel TLS (as handed off): end the session first
                fdpass.send_tls_close_notify(sock)
            sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                if not recv_within(sock, READ_SIZE, left):
                    break
        except OSError:
            pass
        finally:
            sock.close()


class ResponseWriter:
    """Body of a response started with :meth:`Handoff.start_response`."""

    __slots__ = ("_chunked", "_handoff", "_head_only", "_remaining")

    def __init__(
        self, handoff: Handoff, chunked: bool, length: int | None, head_only: bool
    ) -> None:
        self._handoff = handoff
        self._chunked = chunked
        self._remaining = length
        self._head_only = head_only

    def write(self, data: bytes) -> None:
        handoff = self._handoff
        if handoff.phase is not Phase.STREAMING:
            raise RuntimeError("the response is already complete")
        if self._remaining is not None:
            if len(data) > self._remaining:
                raise ValueError("more body bytes than the announced Content-Length")
            self._remaining -= len(data)
        if data and not self._head_only:
            handoff.send_raw(http.chunk(data) if self._chunked else data)

    def end(self) -> None:
        handoff = self._handoff
        if handoff.phase is not Phase.STREAMING:
            return
        if self._remaining:
            raise ValueError(f"{self._remaining} body bytes announced but not written")
        if self._chunked and not self._head_only:
            handoff.send_raw(http.LAST_CHUNK)
        handoff.phase = Phase.DONE

    @property
    def complete(self) -> bool:
        return self._handoff.phase is Phase.DONE
