"""The demo's receiver: one handler serving every demo route.

It runs as ``fdhandoff serve fdhandoff.demo.receivers:handler --interface
handoff`` with three sockets, so one process holds the counters the page shows.
What arrives tells the handler which route it is:

* a PAYLOAD record (Apache format, on the SEQPACKET socket): the auth route
  approved a token stream; the payload is the application's JSON;
* an upgraded WebSocket (``HANDOFF_UPGRADED``): the chat;
* an SCGI handoff for ``/`` or ``/stats``: the page itself, or the live counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Final

from ..message import Format
from ..receiver import Channel, Handoff, SSEStream, WebSocket

log = logging.getLogger("fdhandoff.demo")

#: Pace of the fake model: a token every 60 ms reads like a real LLM answer.
TOKEN_INTERVAL: Final = 0.06
#: Counters are pushed this often to every open page.
STATS_INTERVAL: Final = 1.0
#: Chat messages larger than this are refused with close code 1009.
MAX_CHAT_MESSAGE: Final = 4096
MAX_CHAT_TEXT: Final = 500

ANSWER: Final = (
    "The front read only the request head, then passed the live socket to this daemon "
    "over a UNIX socket with SCM_RIGHTS. It keeps nothing for this connection: no buffer, "
    "no task, no file descriptor. Every token you see was written by the receiver straight "
    "to your TCP connection."
)


@dataclass(slots=True)
class Counters:
    handed_off: int = 0
    streams: int = 0


counters = Counters()
chat = Channel()
stats = Channel()
_stats_task: asyncio.Task[None] | None = None


def _page() -> bytes:
    return resources.files("fdhandoff.demo").joinpath("static/index.html").read_bytes()


def snapshot() -> str:
    return json.dumps(
        {
            "handed_off": counters.handed_off,
            "held": counters.streams + len(chat) + len(stats),
            "streams": counters.streams,
            "chat": len(chat),
        }
    )


async def _push_stats() -> None:
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        if len(stats):
            stats.send(snapshot(), event="stats")


async def handler(handoff: Handoff) -> None:
    global _stats_task  # noqa: PLW0603 - one ticker per process, started on first use
    if _stats_task is None:
        _stats_task = asyncio.get_running_loop().create_task(_push_stats())
    counters.handed_off += 1
    if handoff.format is Format.PAYLOAD:
        await _tokens(handoff)
    elif handoff.upgraded or handoff.path == "/ws/chat":
        await _chat(handoff)
    elif handoff.path == "/stats":
        stream = await handoff.sse(headers=[("Cache-Control", "no-cache")])
        # Join first: the first snapshot then counts the stream it is sent on,
        # as every later one does.
        stats.add(stream)
        stream.send(snapshot(), event="stats")
    elif handoff.path in ("/", "/index.html"):
        await handoff.respond(200, [("Content-Type", "text/html; charset=utf-8")], _page())
    else:
        await handoff.respond(404, [("Content-Type", "text/plain")], b"not found\n")


async def _tokens(handoff: Handoff) -> None:
    try:
        request = json.loads(handoff.payload or b"{}")
        prompt = str(request.get("prompt", ""))
    except (ValueError, AttributeError):
        await handoff.respond(400, [("Content-Type", "text/plain")], b"bad handoff payload\n")
        return
    stream: SSEStream = await handoff.sse(headers=[("Cache-Control", "no-cache")])
    counters.streams += 1
    try:
        words = [f"(you asked: {prompt[:80]!r}) ", *(w + " " for w in ANSWER.split())]
        for word in words:
            await stream.send(json.dumps({"content": word}))
            await asyncio.sleep(TOKEN_INTERVAL)
        await stream.send("[DONE]")
    except ConnectionError:
        log.info("token stream: the client left early")
    finally:
        counters.streams -= 1
        stream.close()


async def _chat(handoff: Handoff) -> None:
    ws: WebSocket = await handoff.websocket(max_message_size=MAX_CHAT_MESSAGE)
    chat.add(ws)

    def on_message(ws: WebSocket, message: str | bytes) -> None:
        try:
            data = json.loads(message)
            line = {"from": str(data["from"])[:40], "text": str(data["text"])[:MAX_CHAT_TEXT]}
        except (ValueError, KeyError, TypeError):
            ws.close(1003, "send JSON with 'from' and 'text'")
            return
        chat.send(json.dumps(line))

    ws.on_message = on_message
