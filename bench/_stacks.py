"""Whole stacks for the memory and broadcast benchmarks, and the clients that load them.

Two stacks serve the same hub (bench/_apps.py):

* ``fdhandoff``: ``fdhandoff front`` (``/`` in pass mode, ``/ws`` in websocket
  mode) handing connections to ``fdhandoff serve _apps:handler``;
* ``nginx->uvicorn``: nginx ``proxy_pass`` (``proxy_buffering off``, the
  WebSocket upgrade headers, 1 h proxy timeouts) to uvicorn (uvloop,
  httptools, the ``websockets`` library) serving ``_apps:starlette_app`` on a
  UNIX socket, as commonly deployed (a TCP upstream would also run out of
  ephemeral ports at 50,000 connections: ~28,000 per address pair).

Every process here may hold at most 20,000 open files, so:

* the load clients run in several processes, at most :data:`PER_CLIENT`
  connections each, from their own 127.x.y.z source addresses (at most
  :data:`PER_SOURCE` connections per address);
* the fdhandoff receiver and uvicorn get ``--workers`` (:func:`app_workers`):
  they hold one fd per connection;
* nginx holds two fds per proxied connection (client and upstream):
  :func:`nginx_workers` processes, ``worker_rlimit_nofile 20000``,
  ``worker_connections 19000``, and ``listen ... reuseport`` so the kernel
  spreads clients evenly over the workers (without it one worker may take
  most of them and hit the cap).

Memory is RSS (and PSS) summed over every process of a stack, masters and
workers, from /proc.  Everything started here is stopped on exit, errors
and Ctrl-C included; every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import math
import multiprocessing
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as c  # noqa: E402

STACKS = ("fdhandoff", "nginx->uvicorn")
KINDS = ("sse", "ws")

#: Connections per load-client process: under the 20,000-file cap with room
#: for the interpreter's own files.
PER_CLIENT = 16_000
#: Connections per source address: the kernel has ~28,000 ephemeral ports per
#: (source, destination) pair (ip_local_port_range 32768-60999).
PER_SOURCE = 10_000
#: Connections a load-client process has waiting for their response head at a
#: time: clients arriving in a burst, bounded so no listen backlog (4096)
#: overflows and no SYN has to be retried.
IN_FLIGHT = 256
#: Open files one server process may use for connections: the 20,000 cap
#: minus room for listeners, logs and the interpreter.
FDS_PER_PROCESS = 17_000
#: uvicorn and the fdhandoff receiver spread connections over their workers
#: unevenly (whichever process wakes first accepts), so each is planned for
#: this many connections, well under its 20,000-file cap.
CONNS_PER_APP_WORKER = 12_500

#: Linux's IP_BIND_ADDRESS_NO_PORT (ip(7)): choose the port at connect time,
#: not at bind time (bind(addr, 0) searches the whole range every time).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def app_workers(connections: int) -> int:
    return max(1, math.ceil(connections / CONNS_PER_APP_WORKER))


def nginx_workers(connections: int) -> int:
    return max(1, math.ceil(2 * connections / FDS_PER_PROCESS))


# --- processes ------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        with contextlib.suppress(OSError):
            kids = c.children(todo.pop())
            found += kids
            todo += kids
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@contextlib.contextmanager
def process_tree(
    cmd: list[str], log: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (output to ``log``); on exit SIGTERM it, then kill what is left of its tree."""
    seen: dict[int, bytes] = {}
    with log.open("ab") as out:
        try:
            with c.started(cmd, stdout=out, stderr=subprocess.STDOUT, env=env) as proc:
                try:
                    yield proc
                finally:
                    seen = {pid: _cmdline(pid) for pid in descendants(proc.pid)}
        finally:
            # Workers outliving their master (a master that had to be killed):
            # kill them, if the pid still names the same program.
            for pid, cmdline in seen.items():
                if cmdline and _cmdline(pid) == cmdline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


@dataclass
class Memory:
    rss_kib: int
    pss_kib: int
    processes: int
    #: RSS per part of the stack ("front", "receiver", "nginx", "uvicorn").
    parts: dict[str, int]


@dataclass
class Stack:
    name: str
    port: int
    tmp: Path
    #: Part name -> the master process of that part.
    masters: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)

    def memory(self) -> Memory:
        rss = pss = count = 0
        parts: dict[str, int] = {}
        for part, proc in self.masters.items():
            part_rss = 0
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(OSError, RuntimeError):
                    kib = c.rss_kib(pid)
                    part_rss += kib
                    pss += pss_kib(pid)
                    count += 1
            parts[part] = part_rss
            rss += part_rss
        return Memory(rss, pss, count, parts)

    def check_alive(self) -> None:
        for part, proc in self.masters.items():
            if proc.poll() is not None:
                logs = "\n".join(tail(log) for log in self.logs)
                raise RuntimeError(f"{self.name}: {part} exited ({proc.returncode})\n{logs}")

    def describe(self) -> str:
        return ", ".join(f"{part} {n} worker(s)" for part, n in self.workers.items())


