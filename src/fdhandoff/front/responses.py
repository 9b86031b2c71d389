"""The small HTTP responses the front gives itself (sans-IO).

Every answer of the front's own is final: ``Connection: close`` (RFC 9112
§9.6; the connection is never reused after an error), a ``Date`` (RFC 9110
§6.6.1: an origin server with a clock MUST send one in 4xx answers, and the
front is the origin of these) and a one-line ``text/plain`` body naming the
problem, so a person with curl sees why.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus
from typing import Final

__all__ = ["error_response", "http_date", "reason_phrase"]

#: Longest problem text echoed in a body; the text may quote client input.
MAX_TEXT: Final = 512


@lru_cache(maxsize=64)
def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Error"


@lru_cache(maxsize=2)
def _date_at(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode("ascii")


def http_date() -> bytes:
    """The current time as an IMF-fixdate (RFC 9110 §5.6.7), formatted once a second."""
    return _date_at(int(time.time()))


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
