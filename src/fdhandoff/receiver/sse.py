"""Server-Sent Events wire format (sans-IO), per the WHATWG HTML standard 9.2.

An event is a block of ``field: value`` lines ended by an empty line.  Data
with line breaks becomes one ``data:`` line per line (the browser joins them
back with ``\\n``); a line starting with ``:`` is a comment, which browsers
ignore and proxies see as traffic: the usual heartbeat.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["CONTENT_TYPE", "encode_comment", "encode_event"]

CONTENT_TYPE: Final = b"text/event-stream"

# The standard splits lines on CRLF, LF or CR alike.
_LINES: Final = re.compile(r"\r\n|\r|\n")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _single_line(value: str, field: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"SSE {field} must be a single line")
    return value


def encode_event(
    data: str | bytes | None = None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """One event, UTF-8 encoded, ending with the blank line that dispatches it."""
    lines: list[str] = []
    if event is not None:
        lines.append("event: " + _single_line(event, "event"))
    if id is not None:
        if "\x00" in id:
            raise ValueError("SSE id must not contain NUL (browsers ignore such ids)")
        lines.append("id: " + _single_line(id, "id"))
    if retry is not None:
        if retry < 0:
            raise ValueError("SSE retry must be a non-negative number of milliseconds")
        lines.append(f"retry: {int(retry)}")
    if data is not None:
        lines.extend("data: " + line for line in _LINES.split(_text(data)))
    if not lines:
        raise ValueError("an SSE event needs data, event, id or retry")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """A comment block (``: text``), e.g. an empty heartbeat ``:\\n\\n``."""
    if not text:
        return b":\n\n"
    return ("\n".join(": " + line for line in _LINES.split(text)) + "\n\n").encode("utf-8")
