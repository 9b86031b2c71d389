"""WebSocket connections (placeholder until the frame codec is available)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .handoff import Handoff


class WebSocket:
    pass


async def accept(handoff: Handoff, *args: Any) -> WebSocket:
    raise NotImplementedError("WebSocket support is not available yet")
