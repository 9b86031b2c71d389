"""The SCGI description of a request that travels with the client fd (sans-IO).

A superset of what nginx's ``fd_pass`` sends (docs/front.md has the byte
layout), so a receiver written for nginx works unchanged:

``CONTENT_LENGTH``
    bytes the front already read from the client that follow the netstring
    (always 0 on plain TCP: the front never reads past the head).
``SCGI`` = ``1+fd_pass``, [``HTTPS`` = ``on``, ``KTLS_RX`` = ``1``], ``REMOTE_ADDR``,
``REMOTE_PORT``, ``REQUEST_METHOD``, ``REQUEST_URI`` (raw, origin-form), ``SERVER_ADDR``,
``SERVER_PORT``, ``QUERY_STRING`` (always, may be empty)
    as nginx, in nginx's order and with nginx's values: ``1+fd_pass`` says
    "SCGI 1 with the client fd attached", which is what this is, so a receiver
    that checks for nginx's value accepts ours.
``SERVER_PROTOCOL``, ``SERVER_NAME``, ``HANDOFF_ROUTE``, [``HANDOFF_UPGRADED``], [``HANDOFF_DATA``],
[``HANDOFF_CHANNEL``]
    added by fdhandoff (``HANDOFF_CHANNEL=1`` offers a channel, see
    :mod:`fdhandoff.front.handoff`; receivers that do not know it ignore it).
``HTTP_<NAME>``
    one per header name, in order of first appearance.  SCGI requires unique
    names, so repeated headers are merged as nginx ``scgi_pass`` (1.23+) does:
    ``Cookie`` values joined with ``"; "`` (RFC 6265 §5.4), others with
    ``", "`` (RFC 9110 §5.3).  Names with anything but letters, digits and
    ``-`` are dropped (nginx's defaults, ``underscores_in_headers off`` and
    ``ignore_invalid_headers on``): ``X_A`` and ``X-A`` would both become
    ``HTTP_X_A``, and a client could smuggle one past a check on the other;
    ``X.A`` has no CGI spelling at all (:func:`fdhandoff.httphead.is_cgi_header_name`,
    the rule the receiver applies to later requests of a kept-alive
    connection too).  When the front has consumed the body
    (auth mode: it went to the application), ``Content-Length``,
    ``Transfer-Encoding`` and ``Expect`` are left out: they describe bytes the
    receiver will never see.

Values come from the strict head parser, which refuses NUL bytes, so the
block needs no escaping.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ..errors import ProtocolError
from ..httphead import RequestHead, is_cgi_header_name
from ..message import CHANNEL_HEADER
from ..scgi import MAX_BLOCK_SIZE

__all__ = ["Endpoint", "describe"]

_COOKIE: Final = b"HTTP_COOKIE"


class Endpoint(NamedTuple):
    """One end of the client connection as SCGI reports it (``b""`` port for UNIX).

    A named tuple rather than a dataclass: two are built per request on the
    hot path, and a tuple is the cheapest immutable record.
    """

    addr: bytes
    port: bytes


#: Header name as sent → its SCGI name (None: dropped, not letters, digits
#: and "-").  Most requests repeat the same dozen names, so the transformation
#: is done once per name, not per request; bounded so odd names cannot grow it
#: forever.
_NAMES: dict[bytes, bytes | None] = {}
MAX_CACHED_NAMES: Final = 2048

#: Framing of a body the front consumed itself (auth mode).
_BODY_FRAMING: Final = frozenset(
    (b"HTTP_CONTENT_LENGTH", b"HTTP_TRANSFER_ENCODING", b"HTTP_EXPECT")
)


def _scgi_name(name: bytes) -> bytes | None:
    scgi_name = b"HTTP_" + name.upper().replace(b"-", b"_") if is_cgi_header_name(name) else None
    if len(_NAMES) < MAX_CACHED_NAMES:
        _NAMES[name] = scgi_name
    return scgi_name


def _header_pairs(head: RequestHead, body_consumed: bool) -> tuple[list[bytes], list[bytes]]:
    merged: dict[bytes, bytes] = {}
    dropped: list[bytes] = []
    names = _NAMES
    for name, value in head.headers:
        key = names[name] if name in names else _scgi_name(name)
        if key is None:
            dropped.append(name)
        elif body_consumed and key in _BODY_FRAMING:
            continue
        elif key in merged:
            merged[key] += (b"; " if key == _COOKIE else b", ") + value
        else:
            merged[key] = value
    parts: list[bytes] = []
    for item in merged.items():
        parts += item
    return parts, dropped


_HTTPS: Final = (b"HTTPS", b"on")
_KTLS: Final = (*_HTTPS, b"KTLS_RX", b"1")


def describe(
    head: RequestHead,
    *,
    remote: Endpoint,
    server: Endpoint,
    route: bytes,
    https: bool = False,
    ktls: bool = False,
    upgraded: bytes | None = None,
    subprotocol: bytes | None = None,
    handoff_data: bytes | None = None,
    already_read: bytes = b"",
    channel: bool = False,
    body_consumed: bool = False,
) -> tuple[bytes, list[bytes]]:
    """The SCGI message (netstring + ``already_read``) and the header names dropped.

    Raises :class:`ProtocolError` (431, or 500 with ``handoff_data``) for a
    description larger than receivers accept.

    ``https``: the client used TLS, to the front (``ktls``: the socket is on
    kernel TLS) or to a balancer that terminated it (PROXY protocol v2
    ``PP2_TYPE_SSL``).  ``body_consumed``: the front read the request body
    itself, so its framing headers are left out.
    """
    parts = [
        b"CONTENT_LENGTH",
        b"%d" % len(already_read),
        b"SCGI",
        b"1+fd_pass",
        # As nginx on a fully offloaded connection: KTLS_RX=1 says the
        # kernel decrypts what the client sends, nothing is relayed.
        *(_KTLS if ktls else _HTTPS if https else ()),
        b"REMOTE_ADDR",
        remote[0],
        b"REMOTE_PORT",
        remote[1],
        b"REQUEST_METHOD",
        head.method,
        b"REQUEST_URI",
        head.target,
        b"SERVER_ADDR",
        server[0],
        b"SERVER_PORT",
        server[1],
        b"QUERY_STRING",
        head.query,
        b"SERVER_PROTOCOL",
        b"HTTP/1.1" if head.version == b"1.1" else b"HTTP/" + head.version,
        b"SERVER_NAME",
        head.host or server[0],
        b"HANDOFF_ROUTE",
        route,
    ]
    if upgraded is not None:
        parts += (b"HANDOFF_UPGRADED", upgraded)
    if subprotocol is not None:
        parts += (b"HANDOFF_SUBPROTOCOL", subprotocol)
    if handoff_data is not None:
        parts += (b"HANDOFF_DATA", handoff_data)
    # Always there: 1 offers a channel; either value tells the receiver that
    # the front waits for the handoff to be taken, and that a handoff it reads
    # after the front closed the connection was given up (answered 503).
    parts += (CHANNEL_HEADER, b"1" if channel else b"0")
    headers, dropped = _header_pairs(head, body_consumed)
    parts += headers
    parts.append(b"")  # the block ends with NUL
    block = b"\x00".join(parts)
    if len(block) > MAX_BLOCK_SIZE:
        # Receivers refuse it (scgi.MAX_BLOCK_SIZE), and the client would get
        # a 503 for a receiver that works.  A head near a raised
        # max_head_size is counted about twice (REQUEST_URI and QUERY_STRING,
        # HTTP_HOST and SERVER_NAME): 431; with an application's payload: 500.
        raise ProtocolError(
            f"request description of {len(block)} bytes is over the SCGI limit of "
            f"{MAX_BLOCK_SIZE} that receivers accept",
            status_hint=431 if handoff_data is None else 500,
        )
    return b"%d:%s,%s" % (len(block), block, already_read), dropped
