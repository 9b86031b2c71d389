"""Requests per second and latency: fdhandoff front + receiver vs nginx → uvicorn vs uvicorn.

A tiny GET, a new connection per request, the load client on the same
machine (bench/_common.py: a Python epoll client in N processes).  All
servers run at once and are measured in turns within each repeat (the order
rotates), so machine noise spreads over all of them; medians over repeats.

* fdhandoff: ``fdhandoff front`` (pass mode) → the minimal receiver of
  bench/_common.py (fdhandoff.fdpass), which answers a fixed 200: the cost
  of the front and the handoff itself.
* fdhandoff-serve: the same front → ``fdhandoff serve`` with a native
  handler (``_common:tiny_handler``) answering the same 200.
* fdhandoff-serve-asgi: the same front → ``fdhandoff serve`` running the
  very ASGI app uvicorn runs below (``_common:asgi_app``).
* nginx → uvicorn: Debian nginx, 1 worker, ``proxy_pass`` to the same
  uvicorn, as usually configured (a new upstream connection per request);
  and ``nginx->uvicorn-ka``, nginx's best case, with upstream keep-alive.
* uvicorn: uvloop + httptools, the same ASGI app answering directly.

Access logs are off everywhere (``log.access = "off"``, ``access_log off``,
``--no-access-log``); ``--front-access-log`` adds a row with the front's
access log on (to a file).

Throughput: ``--conns`` concurrent connections per load process for
``--seconds``.  Latency: one connection at a time (no queueing) for
``--latency-seconds``.  CPU per request: utime + stime of the server
processes (/proc/PID/stat) over the throughput run, divided by requests.

``--front-workers N`` adds a row: the front with ``workers = N`` to the same
minimal receiver (its supervisor and workers counted for CPU).

``--pin CPUS`` runs every server process, of every stack alike, on the given
CPUs (the load client is not pinned): with ``--pin 0`` on two cores the
client has a core to itself and the front and its receiver share the other,
so neither migrates between cores (docs/operations.md, "CPU placement").

Run: ``.venv/bin/python bench/handoff_rate.py`` (about two minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


@dataclass
class Target:
    name: str
    port: int
    pids: list[int]
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    errors: int = 0


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # As nginx is usually configured: a new upstream connection per request.
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ proxy_pass http://127.0.0.1:{upstream}; }}
    }}
    # nginx's best case: upstream connections kept alive.
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{keepalive_port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def front_config(tmp: Path, port: int, receiver: str, access: str, workers: int = 1) -> Path:
    path = tmp / f"front-{port}.toml"
    path.write_text(
        f"workers = {workers}\n"
        f'[[listen]]\naddress = "127.0.0.1:{port}"\nbacklog = 4096\n'
        f'[[route]]\nprefix = "/"\nbackend = "unix:{receiver}"\n'
        f'[log]\naccess = "{access}"\n'
    )
    return path


def cpu_list(text: str) -> set[int]:
    """``"0"``, ``"0,2"`` or ``"0-3"`` as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def start_all(stack: ExitStack, tmp: Path, args: argparse.Namespace) -> list[Target]:
    env = c.python_env()
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if args.pin:
        # Every server process of every stack on the same CPUs (nginx's worker
        # inherits it); the load client stays free to run anywhere else.
        cpus = cpu_list(args.pin)
        quiet["preexec_fn"] = lambda: os.sched_setaffinity(0, cpus)
    served_kwargs = dict(quiet)
    quiet["env"] = env
    receiver_path = str(tmp / "receiver.sock")
    receiver = stack.enter_context(
        c.started(
            [sys.executable, str(c.ROOT / "bench" / "_common.py"), "receiver", receiver_path],
            **quiet,
        )
    )
    c.wait_path(receiver_path)
    targets = []
    port = c.free_port()
    front = stack.enter_context(
        c.started(
            [
                sys.executable,
                "-m",
                "fdhandoff",
                "front",
                "--config",
                str(front_config(tmp, port, receiver_path, "off")),
            ],
            **quiet,
        )
    )
    c.wait_port(port)
    targets.append(Target("fdhandoff", port, [front.pid, receiver.pid]))
    for name, target, interface in (
        ("fdhandoff-serve", "_common:tiny_handler", "handoff"),
        ("fdhandoff-serve-asgi", "_common:asgi_app", "asgi"),
    ):
        served = str(tmp / f"{name}.sock")
        env_served = dict(env)
        env_served["PYTHONPATH"] = os.pathsep.join([str(c.ROOT / "bench"), env["PYTHONPATH"]])
        serve = stack.enter_context(
            c.started(
                [
                    sys.executable, "-m", "fdhandoff", "serve", target,
                    "--interface", interface, "--bind", f"unix:{served}",
                    "--no-access-log", "--log-level", "warning",
                ],
                env=env_served, **served_kwargs,
            )
        )  # fmt: skip
        c.wait_path(served)
        port = c.free_port()
        served_front = stack.enter_context(
            c.started(
                [
                    sys.executable, "-m", "fdhandoff", "front",
                    "--config", str(front_config(tmp, port, served, "off")),
                ],
                **quiet,
            )
        )  # fmt: skip
        c.wait_port(port)
        targets.append(Target(name, port, [served_front.pid, serve.pid]))
    if args.front_workers > 1:
        port = c.free_port()
        pool = stack.enter_context(
            c.started(
                [
                    sys.executable, "-m", "fdhandoff", "front", "--config",
                    str(front_config(tmp, port, receiver_path, "off", args.front_workers)),
                ],
                **quiet,
            )
        )  # fmt: skip
        c.wait_port(port)
        time.sleep(0.5)  # every worker started
        name = f"fdhandoff-w{args.front_workers}"
        targets.append(Target(name, port, [pool.pid, *c.children(pool.pid), receiver.pid]))
    if args.front_access_log:
        port = c.free_port()
        logged = stack.enter_context(
            c.started(
                [
                    sys.executable,
                    "-m",
                    "fdhandoff",
                    "front",
                    "--config",
                    str(front_config(tmp, port, receiver_path, str(tmp / "access.log"))),
                ],
                **quiet,
            )
        )
        c.wait_port(port)
        targets.append(Target("fdhandoff+accesslog", port, [logged.pid, receiver.pid]))
    upstream = c.free_port()
    uvicorn = stack.enter_context(
        c.started(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "_common:asgi_app",
                "--app-dir",
                str(c.ROOT / "bench"),
                "--host",
                "127.0.0.1",
                "--port",
                str(upstream),
                "--no-access-log",
                "--log-level",
                "warning",
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--backlog",
                "4096",
            ],
            **quiet,
        )
    )
    c.wait_port(upstream)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if os.path.exists(nginx) and not args.no_nginx:
        port, keepalive_port = c.free_port(), c.free_port()
        (tmp / "nginx.conf").write_text(
            NGINX_CONF.format(tmp=tmp, port=port, keepalive_port=keepalive_port, upstream=upstream)
        )
        proc = stack.enter_context(
            c.started([nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")], **quiet)
        )
        c.wait_port(port)
        c.wait_port(keepalive_port)
        time.sleep(0.3)
        pids = [proc.pid, *c.children(proc.pid), uvicorn.pid]
        targets.append(Target("nginx->uvicorn", port, pids))
        targets.append(Target("nginx->uvicorn-ka", keepalive_port, pids))
    else:
        print("nginx not found: skipping nginx -> uvicorn", file=sys.stderr)
    targets.append(Target("uvicorn", upstream, [uvicorn.pid]))
    return targets


def measure(target: Target, args: argparse.Namespace) -> None:
    cpu_before = c.cpu_seconds(target.pids)
    result = c.load(
        "127.0.0.1", target.port, processes=args.procs, conns=args.conns, seconds=args.seconds
    )
    cpu = c.cpu_seconds(target.pids) - cpu_before
    target.rates.append(result.rate)
    target.cpu_us.append(cpu / max(1, result.requests) * 1e6)
    target.errors += result.errors
    latency = c.load("127.0.0.1", target.port, processes=1, conns=1, seconds=args.latency_seconds)
    target.p50.append(c.percentile(latency.latencies_us, 0.50))
    target.p99.append(c.percentile(latency.latencies_us, 0.99))
    target.errors += latency.errors


# --- head-parser micro-benchmark (--parse) ------------------------------------------------

#: A browser-like GET.
BROWSER_GET = (
    b"GET /events/chat?room=42&since=1700000000 HTTP/1.1\r\n"
    b"Host: app.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/event-stream\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Referer: https://app.example.com/chat\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)
CURL_GET = (
    b"GET /fd/hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n\r\n"
)


def split_parse(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """A typical hand-written parser: split lines, partition on ':' (no validation)."""
    lines = head[:-4].split(b"\r\n")
    method, target, _version = lines[0].split(b" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    return method, target, headers


def http_client_parse(head: bytes) -> object:
    import http.client  # noqa: PLC0415
    import io  # noqa: PLC0415

    stream = io.BytesIO(head)
    stream.readline()  # the request line
    return http.client.parse_headers(stream)


def parse_bench(rounds: int) -> None:
    import functools  # noqa: PLC0415
    import timeit  # noqa: PLC0415

    sys.path.insert(0, str(c.SRC))
    import httptools  # noqa: PLC0415

    from fdhandoff.httphead import parse_head  # noqa: PLC0415

    class Callbacks:
        def on_url(self, url: bytes) -> None:
            pass

        def on_header(self, name: bytes, value: bytes) -> None:
            pass

    def raw_llhttp(head: bytes) -> None:
        parser = httptools.HttpRequestParser(Callbacks())
        parser.feed_data(head)

    parsers = [
        ("fdhandoff.httphead.parse_head (llhttp + limits, Host, target form)", parse_head),
        ("httptools alone (llhttp, callbacks, no checks)", raw_llhttp),
        ("hand-written split (no validation at all)", split_parse),
        ("http.client.parse_headers (stdlib)", http_client_parse),
    ]
    print(f"machine: {c.machine()}")
    print(f"{'parser':<68}{f'{len(BROWSER_GET)}-byte GET':>14}{f'{len(CURL_GET)}-byte GET':>14}")
    for name, parse in parsers:
        times = []
        for head in (BROWSER_GET, CURL_GET):
            call = functools.partial(parse, head)
            best = min(timeit.repeat(call, number=rounds, repeat=5))
            times.append(best / rounds * 1e6)
        print(f"{name:<68}{times[0]:>12.2f}us{times[1]:>12.2f}us")
    print("(best of 5 runs of", rounds, "parses each)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--latency-seconds", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=1, help="load client processes")
    parser.add_argument("--conns", type=int, default=8, help="connections per load process")
    parser.add_argument("--front-access-log", action="store_true")
    parser.add_argument(
        "--front-workers",
        type=int,
        default=1,
        metavar="N",
        help="add a row: the front with workers = N, to the minimal receiver",
    )
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument(
        "--pin",
        metavar="CPUS",
        help="run every server process (all stacks alike) on these CPUs, e.g. 0 or 0-1",
    )
    parser.add_argument("--parse", action="store_true", help="only the head-parser micro-benchmark")
    args = parser.parse_args()
    if args.parse:
        parse_bench(20_000)
        return 0
    print(f"machine: {c.machine()}")
    print(
        f"load: {args.procs} process(es) x {args.conns} connections, {args.seconds:g} s per "
        f"run; latency: 1 connection, {args.latency_seconds:g} s; {args.repeats} repeats"
        + (f"; servers pinned to CPU {args.pin}" if args.pin else "")
    )
    with tempfile.TemporaryDirectory(prefix="fdh-bench-") as tmp_name, ExitStack() as stack:
        targets = start_all(stack, Path(tmp_name), args)
        for target in targets:  # warm up: imports, caches, first-connection costs
            c.load("127.0.0.1", target.port, processes=1, conns=2, seconds=0.5)
        for repeat in range(args.repeats):
            order = targets[repeat % len(targets) :] + targets[: repeat % len(targets)]
            for target in order:
                measure(target, args)
            print(
                f"repeat {repeat + 1}/{args.repeats}: "
                + ", ".join(f"{t.name} {t.rates[-1]:.0f}/s" for t in targets),
                flush=True,
            )
    print()
    print(f"{'server':<22}{'req/s':>9}{'CPU us/req':>12}{'p50 us':>9}{'p99 us':>9}{'errors':>8}")
    for t in targets:
        print(
            f"{t.name:<22}{c.median(t.rates):>9.0f}{c.median(t.cpu_us):>12.1f}"
            f"{c.median(t.p50):>9.0f}{c.median(t.p99):>9.0f}{t.errors:>8}"
        )
    by_name = {t.name: t for t in targets}
    print()
    for t in targets:
        print(
            f"RESULT {t.name}_rps={c.median(t.rates):.0f} {t.name}_cpu_us={c.median(t.cpu_us):.1f} "
            f"{t.name}_p50_us={c.median(t.p50):.0f} {t.name}_p99_us={c.median(t.p99):.0f}"
        )
    uvicorn = by_name["uvicorn"]
    for mine, prefix in (
        ("fdhandoff", ""),
        ("fdhandoff-serve", "serve_"),
        ("fdhandoff-serve-asgi", "serve_asgi_"),
    ):
        front = by_name[mine]
        for name, label in (("nginx->uvicorn", "nginx_uvicorn"), ("nginx->uvicorn-ka", "nginx_ka")):
            if name in by_name:
                pair = by_name[name]
                print(
                    f"RESULT {prefix}rps_ratio_vs_{label}="
                    f"{c.median(front.rates) / c.median(pair.rates):.2f}"
                    f" {prefix}cpu_ratio_vs_{label}="
                    f"{c.median(front.cpu_us) / c.median(pair.cpu_us):.2f}"
                )
        print(
            f"RESULT {prefix}rps_ratio_vs_uvicorn="
            f"{c.median(front.rates) / c.median(uvicorn.rates):.2f} "
            f"{prefix}p50_minus_uvicorn_us={c.median(front.p50) - c.median(uvicorn.p50):.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
