"""Request head → route: longest path prefix, optionally per host, sans-IO.

Matching follows nginx prefix ``location`` rules, so routes move over from an
nginx ``fd_pass`` configuration unchanged: the prefix is compared with the
*normalised* path (percent-decoded, dot segments removed, repeated slashes
merged, as nginx does before matching), plainly as a string prefix
(``/events`` also matches ``/events2``; write ``/events/`` for a directory),
and the longest matching prefix wins.  A route may name a host; for a request
to that host its routes compete with the host-less ones, and on a prefix tie
the host's route wins.

Normalising before matching closes a bypass: without it ``/public/../admin``
or ``/%61dmin`` would reach the ``/public`` or ``/`` route while the
receiver, decoding the path, serves ``/admin``.  The raw target still travels
as ``REQUEST_URI``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from .errors import ProtocolError

__all__ = ["Match", "Router", "normalize_path"]

T = TypeVar("T")

_HEX: Final = b"0123456789abcdefABCDEF"


def _percent_decode(path: bytes) -> bytes:
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise ProtocolError(f"malformed percent-encoding in path {path[:64]!r}")
        out.append(bytes((int(part[:2], 16),)))
        out.append(part[2:])
    decoded = b"".join(out)
    if b"\x00" in decoded:
        raise ProtocolError("path contains an encoded NUL byte")
    return decoded


def normalize_path(path: bytes) -> bytes:
    """The path routes are matched against (see the module docstring).

    Raises :class:`ProtocolError` (400) for malformed percent-encoding, an
    encoded NUL, or dot segments that climb above the root.
    """
    if b"%" in path:
        path = _percent_decode(path)
    if b"/." not in path and b"//" not in path:
        return path  # the common case: nothing to do
    segments: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if segment == b"..":
            if not segments:
                raise ProtocolError("path climbs above the root with '..'")
            segments.pop()
        elif segment not in (b".", b""):
            segments.append(segment)
    trailing = path.endswith((b"/", b"/.", b"/.."))
    return b"/" + b"/".join(segments) + (b"/" if trailing and segments else b"")


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    """The chosen route: its prefix and host as configured, and its value."""

    prefix: str
    host: str | None
    value: T


class Router(Generic[T]):
    """Longest-prefix router; built once, read-only afterwards.

    ``entries`` are ``(prefix, host_or_None, value)``.  Prefixes start with
    ``/``; hosts are compared lower-cased, without port.  A (prefix, host)
    pair given twice is a ``ValueError``.
    """

    __slots__ = ("_any_host", "_by_host")

    def __init__(self, entries: Iterable[tuple[str, str | None, T]]) -> None:
        generic: list[tuple[bytes, int, Match[T]]] = []
        specific: dict[bytes, list[tuple[bytes, int, Match[T]]]] = {}
        seen: set[tuple[str, str | None]] = set()
        for prefix, host, value in entries:
            if not prefix.startswith("/"):
                raise ValueError(f"route prefix {prefix!r} does not start with '/'")
            key = (prefix, host.lower() if host else None)
            if key in seen:
                raise ValueError(f"route prefix {prefix!r} given twice for host {host!r}")
            seen.add(key)
            item = (prefix.encode("utf-8"), 0 if host else 1, Match(prefix, host, value))
            if host:
                specific.setdefault(host.lower().encode("ascii"), []).append(item)
            else:
                generic.append(item)
        # Longest prefix first; on equal length the host's own route first.
        order = lambda item: (-len(item[0]), item[1])  # noqa: E731
        self._any_host = [(p, m) for p, _, m in sorted(generic, key=order)]
        self._by_host = {
            host: [(p, m) for p, _, m in sorted(items + generic, key=order)]
            for host, items in specific.items()
        }

    def match(self, path: bytes, host: bytes = b"") -> Match[T] | None:
        """The route for a normalised ``path`` (see :func:`normalize_path`) and host."""
        for prefix, match in self._by_host.get(host, self._any_host):
            if path.startswith(prefix):
                return match
        return None
