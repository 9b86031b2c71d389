"""A WebSocket chat room: every message goes to everyone connected.

Run it::

    fdhandoff serve examples.ws_chat:handler --interface handoff --bind unix:/run/chat.sock

Works with every WebSocket sender: the fdhandoff front (either it forwards
the upgrade request and the receiver answers 101, or it answered 101 itself
and sets ``HANDOFF_UPGRADED``), nginx ``fd_pass`` (the receiver answers the
upgrade), OpenResty (marker ``X``: already upgraded).  A name may be given as
``?name=`` in the URL; otherwise the client's address is used.

No task per member: the handler joins the connection to the room and
returns; messages arrive through ``on_message`` and each broadcast is encoded
once for everyone (``Channel.send``).  An idle member costs about a kilobyte
(docs/receiver.md).  One process has one room; with ``--workers`` each
worker has its own.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fdhandoff.receiver import Channel, Handoff, WebSocket

#: Longest chat message in bytes; a larger one closes that client with 1009.
MAX_MESSAGE = 16 * 1024

#: Longest name kept (characters).
MAX_NAME = 32

room = Channel()


def _name(handoff: Handoff) -> str:
    names = parse_qs(handoff.query_string.decode("latin-1")).get("name")
    if names and names[0].strip():
        return names[0].strip()[:MAX_NAME]
    return f"{handoff.client[0]}:{handoff.client[1]}" if handoff.client else "anonymous"


async def handler(handoff: Handoff) -> None:
    ws = await handoff.websocket(max_message_size=MAX_MESSAGE)
    name = _name(handoff)

    def on_message(ws: WebSocket, message: str | bytes) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        room.send(f"{name}: {message}")

    def on_close(ws: WebSocket) -> None:
        room.send(f"* {name} left")

    room.send(f"* {name} joined")
    room.add(ws)
    ws.on_message = on_message
    ws.on_close = on_close
