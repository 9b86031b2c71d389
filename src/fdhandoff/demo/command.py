"""``fdhandoff demo``: the whole system on one machine, with a page to watch it.

Starts, each as its own process like a real deployment:

* the demo receiver (``fdhandoff serve fdhandoff.demo.receivers:handler``) on
  three UNIX sockets: the page and counters, the chat, the token streamer
  (SEQPACKET, Apache's format);
* the front on ``127.0.0.1:8080`` with a pass route, a websocket route and an
  auth route;

and runs the small auth application in this process.  Ctrl-C, SIGTERM or
SIGHUP (the terminal closed) stops everything and removes the socket
directory; on Linux the children also stop if this process is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .authapp import DEMO_TOKEN, AuthApp

__all__ = ["register"]

#: How long a child may take to be ready (the front and receiver start in well
#: under a second; a loaded 2-core machine can take several).
READY_TIMEOUT: Final = 30.0
#: The receiver's ``--grace``: how long open pages (the /stats stream, the chat
#: socket) may hold the receiver after Ctrl-C.  A page never ends these by
#: itself, so the default 10 s grace would only delay every stop by 10 s.
RECEIVER_GRACE: Final = 1.0
#: How long children get after SIGTERM before SIGKILL.  Well past the
#: receiver's grace (and the second it then gives cancelled tasks), so a
#: child that is killed is stuck, not merely slow on a loaded machine.
STOP_TIMEOUT: Final = RECEIVER_GRACE + 9.0
#: Each of these stops the demo cleanly.  SIGHUP is the terminal going away:
#: the children run in their own sessions (so Ctrl-C reaches only this
#: process, which then stops them in order), so no hangup reaches them, and
#: without a handler this process would die leaving them running.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: prctl(2) option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG: Final = 1


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the live demo: front, receivers and an auth app on 127.0.0.1:8080",
        description="Start a front, the demo receivers and a small auth application, and "
        "serve a live page showing an SSE token stream, a WebSocket chat and counters.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="front address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="front port (default 8080)")
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    parser.set_defaults(handler=_run)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything of one demo run lives."""

    directory: Path
    host: str
    port: int

    @property
    def pages(self) -> Path:
        return self.directory / "pages.sock"

    @property
    def chat(self) -> Path:
        return self.directory / "chat.sock"

    @property
    def llm(self) -> Path:
        return self.directory / "llm.sock"

    @property
    def app(self) -> Path:
        return self.directory / "app.sock"

    @property
    def config(self) -> Path:
        return self.directory / "front.toml"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def front_config(self, log_level: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"""\
[[listen]]
address = "{host}:{self.port}"

[[route]]
prefix = "/"
backend = "unix:{self.pages}"

[[route]]
prefix = "/ws/chat"
mode = "websocket"
backend = "unix:{self.chat}"

[[route]]
prefix = "/llm/"
mode = "auth"
upstream = "unix:{self.app}"
allowed_prefix = "{self.directory}/"

[log]
level = "{log_level}"
access = "{"stderr" if log_level in ("debug", "info") else "off"}"
"""


def _run(args: argparse.Namespace) -> int:
    # Checked before anything starts: the front would only fail later, with a
    # status the user has to decode.  The front checks again when it binds
    # (something may take the port meanwhile); readiness then tells them apart.
    if _port_taken(args.host, args.port):
        _say(f"fdhandoff demo: {_port_taken_message(args.host, args.port)}")
        return 1
    directory = Path(os.path.realpath(tempfile.mkdtemp(prefix="fdhandoff-demo-")))
    layout = Layout(directory, args.host, args.port)
    try:
        return asyncio.run(_main(layout, args.log_level))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _main(layout: Layout, log_level: str) -> int:
    layout.config.write_text(layout.front_config(log_level))
    app = AuthApp(str(layout.llm))
    server = await app.serve_unix(str(layout.app))
    python = sys.executable
    children: list[tuple[str, asyncio.subprocess.Process]] = []
    status = 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    die_with_us = _die_with_parent()
    try:
        receiver = await asyncio.create_subprocess_exec(
            python, "-m", "fdhandoff", "serve", "fdhandoff.demo.receivers:handler",
            "--interface", "handoff", "--log-level", log_level, "--grace", str(RECEIVER_GRACE),
            *(["--no-access-log"] if log_level not in ("debug", "info") else []),
            "--bind", f"unix:{layout.pages}", "--bind", f"unix:{layout.chat}",
            "--bind", f"unix-seqpacket:{layout.llm}",
            start_new_session=True, preexec_fn=die_with_us,
        )  # fmt: skip
        children.append(("receiver", receiver))
        await _wait_ready(
            receiver, lambda: all(p.exists() for p in (layout.pages, layout.chat, layout.llm)), stop
        )
        front = await asyncio.create_subprocess_exec(
            python, "-m", "fdhandoff", "front", "--config", str(layout.config),
            start_new_session=True, preexec_fn=die_with_us,
        )  # fmt: skip
        children.append(("front", front))
        try:
            await _wait_ready(front, lambda: _front_ready(front.pid, layout), stop)
        except ChildFailed:
            if front.returncode is not None and _port_taken(layout.host, layout.port):
                raise ChildFailed(_port_taken_message(layout.host, layout.port)) from None
            raise
        _banner(layout, receiver.pid, front.pid)
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        waiters += [asyncio.create_task(proc.wait()) for _, proc in children]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters:
            task.cancel()
        exited = [(name, proc) for name, proc in children if proc.returncode is not None]
        for name, proc in exited:
            _say(f"fdhandoff demo: the {name} exited ({proc.returncode})")
        if not exited:
            _say("\nstopping…")
            status = 0
    except StoppedEarly:
        _say("\nstopping…")
        status = 0
    except ChildFailed as exc:
        _say(f"fdhandoff demo: {exc}")
    finally:
        server.close()
        killed = await _stop_all(children)
    # A child that needed SIGKILL did not shut down cleanly: say so, and do
    # not report a clean stop.
    for name in killed:
        _say(f"fdhandoff demo: the {name} did not stop within {STOP_TIMEOUT:.0f} s; killed it")
    return 1 if killed else status


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies.

    A handler covers the signals that can be caught; SIGKILL (or a crash)
    cannot be, and the children, in their own sessions, would keep the port
    and the sockets forever.  PR_SET_PDEATHSIG is Linux only; elsewhere the
    children outlive a killed demo.  SIGTERM, not SIGKILL, so they still shut
    down cleanly and remove their socket files.  The death signal follows the
    thread that forked, which is this event loop's thread: the one that lives
    as long as the demo.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Resolved here, before fork: loading a library in the child is not safe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The demo may have died between fork() and prctl(): then no death
        # signal will ever come.  _exit, not a signal: until exec the child
        # still has this loop's SIGTERM handler, which only sets a flag.
        if os.getppid() != parent:
            os._exit(1)

    return in_child


def _say(text: str) -> None:
    """Write a line to stderr, if there still is one.

    After SIGHUP the terminal may be gone and writing to it fails (EIO); that
    must not cut short stopping the children and removing the directory.
    """
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


class ChildFailed(Exception):
    pass


class StoppedEarly(Exception):
    """A stop signal came while a child was still starting."""


async def _wait_ready(
    proc: asyncio.subprocess.Process, ready: Callable[[], bool], stop: asyncio.Event
) -> None:
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    while not ready():
        # Start-up can take seconds on a loaded machine; a Ctrl-C or hangup
        # then must not wait for it.
        if stop.is_set():
            raise StoppedEarly
        if proc.returncode is not None:
            raise ChildFailed(f"a process exited during start-up (status {proc.returncode})")
        if asyncio.get_running_loop().time() > deadline:
            raise ChildFailed(f"not ready after {READY_TIMEOUT:.0f} s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.05)


def _port_taken(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something already uses it.

    SO_REUSEADDR like the front, so the TIME_WAIT leftovers of a demo just
    stopped do not count.  Other failures (an address not on this machine)
    are left to the front, which names them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _port_taken_message(host: str, port: int) -> str:
    return (
        f"port {port} on {host} is already in use; "
        f"stop what listens there or choose another port with --port"
    )


def _front_ready(pid: int, layout: Layout) -> bool:
    if os.path.exists("/proc/net/tcp"):
        return _listening(pid, layout.port)
    # Without /proc the port was at least free a moment before the front
    # started, so whoever accepts now is almost surely the front.
    return _accepts(layout.host, layout.port)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself has a TCP socket listening on ``port``.

    Not "something accepts on the port": on a taken port that is the other
    program, and the demo would announce a front that is about to exit.
    Linux /proc: the listening sockets' inodes on that port, against the
    sockets among the process's fds.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN.
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


async def _stop_all(children: list[tuple[str, asyncio.subprocess.Process]]) -> list[str]:
    """SIGTERM every child, SIGKILL any still running after STOP_TIMEOUT; return those."""
    for _, proc in reversed(children):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    # One deadline for all: they stop in parallel, so the wait is not summed.
    deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT
    killed: list[str] = []
    for name, proc in reversed(children):
        if proc.returncode is not None:
            continue
        try:
            remaining = max(0.1, deadline - asyncio.get_running_loop().time())
            await asyncio.wait_for(proc.wait(), remaining)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            killed.append(name)
    return killed


def _banner(layout: Layout, receiver_pid: int, front_pid: int) -> None:
    _say(
        f"""
fdhandoff demo is running: open {layout.url}

  front     pid {front_pid:<7} {layout.url}  (config {layout.config})
              /          pass      -> unix:{layout.pages}
              /ws/chat   websocket -> unix:{layout.chat}
              /llm/      auth      -> app unix:{layout.app}
                                      -> unix-seqpacket:{layout.llm}
  receiver  pid {receiver_pid:<7} fdhandoff.demo.receivers:handler on the three sockets
  auth app  pid {os.getpid():<7} unix:{layout.app} (token: {DEMO_TOKEN})

Try:  curl -N '{layout.url}llm/stream?token={DEMO_TOKEN}&prompt=hello'
Ctrl-C stops everything.
"""
    )
