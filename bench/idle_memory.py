"""Memory per idle handed-off connection in one receiver process.

Three processes, all real sockets:

* the receiver: ``fdhandoff serve idle_memory:<handler> --bind unix:...``;
* a sender (this process, one thread): accepts TCP clients, reads each
  request head and hands the connection over in the fdhandoff front's SCGI
  format, waiting for the receiver's "taken" close like the front does;
* a load client (a subprocess): opens N connections from 127.0.x.y source
  addresses, sends a request (an SSE GET or a WebSocket upgrade), reads the
  response head, then keeps every connection open and silent.

Once every connection is established and idle, the receiver's RSS growth
divided by N is the figure.  The last line printed is::

    RESULT kind=<kind> connections=<N> kib_per_conn=<median of the runs>

Usage: ``python bench/idle_memory.py --kind sse -n 10000 --runs 3``.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("sse", "websocket", "asgi-sse", "asgi-websocket")

#: Source addresses are spread so no (source, destination) pair runs out of
#: ephemeral ports (~28k per pair on Linux).
PER_SOURCE = 20_000

#: Linux's IP_BIND_ADDRESS_NO_PORT (ip(7)), not exported by every Python.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# --- handlers the receiver loads (``idle_memory:sse`` ...) ----------------------------------

_channel: Any = None


def _hub() -> Any:
    global _channel
    if _channel is None:
        from fdhandoff.receiver import Channel  # noqa: PLC0415 - only in the receiver

        _channel = Channel()
    return _channel


async def sse(handoff: Any) -> None:
    """Native SSE: the stream joins a channel; the handler returns at once."""
    stream = await handoff.sse()
    _hub().add(stream)


async def websocket(handoff: Any) -> None:
    """Native WebSocket: the connection joins a channel; no task remains."""
    ws = await handoff.websocket()
    _hub().add(ws)


async def asgi_sse(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    await send({"type": "http.response.body", "body": b": ready\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def asgi_websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- measuring --------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def asgi_available() -> bool:
    try:
        import fdhandoff.receiver.asgi  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


# --- the sender (front-like) ------------------------------------------------------------------


def _read_head(conn: socket.socket) -> bytes:
    conn.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("client closed before its request head")
        data += chunk
    return data


def _scgi_for(head: bytes, client: tuple[str, int]) -> bytes:
    from fdhandoff import scgi  # noqa: PLC0415

    raw, _, rest = head.partition(b"\r\n\r\n")
    lines = raw.split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    query = target.partition(b"?")[2]
    headers: list[tuple[bytes, bytes]] = [
        (b"CONTENT_LENGTH", str(len(rest)).encode()),
        (b"SCGI", b"1"),
        (b"REQUEST_METHOD", method),
        (b"REQUEST_URI", target),
        (b"QUERY_STRING", query),
        (b"SERVER_PROTOCOL", version),
        (b"REMOTE_ADDR", client[0].encode()),
        (b"REMOTE_PORT", str(client[1]).encode()),
    ]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((b"HTTP_" + name.strip().upper().replace(b"-", b"_"), value.strip()))
    return scgi.encode(headers, rest)


def sender(listener: socket.socket, unix_paths: list[str], total: int, done: list[int]) -> None:
    """Accept ``total`` clients and hand each over (round robin over the paths)."""
    from fdhandoff import fdpass  # noqa: PLC0415

    for i in range(total):
        conn, addr = listener.accept()
        try:
            message = _scgi_for(_read_head(conn), addr)
            with socket.socket(socket.AF_UNIX) as unix:
                unix.connect(unix_paths[i % len(unix_paths)])
                fdpass.send_fd(unix, message, conn.fileno(), timeout=30)
                unix.settimeout(30)
                unix.recv(1)  # the receiver closes: taken
        finally:
            conn.close()
        done[0] += 1


# --- the load client (subprocess) ---------------------------------------------------------------


def _request(kind: str) -> bytes:
    if kind.endswith("websocket"):
        key = base64.b64encode(os.urandom(16))
        return (
            b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    return b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"


def source_address(n: int) -> str:
    """The n-th loopback source address: 127.0.<n // 250>.<2 + n % 250>."""
    return f"127.0.{n // 250}.{2 + n % 250}"


