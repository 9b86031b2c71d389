"""WebSocket (RFC 6455) for the receiver: opening handshake and frame codec, sans-IO.

The handshake functions live in :mod:`fdhandoff.websocket_handshake` and are
re-exported here, so callers import everything WebSocket from this module.
"""

from __future__ import annotations

from .websocket_handshake import (
    GUID,
    SUPPORTED_VERSION,
    accept_key,
    check_upgrade,
    error_headers,
    error_response,
    handshake_response,
    is_token,
    parse_subprotocols,
    wants_websocket,
)

__all__ = [
    "GUID",
    "SUPPORTED_VERSION",
    "accept_key",
    "check_upgrade",
    "error_headers",
    "error_response",
    "handshake_response",
    "is_token",
    "parse_subprotocols",
    "wants_websocket",
]
