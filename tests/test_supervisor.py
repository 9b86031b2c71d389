"""Worker processes (the receiver's ``--workers``, the front's ``workers``): no worker
outlives its supervisor, whatever ends it; a SIGHUP starts a new generation."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from test_receiver_support import REPO, serve_process

ECHO = "test_receiver_support:echo"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaps counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@contextlib.contextmanager
def _killing_leftovers(pids: set[int]) -> Iterator[None]:
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sock")
    workers: set[int] = set()
    with (
        _killing_leftovers(workers),
        serve_process(ECHO, [f"unix:{path}"], "--workers", "2") as proc,
    ):
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            workers.update(_children(proc.pid))
            time.sleep(0.05)
        assert len(workers) == 2
        proc.kill()  # no chance to stop them
        proc.wait(10)
        assert not _wait_gone(workers, 5), "workers left running without their supervisor"


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from fdhandoff import supervisor

    out = Path(sys.argv[1])
    supervisor.KILL_MARGIN = 0.5

    def worker(slot: int) -> int:
        def term(*_: object) -> None:
            (out / f"term-{os.getpid()}").touch()
            if sys.argv[2] == "obey":
                os._exit(0)

        signal.signal(signal.SIGTERM, term)
        (out / f"worker-{os.getpid()}").touch()
        while True:
            time.sleep(1)

    def on_stop() -> None:
        raise OSError("the socket file went away")

    sys.exit(supervisor.supervise(2, worker, 0.5, on_stop))
    """
)


def _supervise(tmp_path: Path, mode: str) -> tuple[int, set[int], set[int]]:
    """Run the script, SIGTERM it once both workers are up: (status, workers, terminated)."""
    script = tmp_path / "supervise.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    workers: set[int] = set()
    with _killing_leftovers(workers):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], env=env)
        try:
            deadline = time.monotonic() + 20
            while len(workers) < 2 and time.monotonic() < deadline:
                workers.update(int(p.name[7:]) for p in tmp_path.glob("worker-*"))
                time.sleep(0.05)
            assert len(workers) == 2
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        terminated = {int(p.name[5:]) for p in tmp_path.glob("term-*")}
        assert not _wait_gone(workers, 2), "workers outlived the supervisor"
    return status, workers, terminated


def test_failing_on_stop_still_stops_the_workers(tmp_path: Path) -> None:
    status, workers, terminated = _supervise(tmp_path, "obey")
    assert status == 0
    assert terminated == workers  # each got its SIGTERM: a graceful stop


def test_workers_ignoring_sigterm_are_killed_after_grace_and_margin(tmp_path: Path) -> None:
    started = time.monotonic()
    status, workers, terminated = _supervise(tmp_path, "ignore")
    assert status == 0
    assert terminated == workers
    assert time.monotonic() - started < 15


GENERATIONS = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from fdhandoff import supervisor

    out = Path(sys.argv[1])
    supervisor.KILL_MARGIN = 0.5

    def worker_of(generation: int):
        def worker(slot: int) -> int:
            # The first generation ignores SIGTERM: only SIGKILL ends it.
            if generation == 1:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            (out / f"gen{generation}-{os.getpid()}").touch()
            while True:
                time.sleep(1)
        return worker

    reloads = iter([None, (3, worker_of(2), 0.5)])  # refused, then a new generation

    def reload():
        (out / "reload").touch()
        return next(reloads)

    sys.exit(supervisor.supervise(2, worker_of(1), 0.5, reload=reload))
    """
)


def test_sighup_starts_a_new_generation_and_kills_an_old_one_past_its_grace(
    tmp_path: Path,
) -> None:
    """A refused reload keeps the workers; an accepted one forks the new
    generation, then retires the old one, killed once past grace + margin
    when it ignores SIGTERM; a dead worker of the new generation is still
    replaced, and SIGTERM stops the lot."""
    script = tmp_path / "generations.py"
    script.write_text(GENERATIONS)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    seen: set[int] = set()

    def pids(generation: int, count: int) -> set[int]:
        deadline = time.monotonic() + 20
        while True:
            found = {int(p.name.split("-")[1]) for p in tmp_path.glob(f"gen{generation}-*")}
            seen.update(found)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    with _killing_leftovers(seen):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
        try:
            first = pids(1, 2)
            assert len(first) == 2
            proc.send_signal(signal.SIGHUP)  # refused: nothing changes
            deadline = time.monotonic() + 20
            while not (tmp_path / "reload").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            assert _children(proc.pid) == first
            proc.send_signal(signal.SIGHUP)
            second = pids(2, 3)
            assert len(second) == 3
            assert not _wait_gone(first, 10), "the old generation was not killed"
            assert _children(proc.pid) == second
            victim = min(second)
            os.kill(victim, signal.SIGKILL)
            assert len(pids(2, 4)) == 4, "a dead worker of the new generation is replaced"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not _wait_gone(seen, 5)
