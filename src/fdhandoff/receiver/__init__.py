"""The receiver role: take handed-off client connections and serve them.

asyncio flavour (this package); the sync flavour with the same names is
:mod:`fdhandoff.receiver.sync`.  See docs/receiver.md.
"""

from __future__ import annotations

from .engine import Handler, Receiver, serve
from .handoff import Handoff, Phase, ResponseWriter, SSEStream
from .listeners import Bind
from .options import Options
from .request import HandoffInfo
from .runner import run
from .stream import Channel, ConnectionClosed, Stream
from .ws import WebSocket

__all__ = [
    "Bind",
    "Channel",
    "ConnectionClosed",
    "Handler",
    "Handoff",
    "HandoffInfo",
    "Options",
    "Phase",
    "Receiver",
    "ResponseWriter",
    "SSEStream",
    "Stream",
    "WebSocket",
    "run",
    "serve",
]
