"""The ASGI ``lifespan`` protocol: the app's startup before any request, its shutdown at exit.

The app runs once with a ``lifespan`` scope in a task of its own; it
receives ``lifespan.startup``, answers ``lifespan.startup.complete`` (or
``.failed``), and later receives ``lifespan.shutdown``.  ``scope["state"]``
is the dict the app may fill at startup; every request scope gets a shallow
copy of it (ASGI lifespan spec 2.0, "Lifespan State").

Apps that do not speak the protocol raise on the unknown scope type or
return at once; that is not an error (uvicorn's ``--lifespan auto``): the
adapter logs it at debug level and serves without it.  An app that reports
``lifespan.startup.failed`` is not served.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum
from typing import Any

from ..errors import ConfigError
from .asgi_scope import ASGI_LIFESPAN

__all__ = ["Lifespan"]

log = logging.getLogger("fdhandoff.receiver.asgi")


class _Stage(Enum):
    NEW = 1
    STARTING = 2
    RUNNING = 3  # startup complete (or the app has no lifespan): serving
    UNSUPPORTED = 4  # the app does not speak lifespan: serving without it
    FAILED = 5  # startup failed: not serving
    STOPPED = 6


class Lifespan:
    """Drives one app's lifespan; ``state`` is the dict request scopes copy."""

    __slots__ = (
        "_app",
        "_asked",
        "_failure",
        "_replied",
        "_shutdown",
        "_stage",
        "_task",
        "state",
    )

    def __init__(self, app: Any) -> None:
        self._app = app
        self.state: dict[str, Any] = {}
        self._stage = _Stage.NEW
        self._task: asyncio.Task[None] | None = None
        # Resolved by the app's answer to the startup (or its end).
        self._replied: asyncio.Future[str] | None = None
        # Resolved when shutdown is asked for: the app's second receive() waits on it.
        self._shutdown: asyncio.Future[None] | None = None
        self._failure = ""
        self._asked = False  # lifespan.startup delivered

    @property
    def started(self) -> bool:
        """True once startup was attempted and ended (whatever the outcome)."""
        return self._stage not in (_Stage.NEW, _Stage.STARTING)

    @property
    def starting(self) -> bool:
        """True while the app's startup is running."""
        return self._stage is _Stage.STARTING

    @property
    def failed(self) -> bool:
        return self._stage is _Stage.FAILED

    async def startup(self) -> None:
        """Run the app's startup; raises :class:`ConfigError` if the app reports failure."""
        if self._stage is not _Stage.NEW:
            raise RuntimeError("lifespan startup already ran")
        loop = asyncio.get_running_loop()
        self._stage = _Stage.STARTING
        self._replied = loop.create_future()
        self._shutdown = loop.create_future()
        self._task = loop.create_task(self._main(), name="asgi-lifespan")
        await asyncio.shield(self._replied)
        if self._stage is _Stage.RUNNING:
            log.info("application startup complete")
        elif self._stage is _Stage.FAILED:
            raise ConfigError(f"the application's startup failed: {self._failure}")

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the app to shut down and wait for it, at most ``timeout`` seconds.

        Call it once the last connection ended: the app may close what the
        requests were using.
        """
        task = self._task
        if self._stage is not _Stage.RUNNING or task is None:
            self._stage = _Stage.STOPPED
            return
        self._stage = _Stage.STOPPED
        assert self._shutdown is not None
        self._shutdown.set_result(None)
        await asyncio.wait([task], timeout=timeout)
        if not task.done():
            log.error("the application's shutdown did not end within %.1f s", timeout or 0)
            task.cancel()
            await asyncio.wait([task])

    # --- the app's side ------------------------------------------------------------------

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_LIFESPAN, "state": self.state}
        try:
            await self._app(scope, self._receive, self._send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._stage is _Stage.STARTING:
                log.debug(
                    "the app does not support the lifespan protocol (%r): serving without it", exc
                )
            else:
                log.error("exception in the app's lifespan", exc_info=exc)
        if self._stage is _Stage.STARTING:  # returned or raised without answering
            self._stage = _Stage.UNSUPPORTED
        self._reply("returned")

    async def _receive(self) -> dict[str, Any]:
        if not self._asked:
            self._asked = True
            return {"type": "lifespan.startup"}
        shutdown = self._shutdown
        assert shutdown is not None
        if not shutdown.done():
            try:
                await shutdown
            except asyncio.CancelledError:
                # The event loop is being torn down with this task still
                # waiting (nobody called shutdown()): treat it as the shutdown
                # so the app's cleanup still runs.
                task = asyncio.current_task()
                if task is None or task.uncancel() > 0 or self._stage is _Stage.STOPPED:
                    raise
                self._stage = _Stage.STOPPED
                log.info("event loop closing: running the application's shutdown")
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind not in (
            "lifespan.startup.complete",
            "lifespan.startup.failed",
            "lifespan.shutdown.complete",
            "lifespan.shutdown.failed",
        ):
            raise RuntimeError(f"unexpected lifespan message {kind!r}")
        if kind.endswith(".failed"):
            self._failure = str(message.get("message", ""))
        if kind == "lifespan.shutdown.failed":
            log.error("application shutdown failed: %s", self._failure)
        elif kind == "lifespan.shutdown.complete":
            log.info("application shutdown complete")
        if self._stage is _Stage.STARTING:
            # Decided here, not when startup() resumes: Starlette calls
            # receive() again right after sending this.
            complete = kind == "lifespan.startup.complete"
            self._stage = _Stage.RUNNING if complete else _Stage.FAILED
        self._reply(kind)

    def _reply(self, answer: str) -> None:
        replied = self._replied
        if replied is not None and not replied.done():
            replied.set_result(answer)
