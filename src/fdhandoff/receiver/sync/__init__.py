"""The sync flavour: the same names as the asyncio API, one thread per connection.

For simple daemons that would rather write plain blocking code::

    def handler(handoff):            # fdhandoff serve app:handler --interface handoff
        stream = handoff.sse()
        for token in generate(handoff.payload):
            stream.send(token)
        stream.close()

``Handoff``, ``SSEStream``, ``WebSocket``, ``Channel``, ``ResponseWriter`` and
``ConnectionClosed`` behave like their asyncio namesakes, except that every
call blocks until done and the handler keeps its thread for as long as it
keeps the connection.  Each connection costs a thread (~8 KiB of Python and
a reserved stack), so this flavour is for tens or hundreds of connections;
hubs of thousands of idle streams belong on the asyncio flavour.

Writes use the socket's own timeout (``write_timeout``): ``sendall`` then
handles partial writes and ``EAGAIN`` by polling, and a client that reads
nothing for that long is dropped.  The request description, response framing
and body rules are shared with the asyncio flavour
(:class:`~fdhandoff.receiver.answer.HandoffBase`).  At the open-files limit
accepting backs off like the asyncio engine; unlike it, a handoff read at the
very limit can lose its client (the spare-fd trick needs the single thread of
an event loop).
"""


from __future__ import annotations

from ..stream import ConnectionClosed
from .engine import DEFAULT_MAX_THREADS, Handler, Receiver, serve
from .handoff import Handoff, ResponseWriter
from .streams import Channel, SSEStream, WebSocket

__all__ = [
    "DEFAULT_MAX_THREADS",
    "Channel",
    "ConnectionClosed",
    "Handler",
    "Handoff",
    "Receiver",
    "ResponseWriter",
    "SSEStream",
    "WebSocket",
    "serve",
]
