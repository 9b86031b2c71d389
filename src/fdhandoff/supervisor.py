"""Worker processes sharing listening sockets: ``--workers`` of both roles.

The parent binds the sockets, forks the workers and then only supervises: a
worker that dies is replaced (after a pause if it died young, so a crashing
application does not spin), and SIGTERM/SIGINT are passed on to every worker,
which then shut down gracefully; a worker still running ``grace`` plus
:data:`KILL_MARGIN` seconds later is killed.  Workers accept on the same
sockets; the kernel wakes one of the waiting processes per connection.

With a ``reload`` callback (the front), SIGHUP starts a new generation, as
nginx does: the callback reads the configuration again and returns how to
run the new workers (or None: refused, nothing changes); they are forked,
then the old ones get SIGTERM and finish what they were doing.  Both
generations accept on the sockets they share meanwhile, so a reload refuses
no connection.

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
from collections.abc import Callable, Iterable
from typing import Final

from . import systemd

__all__ = ["KILL_MARGIN", "supervise"]

_LOG = logging.getLogger("fdhandoff.receiver")

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
        _LOG.warning("PR_SET_PDEATHSIG failed: %s", os.strerror(err))
    # The supervisor may have died between fork() and prctl(): nothing would
    # signal us then.
    if os.getppid() != parent:
        os._exit(1)


WorkerMain = Callable[[int], int]

#: What a reload returns: how many workers the new generation has, what each
#: runs (given its slot number) and its grace period; None when refused.
Generation = tuple[int, WorkerMain, float]


def _spawn(
    slot: int,
    worker_main: WorkerMain,
    mask: set[int | signal.Signals],
    signals: set[signal.Signals],
    log: logging.Logger,
) -> int:
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
        for signum in signals:
            # SIGHUP is the supervisor's (a new generation); one sent to a
            # worker directly must not kill it (the default action).
            signal.signal(signum, signal.SIG_IGN if signum == signal.SIGHUP else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = worker_main(slot)
    except BaseException:
        log.exception("worker %d failed", slot)
    finally:
        logging.shutdown()
        os._exit(code)


def supervise(
    count: int,
    worker_main: WorkerMain,
    grace: float,
    on_stop: Callable[[], None] | None = None,
    *,
    reload: Callable[[], Generation | None] | None = None,
    logger: logging.Logger | None = None,
) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; return the exit status.

    ``on_stop`` runs once when stopping begins: the parent must close its
    copies of the listening sockets then, or the kernel would keep queueing
    connections that no worker accepts any more.  ``reload`` (SIGHUP) gives
    the next generation of workers; the current one is then retired.
    """
    log = logger or _LOG
    signals = set(_SIGNALS) | ({signal.SIGHUP} if reload is not None else set())
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    workers: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    retiring: dict[int, float] = {}  # pid of an earlier generation -> when to kill it
    pending: list[tuple[float, int]] = []  # (restart time, slot)
    stopping_since: float | None = None

    def spawn(slot: int) -> int:
        pid = _spawn(slot, worker_main, old_mask, signals, log)
        workers[pid] = (slot, time.monotonic())
        return pid

    try:
        for slot in range(count):
            spawn(slot)
        log.info("supervising %d workers (pids %s)", count, sorted(workers))
        # Ready once every worker runs: a connection arriving before a worker
        # has finished its own start-up waits in the shared socket's backlog.
        systemd.notify("READY=1", f"STATUS=supervising {count} workers")
        while workers or retiring or (pending and stopping_since is None):
            info = signal.sigtimedwait(signals, 0.5)
            now = time.monotonic()
            signo = info.si_signo if info is not None else None
            if signo in (signal.SIGTERM, signal.SIGINT):
                # Workers first: whatever on_stop does, they are told to stop.
                _signal_all(workers, signal.SIGTERM)
                _signal_all(retiring, signal.SIGTERM)
                if stopping_since is None:
                    log.info("stopping %d workers", len(workers) + len(retiring))
                    systemd.stopping()
                    stopping_since = now
                    pending.clear()
                    if on_stop is not None:
                        _run_on_stop(on_stop, log)
            elif signo == signal.SIGHUP and reload is not None:
                if stopping_since is not None:
                    log.info("SIGHUP ignored: stopping")
                else:
                    generation = _next_generation(reload, log)
                    if generation is not None:
                        # The old generation goes once the new one runs: the
                        # sockets are never without a worker accepting.  It
                        # stops within its own grace period, not the new one's.
                        retiring.update(dict.fromkeys(workers, now + grace + KILL_MARGIN))
                        count, worker_main, grace = generation
                        workers.clear()
                        pending.clear()
                        for slot in range(count):
                            spawn(slot)
                        _signal_all(retiring, signal.SIGTERM)
                        log.info(
                            "new generation of %d workers (pids %s); %d retiring",
                            count,
                            sorted(workers),
                            len(retiring),
                        )
                    systemd.notify("READY=1", f"STATUS=supervising {count} workers")
            for pid, status in _reap():
                retiring.pop(pid, None)
                dead = workers.pop(pid, None)
                if dead is None or stopping_since is not None:
                    continue
                log.error("worker %d (pid %d) died: %s; restarting", dead[0], pid, _status(status))
                due = now + (RESTART_PAUSE if _died_young(dead, now) else 0.0)
                pending.append((due, dead[0]))
            for due, slot_no in list(pending):
                if due <= now and stopping_since is None:
                    pending.remove((due, slot_no))
                    log.info("worker %d restarted as pid %d", slot_no, spawn(slot_no))
            late = [pid for pid, deadline in retiring.items() if now > deadline]
            if late:
                log.warning("killing %d workers of an earlier generation still running", len(late))
                for pid in late:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    retiring[pid] = now + KILL_MARGIN  # wait for them to be reaped
            if stopping_since is not None and now - stopping_since > grace + KILL_MARGIN:
                log.warning("killing %d workers still running", len(workers))
                _signal_all(workers, signal.SIGKILL)
                stopping_since = now  # wait for them to be reaped
        return 0
    finally:
        workers.update({pid: (-1, 0.0) for pid in retiring})
        if workers:
            # Leaving through an error: stop the workers as a signal would
            # have, rather than leave them running without a supervisor.
            log.error("supervisor failed: stopping %d workers", len(workers))
            _stop_now(workers, grace + KILL_MARGIN)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _next_generation(
    reload: Callable[[], Generation | None], log: logging.Logger
) -> Generation | None:
    systemd.reloading()
    try:
        return reload()
    except Exception:
        # A bug in reading the configuration must not take the running
        # workers down: they go on as they were.
        log.exception("reload failed, the running workers stay")
        return None


def _run_on_stop(on_stop: Callable[[], None], log: logging.Logger) -> None:
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
        for pid, _ in _reap():
            workers.pop(pid, None)
        time.sleep(0.05)
    _signal_all(workers, signal.SIGKILL)
    for pid in list(workers):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        workers.pop(pid, None)


def _died_young(slot: tuple[int, float], now: float) -> bool:
    return now - slot[1] < YOUNG


def _reap() -> list[tuple[int, int]]:
    """Every child that has ended since the last call: ``(pid, wait status)``."""
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        ended.append((pid, status))
    return ended


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _signal_all(workers: Iterable[int], signum: int) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
