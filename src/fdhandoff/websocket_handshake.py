"""WebSocket opening handshake, server side (RFC 6455 §4.2), sans-IO.

The front (or a receiver that reads the request head itself) calls
:func:`check_upgrade` on the parsed request head.  It either returns the
client's ``Sec-WebSocket-Key`` or raises :class:`~fdhandoff.errors.ProtocolError`
whose ``status_hint`` is the HTTP status to answer with: 400 for a malformed
upgrade request, 426 when the client speaks a WebSocket version other than 13
(that answer must carry ``Sec-WebSocket-Version: 13``, see
:func:`error_headers` / :func:`error_response`).  :func:`handshake_response`
builds the ``101 Switching Protocols`` answer.

Bytes in, bytes out: no sockets here.  Header names are compared
case-insensitively (RFC 9110 §5.1); list-valued headers (``Upgrade``,
``Connection``, ``Sec-WebSocket-Protocol``) may be split over several lines
and are read as one comma-separated list (RFC 9110 §5.3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from typing import Final

from .errors import ProtocolError
from .httphead import http_date, reason_phrase

__all__ = [
    "CONTINUE",
    "GUID",
    "SUPPORTED_VERSION",
    "accept_key",
    "check_key",
    "check_upgrade",
    "error_headers",
    "error_response",
    "expects_continue",
    "handshake_response",
    "is_token",
    "parse_subprotocols",
    "wants_websocket",
]

HeaderPairs = Iterable[tuple[bytes, bytes]]

#: The magic string appended to the client key before hashing (RFC 6455 §1.3).
GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: The only protocol version RFC 6455 defines (§4.1 item 9; drafts used 8 and lower).
SUPPORTED_VERSION: Final = b"13"

#: The interim response a client that sent ``Expect: 100-continue`` waits for
#: (RFC 9110 §15.2.1); RFC 9110 §7.8 puts it before a 101.
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

#: A Sec-WebSocket-Key is base64 of 16 random bytes (§4.1 item 7): always 24
#: characters with two '=' of padding.
_KEY_LENGTH: Final = 24
_KEY_BYTES: Final = 16

# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# HTTP-version "HTTP/" DIGIT "." DIGIT (RFC 9112 §2.3); parsers such as
# httptools hand over just "1.1", so the prefix is optional here.
_HTTP_VERSION = re.compile(rb"(?:HTTP/)?([0-9])\.([0-9])\Z")
# Field values are VCHAR, obs-text, SP and HTAB only (RFC 9110 §5.5): CR, LF
# or NUL would split the response we write, other controls are invalid too.
_BAD_VALUE_CHARS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_OWS: Final = b" \t"

# Headers handshake_response() writes itself; an extra header with one of these
# names would contradict them.  Sec-WebSocket-Extensions is refused because the
# frame codec implements no extension: announcing one would make the client
# send RSV bits that the codec rejects.
_RESERVED_RESPONSE_HEADERS: Final = frozenset(
    {
        b"upgrade",
        b"connection",
        b"sec-websocket-accept",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
        b"content-length",
        b"transfer-encoding",
    }
)


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client key: base64(SHA-1(key + GUID)) (§4.2.2)."""
    # SHA-1 is what RFC 6455 mandates here; it proves the server read the
    # handshake, it is not a security primitive.
    digest = hashlib.sha1(key + GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest)


def is_token(value: bytes) -> bool:
    """True if ``value`` is an HTTP token (RFC 9110 §5.6.2)."""
    return _TOKEN.match(value) is not None


