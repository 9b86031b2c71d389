"""The small HTTP responses the front gives itself (sans-IO).

Every answer of the front's own is final: ``Connection: close`` (RFC 9112
§9.6; the connection is never reused after an error), a ``Date`` (RFC 9110
§6.6.1: an origin server with a clock MUST send one in 4xx answers, and the
front is the origin of these) and a one-line ``text/plain`` body naming the
problem, so a person with curl sees why.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from ..httphead import http_date, reason_phrase

__all__ = ["error_response"]

#: Longest problem text echoed in a body; the text may quote client input.
MAX_TEXT: Final = 512


def error_response(
    status: int,
    text: str,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    head_only: bool = False,
) -> bytes:
    """A complete ``Connection: close`` response whose body is ``text``.

    ``head_only``: the answer to a HEAD request, the same head without the
    body (RFC 9110 §9.3.2; ``Content-Length`` still says what a GET would get).
    """
    body = text[:MAX_TEXT].encode("utf-8", "backslashreplace") + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
        b"Date: " + http_date(),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    lines += [name + b": " + value for name, value in extra_headers]
    lines += (b"", b"" if head_only else body)
    return b"\r\n".join(lines)
