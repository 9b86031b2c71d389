"""The small HTTP responses the front gives itself (sans-IO).

Every answer of the front's own is final: ``Connection: close`` (RFC 9112
§9.6; the connection is never reused after an error) and a one-line
``text/plain`` body naming the problem, so a person with curl sees why.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from http import HTTPStatus
from typing import Final

__all__ = ["error_response", "reason_phrase"]

#: Longest problem text echoed in a body; the text may quote client input.
MAX_TEXT: Final = 512


@lru_cache(maxsize=64)
def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Error"


def error_response(
    status: int, text: str, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """A complete ``Connection: close`` response whose body is ``text``."""
    body = text[:MAX_TEXT].encode("utf-8", "backslashreplace") + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    lines += [name + b": " + value for name, value in extra_headers]
    lines += (b"", body)
    return b"\r\n".join(lines)
