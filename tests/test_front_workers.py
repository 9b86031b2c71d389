"""``workers = N``: the front in N processes on the same listening sockets.

Real front processes (a supervisor and its workers), real test receivers,
real sockets; the configuration file is rewritten between signals.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdhandoff.errors import ConfigError
from fdhandoff.front.accesslog import PIPE_BUF, AccessLog, _batches
from fdhandoff.front.config import MAX_WORKERS, build_config, usable_cpus
from handoff_receiver import (
    IO_TIMEOUT,
    FrontProcess,
    TestReceiver,
    parse_response,
    read_to_close,
    running_front,
    sockdir_fixture,  # noqa: F401  (fixture)
)
from test_front_reload import _config, _reload
from test_metrics import _free_port

pytestmark = pytest.mark.timeout(120)

_SUPERVISING = re.compile(r"supervising (\d+) workers \(pids \[([\d, ]+)\]\)")
_GENERATION = re.compile(r"new generation of (\d+) workers \(pids \[([\d, ]+)\]\)")


def _children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(item) for item in text.split()}


def _pids(match: re.Match[str]) -> set[int]:
    return {int(item) for item in match.group(2).split(",")}


def _wait_ready(front: FrontProcess, count: int) -> None:
    """Every worker of the latest generation has logged its ``ready`` line."""
    deadline = time.monotonic() + IO_TIMEOUT
    while sum("ready, listening on" in line for line in front.lines) < count:
        assert time.monotonic() < deadline, "\n".join(front.lines)
        time.sleep(0.02)


def _get(port: int, target: str = "/x") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode())
        status, _, _ = parse_response(read_to_close(sock))
    return status


def _gone(pids: set[int], timeout: float = IO_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def receiver(sockdir: Path) -> Iterator[TestReceiver]:
    made = TestReceiver(sockdir / "r.sock")
    try:
        yield made
    finally:
        made.close()


def test_two_workers_share_the_listeners_and_stop_together(
    sockdir: Path, receiver: TestReceiver
) -> None:
    port = _free_port()
    metrics = _free_port()
    unix = sockdir / "front.sock"
    path = sockdir / "front.toml"
    path.write_text(
        "workers = 2\n"
        + _config([port], receiver.path)
        + f'[[listen]]\naddress = "unix:{unix}"\n[metrics]\naddress = "127.0.0.1:{metrics}"\n'
    )
    with running_front(["--config", str(path)]) as front:
        workers = _pids(front.wait_for(_SUPERVISING))
        assert len(workers) == 2
        assert _children(front.proc.pid) == workers
        _wait_ready(front, 2)
        for _ in range(20):
            assert _get(port) == 200
            assert receiver.handoffs.get(timeout=IO_TIMEOUT)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect(str(unix))
            sock.sendall(b"GET /u HTTP/1.1\r\nHost: a\r\n\r\n")
            assert parse_response(read_to_close(sock))[0] == 200
        assert receiver.handoffs.get(timeout=IO_TIMEOUT)
        # Each worker counts its own handoffs, on PORT + slot; together, all of them.
        total = 0.0
        for slot in range(2):
            url = f"http://127.0.0.1:{metrics + slot}/metrics"
            with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as answer:
                text = answer.read().decode()
            total += sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("fdhandoff_front_requests_total")
                and 'outcome="handed_off"' in line
            )
        assert total == 21, text
        code = front.stop()
    assert code == 0
    assert _gone(workers)
    assert not unix.exists(), "the supervisor removes its socket files"
    assert "stopping 2 workers" in "\n".join(front.lines)


def test_reload_replaces_the_workers_and_refuses_no_connection(
    sockdir: Path, receiver: TestReceiver
) -> None:
    """SIGHUP: the new generation is forked before the old one stops, so
    clients connecting all along are all served; the old workers exit."""
    port = _free_port()
    added = _free_port()
    path = sockdir / "front.toml"
    text = "workers = 2\n" + _config([port], receiver.path)
    path.write_text(text)
    statuses: list[int] = []
    stop = threading.Event()

    def clients() -> None:
        for _ in range(2000):  # bounded: stops at the event or after 2000 requests
            if stop.is_set():
                return
            statuses.append(_get(port))

    with running_front(["--config", str(path)]) as front:
        old = _pids(front.wait_for(_SUPERVISING))
        _wait_ready(front, 2)
        load = threading.Thread(target=clients)
        load.start()
        try:
            time.sleep(0.3)
            _reload(front, path, "workers = 3\n" + _config([port, added], receiver.path),
                    "new generation")  # fmt: skip
            new = _pids(front.wait_for(_GENERATION))
            _wait_ready(front, 5)
            time.sleep(0.3)
        finally:
            stop.set()
            load.join(timeout=60)
        assert len(new) == 3 and not new & old
        assert _gone(old), "the old generation stops once the new one runs"
        assert _children(front.proc.pid) == new
        assert statuses and set(statuses) == {200}, statuses
        assert _get(added) == 200
        # A refused reload keeps the running workers.
        _reload(front, path, text.replace('prefix = "/"', 'prefix = "x"'), "reload refused")
        time.sleep(0.3)
        assert _children(front.proc.pid) == new
        assert _get(port) == 200
    assert _gone(new)


@contextlib.contextmanager
def _two_workers(
    sockdir: Path, receiver: TestReceiver
) -> Iterator[tuple[FrontProcess, int, set[int]]]:
    """A front with ``workers = 2``, every worker ready: (front, port, worker pids)."""
    port = _free_port()
    path = sockdir / "front.toml"
    path.write_text("workers = 2\n" + _config([port], receiver.path))
    with running_front(["--config", str(path)]) as front:
        workers = _pids(front.wait_for(_SUPERVISING))
        _wait_ready(front, 2)
        yield front, port, workers


def test_a_dead_worker_is_replaced(sockdir: Path, receiver: TestReceiver) -> None:
    with _two_workers(sockdir, receiver) as (front, port, workers):
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        front.wait_for(rf"worker \d \(pid {victim}\) died: killed by signal 9; restarting")
        front.wait_for(r"worker \d restarted as pid \d+")
        deadline = time.monotonic() + IO_TIMEOUT
        while len(_children(front.proc.pid) - {victim}) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(10):
            assert _get(port) == 200


def test_a_worker_ignores_sighup_and_names_the_supervisor(
    sockdir: Path, receiver: TestReceiver
) -> None:
    with _two_workers(sockdir, receiver) as (front, port, workers):
        os.kill(min(workers), signal.SIGHUP)
        front.wait_for(
            rf"SIGHUP ignored: a worker; send it to the supervisor \(pid {front.proc.pid}\)"
        )
        assert _children(front.proc.pid) == workers
        assert _get(port) == 200


def test_one_process_front_keeps_its_shape_at_reload(sockdir: Path, receiver: TestReceiver) -> None:
    """From one process to a supervisor (or back) needs a restart: said, and
    the rest of the configuration still applies."""
    port = _free_port()
    path = sockdir / "front.toml"
    path.write_text(_config([port], receiver.path))
    with running_front(["--config", str(path)]) as front:
        _reload(front, path, "workers = 2\n" + _config([port], receiver.path),
                "configuration reloaded")  # fmt: skip
        front.wait_for(r"reload: workers = 2 takes effect at the next restart")
        assert _children(front.proc.pid) == set()
        assert _get(port) == 200


def test_workers_flag_overrides_the_file(sockdir: Path, receiver: TestReceiver) -> None:
    port = _free_port()
    path = sockdir / "front.toml"
    path.write_text("workers = 3\n" + _config([port], receiver.path))
    with running_front(["--config", str(path), "--workers", "2"]) as front:
        assert len(_pids(front.wait_for(_SUPERVISING))) == 2


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0", f"must be between 1 and {MAX_WORKERS}"),
        (str(MAX_WORKERS + 1), f"must be between 1 and {MAX_WORKERS}"),
        ('"many"', 'must be an integer or "auto"'),
        ("true", 'must be an integer or "auto"'),
        ("2.5", 'must be an integer or "auto"'),
    ],
)
def test_invalid_workers_are_named(value: str, why: str) -> None:
    import tomllib  # noqa: PLC0415

    raw = tomllib.loads(f"workers = {value}\n{_config([8080], Path('/run/r.sock'))}")
    with pytest.raises(ConfigError) as caught:
        build_config(raw)
    assert f"workers = {raw['workers']!r}" in str(caught.value) or "workers = " in str(caught.value)
    assert why in str(caught.value)


def test_auto_is_the_usable_cpus() -> None:
    import tomllib  # noqa: PLC0415

    raw = tomllib.loads(f'workers = "auto"\n{_config([8080], Path("/run/r.sock"))}')
    assert build_config(raw).workers == min(usable_cpus(), MAX_WORKERS)
    assert usable_cpus() == len(os.sched_getaffinity(0))


def test_flag_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--workers = 0: must be between 1 and"):
        build_config({}, listen=["127.0.0.1:8080"], routes=["/=unix:/run/r.sock"], workers=0)


def test_access_log_writes_whole_lines_of_at_most_pipe_buf(tmp_path: Path) -> None:
    """Workers share stderr: each write(2) is whole lines, and at most PIPE_BUF
    bytes unless one line alone is longer, so lines never interleave."""
    lines = [f"line {i} " + "x" * (i % 300) + "\n" for i in range(400)]
    lines.insert(17, "y" * 5000 + "\n")  # longer than PIPE_BUF: a write of its own
    batches = _batches(lines)
    assert "".join(batches) == "".join(lines)
    assert len(batches) > 10
    for batch in batches:
        assert batch.endswith("\n")
        assert len(batch.encode()) <= PIPE_BUF or batch == "y" * 5000 + "\n"
    assert _batches(["é" * 3000 + "\n", "é" * 3000 + "\n"]) == ["é" * 3000 + "\n"] * 2
    # Through the file: every line whole, in order.
    path = tmp_path / "access.log"
    access = AccessLog(str(path))
    for i in range(1500):
        access.log(f"127.0.0.1:{i}", b"GET", b"/p", route="/", outcome="handed-off", start=0.0)
    access.close()
    written = path.read_text().splitlines()
    assert [line.split(" ")[1] for line in written] == [f"127.0.0.1:{i}" for i in range(1500)]


def test_check_names_the_workers(sockdir: Path) -> None:
    path = sockdir / "front.toml"
    path.write_text("workers = 3\n" + _config([8080], sockdir / "r.sock"))
    done = subprocess.run(
        [sys.executable, "-m", "fdhandoff", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 route(s), 3 workers" in done.stdout
    path.write_text("workers = 0\n" + _config([8080], sockdir / "r.sock"))
    done = subprocess.run(
        [sys.executable, "-m", "fdhandoff", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"workers = 0: must be between 1 and {MAX_WORKERS}" in done.stderr
