"""Broadcast latency: one message to N SSE or WebSocket subscribers.

For one stack (bench/_stacks.py) and one kind, N subscribers connect
(``GET /events`` or ``GET /ws``) from load-client processes and wait.  Then,
message after message, the benchmark asks the server to publish
(``GET /publish?kind=...&seq=k``, through the stack like any request): the
server takes the time with :func:`time.monotonic` right before writing to
its first subscriber, broadcasts, and answers that time.  Every subscriber
timestamps the receipt of the message with :func:`time.monotonic` right
after the ``recv`` that brought it; ``CLOCK_MONOTONIC`` is one clock for all
processes on Linux, so receipt minus publish is the delivery latency.

* fdhandoff: ``Channel.send`` on native SSE streams / WebSockets in the
  receiver (the front is not on the path once connections are handed off);
* nginx->uvicorn: Starlette under uvicorn behind nginx ``proxy_pass``; SSE
  through sse-starlette fed by an ``asyncio.Queue`` per subscriber,
  WebSocket by ``await websocket.send_text()`` over the set of sockets;
* ``floor`` (a reference, not a server): this process accepts the
  subscribers itself, answers a bare ``200`` head and broadcasts with a plain
  ``for sock in socks: sock.send(message)`` loop, no framework, no event
  loop: what the kernel's loopback TCP path and one Python call per
  subscriber cost on this machine.  A server cannot deliver faster than this.

Per message: p50, p99 and max (the time until the LAST subscriber had it) of
the per-subscriber latencies; reported as medians over the messages (a first
warm-up message is not counted).  The next message is published only once
every subscriber has the previous one, after a short pause.

Run: ``.venv/bin/python bench/broadcast.py --stack fdhandoff --kind sse -n 10000``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import _stacks as s

#: Load-client processes the subscribers are spread over (they share the two
#: cores with the server; more would only take CPU from it).
CLIENT_PROCESSES = 2
#: Pause between one message being everywhere and the next publish.
PAUSE_SECONDS = 0.5
#: Longest wait for a message to reach every subscriber.
DELIVERY_TIMEOUT = 60.0


FLOOR = "floor"
STACK_NAMES = (*s.STACKS, FLOOR)


@contextlib.contextmanager
def floor_server() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket and the list of accepted subscribers, closed on exit."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    accepted: list[socket.socket] = []
    try:
        yield listener, accepted
    finally:
        for sock in accepted:
            sock.close()
        listener.close()


def measure_floor(
    kind: str, n: int, messages: int, on_progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The reference loop: plain ``sock.send`` to every subscriber, in this process."""
    import _apps  # noqa: PLC0415 - the message format

    published: dict[int, dict[str, Any]] = {}
    complete: dict[int, bool] = {}
    with floor_server() as (listener, accepted):
        port = listener.getsockname()[1]
        with s.Clients(port, n, kind, processes=CLIENT_PROCESSES) as clients:
            listener.settimeout(1.0)
            deadline = time.monotonic() + clients.seconds
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
            while len(accepted) < n and time.monotonic() < deadline:
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                accepted.append(sock)
                sock.settimeout(10.0)
                with contextlib.suppress(OSError):
                    sock.recv(4096)  # the request head: one small segment
                    sock.sendall(head)
            clients.wait_established()
            held = clients.held
            time.sleep(1.0)
            for seq in range(messages + 1):
                if on_progress is not None:
                    on_progress(f"message {seq}/{messages} to {held:,} subscribers")
                data = _apps.message(seq).encode()
                t = time.monotonic()
                for sock in accepted:
                    sock.send(data)
                published[seq] = {"t": t, "sent": len(accepted), "send_s": time.monotonic() - t}
                complete[seq] = clients.wait_got(seq, DELIVERY_TIMEOUT)
                time.sleep(PAUSE_SECONDS)
            times = clients.times()
    result = summarize(FLOOR, kind, n, held, clients.failed, {}, published, complete, times)
    return explain(result, clients, "")


