"""The spare fd that keeps a handoff read at the fd limit from being lost."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import pytest

from fdhandoff.receiver.fdlimit import FdReserve


@pytest.fixture
def fds_to_the_limit() -> Iterator[list[int]]:
    """A soft limit a little above what is open; the test fills it up with ``_fill``
    (requested after ``no_fd_leak``, so the filler is closed before that check)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    try:
        yield filler
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _fill(filler: list[int]) -> None:
    while True:
        try:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return


def test_release_gives_the_slot_and_refill_takes_it_back(no_fd_leak: None) -> None:
    reserve = FdReserve()
    assert reserve.held
    first = reserve.fd
    reserve.release()
    assert not reserve.held
    assert reserve.refill()
    assert reserve.fd == first  # the lowest free number: the one just released
    assert not os.get_inheritable(reserve.fd)
    reserve.close()


def test_at_the_limit_refill_fails_until_an_fd_is_freed(
    no_fd_leak: None, fds_to_the_limit: list[int]
) -> None:
    reserve = FdReserve()
    assert reserve.held
    _fill(fds_to_the_limit)
    reserve.release()
    # Whatever takes the released slot (a handoff's client fd) leaves none.
    fds_to_the_limit.append(os.open(os.devnull, os.O_RDONLY))
    assert not reserve.refill()
    os.close(fds_to_the_limit.pop())
    assert reserve.refill()
    reserve.close()


def test_created_at_the_limit_it_fills_later(no_fd_leak: None, fds_to_the_limit: list[int]) -> None:
    _fill(fds_to_the_limit)
    reserve = FdReserve()  # no fd to open: not held, no error
    assert not reserve.held
    for _ in range(2):  # room for the source and the spare
        os.close(fds_to_the_limit.pop())
    assert reserve.refill()
    reserve.close()


def test_close_releases_both_fds_for_good(no_fd_leak: None) -> None:
    reserve = FdReserve()
    reserve.close()
    assert not reserve.held
    assert not reserve.refill()  # nothing reopened after close
    reserve.close()  # twice is harmless
