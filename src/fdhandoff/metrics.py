"""Process metrics in the Prometheus text format, and a tiny endpoint serving them.

Counters are plain integers in a dict keyed by (name, labels): incrementing one
costs a dict lookup, nothing per connection.  Gauges are functions read at
scrape time (e.g. the number of live connections), so they are never stale and
cost nothing between scrapes.

The endpoint is deliberately small: ``GET /metrics`` on its own listening
socket (loopback by default), one request per connection, bounded head size and
time.  It is the only HTTP server in the package that is not the front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

from .httphead import http_date

__all__ = ["Metrics", "parse_address", "serve_metrics", "worker_address"]

log = logging.getLogger("fdhandoff.metrics")

#: A scrape request is one short line plus a few headers; anything larger or
#: slower is not Prometheus and is dropped.
MAX_SCRAPE_HEAD: Final = 8 * 1024
SCRAPE_TIMEOUT: Final = 5.0

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Counters and gauges of one process (one worker)."""

    __slots__ = ("_counters", "_gauges", "_help", "_kinds", "_prefix", "started")

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._counters: dict[tuple[str, Labels], int] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._help: dict[str, str] = {}
        self._kinds: dict[str, str] = {}
        self.started = time.time()

    def counter(self, name: str, help_text: str) -> None:
        """Declare a counter so it is listed (at 0) before its first increment."""
        self._help[name] = help_text
        self._kinds[name] = "counter"

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Declare a gauge read by ``read()`` at every scrape."""
        self._help[name] = help_text
        self._kinds[name] = "gauge"
        self._gauges[name] = read

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        # One label (the usual case) needs no sorting: a cheaper key on the
        # front's per-request path.
        items = tuple(labels.items())
        key = (name, items if len(items) < 2 else tuple(sorted(items)))
        self._counters[key] = self._counters.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> int:
        """A counter's current value (0 if never incremented)."""
        return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> bytes:
        """The exposition text (Prometheus text format 0.0.4)."""
        lines: list[str] = []
        for name in sorted(self._kinds):
            full = self._prefix + name
            lines.append(f"# HELP {full} {self._help[name]}")
            lines.append(f"# TYPE {full} {self._kinds[name]}")
            if name in self._gauges:
                lines.append(f"{full} {_number(self._gauges[name]())}")
                continue
            series = [(labels, v) for (n, labels), v in self._counters.items() if n == name]
            if not series:
                lines.append(f"{full} 0")
            for labels, value in sorted(series):
                lines.append(f"{full}{_labels(labels)} {value}")
        lines.append(f"# TYPE {self._prefix}start_time_seconds gauge")
        lines.append(f"{self._prefix}start_time_seconds {self.started:.3f}")
        return ("\n".join(lines) + "\n").encode("utf-8")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + ",".join(escaped) + "}"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); ValueError names the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"metrics address must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ValueError(f"metrics port out of range in {text!r}")
    return host, number


def worker_address(text: str, slot: int) -> str:
    """Worker ``slot``'s metrics address: ``PORT + slot`` (each worker process
    counts its own connections); port 0 stays 0, a port of the kernel's choosing."""
    host, port = parse_address(text)
    if port:
        port += slot
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_OK: Final = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
_NOT_FOUND: Final = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n"
    b"Connection: close\r\nDate: %s\r\n\r\nonly /metrics is here"
)


async def serve_metrics(
    metrics: Metrics, host: str, port: int, *, reuse_port: bool = False
) -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` until the returned server is closed.

    ``reuse_port`` (``SO_REUSEPORT``): a process replacing another one that
    still serves the address while it stops (the front's workers at a reload)
    binds it too, rather than fail.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                if (
                    len(parts) == 3
                    and parts[0] in (b"GET", b"HEAD")
                    and (parts[1] == b"/metrics" or parts[1].startswith(b"/metrics?"))
                ):
                    body = metrics.render()
                    # RFC 9110 §6.6.1: Date on the 2xx and 4xx answers alike.
                    writer.write(
                        _OK
                        + b"Content-Length: %d\r\nConnection: close\r\nDate: %s\r\n\r\n"
                        % (len(body), http_date())
                    )
                    if parts[0] == b"GET":
                        writer.write(body)
                else:
                    writer.write(_NOT_FOUND % http_date())
                await writer.drain()
        except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
            log.debug("metrics request dropped: %s", type(exc).__name__)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(
        handle, host, port, limit=MAX_SCRAPE_HEAD, reuse_port=reuse_port or None
    )
    # The bound port, not the one asked for: with port 0 the kernel chose it.
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics on http://%s:%d/metrics", shown, bound)
    return server
