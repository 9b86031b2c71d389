"""The exceptions fdhandoff raises.

Errors caused by the *peer* (bytes on the wire, a misbehaving sender) are kept
apart from errors caused by the *caller* (bad arguments, bad config): the
former carry the HTTP status a server should answer with (``status_hint``), so
the front or receiver can reply without guessing, the way h11's
``error_status_hint`` works.

The tree is deliberately small; a class exists only where a caller needs to
catch it separately.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "FdHandoffError",
    "FdPassError",
    "ProtocolError",
]


class FdHandoffError(Exception):
    """Base class of every fdhandoff error."""


class ProtocolError(FdHandoffError, ValueError):
    """The peer sent bytes that break the protocol (SCGI, HTTP, WebSocket).

    ``status_hint`` is the HTTP status to answer the client with, when there is
    still a client to answer (400 unless a more precise one applies: 408, 413,
    414, 431, 505 ...).
    """

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class FdPassError(FdHandoffError, OSError):
    """A message with an attached fd could not be sent or received correctly.

    Raised for truncated control data (``MSG_CTRUNC``), truncated records
    (``MSG_TRUNC``), a message that carries no fd or more than one, an fd that
    is not a socket, or a peer that closed in the middle of a message.  Any fd
    that did arrive has been closed before this is raised.
    """


class BackendUnavailable(FdHandoffError, ConnectionError):
    """The backend daemon cannot take the connection (missing, refusing,
    backlog full, or not reading within the timeout); answer 503."""

    status_hint = 503


class ConfigError(FdHandoffError, ValueError):
    """A configuration file or command-line option is invalid.  The message
    names the key and what is wrong with it."""
