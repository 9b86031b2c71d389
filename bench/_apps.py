"""The applications the stack benchmarks serve: one hub, written twice.

* :func:`handler` runs in ``fdhandoff serve --interface handoff``: ``GET /events``
  becomes an SSE stream and ``GET /ws`` a WebSocket (already upgraded by the
  front's websocket route), each added to a :class:`fdhandoff.receiver.Channel`
  and left without a task; ``GET /publish?kind=sse|ws&seq=N`` broadcasts one
  message with ``Channel.send``.
* :func:`starlette_app` is the same hub as people usually build it on uvicorn:
  Starlette, ``sse-starlette``'s ``EventSourceResponse`` fed by one
  ``asyncio.Queue`` per subscriber, and a set of Starlette ``WebSocket``
  objects broadcast to with ``await websocket.send_text()`` in a loop (the
  "connection manager" of the FastAPI documentation).

Both take the publish time with :func:`time.monotonic` (``CLOCK_MONOTONIC``,
one clock for every process on Linux) right before the first subscriber is
written to, print it, and return it as JSON: ``{"t": ..., "sent": ...,
"send_s": ...}``.  The message is ``bcast <seq> `` padded to
:data:`MESSAGE_SIZE` bytes so subscribers can tell the messages apart.

Only the standard library is imported at module level: the fdhandoff
receiver must not pay for Starlette in its memory figures, and uvicorn loads
Starlette through the factory.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import parse_qs

#: Bytes of every broadcast message: a short chat line or token batch.
MESSAGE_SIZE = 64


def message(seq: int) -> str:
    head = f"bcast {seq} "
    return head + "x" * max(0, MESSAGE_SIZE - len(head))


def _publish_args(query: str | bytes) -> tuple[str, int]:
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    args = parse_qs(query)
    return args.get("kind", ["sse"])[0], int(args.get("seq", ["0"])[0])


def _report(kind: str, seq: int, t: float, sent: int, send_s: float) -> bytes:
    print(f"PUBLISH kind={kind} seq={seq} t={t:.6f} sent={sent}", file=sys.stderr, flush=True)
    return json.dumps({"t": t, "sent": sent, "send_s": send_s}).encode()


# --- fdhandoff: native streams in channels ----------------------------------------------------

_channels: dict[str, Any] = {}


def _channel(kind: str) -> Any:
    channel = _channels.get(kind)
    if channel is None:
        from fdhandoff.receiver import Channel  # noqa: PLC0415 - only in the receiver

        channel = _channels[kind] = Channel()
    return channel


async def handler(handoff: Any) -> None:
    if handoff.upgraded or handoff.path == "/ws":
        _channel("ws").add(await handoff.websocket())
        return
    if handoff.path == "/events":
        _channel("sse").add(await handoff.sse())
        return
    if handoff.path == "/publish":
        kind, seq = _publish_args(handoff.query_string)
        channel = _channel(kind)
        t = time.monotonic()
        sent = channel.send(message(seq))
        body = _report(kind, seq, t, sent, time.monotonic() - t)
        await handoff.respond(200, [("content-type", "application/json")], body)
        return
    await handoff.respond(404, [("content-type", "text/plain")], b"not found\n")


# --- Starlette + sse-starlette + websockets under uvicorn -------------------------------------


def starlette_app() -> Any:
    """The factory uvicorn calls (``--factory _apps:starlette_app``)."""
    import asyncio  # noqa: PLC0415

    from sse_starlette.sse import EventSourceResponse  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import Response  # noqa: PLC0415
    from starlette.routing import Route, WebSocketRoute  # noqa: PLC0415
    from starlette.websockets import WebSocket, WebSocketDisconnect  # noqa: PLC0415

    queues: set[asyncio.Queue[str]] = set()
    sockets: set[WebSocket] = set()

    async def events(request: Request) -> Response:
        queue: asyncio.Queue[str] = asyncio.Queue()
        queues.add(queue)

        async def stream() -> Any:
            try:
                while True:
                    yield {"data": await queue.get()}
            finally:
                queues.discard(queue)

        return EventSourceResponse(stream())

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        sockets.add(websocket)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            sockets.discard(websocket)

    async def publish(request: Request) -> Response:
        kind, seq = _publish_args(request.url.query)
        text = message(seq)
        t = time.monotonic()
        if kind == "ws":
            sent = 0
            for websocket in list(sockets):
                try:
                    await websocket.send_text(text)
                    sent += 1
                except Exception:  # a subscriber that left: starlette raises several kinds
                    sockets.discard(websocket)
        else:
            for queue in queues:
                queue.put_nowait(text)
            sent = len(queues)
        body = _report(kind, seq, t, sent, time.monotonic() - t)
        return Response(body, media_type="application/json")

    return Starlette(
        routes=[
            Route("/events", events),
            Route("/publish", publish),
            WebSocketRoute("/ws", ws),
        ]
    )
