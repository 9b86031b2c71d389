"""A plain FastAPI app, unchanged, served on handed-off connections.

Run it behind the front (or nginx ``fd_pass``)::

    fdhandoff serve examples.fastapi_app:app --bind unix:/run/app/app.sock
    fdhandoff front --listen 127.0.0.1:8080 --route /=unix:/run/app/app.sock

Routes: ``GET /items/{item_id}``, ``POST /items`` (a validated JSON body),
``GET /tokens`` (an LLM-style token stream as Server-Sent Events), ``GET /boom``
(an unhandled error: the client gets a 500), ``WS /ws`` (echo).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

#: Filled at startup, emptied at shutdown: shows the lifespan ran.
CATALOG: dict[int, str] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    CATALOG.update({1: "hammer", 2: "saw"})
    yield
    CATALOG.clear()


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float


@app.get("/items/{item_id}")
async def read_item(item_id: int, q: str | None = None) -> dict[str, object]:
    return {"item_id": item_id, "name": CATALOG.get(item_id), "q": q}


@app.post("/items")
async def create_item(item: Item) -> dict[str, object]:
    return {"name": item.name, "price": item.price, "created": True}


@app.get("/tokens")
async def tokens(request: Request, n: int = 20) -> StreamingResponse:
    async def generate() -> AsyncIterator[str]:
        for i in range(n):
            yield f"data: {json.dumps({'token': f'tok{i}'})}\n\n"
            await asyncio.sleep(0.01)
        yield "data: [DONE]\n\n"

    return StreamingResponse(generate(), media_type="text/event-stream")


@app.get("/boom")
async def boom() -> dict[str, object]:
    raise RuntimeError("deliberate failure")


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text("echo: " + await websocket.receive_text())
    except WebSocketDisconnect:
        pass
