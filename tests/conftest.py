"""Shared fixtures: fd-leak accounting and required external tools."""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def open_fds() -> set[int]:
    """The fds this process holds right now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves more fds open than it found.

    Allows a short grace period for sockets that are closed by a peer thread
    or by garbage collection of objects the test dropped.
    """
    gc.collect()
    before = open_fds()
    yield
    for _ in range(50):
        gc.collect()
        after = open_fds()
        # New numbers AND a higher count: a leaked fd may reuse the number of
        # one the test closed, which the set difference alone would miss.
        leaked = after - before
        if not leaked and len(after) <= len(before):
            return
        time.sleep(0.02)
    details = {fd: _describe(fd) for fd in sorted(leaked)}
    pytest.fail(f"fd leak: {len(before)} fds before, {len(after)} after; new: {details}")


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """Return the path of an external program the test needs.

    Under CI (``CI`` set) a missing tool FAILS the test, so a broken install
    step can never turn into a silently skipped suite; elsewhere it skips.
    """

    def find(name: str) -> str:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
        if path is None:
            message = f"{name} is not installed (CI installs it: see .ci/run)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        return path

    return find
