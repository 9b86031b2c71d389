"""``--workers N``: fork N receiver processes sharing the listening sockets.

The parent binds the sockets, forks the workers and then only supervises: a
worker that dies is replaced (after a pause if it died young, so a crashing
application does not spin), and SIGTERM/SIGINT are passed on to every worker,
which then shut down gracefully; a worker still running ``grace`` plus
:data:`KILL_MARGIN` seconds later is killed.  Workers accept on the same
sockets; the kernel wakes one of the waiting processes per connection.

Signals are taken synchronously with ``sigtimedwait`` (blocked, never
delivered to a handler), so no signal can be lost between two checks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Final

__all__ = ["KILL_MARGIN", "supervise"]

log = logging.getLogger("fdhandoff.receiver")

#: Seconds past the grace period before stragglers get SIGKILL.
KILL_MARGIN: Final = 5.0

#: A worker that dies sooner than this after starting is restarted only after
#: :data:`RESTART_PAUSE`, so a crash loop costs one fork per second at most.
YOUNG: Final = 1.0
RESTART_PAUSE: Final = 1.0

_SIGNALS: Final = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


def _spawn(slot: int, worker_main: Callable[[int], int], mask: set[int | signal.Signals]) -> int:
    pid = os.fork()
    if pid:
        return pid
    # Worker: default signal handling, then serve; never return into the
    # parent's stack (its finally blocks would remove the socket files).
    code = 1
    try:
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = worker_main(slot)
    except BaseException:
        log.exception("worker %d failed", slot)
    finally:
        logging.shutdown()
        os._exit(code)


def supervise(
    count: int,
    worker_main: Callable[[int], int],
    grace: float,
    on_stop: Callable[[], None] | None = None,
) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; return the exit status.

    ``on_stop`` runs once when stopping begins: the parent must close its
    copies of the listening sockets then, or the kernel would keep queueing
    connections that no worker accepts any more.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    workers: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    pending: list[tuple[float, int]] = []  # (restart time, slot)
    stopping_since: float | None = None
    try:
        for slot in range(count):
            workers[_spawn(slot, worker_main, old_mask)] = (slot, time.monotonic())
        log.info("supervising %d workers (pids %s)", count, sorted(workers))
        while workers or (pending and stopping_since is None):
            info = signal.sigtimedwait(_SIGNALS, 0.5)
            now = time.monotonic()
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                if stopping_since is None:
                    log.info("stopping %d workers", len(workers))
                    stopping_since = now
                    pending.clear()
                    if on_stop is not None:
                        on_stop()
                _signal_all(workers, signal.SIGTERM)
            for dead in _reap(workers, stopping_since is None):
                due = now + (RESTART_PAUSE if _died_young(dead, now) else 0.0)
                pending.append((due, dead[0]))
            for due, slot_no in list(pending):
                if due <= now and stopping_since is None:
                    pending.remove((due, slot_no))
                    pid = _spawn(slot_no, worker_main, old_mask)
                    workers[pid] = (slot_no, time.monotonic())
                    log.info("worker %d restarted as pid %d", slot_no, pid)
            if stopping_since is not None and now - stopping_since > grace + KILL_MARGIN:
                log.warning("killing %d workers still running", len(workers))
                _signal_all(workers, signal.SIGKILL)
                stopping_since = now  # wait for them to be reaped
        return 0
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _died_young(slot: tuple[int, float], now: float) -> bool:
    return now - slot[1] < YOUNG


def _reap(workers: dict[int, tuple[int, float]], restart: bool) -> list[tuple[int, float]]:
    dead = []
    while workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        slot = workers.pop(pid, None)
        if slot is None:
            continue
        if restart:
            log.error(
                "worker %d (pid %d) died: %s; restarting", slot[0], pid, _status(status)
            )
            dead.append(slot)
    return dead


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _signal_all(workers: dict[int, tuple[int, float]], signum: int) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