def _values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower case), OWS stripped, in order."""
    return [value.strip(_OWS) for key, value in headers if key.lower() == name]


def _list_elements(values: list[bytes]) -> list[bytes]:
    """Split comma-separated list values; empty elements are skipped (RFC 9110 §5.6.1)."""
    stripped = (raw.strip(_OWS) for value in values for raw in value.split(b","))
    return [element for element in stripped if element]


def _has_token(values: list[bytes], token: bytes) -> bool:
    return any(element.lower() == token for element in _list_elements(values))


def wants_websocket(headers: HeaderPairs) -> bool:
    """True if the request asks to upgrade to WebSocket (``Upgrade`` lists ``websocket``).

    Lets a front route an upgrade attempt before validating it fully with
    :func:`check_upgrade`.
    """
    return _has_token(_values(list(headers), b"upgrade"), b"websocket")


def _check_http_version(http_version: bytes) -> None:
    match = _HTTP_VERSION.match(http_version)
    if match is None:
        raise ProtocolError(f"malformed HTTP version {http_version[:16]!r}")
    # §4.1 item 2: the upgrade request is an HTTP/1.1 (or later) GET.
    if (int(match[1]), int(match[2])) < (1, 1):
        raise ProtocolError(
            f"WebSocket upgrade needs HTTP/1.1 or later, got {http_version.decode('ascii')}"
        )


def _check_version(headers: list[tuple[bytes, bytes]]) -> None:
    versions = _values(headers, b"sec-websocket-version")
    if not versions:
        raise ProtocolError("missing Sec-WebSocket-Version header", status_hint=426)
    if len(versions) > 1:
        raise ProtocolError("more than one Sec-WebSocket-Version header")
    if versions[0] != SUPPORTED_VERSION:
        # §4.2.2: answer with the versions we do support (error_headers()).
        raise ProtocolError(
            f"unsupported Sec-WebSocket-Version {versions[0][:16]!r} (only 13)", status_hint=426
        )


def _check_key(headers: list[tuple[bytes, bytes]]) -> bytes:
    keys = _values(headers, b"sec-websocket-key")
    if not keys:
        raise ProtocolError("missing Sec-WebSocket-Key header")
    if len(keys) > 1:
        raise ProtocolError("more than one Sec-WebSocket-Key header")
    return check_key(keys[0])


def check_key(key: bytes) -> bytes:
    """``key`` without surrounding whitespace if it is a valid ``Sec-WebSocket-Key``.

    For a key that did not come in a header (an Apache handoff payload names
    it): the same rule as :func:`check_upgrade`'s, RFC 6455 §4.2.1 item 5, a
    base64-encoded 16-byte value, else :class:`ProtocolError` (400).
    """
    key = key.strip(_OWS)
    try:
        # validate=True: characters outside the base64 alphabet are an error,
        # not silently skipped.
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(key) != _KEY_LENGTH or len(raw) != _KEY_BYTES:
        raise ProtocolError(
            f"Sec-WebSocket-Key {key[:32]!r} is not base64 of 16 bytes (RFC 6455 §4.1)"
        )
    return key


def check_upgrade(method: bytes, http_version: bytes, headers: HeaderPairs) -> bytes:
    """Validate a client's opening handshake (RFC 6455 §4.2.1); return its key.

    ``http_version`` is ``b"1.1"`` or ``b"HTTP/1.1"``.  ``headers`` are the
    request's (name, value) pairs.  Raises :class:`ProtocolError` with
    ``status_hint=400`` and a message naming the problem, or ``status_hint=426``
    when ``Sec-WebSocket-Version`` is missing or not 13.  A request that
    announces content (``Content-Length`` other than 0, ``Transfer-Encoding``)
    is 400: its body would otherwise be read as WebSocket frames.  The version is
    checked before the key so that a client speaking an older draft (which has
    no ``Sec-WebSocket-Key``) learns which version to use.
    """
    pairs = list(headers)
    if method != b"GET":
        raise ProtocolError(f"WebSocket upgrade must use GET, not {method[:16]!r}")
    _check_http_version(http_version)
    hosts = _values(pairs, b"host")
    if len(hosts) != 1:
        # RFC 9112 §3.2: zero or several Host lines are answered with 400.
        raise ProtocolError("missing Host header" if not hosts else "more than one Host header")
    if not _has_token(_values(pairs, b"upgrade"), b"websocket"):
        raise ProtocolError("Upgrade header does not list 'websocket'")
    if not _has_token(_values(pairs, b"connection"), b"upgrade"):
        raise ProtocolError("Connection header does not list 'upgrade'")
    if _has_content(pairs):
        # RFC 9110 §7.8: the new protocol starts after the whole request,
        # content included; RFC 9110 §9.3.1: content in a GET has no meaning
        # and may be refused as a smuggling attempt.  Whoever answers the
        # 101 here (the front, a receiver) reads no request content: the
        # client's body bytes would be taken for its first WebSocket frames,
        # where the client and any intermediary see HTTP content.
        raise ProtocolError("WebSocket upgrade request with content (RFC 9110 §9.3.1)")
    _check_version(pairs)
    return _check_key(pairs)


def _has_content(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request announces content: any ``Transfer-Encoding``, or a
    ``Content-Length`` other than zero (RFC 9112 §6.3)."""
    if _values(headers, b"transfer-encoding"):
        return True
    return any(value.strip(b"0") for value in _values(headers, b"content-length"))