def client_main(port: int, count: int, kind: str, first_source: int) -> None:
    """Open ``count`` connections, send the request, await the response head, idle."""
    request = _request(kind)
    expected = b"HTTP/1.1 101" if kind.endswith("websocket") else b"HTTP/1.1 200"
    socks = []
    for i in range(count):
        s = socket.socket()
        # Pick the port at connect time: bind(addr, 0) searches the whole
        # port range for every socket, which gets slow with thousands bound.
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((source_address(first_source + i // PER_SOURCE), 0))
        s.connect(("127.0.0.1", port))
        s.sendall(request)
        socks.append(s)
    for s in socks:
        s.settimeout(60)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("a connection closed before its response")
            head += chunk
        if not head.startswith(expected):
            raise SystemExit(f"unexpected response: {head[:80]!r}")
    print("ESTABLISHED", count, flush=True)
    sys.stdin.readline()  # hold until told to quit
    for s in socks:
        s.close()


# --- one run -------------------------------------------------------------------------------------


def start_receiver(
    kind: str, socks: list[str], loop: str, workers: int = 1
) -> subprocess.Popen[bytes]:
    interface = "asgi" if kind.startswith("asgi") else "handoff"
    target = "idle_memory:" + kind.replace("-", "_")
    cmd = [sys.executable, "-m", "fdhandoff", "serve", target, "--interface", interface]
    for path in socks:
        cmd += ["--bind", f"unix:{path}"]
    cmd += ["--no-access-log", "--log-level", "warning", "--loop", loop, "--grace", "1"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO / "src")]))
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 30
    while not all(os.path.exists(p) for p in socks):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the receiver did not start")
        time.sleep(0.05)
    return proc


def start_clients(port: int, n: int, kind: str, per_process: int) -> list[subprocess.Popen[str]]:
    clients = []
    # A fresh range of source addresses per run: the previous run's closed
    # connections sit in TIME_WAIT on their (address, port) pairs.
    source = random.randrange(0, 250 * 200)
    for start in range(0, n, per_process):
        count = min(per_process, n - start)
        clients.append(
            subprocess.Popen(
                [sys.executable, __file__, "--client", str(port), str(count), kind, str(source)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
            )
        )
        source += (count + PER_SOURCE - 1) // PER_SOURCE
    return clients


def stop_clients(clients: list[subprocess.Popen[str]]) -> None:
    for client in clients:
        if client.poll() is None and client.stdin is not None:
            try:
                client.stdin.write("quit\n")
                client.stdin.flush()
            except BrokenPipeError:
                pass
    for client in clients:
        try:
            client.wait(60)
        except subprocess.TimeoutExpired:
            client.kill()


def one_run(kind: str, n: int, loop: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.sock")
        receiver = start_receiver(kind, [path], loop)
        try:
            time.sleep(1.0)
            before = rss_kib(receiver.pid)
            listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
            port = listener.getsockname()[1]
            done = [0]
            thread = threading.Thread(target=sender, args=(listener, [path], n, done), daemon=True)
            thread.start()
            clients = start_clients(port, n, kind, n)
            try:
                for client in clients:
                    assert client.stdout is not None
                    line = client.stdout.readline()
                    if not line.startswith("ESTABLISHED"):
                        raise SystemExit(f"load client failed: {line!r}")
                thread.join(60)
                time.sleep(2.0)  # idle
                after = rss_kib(receiver.pid)
            finally:
                stop_clients(clients)
                listener.close()
        finally:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(60)
    kib = (after - before) / n
    print(
        f"  run: receiver RSS {before} KiB -> {after} KiB with {n} idle connections: "
        f"{kib:.3f} KiB per connection",
        flush=True,
    )
    return kib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="sse")
    parser.add_argument("-n", "--connections", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.kind.startswith("asgi") and not asgi_available():
        print(f"RESULT kind={args.kind} needs the ASGI adapter (fdhandoff.receiver.asgi)")
        return
    if args.connections > 19_000:
        raise SystemExit("one receiver process holds at most ~19,000 fds here: see hold_100k.py")
    print(f"{args.kind}: {args.connections} idle connections, {args.runs} runs, {args.loop}")
    figures = [one_run(args.kind, args.connections, args.loop) for _ in range(args.runs)]
    median = statistics.median(figures)
    print(f"RESULT kind={args.kind} connections={args.connections} kib_per_conn={median:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        main()
