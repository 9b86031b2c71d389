"""WebSocket echo servers for ``fdhandoff serve``, one per receiver API.

* ``handler`` (``--interface handoff``): the native API; ``/cb/...`` echoes
  from an ``on_message`` callback, any other path with ``async for``;
* ``sync_handler`` (``--interface handoff``): the sync flavour, ``for`` in a thread;
* ``app`` (``--interface asgi``): a plain ASGI app, no framework.

Every message comes back as it arrived: text as text, binary as binary.
"""

from __future__ import annotations

from typing import Any

from fdhandoff.receiver import Handoff, WebSocket
from fdhandoff.receiver.sync import Handoff as SyncHandoff


async def handler(handoff: Handoff) -> None:
    ws = await handoff.websocket()
    if handoff.path is not None and handoff.path.startswith("/cb/"):

        def on_message(ws: WebSocket, message: str | bytes) -> None:
            ws.send(message)

        ws.on_message = on_message
        return
    async for message in ws:
        await ws.send(message)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not a WebSocket\n"})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        if event.get("text") is not None:
            await send({"type": "websocket.send", "text": event["text"]})
        else:
            await send({"type": "websocket.send", "bytes": event["bytes"]})


def sync_handler(handoff: SyncHandoff) -> None:
    """The sync flavour: a plain function, in its own thread."""
    ws = handoff.websocket()
    for message in ws:
        ws.send(message)
