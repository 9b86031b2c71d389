"""What a handoff says about the request (sans-IO).

:class:`HandoffInfo` turns a :class:`~fdhandoff.message.HandoffRecord` into the
request an application sees: method, decoded and raw path, query string, the
HTTP headers restored from the CGI-style ``HTTP_*`` variables, client and
server addresses, TLS flag.  It is the common base of the asyncio and sync
``Handoff`` objects and of any adapter built on them (ASGI); it does no I/O.

What each format can tell:

* SCGI (fdhandoff front, nginx ``fd_pass``) and plain SCGI: the whole request
  head.  nginx ``fd_pass`` repeats ``HTTP_*`` names for repeated header lines;
  they are kept, in order, as repeated headers.
* PAYLOAD (Apache ``mod_socket_handoff``): only the application's opaque
  payload; the addresses come from the client socket itself.
* BYTE markers: nothing but the marker; ``X`` (OpenResty) means the WebSocket
  upgrade is already done, ``\\x00`` (``mod_proxy_fdpass``) means Apache has
  already sent the response head.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote_to_bytes

from .. import scgi
from ..errors import ProtocolError
from ..message import Format, HandoffRecord

__all__ = ["HandoffInfo", "Headers", "RawHeaders", "split_target"]

RawHeaders = list[tuple[bytes, bytes]]
Headers = list[tuple[str, str]]

#: BYTE-format markers with a meaning for the receiver (message.KNOWN_MARKERS).
MARKER_UPGRADED: Final = b"X"  # OpenResty: 101 already sent, frames follow
MARKER_HEAD_SENT: Final = b"\x00"  # mod_proxy_fdpass: Apache sent the head

_ON_VALUES: Final = (b"on", b"ON", b"On", b"1")


#: ``HTTP_X_NAME`` → ``x-name``: requests repeat the same dozen names, so each
#: is transformed once; bounded so odd names cannot grow it forever.
_HEADER_NAMES: dict[bytes, bytes] = {}
MAX_CACHED_NAMES: Final = 2048


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split a request target into raw path and query (RFC 9112 section 3.2).

    Origin form ``/p?q`` and asterisk form ``*`` are taken as they are; the
    absolute form ``http://host/p?q`` (section 3.2.2) keeps only its path.
    """
    lowered = target[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        rest = target[target.index(b"//") + 2 :]
        slash = rest.find(b"/")
        question = rest.find(b"?")
        if slash < 0 or (0 <= question < slash):
            target = b"/" + (rest[question:] if question >= 0 else b"")
        else:
            target = rest[slash:]
    if not (target.startswith(b"/") or target == b"*"):
        raise ProtocolError(f"request target is not a path: {target[:64]!r}")
    path, sep, query = target.partition(b"?")
    return path, query if sep else b""


def _decode_path(raw_path: bytes) -> str:
    # ASGI and WSGI give applications the path with %XX sequences and UTF-8
    # decoded; invalid UTF-8 becomes U+FFFD rather than an error.
    return unquote_to_bytes(raw_path).decode("utf-8", "replace")


def _address(host: bytes | None, port: bytes | None) -> tuple[str, int] | None:
    if not host:
        return None
    number = int(port) if port and port.isdigit() and port.isascii() and len(port) <= 5 else 0
    return host.decode("latin-1"), number


class HandoffInfo:
    """The request as one handoff describes it.

    Attributes are ``None`` where the format carries nothing (PAYLOAD and
    BYTE formats know no method, path or headers).
    """

    __slots__ = (
        "already_read",
        "client",
        "format",
        "http_version",
        "ktls_rx_relay",
        "marker",
        "method",
        "path",
        "payload",
        "query_string",
        "raw_headers",
        "raw_path",
        "record",
        "route",
        "server",
        "subprotocol",
        "tls",
        "upgraded",
    )

    def __init__(self, record: HandoffRecord) -> None:
        self.record = record
        self.format = record.format
        #: Client bytes the sender had already read (SCGI body): the start of
        #: the request body, pipelined requests, or WebSocket frames.
        self.already_read = record.body
        self.payload = record.payload
        self.marker = record.marker
        self.method: str | None = None
        self.raw_path: bytes | None = None
        self.path: str | None = None
        self.query_string = b""
        self.raw_headers: RawHeaders = []
        self.http_version = "1.1"
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.tls = False
        self.upgraded = record.marker == MARKER_UPGRADED
        #: The WebSocket subprotocol the sender agreed in the ``101`` it sent
        #: (fdhandoff front ``HANDOFF_SUBPROTOCOL``), None when it chose none.
        self.subprotocol: str | None = None
        self.route: str | None = None
        #: nginx fd_pass with kTLS TX only (KTLS_RX=0): decrypted client bytes
        #: keep arriving on the UNIX connection (peers.md section 1).
        self.ktls_rx_relay = False
        if record.format in (Format.SCGI, Format.PLAIN_SCGI):
            self._from_scgi(record.headers, record.format is Format.PLAIN_SCGI)

    # --- parsing ---------------------------------------------------------------

    def _from_scgi(self, pairs: scgi.HeaderList, plain: bool) -> None:
        env: dict[bytes, bytes] = {}
        headers: RawHeaders = []
        names = _HEADER_NAMES
        for name, value in pairs:
            if name.startswith(b"HTTP_"):
                header = names.get(name)
                if header is None:
                    header = name[5:].lower().replace(b"_", b"-")
                    if len(names) < MAX_CACHED_NAMES:
                        names[name] = header
                headers.append((header, value))
            else:
                env.setdefault(name, value)
        if plain:
            headers.extend(_cgi_content_headers(env, headers))
        self.raw_headers = headers
        method = env.get(b"REQUEST_METHOD")
        if not method:
            raise ProtocolError("SCGI request has no REQUEST_METHOD")
        self.method = method.decode("latin-1")
        self.raw_path, query = split_target(_target(env))
        self.path = _decode_path(self.raw_path)
        self.query_string = env.get(b"QUERY_STRING", query)
        protocol = env.get(b"SERVER_PROTOCOL", b"HTTP/1.1")
        if protocol not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise ProtocolError(f"unsupported SERVER_PROTOCOL {protocol!r}", status_hint=505)
        self.http_version = protocol[5:].decode()
        self.client = _address(env.get(b"REMOTE_ADDR"), env.get(b"REMOTE_PORT"))
        self.server = _address(
            env.get(b"SERVER_ADDR") or env.get(b"SERVER_NAME"), env.get(b"SERVER_PORT")
        )
        self.tls = env.get(b"HTTPS") in _ON_VALUES or env.get(b"REQUEST_SCHEME") == b"https"
        self.upgraded = env.get(b"HANDOFF_UPGRADED") == b"websocket"
        if self.upgraded:
            chosen = env.get(b"HANDOFF_SUBPROTOCOL")
            self.subprotocol = chosen.decode("latin-1") if chosen else None
        route = env.get(b"HANDOFF_ROUTE")
        self.route = route.decode("utf-8", "replace") if route is not None else None
        self.payload = env.get(b"HANDOFF_DATA", b"")
        self.ktls_rx_relay = env.get(b"KTLS_RX") == b"0"

    # --- convenience -------------------------------------------------------------

    @property
    def headers(self) -> Headers:
        """``(lowercase name, value)`` pairs in arrival order; repeats kept."""
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``default``."""
        key = name.lower().encode("latin-1")
        for n, v in self.raw_headers:
            if n == key:
                return v.decode("latin-1")
        return default

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for n, v in self.raw_headers if n == key]

    @property
    def scheme(self) -> str:
        """``https`` or ``http`` (``wss``/``ws`` are the caller's to derive)."""
        return "https" if self.tls else "http"

    @property
    def has_request(self) -> bool:
        """True when the format described the request (SCGI, plain SCGI)."""
        return self.method is not None

    def describe(self) -> str:
        """``METHOD path`` for logs, ``-`` parts when unknown."""
        method = self.method or "-"
        path = self.raw_path.decode("latin-1") if self.raw_path is not None else "-"
        if self.query_string:
            path += "?" + self.query_string.decode("latin-1")
        return f"{method} {path}"


def _target(env: dict[bytes, bytes]) -> bytes:
    target = env.get(b"REQUEST_URI")
    if target:
        return target
    # CGI-style senders without REQUEST_URI (RFC 3875 section 4.1).
    path = env.get(b"DOCUMENT_URI") or (env.get(b"SCRIPT_NAME", b"") + env.get(b"PATH_INFO", b""))
    if not path:
        raise ProtocolError("SCGI request has neither REQUEST_URI nor a script path")
    query = env.get(b"QUERY_STRING")
    return path + b"?" + query if query else path


def _cgi_content_headers(env: dict[bytes, bytes], headers: RawHeaders) -> RawHeaders:
    # Plain SCGI senders (nginx scgi_pass, Apache mod_proxy_scgi) pass the
    # entity headers CGI-style, not as HTTP_* (RFC 3875 section 4.1.2-3).
    present = {name for name, _ in headers}
    extra: RawHeaders = []
    content_type = env.get(b"CONTENT_TYPE")
    if content_type and b"content-type" not in present:
        extra.append((b"content-type", content_type))
    length = env.get(b"CONTENT_LENGTH", b"0")
    if b"content-length" not in present:
        if length != b"0":
            extra.append((b"content-length", length))
        return extra
    # The body that follows is CONTENT_LENGTH bytes; a client's Content-Length
    # that says otherwise means the sender cut the body short.  nginx 1.22
    # with "scgi_request_buffering off" sends as CONTENT_LENGTH only the
    # part of the body it has read so far, then streams the rest: taken as
    # it stands, the application would get a truncated body as a whole one.
    announced = next(value for name, value in headers if name == b"content-length")
    if announced.isdigit() and length.isdigit() and int(announced) != int(length):
        raise ProtocolError(
            f"CONTENT_LENGTH {length.decode()} differs from the request's Content-Length "
            f"{announced.decode()}: the sender does not pass the whole body "
            "(nginx 1.22 with scgi_request_buffering off)"
        )
    return extra
