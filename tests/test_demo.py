"""`fdhandoff demo` end to end: real processes, curl, and the real headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from cdp import chromium_path, launch
from fdhandoff.demo.command import _listening


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    url: str
    directory: Path
    banner: str

    def children(self) -> list[int]:
        """PIDs of the front and receiver, read from the banner."""
        return [int(pid) for pid in re.findall(r"(?:front|receiver)\s+pid (\d+)", self.banner)]


def _start_demo() -> Demo:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdhandoff", "demo", "--port", str(port)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    banner = "".join(lines)
    if "Ctrl-C" not in banner:
        proc.kill()
        proc.wait()
        pytest.fail(f"demo did not start:\n{banner}")
    match = re.search(r"config (\S+)/front\.toml", banner)
    assert match, banner
    return Demo(proc, f"http://127.0.0.1:{port}/", Path(match.group(1)), banner)


def _stop(demo: Demo, signum: int = signal.SIGINT) -> str:
    """Signal the demo, wait for it; return what it wrote after the banner."""
    if demo.proc.poll() is None:
        demo.proc.send_signal(signum)
        try:
            demo.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.proc.kill()
            demo.proc.wait()
    rest = ""
    if demo.proc.stderr is not None:
        # Non-blocking: a child that outlived the demo would hold the pipe open.
        fd = demo.proc.stderr.fileno()
        os.set_blocking(fd, False)
        chunks: list[bytes] = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        rest = b"".join(chunks).decode(errors="replace")
        demo.proc.stderr.close()
    return rest


def _processes_mentioning(directory: Path) -> list[int]:
    """PIDs whose command line names the demo's directory (front and receiver do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if os.fsencode(directory) in cmdline:
            found.append(int(entry.name))
    return found


def _port(demo: Demo) -> int:
    return int(demo.url.rsplit(":", 1)[1].rstrip("/"))