def expects_continue(headers: HeaderPairs) -> bool:
    """True if the request carries ``Expect: 100-continue`` (RFC 9110 §10.1.1).

    RFC 9110 §7.8: a server that receives it together with ``Upgrade`` MUST
    send ``100 (Continue)`` before the ``101``; pass the result to
    :func:`handshake_response` as ``continue_first``.
    """
    return _has_token(_values(list(headers), b"expect"), b"100-continue")


def parse_subprotocols(headers: HeaderPairs) -> list[bytes]:
    """The ``Sec-WebSocket-Protocol`` tokens the client offers, in its order of preference.

    Raises :class:`ProtocolError` (400) if an element is not a token
    (RFC 6455 §4.1 item 10).
    """
    elements = _list_elements(_values(list(headers), b"sec-websocket-protocol"))
    for element in elements:
        if not is_token(element):
            raise ProtocolError(f"Sec-WebSocket-Protocol element {element[:32]!r} is not a token")
    return elements


def _check_header(name: bytes, value: bytes) -> None:
    if not is_token(name):
        raise ValueError(f"header name {name!r} is not a token")
    if _BAD_VALUE_CHARS.search(value):
        raise ValueError(f"header {name!r} value contains a control character (CR, LF, NUL, ...)")


def handshake_response(
    key: bytes,
    *,
    subprotocol: bytes | None = None,
    extra_headers: HeaderPairs = (),
    continue_first: bool = False,
) -> bytes:
    """The complete ``101 Switching Protocols`` response for ``key`` (RFC 6455 §4.2.2).

    ``subprotocol`` must be one of the client's offers (see
    :func:`parse_subprotocols`); ``extra_headers`` are appended as given
    (e.g. ``Set-Cookie``).  ``continue_first``: the request expected
    ``100-continue`` (:func:`expects_continue`), and RFC 9110 §7.8 wants the
    ``100 (Continue)`` before the ``101``: both go in the bytes returned, to
    be sent in one write.  Raises ``ValueError`` for a subprotocol that is not
    a token, an extra header that is malformed, or one that would contradict
    the handshake headers written here.
    """
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept_key(key),
    ]
    if subprotocol is not None:
        if not is_token(subprotocol):
            raise ValueError(f"subprotocol {subprotocol!r} is not a token")
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol)
    for name, value in extra_headers:
        _check_header(name, value)
        if name.lower() in _RESERVED_RESPONSE_HEADERS:
            raise ValueError(f"header {name!r} is set by the handshake itself")
        lines.append(name + b": " + value)
    lines += (b"", b"")
    response = b"\r\n".join(lines)
    return CONTINUE + response if continue_first else response


def error_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers a rejected upgrade must carry besides the usual ones.

    For 426: ``Sec-WebSocket-Version: 13`` (RFC 6455 §4.2.2 item 4) and
    ``Upgrade: websocket`` (a 426 must name the protocol to upgrade to,
    RFC 9110 §15.5.22).  Nothing for other statuses.
    """
    if status == 426:
        return [(b"Sec-WebSocket-Version", SUPPORTED_VERSION), (b"Upgrade", b"websocket")]
    return []


def error_response(error: ProtocolError, *, head_only: bool = False) -> bytes:
    """A complete plain-text HTTP/1.1 error response for a failed upgrade.

    Status from ``error.status_hint``, the message as the body, a ``Date``
    (RFC 9110 §6.6.1: a 4xx from an origin with a clock), the headers of
    :func:`error_headers`, and ``Connection: close`` (plus ``upgrade`` when an
    ``Upgrade`` header is sent, as RFC 9110 §7.8 requires).  ``head_only``:
    the answer to a ``HEAD`` request, the same head without its body
    (RFC 9110 §9.3.2).
    """
    status = error.status_hint
    body = str(error).encode("utf-8", "backslashreplace") + b"\n"
    extra = error_headers(status)
    connection = b"upgrade, close" if extra else b"close"
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
        b"Date: " + http_date(),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: " + connection,
    ]
    lines += [name + b": " + value for name, value in extra]
    lines += (b"", b"" if head_only else body)
    return b"\r\n".join(lines)
