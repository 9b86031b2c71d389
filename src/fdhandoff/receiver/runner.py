"""Running a receiver process: load the target, bind, pick the flavour, serve.

Shared by ``fdhandoff serve`` and by programs that start a receiver
themselves (:func:`run`).  The flavour follows the handler: a coroutine
function runs on the asyncio engine (uvloop when available), a plain function
on the thread-per-connection sync engine.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from .. import systemd
from ..errors import ConfigError
from ..metrics import worker_address
from ..supervisor import supervise
from . import engine
from .listeners import DEFAULT_SOCKET_MODE, Bind, Listener, close_listener, open_listener
from .options import Options

__all__ = ["load_target", "new_event_loop", "run"]

log = logging.getLogger("fdhandoff.receiver")

LOOPS = ("auto", "asyncio", "uvloop")


def load_target(spec: str) -> Any:
    """Import ``module:attr`` (dotted attr allowed) from the current directory too."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"target {spec!r}: expected module:attribute")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # like uvicorn: the app next to the command
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"target {spec!r}: cannot import {module_name}: {exc}") from exc
        raise
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"target {spec!r}: {module_name} has no attribute {attr}") from None
    return target


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """uvloop when asked for or available (``auto``), else asyncio's loop."""
    if kind not in LOOPS:
        raise ConfigError(f"--loop {kind!r}: expected one of {', '.join(LOOPS)}")
    if kind != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional at run time
        except ImportError:
            if kind == "uvloop":
                raise ConfigError("--loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def is_async_handler(handler: Callable[..., Any]) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 - objects with async __call__
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def serve_listeners(
    handler: Callable[..., Any],
    listeners: Sequence[Listener],
    options: Options,
    loop: str = "auto",
) -> int:
    """Serve on already-bound listeners in this process until stopped.

    The service manager hears ``READY=1`` once handoffs are taken (after an
    ASGI app's lifespan startup); in a worker of ``--workers`` nothing is
    sent, the supervisor speaks for all (a worker has no ``NOTIFY_SOCKET``).
    """
    socks = [listener.sock for listener in listeners]
    status = "STATUS=taking handoffs on " + ", ".join(str(item.bind) for item in listeners)

    def ready(_: engine.Receiver) -> None:
        systemd.notify("READY=1", status)

    if is_async_handler(handler):
        with asyncio.Runner(loop_factory=lambda: new_event_loop(loop)) as runner:
            runner.run(engine.serve(handler, socks, options, ready=ready))
        return 0
    # Threads only when asked for.
    sync = importlib.import_module(f"{__package__}.sync")
    systemd.notify("READY=1", status)
    sync.serve(handler, socks, options)
    return 0


def run(
    handler: Callable[..., Any],
    binds: Sequence[Bind | str],
    options: Options | None = None,
    *,
    workers: int = 1,
    loop: str = "auto",
    socket_mode: int = DEFAULT_SOCKET_MODE,
    socket_group: str | None = None,
) -> int:
    """Bind, serve (in ``workers`` processes), remove the socket files on exit."""
    options = options if options is not None else Options()
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if not binds:
        raise ConfigError("give at least one --bind")
    listeners: list[Listener] = []
    previous = _exit_on_sigterm()
    inherited = systemd.Inherited()
    try:
        inherited = systemd.Inherited.from_environ()
        for bind in binds:
            spec = bind if isinstance(bind, Bind) else Bind.parse(bind)
            listeners.append(
                open_listener(spec, mode=socket_mode, group=socket_group, inherited=inherited)
            )
        if inherited.unclaimed():
            # systemd would queue handoffs there that no worker ever takes.
            raise ConfigError(
                f"socket activation passed {', '.join(inherited.unclaimed())}, which no "
                "--bind names: add a --bind for it or remove it from the .socket unit"
            )
        log.info(
            "receiver listening on %s (%d worker%s)",
            ", ".join(str(listener.bind) for listener in listeners),
            workers,
            "s" if workers > 1 else "",
        )
        if workers == 1:
            return serve_listeners(handler, listeners, options, loop)

        def worker(slot: int) -> int:
            return serve_listeners(handler, listeners, _for_worker(options, slot), loop)

        def stop_listening() -> None:
            for listener in listeners:
                close_listener(listener)

        return supervise(workers, worker, options.grace, stop_listening)
    except _Terminated:
        log.info("SIGTERM before the receiver was serving: stopped")
        return 0
    finally:
        # A second SIGTERM or a SIGINT now would interrupt the removal half-way
        # and leave socket files behind: held until the files are gone, then
        # it acts as it would have (signal(7): a blocked signal stays pending).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for listener in listeners:
                close_listener(listener)
            inherited.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


_STOP_SIGNALS: Final = {signal.SIGTERM, signal.SIGINT}


class _Terminated(KeyboardInterrupt):
    """SIGTERM before the engine serves.  A KeyboardInterrupt, because asyncio
    (and uvloop) let that out of every task and callback, as for Ctrl-C,
    instead of logging it and carrying on."""


def _exit_on_sigterm() -> signal.Handlers | Callable[..., Any] | int | None:
    """Make a SIGTERM before the engine installs its own handler a clean stop.

    Between binding and the event loop's handler (loading the loop, an ASGI
    lifespan startup) the default action would kill the process and leave its
    socket files behind; a supervisor dying then (PR_SET_PDEATHSIG) does just
    that.  :class:`_Terminated` unwinds through ``run``'s ``finally``, which
    removes them.  Only the main thread can set a handler: elsewhere the
    caller owns signals.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, _frame: object) -> None:
        raise _Terminated

    return signal.signal(signal.SIGTERM, stop)


def _for_worker(options: Options, slot: int) -> Options:
    """Worker ``slot``'s options: its own metrics port (PORT + slot), and no
    channels (see :attr:`Options.channels`)."""
    options = options.replace(channels=False)
    if not options.metrics:
        return options
    return options.replace(metrics=worker_address(options.metrics, slot))
