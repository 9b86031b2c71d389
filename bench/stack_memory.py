"""Memory of a whole stack holding N idle SSE or WebSocket connections.

For one stack (bench/_stacks.py), one kind (``sse``: ``GET /events``, ``ws``:
``GET /ws`` upgraded) and one N:

1. start the stack with the workers N needs, check it answers, warm it up
   (a few connections of the kind opened and closed: imports, first
   allocations), wait 1 s and read its memory: RSS summed over every process
   (fdhandoff: the front + the receiver's supervisor and workers; nginx
   master and workers + uvicorn's supervisor and workers), and PSS;
2. open N connections from load-client processes (at most 256 per process
   waiting for their response head at a time), each sending the request and
   reading the response head (``200`` event stream, ``101``), then holding
   the connection open and silent;
3. wait 2 s once all are established, read the memory again, and count the
   connections the server side holds (ESTABLISHED on the stack's port, from
   /proc/net/tcp).

KiB per connection = RSS growth / connections held.  If fewer than N could
be established the point records how many were (``reached``) and why.

Run: ``.venv/bin/python bench/stack_memory.py --stack fdhandoff --kind sse -n 10000``
(``--stack nginx->uvicorn``, ``--kind ws``).  bench/run_all.py runs every
combination.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _stacks as s

#: Connections per worker opened and closed before the baseline is read.
WARMUP_PER_WORKER = 20
#: Idle time before memory is read: sse-starlette's first ping, allocator
#: housekeeping and the last handshakes have settled.
SETTLE_SECONDS = 2.0


def describe(reasons: dict[str, int]) -> str:
    return ", ".join(f"{count:,} {why}" for why, count in sorted(reasons.items())) or "none"


def measure(
    stack_name: str, kind: str, n: int, on_progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    def say(text: str) -> None:
        if on_progress is not None:
            on_progress(text)

    with (
        tempfile.TemporaryDirectory(prefix="fdh-stackmem-") as tmp_name,
        s.stack(stack_name, Path(tmp_name), n) as stack,
    ):
        warm = WARMUP_PER_WORKER * max(stack.workers.values())
        with s.Clients(stack.port, warm, kind, processes=1) as clients:
            clients.wait_established()
        time.sleep(1.0)
        stack.check_alive()
        base = stack.memory()
        base_fds = s.established(stack.port)
        with s.Clients(stack.port, n, kind) as clients:
            seconds = clients.wait_established(
                lambda held, failed: say(f"{held:,}/{n:,} connections")
            )
            time.sleep(SETTLE_SECONDS)
            stack.check_alive()
            after = stack.memory()
            server_held = s.established(stack.port) - base_fds
            held, failed, reasons = clients.held, clients.failed, clients.reasons()
            errors = "\n".join(s.tail(log, 5) for log in stack.logs).strip()
        workers = dict(stack.workers)
    reached = min(held, server_held)
    point: dict[str, Any] = {
        "stack": stack_name,
        "kind": kind,
        "n": n,
        "reached": reached,
        "failed": failed,
        "seconds": round(seconds, 1),
        "workers": workers,
        "base_rss_kib": base.rss_kib,
        "rss_kib": after.rss_kib,
        "base_pss_kib": base.pss_kib,
        "pss_kib": after.pss_kib,
        "processes": after.processes,
        "parts_kib": after.parts,
        "base_parts_kib": base.parts,
        "kib_per_conn": (after.rss_kib - base.rss_kib) / reached if reached else None,
        "pss_kib_per_conn": (after.pss_kib - base.pss_kib) / reached if reached else None,
    }
    if reasons:
        point["failures"] = reasons
    if reached < n:
        point["why"] = (
            f"{held:,} held by the clients, {server_held:,} established at the server; "
            f"{failed:,} failed: {describe(reasons)}; last log lines: {errors[-600:]}"
        )
    return point


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", choices=s.STACKS, default="fdhandoff")
    parser.add_argument("--kind", choices=s.KINDS, default="sse")
    parser.add_argument("-n", "--connections", type=int, default=10_000)
    args = parser.parse_args()
    point = measure(
        args.stack,
        args.kind,
        args.connections,
        lambda text: print(f"\r  {text}   ", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    print(json.dumps(point, indent=1))
    if point["kib_per_conn"] is not None:
        print(
            f"RESULT stack={args.stack} kind={args.kind} connections={point['reached']} "
            f"total_rss_kib={point['rss_kib']} kib_per_conn={point['kib_per_conn']:.2f}"
        )
    return 0 if point["reached"] == args.connections else 1


if __name__ == "__main__":
    raise SystemExit(main())
