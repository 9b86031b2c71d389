"""Receiver settings: limits and timeouts as named constants, and one frozen options object.

Every default is listed with its reason in docs/security.md (section "Receiver").
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from dataclasses import dataclass
from typing import Final

from .. import scgi
from ..fdpass import peer_credentials
from ..httphead import DEFAULT_LIMITS, HeadLimits
from ..message import HandoffRecord

log = logging.getLogger("fdhandoff.receiver")

__all__ = [
    "ACCEPT_BACKOFF",
    "BODY_TIMEOUT",
    "DEFAULT_GRACE",
    "HANDOFF_TIMEOUT",
    "KEEPALIVE_TIMEOUT",
    "LINGER_TIMEOUT",
    "MAX_BODY_SIZE",
    "MAX_SECONDS",
    "MAX_STREAM_BUFFER",
    "MAX_WS_MESSAGE_SIZE",
    "WRITE_TIMEOUT",
    "Options",
]

#: Longest wait for one complete handoff on a new UNIX connection.  A sender
#: writes its handoff in one sendmsg right after connect, so anything slower is
#: a stuck or hostile peer; the fdhandoff front itself gives up after ~1 s.
HANDOFF_TIMEOUT: Final = 5.0

#: Pause after EMFILE/ENFILE at accept or recvmsg before accepting again: long
#: enough for streams to end and free fds, short enough that a burst costs
#: senders little (trio's serve_listeners uses the same 100 ms).
ACCEPT_BACKOFF: Final = 0.1

#: Longest wait for the next bytes of a request body.  RFC 9112 sets no value;
#: 30 s is a common server default (uvicorn, hypercorn) and bounds a client that
#: announces a body it never sends (nginx fd_pass swallows bodies, for one).
BODY_TIMEOUT: Final = 30.0

#: Largest request body read into memory by ``read_body()`` (413 above).
MAX_BODY_SIZE: Final = 16 * 1024 * 1024

#: Longest time a client may keep its receive window closed while a response
#: waits to be written.  Slow readers are fine; a client that reads nothing for
#: this long is gone or hostile.
WRITE_TIMEOUT: Final = 60.0

#: Bytes a non-blocking stream (SSE, WebSocket) may queue in user space while
#: the kernel send buffer is full.  Above it the stream is closed as a slow
#: consumer: one stalled client must not grow the process without bound.
MAX_STREAM_BUFFER: Final = 1024 * 1024

#: Largest WebSocket message (after reassembly of fragments); larger ones end
#: the connection with close code 1009 (RFC 6455 section 7.4.1).  The bound
#: the receiver already puts on a request body read into memory
#: (MAX_BODY_SIZE), and uvicorn's --ws-max-size: an app moved from uvicorn
#: takes the same messages.  The codec's own default (websocket.py) is 1 MiB.
MAX_WS_MESSAGE_SIZE: Final = 16 * 1024 * 1024

#: After a complete response the receiver half-closes and reads what the client
#: still sends (an unread body, a pipelined request) for at most this long
#: before closing, so the kernel does not answer unread bytes with a RST that
#: destroys the response in flight (RFC 9112 section 9.6, "lingering close").
LINGER_TIMEOUT: Final = 2.0

#: Default time live streams get to finish after SIGTERM before they are closed.
DEFAULT_GRACE: Final = 10.0

#: Longest wait for the next request on a kept-alive ASGI connection; then it
#: is closed quietly.  uvicorn's and Apache's default (nginx: 75 s).  Idle
#: connections cost a task each, so the wait is short.
KEEPALIVE_TIMEOUT: Final = 5.0

#: Longest any timeout may be set to: a day, as the front's ``[timeouts]``.
#: Larger, ``inf`` and NaN are refused rather than read as "never".
MAX_SECONDS: Final = 86400.0


@dataclass(frozen=True, slots=True)
class Options:
    """What one receiver process enforces.  Built by the CLI or by the caller."""

    handoff_timeout: float = HANDOFF_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_body_size: int = MAX_BODY_SIZE
    write_timeout: float = WRITE_TIMEOUT
    max_stream_buffer: int = MAX_STREAM_BUFFER
    max_ws_message_size: int = MAX_WS_MESSAGE_SIZE
    linger_timeout: float = LINGER_TIMEOUT
    grace: float = DEFAULT_GRACE
    #: Handoffs allowed only from these sender uids / gids (SO_PEERCRED);
    #: both empty means any sender that can connect to the socket.
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    #: Live connections at most; 0 means no limit but the fd limit.
    max_connections: int = 0
    #: One access-log line per connection (logger ``fdhandoff.access``).
    access_log: bool = True
    #: ``HOST:PORT`` serving ``GET /metrics`` (Prometheus text); None = off.
    #: With several workers, worker *i* listens on PORT + *i*.
    metrics: str | None = None
    #: Keep channels offered by the front (HANDOFF_CHANNEL).  Off in the
    #: workers of ``--workers N``: a channel belongs to the worker that
    #: accepted it, so channels would pin a front's handoffs to a few
    #: workers; a new connection per handoff lets the kernel spread them.
    channels: bool = True
    #: Kept-alive ASGI connections: the wait for a next request (0: one
    #: request per handoff), and the limits on its head.  Those requests
    #: never pass the front, so the receiver applies the front's head limits
    #: (same defaults, same ranges) itself.
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    head_limits: HeadLimits = DEFAULT_LIMITS

    def replace(self, **changes: object) -> Options:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def sender_allowed(conn: socket.socket, options: Options) -> bool:
    """Whether the process at the other end of ``conn`` may hand connections in.

    ``--allow-uid`` / ``--allow-gid`` against ``SO_PEERCRED`` (unix(7)); both
    empty means any process that can connect to the socket file.  A refusal
    is logged with the sender's pid, uid and gid.  Shared by the asyncio and
    sync engines.
    """
    uids, gids = options.allow_uids, options.allow_gids
    if not uids and not gids:
        return True
    try:
        cred = peer_credentials(conn)
    except OSError as exc:
        log.warning("refused handoff connection: SO_PEERCRED failed: %s", exc)
        return False
    if cred.uid in uids or cred.gid in gids:
        return True
    log.warning(
        "refused handoff connection from pid %d uid %d gid %d "
        "(not in --allow-uid/--allow-gid); its client connection is closed",
        cred.pid,
        cred.uid,
        cred.gid,
    )
    return False


def drop_abandoned(record: HandoffRecord, client: socket.socket) -> None:
    """Close the client of a handoff its sender gave up on (``record.abandoned``).

    The fdhandoff front closes the connection when handoffs stay unread for
    ``timeouts.handoff`` and answers their clients ``503`` itself: running the
    request now would answer it twice and apply what the client was told
    failed (a retried POST would run twice).  Shared by the asyncio and sync
    engines.
    """
    method = scgi.header_value(record.headers, b"REQUEST_METHOD") or b"-"
    uri = scgi.header_value(record.headers, b"REQUEST_URI") or b"-"
    log.warning(
        "handoff of %s %s read after its sender closed the connection: not run (the "
        "fdhandoff front gives up on handoffs left unread for timeouts.handoff and answers "
        "their clients 503); this receiver was blocked or overloaded for that long",
        method.decode("latin-1"),
        uri[:200].decode("latin-1"),
    )
    client.close()
