"""A plain Starlette app, unchanged, served on handed-off connections.

Nothing here knows about fdhandoff except one optional look at
``scope["extensions"]["fdhandoff"]`` in ``/info``.  Run it behind the front::

    fdhandoff serve examples.starlette_app:app --bind unix:/run/app/app.sock
    fdhandoff front --listen 127.0.0.1:8080 --route /=unix:/run/app/app.sock

Routes: ``/`` text, ``/info`` the request as JSON, ``POST /echo`` the body
back, ``/stream`` a streamed body, ``/sse`` Server-Sent Events (a
``StreamingResponse``), ``/ws/echo`` and ``/ws/chat`` WebSockets.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

#: Members of the chat room (one process; several workers have one room each).
ROOM: set[WebSocket] = set()


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    # What startup prepares (a DB pool, a model...) reaches every request
    # through request.state: the lifespan state is copied into each scope.
    yield {"started_pid": os.getpid()}


async def home(request: Request) -> Response:
    return PlainTextResponse("hello from starlette\n")


async def info(request: Request) -> Response:
    extension = request.scope.get("extensions", {}).get("fdhandoff", {})
    return JSONResponse(
        {
            "method": request.method,
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.scope["raw_path"].decode("latin-1"),
            "query": request.url.query,
            "headers": [[k, v] for k, v in request.headers.items()],
            "client": list(request.client) if request.client else None,
            "handoff_format": extension.get("format"),
            "handoff_route": extension.get("route"),
            "started_pid": request.state.started_pid,
        }
    )


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, media_type=request.headers.get("content-type", "text/plain"))


async def stream(request: Request) -> Response:
    count = int(request.query_params.get("n", "5"))

    async def lines() -> AsyncIterator[str]:
        for i in range(count):
            yield f"line {i}\n"
            await asyncio.sleep(0.01)

    return StreamingResponse(lines(), media_type="text/plain")


async def sse(request: Request) -> Response:
    """``n`` events (0: endless) ``interval`` seconds apart."""
    count = int(request.query_params.get("n", "10"))
    interval = float(request.query_params.get("interval", "0.05"))

    async def events() -> AsyncIterator[str]:
        yield "retry: 1000\n\n"
        i = 0
        while count == 0 or i < count:
            yield f"id: {i}\ndata: {json.dumps({'token': i})}\n\n"
            i += 1
            await asyncio.sleep(interval)
        yield "event: done\ndata: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def ws_echo(websocket: WebSocket) -> None:
    offered = websocket.scope["subprotocols"]
    await websocket.accept(subprotocol="echo" if "echo" in offered else None)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


async def ws_chat(websocket: WebSocket) -> None:
    await websocket.accept()
    ROOM.add(websocket)
    try:
        async for text in websocket.iter_text():
            for member in list(ROOM):
                try:
                    await member.send_text(text)
                except (WebSocketDisconnect, RuntimeError, OSError):
                    ROOM.discard(member)
    finally:
        ROOM.discard(websocket)


app = Starlette(
    routes=[
        Route("/", home),
        Route("/info", info),
        Route("/echo", echo, methods=["POST"]),
        Route("/stream", stream),
        Route("/sse", sse),
        WebSocketRoute("/ws/echo", ws_echo),
        WebSocketRoute("/ws/chat", ws_chat),
    ],
    lifespan=lifespan,
)
