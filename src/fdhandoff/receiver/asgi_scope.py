"""ASGI scopes from handoffs and from request heads read on a kept-alive connection (sans-IO).

The first request of a connection is described by the handoff
(:class:`~fdhandoff.receiver.request.HandoffInfo`); later ones by the request
heads the adapter reads itself (:func:`fdhandoff.httphead.parse_head`).  Both
become a :class:`Request`, and a :class:`Request` plus the connection's facts
becomes the scope (ASGI HTTP and WebSocket spec 2.4).

Handoff formats that carry no request (Apache ``mod_socket_handoff``
payloads, BYTE markers) become ``GET /``; a payload is passed in the
``x-handoff-data`` header, where Apache applications put it, and in
``scope["extensions"]["fdhandoff"]["payload"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from .. import websocket
from ..httphead import RequestHead, is_cgi_header_name
from ..message import Format
from .request import MARKER_HEAD_SENT, MARKER_UPGRADED, HandoffInfo, RawHeaders, split_target

__all__ = [
    "ASGI_HTTP",
    "ASGI_LIFESPAN",
    "ASGI_WEBSOCKET",
    "Request",
    "connection_tokens",
    "extension_for",
    "http_scope",
    "request_from_handoff",
    "request_from_head",
    "websocket_scope",
]

#: ``scope["asgi"]``, one shared dict per scope type: scopes are made per
#: request, and these never change.  Spec 2.4: ``send()`` raises an
#: ``OSError`` once the client is gone, so apps need not watch ``receive()``.
ASGI_HTTP: Final[dict[str, str]] = {"version": "3.0", "spec_version": "2.4"}
ASGI_WEBSOCKET: Final[dict[str, str]] = {"version": "3.0", "spec_version": "2.4"}
ASGI_LIFESPAN: Final[dict[str, str]] = {"version": "3.0", "spec_version": "2.0"}


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the app will see it.

    ``headers`` are ``(lowercase name, value)`` byte pairs in arrival order;
    repeated names stay repeated (nginx ``fd_pass`` sends one ``HTTP_*`` per
    header line).  ``upgraded``: the WebSocket handshake was already answered
    by the sender (fdhandoff front ``HANDOFF_UPGRADED``, OpenResty ``X``).
    ``subprotocol``: the one the fdhandoff front agreed in that answer.
    ``head_sent``: Apache ``mod_proxy_fdpass`` already sent the response head.
    ``described``: the request came from the client (a parsed head, SCGI),
    not made up for a payload-only handoff.
    """

    method: str
    raw_path: bytes
    query_string: bytes
    headers: RawHeaders
    http_version: str = "1.1"
    upgraded: bool = False
    head_sent: bool = False
    described: bool = True
    subprotocol: str | None = None

    @property
    def is_websocket(self) -> bool:
        """An upgrade to WebSocket: asked for (``Upgrade`` + ``Connection``) or done.

        RFC 9110 section 7.8: a server MUST ignore ``Upgrade`` in an HTTP/1.0
        request, so one is an ordinary HTTP request (the front hands it off
        as such), not a WebSocket handshake to refuse.
        """
        if self.upgraded:
            return True
        if self.http_version == "1.0":
            return False
        return websocket.wants_websocket(self.headers) and b"upgrade" in connection_tokens(
            self.headers
        )

    def describe(self) -> str:
        """``METHOD target`` for logs."""
        target = self.raw_path.decode("latin-1")
        if self.query_string:
            target += "?" + self.query_string.decode("latin-1")
        return f"{self.method} {target}"


def connection_tokens(headers: RawHeaders) -> set[bytes]:
    """The lower-cased options of every ``Connection`` header (RFC 9110 section 7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip(b" \t").lower() for t in value.split(b","))
    return tokens


def request_from_handoff(info: HandoffInfo) -> Request:
    """The first request of a handed-off connection."""
    if info.has_request:
        assert info.method is not None and info.raw_path is not None
        return Request(
            info.method,
            info.raw_path,
            info.query_string,
            info.raw_headers,
            info.http_version,
            upgraded=info.upgraded,
            subprotocol=info.subprotocol,
        )
    # PAYLOAD and BYTE handoffs describe no request: the sender (Apache,
    # OpenResty) consumed it.  The app sees GET / and the payload.
    headers: RawHeaders = [(b"x-handoff-data", info.payload)] if info.payload else []
    return Request(
        "GET",
        b"/",
        b"",
        headers,
        upgraded=info.marker == MARKER_UPGRADED,
        head_sent=info.format is Format.BYTE and info.marker == MARKER_HEAD_SENT,
        described=False,
    )


def request_from_head(head: RequestHead) -> tuple[Request, list[bytes]]:
    """A request read from the connection itself (keep-alive, pipelining),
    and the header names dropped from it.

    The front drops names that are not letters, digits and "-" from the
    first request (:func:`~fdhandoff.httphead.is_cgi_header_name`); later
    requests never pass the front, so the same names are dropped here, or an
    app mapping ``x_a`` to ``HTTP_X_A`` could be fooled on the second request
    of a connection where the first was safe.
    """
    raw_path, query = split_target(head.target)
    headers: RawHeaders = []
    dropped: list[bytes] = []
    for name, value in head.headers:
        if is_cgi_header_name(name):
            headers.append((name.lower(), value))
        else:
            dropped.append(name)
    request = Request(
        head.method.decode("latin-1"), raw_path, query, headers, http_version=head.version.decode()
    )
    return request, dropped


def extension_for(info: HandoffInfo) -> dict[str, Any]:
    """``scope["extensions"]["fdhandoff"]``: what the handoff said beyond HTTP."""
    return {
        "format": info.format.value,
        "payload": info.payload,
        "marker": info.marker,
        "route": info.route,
        "upgraded": info.upgraded,
        "subprotocol": info.subprotocol,
    }


def _path(raw_path: bytes) -> str:
    # ASGI: "path" is percent-decoded and UTF-8 decoded; invalid UTF-8 is
    # replaced rather than refused (as uvicorn and hypercorn do).
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


def http_scope(
    request: Request,
    *,
    scheme: str,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    state: dict[str, Any],
    extensions: dict[str, Any],
) -> dict[str, Any]:
    """The ``http`` connection scope (ASGI HTTP spec 2.4)."""
    return {
        "type": "http",
        "asgi": ASGI_HTTP,
        "http_version": request.http_version,
        "method": request.method,
        "scheme": scheme,
        "path": _path(request.raw_path),
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": client,
        "server": server,
        "state": state.copy(),
        "extensions": extensions,
    }


def websocket_scope(
    request: Request,
    subprotocols: list[str],
    *,
    scheme: str,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    state: dict[str, Any],
    extensions: dict[str, Any],
) -> dict[str, Any]:
    """The ``websocket`` connection scope (ASGI WebSocket spec 2.4)."""
    return {
        "type": "websocket",
        "asgi": ASGI_WEBSOCKET,
        "http_version": "1.1",
        "scheme": "wss" if scheme == "https" else "ws",
        "path": _path(request.raw_path),
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": client,
        "server": server,
        "subprotocols": subprotocols,
        "state": state.copy(),
        "extensions": extensions,
    }