def _open_stats(demo: Demo) -> tuple[socket.socket, dict[str, int]]:
    """Open the /stats SSE stream; return the socket and the first snapshot."""
    sock = socket.create_connection(("127.0.0.1", _port(demo)), timeout=20)
    sock.sendall(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    received = b""
    while b"\r\n\r\n" not in received or b"\n\n" not in received.split(b"\r\n\r\n", 1)[1]:
        chunk = sock.recv(4096)
        assert chunk, f"the stats stream ended early: {received!r}"
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    event = body.split(b"\n\n", 1)[0].decode()
    assert "event: stats" in event, event
    data = next(line[6:] for line in event.splitlines() if line.startswith("data: "))
    snapshot: dict[str, int] = json.loads(data)
    return sock, snapshot


@contextmanager
def _open_chat(demo: Demo) -> Iterator[ClientConnection]:
    """Open the chat WebSocket and wait until the receiver holds it (its echo arrives)."""
    with connect(f"ws://127.0.0.1:{_port(demo)}/ws/chat", open_timeout=20) as ws:
        ws.send(json.dumps({"from": "test", "text": "here"}))
        assert json.loads(ws.recv(timeout=20)) == {"from": "test", "text": "here"}
        yield ws


@pytest.fixture
def demo() -> Iterator[Demo]:
    running = _start_demo()
    try:
        yield running
    finally:
        _stop(running)


def _curl(curl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [curl, "-s", "--max-time", "20", *args], capture_output=True, text=True, check=False
    )


def test_page_tokens_and_refusal_through_the_front(
    demo: Demo, require_tool: Callable[[str], str]
) -> None:
    curl = require_tool("curl")
    page = _curl(curl, "-w", "%{http_code}", demo.url)
    assert page.stdout.endswith("200")
    assert "<title>fdhandoff demo</title>" in page.stdout

    stream = _curl(curl, "-N", demo.url + "llm/stream?token=demo-token&prompt=hi")
    events = [line[6:] for line in stream.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "you asked: 'hi'" in events[0]
    assert len(events) > 10

    refused = _curl(curl, "-w", " %{http_code}", demo.url + "llm/stream?token=wrong")
    assert refused.stdout.endswith(" 401")

    missing = _curl(curl, "-w", " %{http_code}", demo.url + "nothing-here")
    assert missing.stdout.endswith(" 404")


def test_ctrl_c_stops_every_process_and_removes_the_sockets() -> None:
    running = _start_demo()
    children = running.children()
    assert len(children) == 2
    assert any(running.directory.glob("*.sock"))
    _stop(running)
    assert running.proc.returncode == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not running.directory.exists()


def test_browser_sees_tokens_chat_and_counters(
    demo: Demo, require_tool: Callable[[str], str]
) -> None:
    require_tool("chromium")
    executable = chromium_path()
    assert executable is not None
    with launch(executable) as browser:
        first = browser.open(demo.url)
        second = browser.open(demo.url)
        for tab in (first, second):
            tab.wait_for(
                "document.getElementById('chat-status').textContent.startsWith('connected')"
            )

        # Counters arrive over SSE and count this tab's own connections.
        handed = first.wait_for(
            "(() => { const n = parseInt(document.getElementById('handed-off').textContent);"
            " return n >= 3 ? n : 0; })()"
        )
        assert handed >= 3

        # Token stream through the auth route.
        first.evaluate("document.getElementById('llm-go').click()")
        first.wait_for("document.getElementById('llm-status').textContent === 'done'", 60)
        tokens = first.evaluate("document.getElementById('tokens').textContent")
        assert "SCM_RIGHTS" in tokens

        # A chat message typed in one tab arrives in the other.
        first.evaluate(
            "document.getElementById('chat-text').value = 'hello from tab one';"
            "document.getElementById('chat-send').click()"
        )
        line = second.wait_for(
            "Array.from(document.querySelectorAll('#chat-log p')).map(p => p.textContent)"
            ".find(t => t.endsWith('hello from tab one')) || ''"
        )
        assert line.endswith(": hello from tab one")
        held = second.wait_for(
            "(() => { const n = parseInt(document.getElementById('ws-held').textContent);"
            " return n >= 2 ? n : 0; })()"
        )
        assert held >= 2


def test_ctrl_c_with_open_connections_is_quick_and_clean() -> None:
    running = _start_demo()
    children = running.children()
    assert len(children) == 2
    stats, _ = _open_stats(running)
    with stats, _open_chat(running) as chat:
        started = time.monotonic()
        rest = _stop(running)
        elapsed = time.monotonic() - started
        # The receiver's shutdown grace is what a held stream costs: about a
        # second, not the 10 s default nor a SIGKILL after it.
        assert elapsed < 5.0, (elapsed, rest)
        assert running.proc.returncode == 0, rest
        assert "killed" not in rest, rest
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert _processes_mentioning(running.directory) == []
        assert not running.directory.exists()
        # Both clients were closed by the receiver, not left hanging.
        stats.settimeout(5)
        while stats.recv(4096):
            pass
        with pytest.raises(ConnectionClosed):
            chat.recv(timeout=5)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for the processes to end; return those still running."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _alive(pid)]
    return alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) is gone for our purpose.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sighup_stops_every_process_and_removes_the_sockets() -> None:
    running = _start_demo()
    children = running.children()
    assert len(children) == 2
    try:
        rest = _stop(running, signal.SIGHUP)
        assert running.proc.returncode == 0, rest
        assert _wait_gone(children, 5) == []
        assert _processes_mentioning(running.directory) == []
        assert not running.directory.exists()
    finally:
        _kill_leftovers(children)
        shutil.rmtree(running.directory, ignore_errors=True)


def test_children_stop_when_the_demo_is_killed() -> None:
    running = _start_demo()
    children = running.children()
    assert len(children) == 2
    try:
        # SIGKILL leaves the demo no chance to stop anything: the children must
        # notice their parent died by themselves.
        _stop(running, signal.SIGKILL)
        assert _wait_gone(children, 10) == []
        assert _processes_mentioning(running.directory) == []
        # The receiver removes its own socket files when it stops (app.sock
        # is the killed demo's own and stays, with the directory).
        for name in ("pages.sock", "chat.sock", "llm.sock"):
            assert not (running.directory / name).exists()
    finally:
        _kill_leftovers(children)
        shutil.rmtree(running.directory, ignore_errors=True)


def test_a_taken_port_is_one_clear_error_and_no_banner() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fdhandoff", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert "is running" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]
    assert "--port" in lines[0]


def test_readiness_is_the_front_itself_listening() -> None:
    with socket.socket() as ours:
        ours.bind(("127.0.0.1", 0))
        ours.listen()
        port = ours.getsockname()[1]
        assert _listening(os.getpid(), port)
        # Something else accepting on the port is not the front being ready.
        with subprocess.Popen(["sleep", "30"]) as other:
            try:
                assert not _listening(other.pid, port)
            finally:
                other.kill()
    assert not _listening(os.getpid(), port)


def test_first_stats_snapshot_counts_its_own_stream(demo: Demo) -> None:
    stats, first = _open_stats(demo)
    with stats:
        assert first["held"] == 1, first
        assert first["streams"] == 0 and first["chat"] == 0, first
        with _open_chat(demo):
            again, second = _open_stats(demo)
            with again:
                # The first stats stream, the chat socket and this stream.
                assert second["chat"] == 1, second
                assert second["held"] == 3, second
