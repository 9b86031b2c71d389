"""``fdhandoff serve TARGET --bind unix:PATH``: run a receiver daemon."""

from __future__ import annotations

import argparse
import grp
import importlib
import pwd
from collections.abc import Callable
from typing import Any, Final

from ..errors import ConfigError
from ..httphead import MAX_HEAD_SIZE, MAX_HEADERS, MAX_URI_LENGTH, HeadLimits
from ..metrics import parse_address
from . import options as limits
from .listeners import DEFAULT_SOCKET_MODE, Bind
from .options import MAX_SECONDS, Options
from .runner import LOOPS, load_target, run

__all__ = ["register"]

INTERFACES = ("asgi", "handoff")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run a receiver daemon that takes handed-off client connections",
        description=(
            "Take client connections handed over on UNIX sockets (fdhandoff front, nginx "
            "fd_pass or scgi_pass, Apache mod_socket_handoff / mod_proxy_fdpass / "
            "mod_proxy_scgi, OpenResty) and serve them with TARGET."
        ),
    )
    parser.add_argument("target", metavar="TARGET", help="module:attribute, e.g. app:handler")
    parser.add_argument(
        "--bind",
        action="append",
        required=True,
        metavar="ADDRESS",
        help="unix:PATH or unix-seqpacket:PATH (Apache mod_socket_handoff); repeatable",
    )
    parser.add_argument(
        "--interface",
        choices=INTERFACES,
        default="asgi",
        help="asgi: TARGET is an ASGI app; handoff: TARGET takes a Handoff (default: asgi)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_octal,
        default=DEFAULT_SOCKET_MODE,
        metavar="MODE",
        help="permissions of the socket files, octal (default: 0660)",
    )
    parser.add_argument("--socket-group", metavar="GROUP", help="group of the socket files")
    parser.add_argument(
        "--allow-uid",
        action="append",
        type=_uid,
        default=[],
        metavar="UID",
        help="accept handoffs only from this sender uid or user name (SO_PEERCRED); repeatable",
    )
    parser.add_argument(
        "--allow-gid",
        action="append",
        type=_gid,
        default=[],
        metavar="GID",
        help="accept handoffs only from this sender gid or group name; repeatable",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="processes (default 1)")
    parser.add_argument(
        "--grace",
        type=float,
        default=limits.DEFAULT_GRACE,
        metavar="SECONDS",
        help="time live connections get to finish after SIGTERM (default %(default)s)",
    )
    parser.add_argument("--loop", choices=LOOPS, default="auto", help="event loop (default auto)")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="logging level (default info)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="no log line per connection")
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_metrics_address,
        help="serve Prometheus metrics on http://HOST:PORT/metrics "
        "(worker i of --workers uses PORT+i)",
    )
    group = parser.add_argument_group("limits (see docs/security.md)")
    _limit(group, "--handoff-timeout", float, limits.HANDOFF_TIMEOUT, "seconds for one handoff")
    _limit(group, "--body-timeout", float, limits.BODY_TIMEOUT, "seconds between body reads")
    _limit(group, "--write-timeout", float, limits.WRITE_TIMEOUT, "seconds a client may stall")
    _limit(group, "--linger-timeout", float, limits.LINGER_TIMEOUT, "seconds of lingering close")
    _limit(group, "--max-body-size", int, limits.MAX_BODY_SIZE, "bytes of request body read")
    _limit(group, "--max-stream-buffer", int, limits.MAX_STREAM_BUFFER, "bytes queued per stream")
    _limit(group, "--max-ws-message-size", int, limits.MAX_WS_MESSAGE_SIZE, "bytes per message")
    _limit(group, "--max-connections", int, 0, "live connections per process, 0 = no limit")
    _limit(
        group,
        "--keepalive-timeout",
        float,
        limits.KEEPALIVE_TIMEOUT,
        "ASGI: seconds to wait for a next request on a connection, 0 = one request",
    )
    _limit(group, "--max-head-size", int, MAX_HEAD_SIZE, "ASGI: bytes of a next request's head")
    _limit(group, "--max-uri-length", int, MAX_URI_LENGTH, "ASGI: bytes of its request line")
    _limit(group, "--max-headers", int, MAX_HEADERS, "ASGI: header lines in its head")
    parser.set_defaults(handler=_run)


