"""The ``fdhandoff`` command: argument parsing and the only place that exits.

Each role registers its own sub-commands (``register(subparsers)``) and sets
``handler`` on its parser; a handler returns the process exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import ConfigError

#: Modules whose ``register(subparsers)`` adds sub-commands, in help order.
COMMAND_MODULES = (
    "fdhandoff.receiver.command",
    "fdhandoff.front.command",
    "fdhandoff.demo.command",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdhandoff",
        description="Hand live client connections to backend daemons over UNIX sockets.",
    )
    parser.add_argument("--version", action="version", version=f"fdhandoff {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"fdhandoff {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
