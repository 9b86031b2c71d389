"""``fdhandoff front``: placeholder until the front lands."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "front", help="run the front server (not available yet)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    print("fdhandoff front: the front is not available in this version yet", file=sys.stderr)
    return 2
