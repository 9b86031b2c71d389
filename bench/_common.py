"""Shared pieces of the front benchmarks: a minimal receiver, a load client, process helpers.

Run as a script for the roles the benchmarks start in their own processes::

    python bench/_common.py receiver PATH        # fixed 200 for every handoff
    python bench/_common.py hold PATH            # keep every handed-off client open
    python bench/_common.py load HOST PORT CONNS SECONDS   # (used through load())

Also importable as an ASGI app for uvicorn (``_common:asgi_app``), with no
side effects on import.

Every loop here is bounded in time and count.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

#: The answer every server under test gives: the same bytes of body.
BODY = b"ok\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    b"Connection: close\r\n\r\n" + BODY
)
#: What the holding receiver sends before keeping a connection open forever.
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
)
REQUEST = (
    b"GET /bench?x=1 HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nConnection: close\r\n\r\n"
)


# --- the ASGI app for uvicorn ---------------------------------------------------------------


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


async def tiny_handler(handoff: Any) -> None:
    """``fdhandoff serve --interface handoff`` twin of :func:`asgi_app`."""
    await handoff.respond(200, [("Content-Type", "text/plain")], BODY)


# --- receivers (fdhandoff.fdpass + message, one epoll loop, no framework) -------------------


def _listen_unix(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _netstring_end(data: bytes) -> int:
    """Where the first netstring in ``data`` ends (past its ','), or -1."""
    colon = data.find(b":")
    if colon <= 0:
        return -1
    end = colon + int(data[:colon]) + 2
    return end if len(data) >= end else -1


#: How a description offers a channel (fdhandoff.message.CHANNEL_HEADER).
_CHANNEL = b"\x00HANDOFF_CHANNEL\x001\x00"


def run_receiver(path: str, *, hold: bool = False, seconds: float = 3600.0) -> None:
    """Take handoffs; answer the fixed 200 and close, or hold every client open.

    Minimal on purpose (the front is what is measured): one epoll loop, one
    :func:`fdhandoff.fdpass.recv_fd_nowait` per readiness event (epoll is
    level-triggered: bytes left over wake it again), each netstring only
    checked for completeness (the front sends no bytes after it on plain
    TCP).  It speaks the channel protocol as every fdhandoff receiver does: a
    description with ``HANDOFF_CHANNEL=1`` keeps the connection open and is
    acknowledged with one ACK byte once answered; otherwise the close of the
    connection is the acknowledgement.  Nothing runs between the answer and
    the next ``epoll_wait`` but the acknowledgement: on two cores, work left
    over after a response competes with the client's next request.  The run
    is bounded by ``SIGALRM`` after ``seconds``, not by a poll timeout.
    """
    sys.path.insert(0, str(SRC))
    from fdhandoff import fdpass  # noqa: PLC0415

    listener = _listen_unix(path)
    listen_fd = listener.fileno()
    poller = select.epoll()
    poller.register(listen_fd, select.EPOLLIN)
    # UNIX connections: fd -> [conn, unparsed bytes, client fds in order].
    conns: dict[int, list[Any]] = {}
    held: list[socket.socket] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(0))
    signal.alarm(max(1, int(seconds)))
    print("receiver ready", flush=True)

    # try/except rather than contextlib.suppress (SIM105): free when nothing
    # is raised, where suppress builds a context manager per response.
    def answer(client: socket.socket) -> None:
        try:  # noqa: SIM105
            client.send(STREAM_HEAD if hold else RESPONSE)
        except OSError:
            pass
        if hold:  # an event stream that never sends an event
            held.append(client)
        else:
            client.close()

    def drop(fd: int) -> None:
        conn, _, fds = conns.pop(fd)
        for fd_sock in fds:
            fd_sock.close()
        conn.close()  # also leaves the epoll set (taken, for a one-handoff sender)

    def readable(fd: int) -> None:
        state = conns[fd]
        conn, data, fds = state
        try:
            more, fd_sock = fdpass.recv_fd_nowait(conn, blocking=False)
        except BlockingIOError:
            return
        except OSError:
            more, fd_sock = b"", None
        if fd_sock is not None:
            fds.append(fd_sock)
        if not more:
            drop(fd)
            return
        data += more
        acks = 0
        while (end := _netstring_end(data)) > 0 and fds:
            message, data = data[:end], data[end:]
            # Answer first, then acknowledge (or close): the ack wakes the
            # front, whose work is then off the path of the response.
            answer(fds.pop(0))
            if _CHANNEL not in message:
                drop(fd)
                return
            acks += 1
        state[1] = data
        if acks:
            try:  # noqa: SIM105  (as in answer)
                conn.send(b"\x06" * acks)
            except OSError:
                pass  # the front is gone

    # The raw accept (an fd) and an explicit family: socket.accept()'s
    # wrapper converts enums and runs a Python __init__ per connection.
    accept = listener._accept  # type: ignore[attr-defined]
    unix, stream = int(socket.AF_UNIX), int(socket.SOCK_STREAM)
    while True:
        for fd, _ in poller.poll():
            if fd != listen_fd:
                readable(fd)
                continue
            for _ in range(256):  # drain the accept queue
                try:
                    conn = socket.socket(unix, stream, 0, accept()[0])
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        time.sleep(0.01)
                        break
                    raise
                conn.setblocking(False)
                fd = conn.fileno()
                conns[fd] = [conn, b"", []]
                poller.register(fd, select.EPOLLIN)
                readable(fd)  # the handoff is usually there already


# --- the load client -------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_us: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _load_worker(host: str, port: int, conns: int, seconds: float, out: Any) -> None:
    """``conns`` concurrent connections, a new one per request, for ``seconds``."""
    poller = select.epoll()
    active: dict[int, tuple[socket.socket, float, bytearray]] = {}
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    address = (host, port)

    def open_one() -> None:
        nonlocal errors
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setblocking(False)
        start = time.perf_counter()
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            errors += 1
            sock.close()
            return
        active[sock.fileno()] = (sock, start, bytearray())
        poller.register(sock.fileno(), select.EPOLLOUT)

    for _ in range(conns):
        open_one()
    while active and time.perf_counter() < deadline + 5.0:
        for fd, event in poller.poll(0.5):
            sock, start, buf = active[fd]
            if event & select.EPOLLOUT:
                try:
                    sock.send(REQUEST)
                except OSError:
                    event = select.EPOLLERR
                else:
                    poller.modify(fd, select.EPOLLIN)
                    continue
            try:
                data = sock.recv(4096) if not event & select.EPOLLERR else b""
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                buf += data
                # Done when the whole response is in, as an HTTP client knows it
                # (Content-Length), not when the server closes: a client does
                # not wait for the FIN.
                end = buf.find(b"\r\n\r\n")
                if end < 0 or len(buf) < end + 4 + len(BODY):
                    continue
                ok = buf.startswith(b"HTTP/1.1 200") and buf.endswith(BODY)
            else:
                ok = False
            poller.unregister(fd)
            del active[fd]
            sock.close()
            if ok:
                latencies.append((time.perf_counter() - start) * 1e6)
            else:
                errors += 1
            if time.perf_counter() < deadline:
                open_one()
    for sock, _, _ in active.values():
        sock.close()
    out.send((len(latencies), errors, latencies))
    out.close()


def load(host: str, port: int, *, processes: int, conns: int, seconds: float) -> LoadResult:
    """Run the load client in ``processes`` processes; merge their results."""
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for _ in range(processes):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_load_worker, args=(host, port, conns, seconds, child))
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    started = time.perf_counter()
    total, errors, latencies = 0, 0, []
    for pipe, proc in zip(pipes, procs, strict=True):
        if pipe.poll(seconds + 30):
            count, errs, lats = pipe.recv()
            total += count
            errors += errs
            latencies += lats
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    elapsed = min(time.perf_counter() - started, seconds + 5.0)
    return LoadResult(total, errors, max(elapsed, seconds), latencies)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- processes and measurements --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def wait_path(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.02)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), from /proc/PID/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


@contextlib.contextmanager
def started(cmd: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} cores, Linux {os.uname().release}, "
        f"Python {sys.version.split()[0]}"
    )


def dump(result: dict[str, Any]) -> str:
    return json.dumps(result, sort_keys=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "receiver":
        run_receiver(sys.argv[2])
    elif role == "hold":
        run_receiver(sys.argv[2], hold=True)
    else:
        raise SystemExit(f"unknown role {role!r}")
