"""Running out of file descriptors without losing a client.

``accept`` and ``recvmsg`` fail with these errors when the process (or the
system) has no fd or memory to spare; the engines back off and retry rather
than fail.  :class:`FdReserve` covers the one case a back-off cannot: a
handoff read when exactly no fd is left.
"""

from __future__ import annotations

import errno
import os
from typing import Final

__all__ = ["RESOURCE_ERRNOS", "FdReserve"]

#: Errors of accept()/recvmsg() that mean "out of fds or memory right now":
#: back off and retry instead of failing (trio's serve_listeners does the same).
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class FdReserve:
    """One spare fd, so that a handoff read at the fd limit is never lost.

    When ``recvmsg`` cannot install the passed fd (EMFILE), Linux drops the fd
    and only sets ``MSG_CTRUNC`` (``scm_detach_fds``): the client would be
    disconnected.  So the spare is closed right before each ``recvmsg`` (no
    await in between, nothing else can take the slot) and reopened after.  If
    it cannot be reopened the process is at its limit: accepting pauses and
    handoffs wait in the kernel until a connection ends and frees an fd.

    The spare is a ``dup`` of a ``/dev/null`` fd held for the reserve's life:
    reopening it happens once per handoff, and ``dup`` costs a quarter of an
    ``open`` (no path lookup).
    """

    __slots__ = ("_closed", "_source", "fd")

    def __init__(self) -> None:
        self._source = -1
        self._closed = False
        self.fd = -1
        self.refill()

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def refill(self) -> bool:
        if self.fd < 0 and not self._closed:
            try:
                if self._source < 0:  # first use, or at the limit when created
                    self._source = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                self.fd = os.dup(self._source)  # non-inheritable, as os.dup makes it
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
        return self.fd >= 0

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Release the spare and its source for good."""
        self._closed = True
        self.release()
        if self._source >= 0:
            os.close(self._source)
            self._source = -1
