"""The demo's application: decides whether a client may have a token stream.

It plays the part of the PHP handler in Apache's mod_socket_handoff pattern:
it sees the request (forwarded by the front's auth route), checks the demo
token, and either answers ``401`` itself or answers with ``X-Socket-Handoff``
naming the streamer's socket and ``X-Handoff-Data`` carrying what the streamer
needs, as one line of JSON.  The front then hands the client socket over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("fdhandoff.demo.app")

DEMO_TOKEN: Final = "demo-token"  # noqa: S105 - a public demo value, printed on start
#: Bounds for the demo app's own reading: a head larger than this, or slower
#: than this, is answered 431 / dropped; the app has no reason to wait longer.
MAX_HEAD: Final = 16 * 1024
HEAD_TIMEOUT: Final = 5.0
MAX_PROMPT: Final = 500


@dataclass(frozen=True, slots=True)
class AuthApp:
    """Answers ``GET /llm/stream?token=...&prompt=...`` forwarded by the front."""

    streamer_socket: str
    token: str = DEMO_TOKEN

    def answer(self, method: str, target: str) -> bytes:
        url = urlsplit(target)
        query = parse_qs(url.query)
        if method != "GET" or url.path != "/llm/stream":
            return _response(404, b"not found\n")
        if query.get("token", [""])[0] != self.token:
            log.info("refused %s: bad token", url.path)
            return _response(401, b"bad or missing token\n")
        prompt = query.get("prompt", [""])[0][:MAX_PROMPT]
        payload = json.dumps(
            {"user_id": 1, "prompt": prompt, "uri": target, "method": method},
            separators=(",", ":"),
        )
        return _response(
            200,
            b"",
            [("X-Socket-Handoff", self.streamer_socket), ("X-Handoff-Data", payload)],
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("dropped a request: %s", type(exc).__name__)
            writer.close()
            return
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            reply = _response(400, b"malformed request line\n")
        else:
            reply = self.answer(parts[0].decode("latin-1"), parts[1].decode("latin-1"))
        writer.write(reply)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def serve_unix(self, path: str) -> asyncio.Server:
        return await asyncio.start_unix_server(self.handle, path, limit=MAX_HEAD)


_REASONS: Final = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}


def _response(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8") + body
