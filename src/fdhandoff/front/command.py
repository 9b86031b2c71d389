"""``fdhandoff front`` (run the front) and ``fdhandoff check`` (validate its config)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .config import FrontConfig, load_config, warnings
from .tls import probe_offload, server_context

if TYPE_CHECKING:
    from .server import Front

__all__ = ["register"]

log = logging.getLogger("fdhandoff.front")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="configuration file (TOML)")
    parser.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="listen address: 127.0.0.1:8080, [::1]:8080 or unix:/PATH "
        "(repeatable; replaces the file's [[listen]] tables)",
    )
    parser.add_argument(
        "--route",
        action="append",
        metavar="PREFIX=unix:PATH",
        help="pass-mode route, added to the file's [[route]] tables (repeatable)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes accepting on the listeners (replaces the file's workers)",
    )


def register(subparsers: Any) -> None:
    front: argparse.ArgumentParser = subparsers.add_parser(
        "front",
        help="run the front server (accept, read the head, hand the connection off)",
        description="Accept HTTP/1.1 connections, read the request head, and hand the live "
        "connection to a receiver daemon over a UNIX socket (docs/front.md).",
    )
    _add_config_options(front)
    front.set_defaults(handler=_run_front)
    check: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="validate a front configuration and say exactly what is wrong",
        description="Validate a front configuration: exit 0 if it is valid, 2 with one line "
        "per problem (key path, value, why) if not.",
    )
    _add_config_options(check)
    check.set_defaults(handler=_run_check)


def _load(args: argparse.Namespace) -> FrontConfig:
    if args.config is None and not (args.listen and args.route):
        raise ConfigError("give --config FILE.toml, or both --listen and --route")
    return load_config(args.config, listen=args.listen, routes=args.route, workers=args.workers)


def _run_check(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
        found = warnings(config) + _check_tls(config)
    except ConfigError as exc:
        source = args.config or "command line"
        print(f"{source}: invalid configuration:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        return 2
    for line in found:
        print(f"warning: {line}", file=sys.stderr)
    count = len(config.listen)
    listen = ", ".join(
        address.text + (" (TLS)" if files else "") + (" (PROXY protocol)" if proxy else "")
        for address, files, proxy in zip(
            config.listen,
            config.tls or (None,) * count,
            config.proxy_protocol or (False,) * count,
            strict=False,
        )
    )
    workers = f", {config.workers} workers" if config.workers > 1 else ""
    print(
        f"ok: {len(config.listen)} listener(s) ({listen}), {len(config.routes)} route(s)" + workers
    )
    for route in config.routes:
        where = route.backend or (route.upstream.text if route.upstream else "")
        host = f" host={route.host}" if route.host else ""
        print(f"  {route.prefix}{host} -> {route.mode.value} {where}")
    return 0


def _check_tls(config: FrontConfig) -> list[str]:
    """Load every TLS listener's certificate and key (ConfigError if one cannot
    be); a warning if this machine cannot hand TLS connections off, as the
    front would then refuse to start here (the check may run elsewhere)."""
    found: list[str] = []
    for address, files in zip(config.listen, config.tls, strict=False):
        if files is None:
            continue
        try:
            context = server_context(files)
        except ConfigError as exc:
            raise ConfigError(f"listen {address.text}: {exc}") from None
        if not found and (problem := probe_offload(context)) is not None:
            found.append(f"listen {address.text}: TLS cannot be handed off here: {problem}")
    return found


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop  # noqa: PLC0415  (optional: absent off Linux)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _run_front(args: argparse.Namespace) -> int:
    config = _load(args)
    logging.getLogger("fdhandoff").setLevel(config.log.level.upper())
    from .server import Front  # noqa: PLC0415  (``check`` needs none of the engine)

    workers = config.workers > 1
    front = Front(config, reload=lambda: _load(args), worker=workers)
    # Until the loop handles it (and after): a reload or log-rotation
    # SIGHUP sent while starting must not kill the front (default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    front.open()  # bind before the loop starts: a busy port is exit 2 at once
    if workers:
        return _supervise(front)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(front.serve())


def _supervise(front: Front) -> int:
    """``workers = N``: N processes serve ``front``'s listeners, this one supervises.

    The listeners are bound here, once, so every worker accepts on the same
    sockets, and a worker restarted after a crash finds its backlog intact.
    A reload (SIGHUP) is applied to ``front`` here, all or nothing as in one
    process; the new workers are forked from it, then the old ones finish
    what they were doing (``timeouts.shutdown``).
    """
    from ..supervisor import Generation, supervise  # noqa: PLC0415

    def worker(slot: int) -> int:
        front.as_worker(slot)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(front.serve())

    def reload() -> Generation | None:
        if not front.reload_config():
            return None
        return front.config.workers, worker, front.config.timeouts.shutdown

    try:
        return supervise(
            front.config.workers,
            worker,
            front.config.timeouts.shutdown,
            front.close_listeners,
            reload=reload,
            logger=log,
        )
    finally:
        # Every worker is gone: the socket files and passed sockets go too.
        front.close_listeners()
        front.access.close()
