"""``fdhandoff demo``: placeholder until the demo lands."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="run the live demo (coming with the front and receiver)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    print(
        "fdhandoff demo: the live demo (front + receivers + browser page) arrives with the front\n"
        "and receiver; today the package provides the SCGI codec, the handoff formats and fd\n"
        "passing (see docs/protocol.md).",
        file=sys.stderr,
    )
    return 0
