"""Response heads for the ASGI adapter (sans-IO): the app's start message to bytes.

The app's ``http.response.start`` becomes the head, minus what the adapter
decides itself: the body's framing (``Content-Length`` it computes,
``Transfer-Encoding``) and the connection's persistence (``Connection``,
``Keep-Alive``), RFC 9112 sections 6 and 9.6.  The head is finished
(:func:`finish_head`) once the first body message shows how the body ends.
Header names and values are checked: CR, LF or NUL from the app would let it
forge headers or a second response, and no control character is valid in a
field value (RFC 9110 section 5.5).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from . import http

__all__ = ["NO_BODY_STATUSES", "AppHead", "app_head", "error_response", "finish_head"]

#: Statuses whose responses never have content (RFC 9110 sections 6.4.1,
#: 15.3.6): what the app sends as a body is dropped.  A 205 is still framed,
#: ``Content-Length: 0`` (see app_head).
NO_BODY_STATUSES: Final = frozenset({204, 205, 304})

_HOP_BY_HOP: Final = frozenset({b"transfer-encoding", b"connection", b"keep-alive"})

#: ``X-Accel-Buffering: no`` on streamed plain-SCGI answers: nginx buffers
#: SCGI responses unless told not to, which would hold back every stream.
_NO_PROXY_BUFFERING: Final = b"X-Accel-Buffering: no\r\n"


@dataclass(frozen=True, slots=True)
class AppHead:
    """The app's head: status line and kept headers, without the final CRLF.

    ``length``: the app's ``Content-Length``; ``close``: the app sent
    ``Connection: close``.
    """

    status: int
    head: bytes
    length: int | None
    close: bool


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


def app_head(message: dict[str, Any], *, cgi: bool, head_sent: bool) -> AppHead:
    """Check and encode an ``http.response.start`` message.

    ``cgi``: a CGI ``Status:`` line (plain SCGI); ``head_sent``: the sender
    wrote the head already, so nothing of it is kept.  Raises ``ValueError``.
    """
    status = message["status"]
    # RFC 9110 section 15: final statuses are 200 to 599; an informational
    # one cannot be the response, and 600 and above are not HTTP at all.
    if not isinstance(status, int) or not 200 <= status <= 599:
        raise ValueError(f"invalid response status {status!r} (200 to 599)")
    kept: list[tuple[bytes, bytes]] = []
    length: int | None = None
    close = has_date = False
    for raw_name, raw_value in message.get("headers", ()):
        name, value = _as_bytes(raw_name), _as_bytes(raw_value)
        lower = name.lower()
        if lower in _HOP_BY_HOP:
            close = close or (lower == b"connection" and b"close" in value.lower())
            continue
        if lower == b"content-length":
            if status in (204, 205):
                # RFC 9110 section 8.6: a server MUST NOT send Content-Length
                # in a 204 (its body is dropped anyway, NO_BODY_STATUSES); a
                # 205 gets ours, below.
                continue
            length = _content_length(value, length)
        elif lower == b"date":
            has_date = True
        kept.append((name, value))
    if status == 205:
        # RFC 9110 section 15.3.6: no content in a 205; and RFC 9112 section
        # 6.3 does not exempt it from framing, so a kept-alive client needs
        # the zero length to know the response ended.
        kept.append((b"Content-Length", b"0"))
        length = 0
    if head_sent:
        return AppHead(status, b"", length, close)
    phrase = http.reason(status).encode()
    if cgi:
        first = b"Status: %d %s\r\n" % (status, phrase)
    else:
        first = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
        if not has_date:
            first += b"Date: " + http.http_date() + b"\r\n"
    return AppHead(status, first + http.encode_headers(kept), length, close)


def finish_head(
    head: bytes,
    *,
    length: int | None = None,
    chunked: bool = False,
    close: bool = False,
    cgi: bool = False,
) -> bytes:
    """The head with the adapter's framing and persistence headers, and its end.

    ``length``: a Content-Length computed here; ``chunked``: the body is
    chunked; ``close``: the connection ends after this response.  A plain-SCGI
    answer streamed until the close is marked unbuffered for nginx.
    """
    extra = b""
    if length is not None:
        extra += b"Content-Length: %d\r\n" % length
    if chunked:
        extra += b"Transfer-Encoding: chunked\r\n"
    if cgi:
        streamed = length is None and b"\ncontent-length:" not in head.lower()
        if streamed and b"\nx-accel-buffering:" not in head.lower():
            extra += _NO_PROXY_BUFFERING
    elif close:
        extra += b"Connection: close\r\n"
    return head + extra + b"\r\n"


def error_response(
    status: int,
    *,
    cgi: bool = False,
    head_only: bool = False,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """A complete plain-text answer ending the connection (``Connection: close``)."""
    phrase = http.reason(status)
    body = f"{status} {phrase}\n".encode()
    headers = [(b"Content-Type", b"text/plain; charset=utf-8"), *extra]
    headers.append((b"Content-Length", b"%d" % len(body)))
    if not cgi:
        headers.append((b"Connection", b"close"))
    head = http.response_head(status, headers, cgi=cgi)
    return head if head_only else head + body


def _content_length(value: bytes, previous: int | None) -> int:
    if previous is not None:
        # One field line, one decimal (RFC 9110 section 8.6): "2, 2" in one
        # line is refused below, and the same in two lines is no better; a
        # recipient may reject either as a framing error (RFC 9112 section 6.3).
        raise ValueError("the app's response has more than one Content-Length header")
    text = value.strip()
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise ValueError(f"invalid Content-Length {value[:32]!r} in the app's response")
    return int(text)
