"""HTTP/1.1 response bytes (sans-IO): status line or CGI head, headers, chunks.

The receiver writes the whole response itself (the senders send nothing, not
even ``100 Continue``), so this module is the one place that produces response
framing (RFC 9112).  Header names and values are checked here: a CR, LF or NUL
from application data would let it forge headers or a second response, and no
other control character is valid in a field value either (RFC 9110 section 5.5).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from ..httphead import http_date, reason_phrase

__all__ = [
    "CONTINUE",
    "LAST_CHUNK",
    "HeaderInput",
    "chunk",
    "encode_headers",
    "has_framing",
    "has_header",
    "http_date",
    "reason",
    "response_head",
    "without_connection_fields",
]

HeaderInput = Iterable[tuple[str | bytes, str | bytes]]

#: Interim answer to ``Expect: 100-continue`` (RFC 9110 section 10.1.1).
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

#: End of a chunked body, no trailers (RFC 9112 section 7.1).
LAST_CHUNK: Final = b"0\r\n\r\n"

# token = 1*tchar (RFC 9110 section 5.6.2).
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# field-value: VCHAR, obs-text, SP and HTAB only (RFC 9110 section 5.5).  CR,
# LF and NUL would forge headers or a second response; the other controls
# (and DEL) are invalid too, and recipients treat them in different ways.
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def reason(status: int) -> str:
    """The standard reason phrase, or an empty one for unknown codes."""
    return reason_phrase(status).decode("ascii")


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


#: Checked header lines by (name, value) as given: most responses repeat the
#: same few (``Content-Type``, ``Cache-Control``...), so each is validated and
#: encoded once; bounded so per-response values cannot grow it forever.
_LINES: dict[tuple[str | bytes, str | bytes], bytes] = {}
MAX_CACHED_LINES: Final = 1024


def _header_line(raw_name: str | bytes, raw_value: str | bytes) -> bytes:
    name = _as_bytes(raw_name)
    value = _as_bytes(raw_value)
    if not _TOKEN.match(name):
        raise ValueError(f"invalid response header name {name!r}")
    if _BAD_VALUE.search(value):
        raise ValueError(
            f"response header {name!r} contains a control character (CR, LF, NUL, ...)"
        )
    line = name + b": " + value.strip(b" \t") + b"\r\n"
    if len(_LINES) < MAX_CACHED_LINES:
        _LINES[(raw_name, raw_value)] = line
    return line


def encode_headers(headers: HeaderInput) -> bytes:
    """``Name: value\\r\\n`` lines; raises ``ValueError`` on an invalid name or value."""
    lines = _LINES
    out = []
    for name, value in headers:
        try:
            line = lines.get((name, value))
        except TypeError:  # an unhashable value (bytearray): no cache for it
            line = None
        out.append(line or _header_line(name, value))
    return b"".join(out)


#: Header names as given (str or bytes, any case) → lowercase bytes: a
#: response names the same few each time; bounded like _LINES.
_LOWER: dict[str | bytes, bytes] = {}


def _lower(name: str | bytes) -> bytes:
    lowered = _LOWER.get(name)
    if lowered is None:
        lowered = _as_bytes(name).lower()
        if len(_LOWER) < MAX_CACHED_LINES:
            _LOWER[name] = lowered
    return lowered


def has_header(headers: Iterable[tuple[str | bytes, str | bytes]], name: bytes) -> bool:
    """True if ``name`` (lowercase) is among ``headers``."""
    return any(_lower(n) == name for n, _ in headers)


#: Framing the receiver writes itself (RFC 9112 section 6): an application
#: that sets either would frame the body twice or wrongly.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


def has_framing(headers: Iterable[tuple[str | bytes, str | bytes]]) -> bool:
    """True if ``headers`` set Content-Length or Transfer-Encoding."""
    return any(_lower(n) in _FRAMING for n, _ in headers)


#: Fields about the connection itself, which the receiver alone decides:
#: hop-by-hop (RFC 9110 section 7.6.1), and every answer here ends its
#: connection, so a handler's ``Connection: keep-alive`` would contradict the
#: ``Connection: close`` sent with it (the ASGI adapter drops them too).
_CONNECTION_FIELDS: Final = frozenset({b"connection", b"keep-alive"})


def without_connection_fields(
    headers: HeaderInput,
) -> list[tuple[str | bytes, str | bytes]]:
    """``headers`` without ``Connection`` and ``Keep-Alive``."""
    return [(n, v) for n, v in headers if _lower(n) not in _CONNECTION_FIELDS]


def response_head(
    status: int,
    headers: HeaderInput = (),
    *,
    version: str = "1.1",
    cgi: bool = False,
) -> bytes:
    """The response head up to and including the empty line.

    ``cgi=True`` writes a CGI-style ``Status:`` header instead of a status line:
    what SCGI clients (nginx ``scgi_pass``, Apache ``mod_proxy_scgi``) parse.
    A ``Date`` is added unless ``headers`` has one.
    """
    first = _FIRST_LINES.get((status, version, cgi))
    if first is None:
        first = _first_line(status, version, cgi)
    given = headers if isinstance(headers, list) else list(headers)
    # Date is a single field (RFC 9110 section 6.6.1): the caller's wins, as
    # the app's does in the ASGI adapter; ours only when there is none.
    if not cgi and not has_header(given, b"date"):
        first += b"Date: " + http_date() + b"\r\n"
    return first + encode_headers(given) + b"\r\n"


#: Status lines by (status, version, cgi): a few dozen at most.
_FIRST_LINES: dict[tuple[int, str, bool], bytes] = {}


def _first_line(status: int, version: str, cgi: bool) -> bytes:
    # RFC 9110 section 15: status codes are 100 to 599; a client may take
    # anything else for a broken response.
    if not 100 <= status <= 599:
        raise ValueError(f"invalid HTTP status {status} (100 to 599)")
    phrase = reason_phrase(status)
    if cgi:
        first = b"Status: %d %s\r\n" % (status, phrase)
    else:
        first = b"HTTP/%s %d %s\r\n" % (version.encode(), status, phrase)
    if len(_FIRST_LINES) < MAX_CACHED_LINES:
        _FIRST_LINES[(status, version, cgi)] = first
    return first


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1); empty data gives nothing."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)
