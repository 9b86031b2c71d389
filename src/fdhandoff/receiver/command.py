"""``fdhandoff serve``: placeholder until the receiver lands."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run a receiver daemon (not available yet)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    print("fdhandoff serve: the receiver is not available in this version yet", file=sys.stderr)
    return 2