def measure(
    stack_name: str,
    kind: str,
    n: int,
    messages: int,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    def say(text: str) -> None:
        if on_progress is not None:
            on_progress(text)

    published: dict[int, dict[str, Any]] = {}
    complete: dict[int, bool] = {}
    with (
        tempfile.TemporaryDirectory(prefix="fdh-bcast-") as tmp_name,
        s.stack(stack_name, Path(tmp_name), n) as stack,
        s.Clients(stack.port, n, kind, processes=CLIENT_PROCESSES) as clients,
    ):
        clients.wait_established(lambda held, failed: say(f"{held:,}/{n:,} subscribers"))
        held = clients.held
        time.sleep(1.0)
        for seq in range(messages + 1):  # 0 is the warm-up
            say(f"message {seq}/{messages} to {held:,} subscribers")
            published[seq] = json.loads(s.http_get(stack.port, f"/publish?kind={kind}&seq={seq}"))
            complete[seq] = clients.wait_got(seq, DELIVERY_TIMEOUT)
            time.sleep(PAUSE_SECONDS)
        stack.check_alive()
        times = clients.times()
        workers = dict(stack.workers)
        logs = "\n".join(s.tail(log, 5) for log in stack.logs).strip()
    result = summarize(
        stack_name, kind, n, held, clients.failed, workers, published, complete, times
    )
    return explain(result, clients, logs)


def explain(result: dict[str, Any], clients: s.Clients, logs: str) -> dict[str, Any]:
    """Say why subscribers are missing, if any are."""
    reasons = clients.reasons()
    if reasons:
        result["failures"] = reasons
        result["why"] = (
            ", ".join(f"{count:,} {why}" for why, count in sorted(reasons.items()))
            + f"; last log lines: {logs[-600:]}"
        )
    return result


def summarize(
    stack_name: str,
    kind: str,
    n: int,
    held: int,
    failed: int,
    workers: dict[str, int],
    published: dict[int, dict[str, Any]],
    complete: dict[int, bool],
    times: dict[int, list[float]],
) -> dict[str, Any]:
    messages = len(published) - 1
    rows = []
    for seq in range(1, messages + 1):
        t0 = published[seq]["t"]
        latencies = sorted((t - t0) * 1000 for t in times.get(seq, []))
        rows.append(
            {
                "seq": seq,
                "sent": published[seq]["sent"],
                "received": len(latencies),
                "complete": complete[seq],
                "send_ms": published[seq]["send_s"] * 1000,
                "p50_ms": c.percentile(latencies, 0.50),
                "p99_ms": c.percentile(latencies, 0.99),
                "max_ms": latencies[-1] if latencies else float("nan"),
                "min_ms": latencies[0] if latencies else float("nan"),
            }
        )

    result = {
        "stack": stack_name,
        "kind": kind,
        "n": n,
        "subscribers": held,
        "failed": failed,
        "runs": 1,
        "workers": workers,
        "all_delivered": all(row["complete"] and row["received"] == held for row in rows),
        "rows": rows,
    }
    return with_medians(result)


def with_medians(result: dict[str, Any]) -> dict[str, Any]:
    """Medians over the messages of ``result["rows"]``."""
    rows = result["rows"]
    result["messages"] = len(rows)
    for key in ("p50_ms", "p99_ms", "max_ms", "send_ms"):
        result[key] = statistics.median(row[key] for row in rows)
    return result


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one stack and kind as one: medians over all their messages."""
    first = results[0]
    merged = {key: value for key, value in first.items() if key not in ("failures", "why")}
    merged["rows"] = [row | {"run": i + 1} for i, r in enumerate(results) for row in r["rows"]]
    merged["runs"] = len(results)
    merged["subscribers"] = min(r["subscribers"] for r in results)
    merged["failed"] = sum(r["failed"] for r in results)
    merged["all_delivered"] = all(r["all_delivered"] for r in results)
    failures: dict[str, int] = {}
    for r in results:
        for why, count in r.get("failures", {}).items():
            failures[why] = failures.get(why, 0) + count
    if failures:
        merged["failures"] = failures
        merged["why"] = " / ".join(r["why"] for r in results if r.get("why"))
    return with_medians(merged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", choices=STACK_NAMES, default="fdhandoff")
    parser.add_argument("--kind", choices=s.KINDS, default="sse")
    parser.add_argument("-n", "--subscribers", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=9)
    args = parser.parse_args()

    def show(text: str) -> None:
        print(f"\r  {text}   ", end="", file=sys.stderr, flush=True)

    if args.stack == FLOOR:
        result = measure_floor(args.kind, args.subscribers, args.messages, show)
    else:
        result = measure(args.stack, args.kind, args.subscribers, args.messages, show)
    print(file=sys.stderr)
    for row in result["rows"]:
        print(
            f"message {row['seq']}: {row['received']}/{result['subscribers']} received, "
            f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
            f"last {row['max_ms']:.1f} ms (server send loop {row['send_ms']:.1f} ms)"
        )
    print(
        f"RESULT stack={args.stack} kind={args.kind} subscribers={result['subscribers']} "
        f"p50_ms={result['p50_ms']:.1f} p99_ms={result['p99_ms']:.1f} "
        f"last_ms={result['max_ms']:.1f}"
    )
    return 0 if result["all_delivered"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
