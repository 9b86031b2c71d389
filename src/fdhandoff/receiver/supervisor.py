"""``--workers N``: fork N receiver processes sharing the listening sockets.

The parent binds the sockets, forks the workers and then only supervises: a
worker that dies is replaced (after a pause if it died young, so a crashing
application does not spin), and SIGTERM/SIGINT are passed on to every worker,
which then shut down gracefully; a worker still running ``grace`` plus
:data:`KILL_MARGIN` seconds later is killed.  Workers accept on the same
sockets; the kernel wakes one of the waiting processes per connection.

Signals are taken synchronously with ``sigtimedwait`` (blocked, never
delivered to a handler), so no signal can be lost between two checks.

No worker outlives the supervisor: one leaving through an error stops its
workers the same way (SIGTERM, SIGKILL after the margin) before it returns,
and each worker asks the kernel for SIGKILL should the supervisor die without
that chance (``PR_SET_PDEATHSIG``: SIGKILL or a crash of the supervisor).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Final

from .. import systemd

__all__ = ["KILL_MARGIN", "supervise"]

log = logging.getLogger("fdhandoff.receiver")

#: Seconds past the grace period before stragglers get SIGKILL.
KILL_MARGIN: Final = 5.0

#: A worker that dies sooner than this after starting is restarted only after
#: :data:`RESTART_PAUSE`, so a crash loop costs one fork per second at most.
YOUNG: Final = 1.0
RESTART_PAUSE: Final = 1.0

_SIGNALS: Final = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}

#: prctl(2) option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG: Final = 1


def _die_with_parent(parent: int) -> None:
    """In a worker: be killed when the supervisor dies, even by SIGKILL.

    Nobody would stop an orphaned worker any more (no SIGTERM, no kill after
    the grace period): it would go on serving with its parent pid 1.
    """
    if sys.platform != "linux":  # pragma: no cover - Linux-only project
        return
    libc = ctypes.CDLL(None, use_errno=True)
    signum = ctypes.c_ulong(signal.SIGKILL)
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), signum, zero, zero, zero) != 0:
        err = ctypes.get_errno()
        log.warning("PR_SET_PDEATHSIG failed: %s", os.strerror(err))
    # The supervisor may have died between fork() and prctl(): nothing would
    # signal us then.
    if os.getppid() != parent:
        os._exit(1)


def _spawn(slot: int, worker_main: Callable[[int], int], mask: set[int | signal.Signals]) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # Worker: default signal handling, then serve; never return into the
    # parent's stack (its finally blocks would remove the socket files).
    code = 1
    try:
        _die_with_parent(parent)
        # The supervisor alone speaks to the service manager (sd_notify(3)):
        # with NotifyAccess=main it would refuse a worker's messages anyway.
        os.environ.pop("NOTIFY_SOCKET", None)
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
        # Ready once every worker runs: a handoff arriving before a worker has
        # finished its own start-up waits in the shared socket's backlog.
        systemd.notify("READY=1", f"STATUS=supervising {count} workers")
        while workers or (pending and stopping_since is None):
            info = signal.sigtimedwait(_SIGNALS, 0.5)
            now = time.monotonic()
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                # Workers first: whatever on_stop does, they are told to stop.
                _signal_all(workers, signal.SIGTERM)
                if stopping_since is None:
                    log.info("stopping %d workers", len(workers))
                    systemd.stopping()
                    stopping_since = now
                    pending.clear()
                    if on_stop is not None:
                        _run_on_stop(on_stop)
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
        if workers:
            # Leaving through an error: stop the workers as a signal would
            # have, rather than leave them running without a supervisor.
            log.error("supervisor failed: stopping %d workers", len(workers))
            _stop_now(workers, grace + KILL_MARGIN)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _run_on_stop(on_stop: Callable[[], None]) -> None:
    # Closing the listening sockets may fail (a file removed meanwhile):
    # stopping goes on, the workers are what matters now.
    try:
        on_stop()
    except Exception:
        log.exception("closing the listening sockets failed")


def _stop_now(workers: dict[int, tuple[int, float]], timeout: float) -> None:
    """SIGTERM every worker, SIGKILL those still running after ``timeout``, reap all."""
    _signal_all(workers, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while workers and time.monotonic() < deadline:
        _reap(workers, restart=False)
        time.sleep(0.05)
    _signal_all(workers, signal.SIGKILL)
    for pid in list(workers):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        workers.pop(pid, None)


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
            log.error("worker %d (pid %d) died: %s; restarting", slot[0], pid, _status(status))
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
