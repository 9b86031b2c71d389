"""The service manager's two protocols: socket activation and readiness notification.

* **Socket activation** (``sd_listen_fds(3)``): systemd binds the listening
  sockets of a ``.socket`` unit itself and passes them to the service as fds
  3, 4, … with ``LISTEN_FDS=<count>`` and ``LISTEN_PID=<the service's pid>``
  in its environment.  Connections arriving while the service restarts wait in
  the socket's backlog instead of being refused, so a front or a receiver can
  be restarted (a new version, a changed setting a reload cannot apply)
  without a client seeing ``connection refused`` or the front a ``503``.
  The sockets are matched to the configured addresses by what they are bound
  to, so the configuration stays the same with or without activation.
* **Readiness** (``sd_notify(3)``): with ``Type=notify`` systemd waits for
  ``READY=1`` before it counts the service as started (and starts the units
  ordered after it), and shows ``STATUS=`` lines in ``systemctl status``;
  ``RELOADING=1`` and ``STOPPING=1`` tell it a reload or a stop is under way.

Both are plain file-descriptor and datagram conventions, so this module needs
no systemd library.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Final

from .errors import ConfigError

__all__ = [
    "SD_LISTEN_FDS_START",
    "Inherited",
    "describe_socket",
    "notify",
    "reloading",
    "stopping",
]

log = logging.getLogger("fdhandoff")

#: The first fd of a passed socket (sd_listen_fds(3): SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START: Final = 3

#: More than any real .socket unit passes; a larger LISTEN_FDS is a broken
#: environment, not a request to adopt thousands of descriptors.
MAX_LISTEN_FDS: Final = 1024

_ENV_NAMES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def describe_socket(sock: socket.socket) -> str:
    """How a socket's bound address is written in configurations and logs."""
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # an abstract name (unix(7))
            return "unix:@" + name[1:].decode("utf-8", "replace")
        return f"unix:{name}" if name else "unix:(unnamed)"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    if sock.family == socket.AF_INET:
        return f"{name[0]}:{name[1]}"
    return f"fd {sock.fileno()}"


def _same_host(configured: str, bound: str) -> bool:
    try:
        return ipaddress.ip_address(configured) == ipaddress.ip_address(bound)
    except ValueError:
        return configured == bound


class Inherited:
    """Listening sockets passed by the service manager, until each is claimed.

    :meth:`take` hands out the socket bound to an address; what nobody took is
    reported by :meth:`unclaimed`.  A socket given back with :meth:`give_back`
    (a reload dropped its address) stays open, because systemd keeps listening on
    it whatever this process does: closing it and binding the address again
    later would fail with ``EADDRINUSE``.
    """

    def __init__(self, socks: list[socket.socket] | None = None) -> None:
        self._free: list[socket.socket] = list(socks or ())
        self.count = len(self._free)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Inherited:
        """The sockets named by ``LISTEN_FDS``, if they are meant for this process.

        The variables are removed (as ``sd_listen_fds(1)`` does), so a process
        started from this one does not take the same fds for its own.  A
        ``LISTEN_PID`` naming another process means the variables were
        inherited from a parent and are not ours: nothing is adopted.
        ``ConfigError`` for a malformed count or an fd that is not a listening
        socket.
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
        for name in _ENV_NAMES:
            env.pop(name, None)
        if count is None:
            return cls()
        if pid is None or not pid.isdigit() or int(pid) != os.getpid():
            log.info("LISTEN_FDS set for process %s, not this one (%d): ignored", pid, os.getpid())
            return cls()
        if not (count.isdigit() and count.isascii()) or not 0 < int(count) <= MAX_LISTEN_FDS:
            raise ConfigError(f"LISTEN_FDS={count!r}: expected a count of passed sockets")
        socks: list[socket.socket] = []
        try:
            for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
                socks.append(_adopt(fd))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        log.info(
            "socket activation: %s passed by the service manager",
            ", ".join(describe_socket(sock) for sock in socks),
        )
        return cls(socks)

    def take_tcp(self, host: str, port: int) -> socket.socket | None:
        """The passed TCP socket bound to ``host:port``, or None."""
        for sock in self._free:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            bound = sock.getsockname()
            if bound[1] == port and _same_host(host, bound[0]):
                self._free.remove(sock)
                return sock
        return None

    def take_unix(self, address: str | bytes, kind: int) -> socket.socket | None:
        """The passed UNIX socket of type ``kind`` bound to ``address``
        (a path, or an abstract name starting with NUL), or None."""
        wanted = os.fsencode(address) if isinstance(address, str) else address
        for sock in self._free:
            if sock.family != socket.AF_UNIX or sock.type != kind:
                continue
            bound = sock.getsockname()
            if (os.fsencode(bound) if isinstance(bound, str) else bound) == wanted:
                self._free.remove(sock)
                return sock
        return None

    def give_back(self, sock: socket.socket) -> None:
        """Keep a passed socket for a later :meth:`take` (a reload dropped it)."""
        self._free.append(sock)

    def unclaimed(self) -> list[str]:
        """The addresses of the passed sockets nobody has taken."""
        return [describe_socket(sock) for sock in self._free]

    def close(self) -> None:
        """Close the sockets nobody took (at exit)."""
        while self._free:
            self._free.pop().close()


def _adopt(fd: int) -> socket.socket:
    # Close-on-exec, as sd_listen_fds(3) sets it: a process this one starts
    # must not keep the listening socket open after a restart.
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(
            f"socket activation: fd {fd} (LISTEN_FDS) is not a socket: {exc.strerror or exc}"
        ) from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if not listening:
        sock.detach()  # not ours to close: report it and leave it alone
        raise ConfigError(
            f"socket activation: fd {fd} is not a listening socket "
            "(Accept=no is needed in the .socket unit, and no datagram sockets)"
        )
    return sock


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (``READY=1``, ``STATUS=…``) to the service manager.

    A no-op returning False outside ``Type=notify`` services (no
    ``NOTIFY_SOCKET``).  A failure is logged, never raised: readiness is
    reported, it does not decide whether the process serves.
    """
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):  # an abstract socket (sd_notify(3))
        address: str | bytes = b"\0" + os.fsencode(target[1:])
    elif target.startswith("/"):
        address = target
    else:
        log.warning("NOTIFY_SOCKET=%r: only UNIX sockets are supported; not notifying", target)
        return False
    message = "\n".join(fields).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("notifying the service manager (%s) failed: %s", target, exc.strerror or exc)
        return False
    return True


def reloading() -> None:
    """``RELOADING=1`` with the time the reload began (``Type=notify-reload``
    requires ``MONOTONIC_USEC``, systemd.service(5))."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> None:
    """``STOPPING=1``: the stop has begun (connections are being finished)."""
    notify("STOPPING=1")