def _env() -> dict[str, str]:
    env = c.python_env()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
    return env


def _ready(port: int, timeout: float = 30.0) -> None:
    """Wait until the whole stack answers (workers started, app loaded)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            http_get(port, "/publish?kind=sse&seq=-1", timeout=5.0)
            return
        except (OSError, RuntimeError) as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"the stack on port {port} never answered: {last}")


@contextlib.contextmanager
def fdhandoff_stack(tmp: Path, *, workers: int) -> Iterator[Stack]:
    env = _env()
    receiver_path = tmp / "receiver.sock"
    port = c.free_port()
    config = tmp / "front.toml"
    config.write_text(
        f'[[listen]]\naddress = "127.0.0.1:{port}"\nbacklog = 4096\n'
        f'[[route]]\nprefix = "/"\nbackend = "unix:{receiver_path}"\n'
        f'[[route]]\nprefix = "/ws"\nmode = "websocket"\nbackend = "unix:{receiver_path}"\n'
        f'[log]\naccess = "off"\nlevel = "warning"\n'
    )
    stack = Stack("fdhandoff", port, tmp, workers={"receiver": workers})
    receiver_cmd = [
        sys.executable,
        "-m",
        "fdhandoff",
        "serve",
        "_apps:handler",
        "--interface",
        "handoff",
        "--bind",
        f"unix:{receiver_path}",
        "--no-access-log",
        "--log-level",
        "warning",
        "--grace",
        "1",
        "--workers",
        str(workers),
    ]
    front_cmd = [sys.executable, "-m", "fdhandoff", "front", "--config", str(config)]
    with contextlib.ExitStack() as stop:
        log = tmp / "receiver.log"
        stack.logs.append(log)
        stack.masters["receiver"] = stop.enter_context(process_tree(receiver_cmd, log, env))
        c.wait_path(str(receiver_path))
        log = tmp / "front.log"
        stack.logs.append(log)
        stack.masters["front"] = stop.enter_context(process_tree(front_cmd, log, env))
        c.wait_port(port)
        _ready(port)
        yield stack


NGINX_CONF = """
daemon off;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{ server unix:{tmp}/uvicorn.sock; }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
        location /ws {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if os.path.exists(found) else None


@contextlib.contextmanager
def nginx_uvicorn_stack(tmp: Path, *, nginx: int, uvicorn: int) -> Iterator[Stack]:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    env = _env()
    # nginx's workers run as another user when started as root: they must
    # reach uvicorn's socket (uvicorn makes it 0666).
    tmp.chmod(0o755)
    uds = tmp / "uvicorn.sock"
    port = c.free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port, workers=nginx))
    uvicorn_cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "_apps:starlette_app",
        "--factory",
        "--app-dir",
        str(HERE),
        "--uds",
        str(uds),
        "--no-access-log",
        "--log-level",
        "warning",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--ws",
        "websockets",
        # The load clients are raw sockets that never answer a ping: without
        # this, websockets closes every idle connection after 20 + 20 s.
        "--ws-ping-interval",
        "3600",
        "--backlog",
        "4096",
        "--timeout-graceful-shutdown",
        "2",
        "--workers",
        str(uvicorn),
    ]
    stack = Stack("nginx->uvicorn", port, tmp, workers={"nginx": nginx, "uvicorn": uvicorn})
    with contextlib.ExitStack() as stop:
        log = tmp / "uvicorn.log"
        stack.logs.append(log)
        stack.masters["uvicorn"] = stop.enter_context(process_tree(uvicorn_cmd, log, env))
        c.wait_path(str(uds), timeout=60)
        log = tmp / "nginx.log"
        stack.logs += [log, tmp / "nginx-error.log"]
        nginx_cmd = [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
        stack.masters["nginx"] = stop.enter_context(process_tree(nginx_cmd, log, env))
        c.wait_port(port)
        _ready(port, timeout=60)
        yield stack


@contextlib.contextmanager
def stack(name: str, tmp: Path, connections: int) -> Iterator[Stack]:
    """The named stack, with enough worker processes for ``connections``."""
    if name == "fdhandoff":
        with fdhandoff_stack(tmp, workers=app_workers(connections)) as running:
            yield running
    elif name == "nginx->uvicorn":
        with nginx_uvicorn_stack(
            tmp, nginx=nginx_workers(connections), uvicorn=app_workers(connections)
        ) as running:
            yield running
    else:
        raise ValueError(f"unknown stack {name!r}")


def http_get(port: int, target: str, timeout: float = 60.0) -> bytes:
    """One GET through the stack; the body of a 200, else RuntimeError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {target}: {head[:60]!r}")
    return body


def established(port: int) -> int:
    """Server-side TCP connections in ESTABLISHED on 127.0.0.1:``port`` (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split(None, 4)
            if fields[1] == local and fields[3] == "01":
                count += 1
    return count


# --- load clients ---------------------------------------------------------------------------------


class Sources:
    """Fresh loopback source addresses: 127.X.Y.Z, never reused within a process.

    A new range per run, because the previous run's closed connections sit
    in TIME_WAIT on their (address, port) pairs.
    """

    def __init__(self) -> None:
        self._next = random.randrange(0, 100) * 65_536

    def take(self, count: int) -> list[str]:
        found = []
        for _ in range(count):
            n = self._next
            self._next += 1
            found.append(f"127.{20 + (n // 65_536) % 200}.{(n // 250) % 256}.{2 + n % 250}")
        return found


SOURCES = Sources()


def request(kind: str) -> bytes:
    if kind == "ws":
        key = base64.b64encode(os.urandom(16))
        return (
            b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    return b"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"


_MARKER = re.compile(rb"bcast (\d+) ")


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _client(
    port: int, count: int, kind: str, sources: list[str], seconds: float, pipe: Connection
) -> None:
    """Open ``count`` connections, hold them, timestamp every broadcast message.

    Messages to the parent: ``("progress", held, failed)`` while connecting,
    ``("established", held, failed, reasons)`` once done (or out of time),
    ``reasons`` counting the failures by what happened,
    ``("got", seq)`` when every held connection has seen message ``seq``.
    From the parent: ``"times"`` (answered with ``{seq: [monotonic, ...]}``),
    ``"stop"``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    expected = b"HTTP/1.1 101" if kind == "ws" else b"HTTP/1.1 200"
    poller = select.epoll()
    poller.register(pipe.fileno(), select.EPOLLIN)
    pending: dict[int, tuple[socket.socket, bytearray]] = {}
    held: dict[int, socket.socket] = {}
    tails: dict[int, bytes] = {}
    last_seq: dict[int, int] = {}
    times: dict[int, list[float]] = {}
    opened = failed = dropped = 0
    reasons: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    done = False
    next_progress = 0.0

    def fail(fd: int, why: str) -> None:
        nonlocal failed
        sock, _ = pending.pop(fd)
        poller.unregister(fd)
        sock.close()
        failed += 1
        reasons[why] = reasons.get(why, 0) + 1

    while True:
        now = time.monotonic()
        while not done and opened < count and len(pending) < IN_FLIGHT and now < deadline:
            sock = socket.socket()
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((sources[opened // PER_SOURCE], 0))
            sock.setblocking(False)
            opened += 1
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                failed += 1
                why = f"connect: {errno.errorcode.get(err, err)}"
                reasons[why] = reasons.get(why, 0) + 1
                continue
            pending[sock.fileno()] = (sock, bytearray())
            poller.register(sock.fileno(), select.EPOLLOUT)
        if not done and ((opened >= count and not pending) or now >= deadline):
            done = True
            for fd in list(pending):
                fail(fd, "no response head in time")
            pipe.send(("established", len(held), failed + dropped, reasons))
        elif not done and now >= next_progress:
            pipe.send(("progress", len(held), failed + dropped))
            next_progress = now + 0.5
        for fd, event in poller.poll(0.2):
            if fd == pipe.fileno():
                command = pipe.recv()
                if command == "times":
                    pipe.send(times)
                    continue
                for sock in held.values():
                    sock.close()
                for sock, _ in pending.values():
                    sock.close()
                return
            if fd in pending:
                sock, buf = pending[fd]
                if event & select.EPOLLOUT:
                    try:
                        sock.send(request(kind))
                    except OSError as exc:
                        fail(fd, f"connect/send: {_errname(exc)}")
                        continue
                    poller.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    fail(
                        fd, f"before the response head: {errno.errorcode.get(exc.errno or 0, exc)}"
                    )
                    continue
                if not data:
                    fail(fd, "closed before the response head")
                    continue
                buf += data
                if b"\r\n\r\n" not in buf:
                    continue
                if not buf.startswith(expected):
                    fail(fd, "answered " + buf.partition(b"\r\n")[0].decode("latin-1")[:40])
                    continue
                rest = buf.partition(b"\r\n\r\n")[2]
                if kind == "ws" and rest[:1] == b"\x88":  # a close frame (RFC 6455 5.5.1)
                    code = int.from_bytes(rest[2:4], "big") if len(rest) >= 4 else 0
                    fail(fd, f"101, then a close frame {code}")
                    continue
                del pending[fd]
                held[fd] = sock
                tails[fd] = b""
                last_seq[fd] = -1
                continue
            sock = held[fd]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            received = time.monotonic()
            if not data:  # the server closed it: no longer held
                poller.unregister(fd)
                del held[fd]
                sock.close()
                dropped += 1
                why = "closed by the server after the response head"
                reasons[why] = reasons.get(why, 0) + 1
                continue
            seen = tails[fd] + data
            for match in _MARKER.finditer(seen):
                seq = int(match.group(1))
                if seq > last_seq[fd]:
                    last_seq[fd] = seq
                    got = times.setdefault(seq, [])
                    got.append(received)
                    if len(got) == len(held):
                        pipe.send(("got", seq))
            tails[fd] = seen[-24:]


@dataclass
class ClientState:
    held: int = 0
    failed: int = 0
    established: bool = False
    reasons: dict[str, int] = field(default_factory=dict)


class Clients:
    """Load-client processes holding ``total`` connections to ``port``; a context manager."""

    def __init__(self, port: int, total: int, kind: str, *, processes: int | None = None) -> None:
        self.total = total
        per = math.ceil(total / (processes or max(1, math.ceil(total / PER_CLIENT))))
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        self.states: list[ClientState] = []
        #: Time to establish everything: 30 s plus 250 connections per second.
        self.seconds = 30.0 + total / 250
        try:
            for start in range(0, total, per):
                count = min(per, total - start)
                sources = SOURCES.take(math.ceil(count / PER_SOURCE))
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_client,
                    args=(port, count, kind, sources, self.seconds, child),
                    daemon=True,
                )
                proc.start()
                child.close()
                self.pipes.append(parent)
                self.procs.append(proc)
                self.states.append(ClientState())
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def held(self) -> int:
        return sum(state.held for state in self.states)

    @property
    def failed(self) -> int:
        return sum(state.failed for state in self.states)

    def reasons(self) -> dict[str, int]:
        """Why connections failed: what happened, and how many times."""
        merged: dict[str, int] = {}
        for state in self.states:
            for why, count in state.reasons.items():
                merged[why] = merged.get(why, 0) + count
        return merged

    def _pump(self, timeout: float) -> list[tuple[int, Any]]:
        """Messages from the clients (index, message) within ``timeout``; states updated."""
        got = []
        ready = cast(list[Connection], multiprocessing.connection.wait(self.pipes, timeout))
        for pipe in ready:
            index = self.pipes.index(pipe)
            try:
                message = pipe.recv()
            except EOFError:
                raise RuntimeError("a load client died") from None
            state = self.states[index]
            if message[0] in ("progress", "established"):
                state.held, state.failed = message[1], message[2]
            if message[0] == "established":
                state.established = True
                state.reasons = message[3]
            got.append((index, message))
        return got

    def wait_established(self, on_progress: Any = None) -> float:
        """Wait until every client is done connecting; seconds it took."""
        started = time.monotonic()
        deadline = started + self.seconds + 30
        while not all(state.established for state in self.states):
            if time.monotonic() > deadline:
                raise RuntimeError("the load clients never finished connecting")
            self._pump(0.5)
            if on_progress is not None:
                on_progress(self.held, self.failed)
        return time.monotonic() - started

    def wait_got(self, seq: int, timeout: float) -> bool:
        """Wait until every client saw message ``seq`` on all its connections."""
        deadline = time.monotonic() + timeout
        waiting = set(range(len(self.pipes)))
        while waiting and time.monotonic() < deadline:
            for index, message in self._pump(0.2):
                if message[0] == "got" and message[1] == seq:
                    waiting.discard(index)
        return not waiting

    def times(self) -> dict[int, list[float]]:
        merged: dict[int, list[float]] = {}
        for pipe in self.pipes:
            pipe.send("times")
        for index, pipe in enumerate(self.pipes):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if not pipe.poll(1.0):
                    continue
                message = pipe.recv()
                if isinstance(message, dict):
                    for seq, values in message.items():
                        merged.setdefault(seq, []).extend(values)
                    break
                if message[0] in ("progress", "established"):
                    self.states[index].held = message[1]
            else:
                raise RuntimeError("a load client did not report its times")
        return merged

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send("stop")
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()
        self.pipes, self.procs = [], []


# --- the machine ----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    found: dict[str, str] = {}
    for name in ("uvloop", "httptools", "uvicorn", "starlette", "sse-starlette", "websockets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    binary = nginx_binary()
    if binary is not None:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
        found["nginx"] = (out.stderr or out.stdout).strip().rpartition("/")[2]
    else:
        found["nginx"] = "not installed"
    return found


def machine() -> dict[str, str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        **versions(),
    }
