"""Hold 100,000 idle WebSocket (or SSE) connections in one receiver with --workers.

Every process here may hold at most 20,000 open files, so the load is spread:
the receiver runs ``--workers W`` processes sharing one UNIX socket, the load
client runs in several processes, each opening its share of connections from
its own 127.0.x.y source addresses.  The sender in this process hands every
accepted TCP connection over in the fdhandoff front's SCGI format and waits
for the "taken" close, as the front does.

Prints a line per worker (connections held = open fds, RSS) and, last::

    RESULT kind=<kind> connections=<N> workers=<W> kib_per_conn=<f> total_rss_mib=<f>

Bounded in time (``--timeout``).  Usage::

    python bench/hold_100k.py -n 100000 --workers 7
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from idle_memory import (
    rss_kib,
    sender,
    start_clients,
    start_receiver,
    stop_clients,
)

#: Connections per load-client process: under the 20,000-file cap with room
#: for the interpreter's own fds.
PER_CLIENT = 17_000


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def total_rss(pids: list[int]) -> int:
    return sum(rss_kib(p) for p in pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=7)
    parser.add_argument("--kind", choices=("websocket", "sse"), default="websocket")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    args = parser.parse_args()
    n = args.connections
    if n / args.workers > 19_000:
        raise SystemExit("too few workers: each process holds at most ~19,000 connections")
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.sock")
        receiver = start_receiver(args.kind, [path], args.loop, args.workers)
        try:
            time.sleep(2.0)
            pids = [receiver.pid, *workers_of(receiver.pid)]
            before = total_rss(pids)
            base_fds = {p: fds(p) for p in pids}
            listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
            done = [0]
            thread = threading.Thread(
                target=sender, args=(listener, [path], n, done), daemon=True
            )
            started = time.monotonic()
            thread.start()
            clients = start_clients(listener.getsockname()[1], n, args.kind, PER_CLIENT)
            try:
                while thread.is_alive() and time.monotonic() < deadline:
                    thread.join(5)
                    print(f"  {done[0]} handed over", flush=True)
                if thread.is_alive():
                    raise SystemExit(f"timed out after {done[0]} handoffs")
                for client in clients:
                    assert client.stdout is not None
                    line = client.stdout.readline()
                    if not line.startswith("ESTABLISHED"):
                        raise SystemExit(f"load client failed: {line!r}")
                took = time.monotonic() - started
                time.sleep(3.0)  # idle
                pids = [receiver.pid, *workers_of(receiver.pid)]
                after = total_rss(pids)
                for pid in pids[1:]:
                    held = fds(pid) - base_fds.get(pid, fds(pid))
                    print(f"  worker {pid}: {held} connections, RSS {rss_kib(pid) / 1024:.1f} MiB")
            finally:
                stop_clients(clients)
                listener.close()
        finally:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(120)
    kib = (after - before) / n
    print(
        f"{n} connections established in {took:.1f} s "
        f"({n / took:.0f} handoffs/s); receiver RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB"
    )
    print(
        f"RESULT kind={args.kind} connections={n} workers={args.workers} "
        f"kib_per_conn={kib:.3f} total_rss_mib={after / 1024:.1f}"
    )


if __name__ == "__main__":
    main()