def _limit(group: Any, flag: str, kind: Callable[[str], Any], default: float, what: str) -> None:
    group.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")


def _metrics_address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode")
    return mode


def _uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user {text!r}") from None


def _gid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group {text!r}") from None


#: Timeouts, in seconds, as the front's ``[timeouts]``: at least a
#: millisecond (0 would fail every read) and at most a day (``inf`` and NaN,
#: which float() accepts, are refused rather than read as "never").
_SECONDS: Final = ("handoff_timeout", "body_timeout", "write_timeout")
#: Seconds where 0 means something: close at once, no keep-alive.
_SECONDS_OR_ZERO: Final = ("grace", "linger_timeout", "keepalive_timeout")
#: Sizes that must be above 0: a zero stream buffer or message size would
#: refuse every message.
_POSITIVE: Final = ("max_stream_buffer", "max_ws_message_size")
#: Counts where 0 means something: no body, no limit.
_NOT_NEGATIVE: Final = ("max_body_size", "max_connections")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_options(args: argparse.Namespace) -> Options:
    """The receiver's options from the command line; a clear error for a value out of range."""
    for names, low in ((_SECONDS, 0.001), (_SECONDS_OR_ZERO, 0.0)):
        for name in names:
            if not low <= getattr(args, name) <= MAX_SECONDS:  # also NaN
                raise ConfigError(
                    f"{_flag(name)} must be between {low:g} and {MAX_SECONDS:g} seconds"
                )
    for name in _POSITIVE:
        if not getattr(args, name) > 0:
            raise ConfigError(f"{_flag(name)} must be positive")
    for name in _NOT_NEGATIVE:
        if not getattr(args, name) >= 0:
            raise ConfigError(f"{_flag(name)} must not be negative")
    head = HeadLimits(args.max_head_size, args.max_uri_length, args.max_headers)
    problems = head.problems()
    if problems:
        name, _, problem = problems[0]
        raise ConfigError(f"{_flag(name)} {problem}")
    return Options(
        handoff_timeout=args.handoff_timeout,
        body_timeout=args.body_timeout,
        write_timeout=args.write_timeout,
        linger_timeout=args.linger_timeout,
        max_body_size=args.max_body_size,
        max_stream_buffer=args.max_stream_buffer,
        max_ws_message_size=args.max_ws_message_size,
        max_connections=args.max_connections,
        grace=args.grace,
        allow_uids=frozenset(args.allow_uid),
        allow_gids=frozenset(args.allow_gid),
        access_log=not args.no_access_log,
        metrics=args.metrics,
        keepalive_timeout=args.keepalive_timeout,
        head_limits=head,
    )


def _handler(target: Any, interface: str, options: Options) -> Any:
    if interface == "handoff":
        if not callable(target):
            raise ConfigError("--interface handoff: TARGET must be callable(handoff)")
        return target
    return make_asgi_handler(target, options)


def make_asgi_handler(app: Any, options: Options) -> Any:
    """The seam to :mod:`fdhandoff.receiver.asgi`: its ``make_asgi_handler(app,
    options)`` returns an async handler taking a :class:`Handoff`."""
    name = f"{__package__}.asgi"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name != name:
            raise
        raise ConfigError(
            "--interface asgi: the ASGI adapter (fdhandoff.receiver.asgi) is not available "
            "in this version; use --interface handoff"
        ) from None
    return module.make_asgi_handler(app, options)


def _run(args: argparse.Namespace) -> int:
    options = build_options(args)
    binds = [Bind.parse(spec) for spec in args.bind]
    target = load_target(args.target)
    handler = _handler(target, args.interface, options)
    return run(
        handler,
        binds,
        options,
        workers=args.workers,
        loop=args.loop,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
    )
