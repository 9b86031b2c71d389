"""The front's memory while N handed-off connections stay open at a receiver.

The front should hold nothing for a connection once the receiver has taken
it: no task, no buffer, no fd.  This starts ``fdhandoff front`` and a
receiver (bench/_common.py, ``hold``: it sends an event-stream head and
keeps every client open), warms the front up, reads its RSS, then opens
``--connections`` client connections through it (at most ``--in-flight``
waiting for their response head at a time, as clients arrive in practice)
and keeps them all open; it reads the RSS again, and the front's fd count,
which must be back at its idle value.

Prints ``RESULT front_rss_growth_kib=<float> connections=<N>``.

The 20,000 open-files cap per process is respected: the client and the
receiver each hold N (10,000 by default) sockets, the front none.
Run: ``.venv/bin/python bench/front_memory.py`` (under a minute).
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


def hold_clients(port: int, count: int, in_flight: int, seconds: float, out: Any) -> None:
    """Open ``count`` connections (≤ ``in_flight`` awaiting their head), hold them open."""
    poller = select.epoll()
    waiting: dict[int, tuple[socket.socket, bytearray]] = {}
    held: list[socket.socket] = []
    failed = 0
    opened = 0
    deadline = time.monotonic() + seconds
    while (opened < count or waiting) and time.monotonic() < deadline:
        while opened < count and len(waiting) < in_flight:
            sock = socket.socket()
            sock.setblocking(False)
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                failed += 1
                opened += 1
                continue
            waiting[sock.fileno()] = (sock, bytearray())
            poller.register(sock.fileno(), select.EPOLLOUT)
            opened += 1
        for fd, event in poller.poll(0.5):
            sock, buf = waiting[fd]
            if event & select.EPOLLOUT and not buf:
                try:
                    sock.send(c.REQUEST.replace(b"Connection: close\r\n", b""))
                except OSError:
                    failed += 1
                    poller.unregister(fd)
                    del waiting[fd]
                    sock.close()
                    continue
                poller.modify(fd, select.EPOLLIN)
                buf += b"\0"  # marks "request sent"
                continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            buf += data
            if data and b"\r\n\r\n" not in buf:
                continue
            poller.unregister(fd)
            del waiting[fd]
            if data and buf[1:].startswith(b"HTTP/1.1 200"):
                held.append(sock)
            else:
                failed += 1
                sock.close()
    out.send((len(held), failed))
    out.recv()  # hold until told to stop
    for sock in held:
        sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2_000)
    args = parser.parse_args()
    print(f"machine: {c.machine()}")
    env = c.python_env()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="fdh-mem-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        receiver_path = str(tmp / "receiver.sock")
        receiver = stack.enter_context(
            c.started(
                [sys.executable, str(c.ROOT / "bench" / "_common.py"), "hold", receiver_path],
                **quiet,
            )
        )
        c.wait_path(receiver_path)
        port = c.free_port()
        config = tmp / "front.toml"
        config.write_text(
            f'[[listen]]\naddress = "127.0.0.1:{port}"\n'
            f'[[route]]\nprefix = "/"\nbackend = "unix:{receiver_path}"\n'
            f'[log]\naccess = "off"\n'
        )
        front = stack.enter_context(
            c.started(
                [sys.executable, "-m", "fdhandoff", "front", "--config", str(config)], **quiet
            )
        )
        c.wait_port(port)

        def run_clients(count: int) -> tuple[Any, multiprocessing.Process, int, int]:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=hold_clients, args=(port, count, args.in_flight, 120, child))
            proc.start()
            child.close()
            if not parent.poll(180):
                raise RuntimeError("the client never finished opening connections")
            held, failed = parent.recv()
            return parent, proc, held, failed

        def release(pipe: Any, proc: multiprocessing.Process) -> None:
            pipe.send("stop")
            proc.join(timeout=60)

        # Warm up: imports, caches, allocator pools, the first handoffs.
        pipe, proc, held, failed = run_clients(args.warmup)
        release(pipe, proc)
        time.sleep(1.0)
        fds_idle = len(os.listdir(f"/proc/{front.pid}/fd"))
        rss_before = c.rss_kib(front.pid)
        receiver_before = c.rss_kib(receiver.pid)

        started = time.monotonic()
        pipe, proc, held, failed = run_clients(args.connections)
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # housekeeping ticks pass; nothing is in flight
        rss_while = c.rss_kib(front.pid)
        fds_while = len(os.listdir(f"/proc/{front.pid}/fd"))
        receiver_while = c.rss_kib(receiver.pid)
        release(pipe, proc)

    growth = rss_while - rss_before
    print(
        f"{held} connections handed off and held open ({failed} failed) in {elapsed:.1f} s, "
        f"at most {args.in_flight} awaiting their head at a time"
    )
    print(
        f"front RSS: {rss_before} KiB before, {rss_while} KiB with them open "
        f"(growth {growth} KiB, {growth * 1024 / max(1, held):.1f} bytes per connection)"
    )
    print(f"front fds: {fds_idle} idle, {fds_while} with them open")
    print(f"receiver RSS (for reference): {receiver_before} -> {receiver_while} KiB")
    print(f"RESULT front_rss_growth_kib={float(growth):.1f} connections={held}")
    return 0 if failed == 0 and fds_while == fds_idle else 1


if __name__ == "__main__":
    raise SystemExit(main())
