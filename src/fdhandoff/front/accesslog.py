"""One access-log line per request, written in batches.

Format (one line, fields separated by spaces)::

    <time> <client> "<METHOD> <target>" route=<prefix|-> <outcome> <duration>ms

``outcome`` is ``handed-off`` or the status the front answered followed by
the problem in quotes (``503 "backend /run/x.sock: connection refused"``),
``relayed <status>`` for an auth-mode response from the application, or
``closed "<why>"`` when there was nobody left to answer.  Lines are buffered
and flushed by the front's housekeeping tick (every 100 ms at most) and at
exit: a write(2) per request would cost more than parsing the request.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time
from typing import Final, TextIO

__all__ = ["AccessLog"]

#: Longest request target written to the log (the rest is elided): a 8 KiB
#: URI per line would let a client fill the disk eight times faster.
MAX_LOGGED_TARGET: Final = 256

#: Largest atomic write to a pipe (pipe(7)); POSIX guarantees 512, Linux 4096.
PIPE_BUF: Final = select.PIPE_BUF

#: Buffered lines are flushed when this many are pending, besides the tick.
FLUSH_LINES: Final = 512


#: Bytes that are escaped in a logged field, so a client cannot forge a line.
_UNSAFE: Final = re.compile(rb'[^\x20-\x7e]|["\\]')


def _escape(match: re.Match[bytes]) -> bytes:
    return b"\\x%02x" % match[0][0]


def _clip(value: bytes) -> str:
    clipped = value[:MAX_LOGGED_TARGET]
    if _UNSAFE.search(clipped) is not None:
        clipped = _UNSAFE.sub(_escape, clipped)
    return clipped.decode("ascii") + ("..." if len(value) > MAX_LOGGED_TARGET else "")


def _batches(lines: list[str]) -> list[str]:
    """Whole lines joined into writes of at most ``PIPE_BUF`` bytes where they fit.

    Workers (``workers = N``) share stderr or the file: a write(2) of up to
    PIPE_BUF bytes to a pipe is atomic (pipe(7)), so no worker's line is ever
    cut by another's; appends to a file are whole writes anyway (O_APPEND).
    """
    batches: list[str] = []
    size = 0
    start = 0
    for index, line in enumerate(lines):
        if size + len(line) > PIPE_BUF and index > start:
            batches.append("".join(lines[start:index]))
            start, size = index, 0
        size += len(line.encode("utf-8", "replace"))
    batches.append("".join(lines[start:]))
    return batches


class AccessLog:
    """Buffered access log to stderr, a file, or nowhere (``"off"``)."""

    __slots__ = ("_lines", "_owned", "_second", "_stamp", "_stream", "enabled")

    def __init__(self, where: str) -> None:
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""
        self.enabled = where != "off"
        self._owned = False
        self._stream: TextIO | None = None
        if where == "stderr":
            self._stream = sys.stderr
        elif self.enabled:
            # Opened at start and on each reload (SIGHUP), appended to: a
            # rotation tool renames the file, then signals (or copytruncates).
            fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._stream = open(fd, "a", encoding="utf-8", closefd=True)  # noqa: SIM115
            self._owned = True

    def log(
        self,
        client: str,
        method: bytes,
        target: bytes,
        *,
        route: str | None,
        outcome: str,
        start: float,
    ) -> None:
        if not self.enabled:
            return
        duration = (time.monotonic() - start) * 1000.0
        second = int(time.time())
        if second != self._second:  # strftime once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        request = f"{_clip(method)} {_clip(target)}" if method else "-"
        self._lines.append(
            f'{self._stamp} {client} "{request}" route={route or "-"} {outcome} {duration:.3f}ms\n'
        )
        if len(self._lines) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if not self._lines or self._stream is None:
            return
        lines, self._lines = self._lines, []
        try:
            for data in _batches(lines):
                self._stream.write(data)
                self._stream.flush()
        except OSError:
            pass  # a full disk must not stop the front; lines are dropped

    def close(self) -> None:
        self.flush()
        if self._owned and self._stream is not None:
            self._stream.close()
