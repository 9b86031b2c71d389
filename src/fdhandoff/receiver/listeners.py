"""UNIX listening sockets for the receiver: bind safely, set permissions, remove on exit.

A socket file left behind by a crashed receiver is replaced only when it is
provably stale: it is a socket (``lstat``, so a symlink is not followed) and
nobody accepts connections on it (a test ``connect`` is refused).  Anything
else at the path — a regular file, a live receiver — is an error, never
removed.  On exit the file is removed only if it is still the one we created
(same device and inode), so a successor that already took the path keeps it.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError
from ..systemd import Inherited

__all__ = ["DEFAULT_SOCKET_MODE", "Bind", "Listener", "close_listener", "open_listener"]

#: Owner and group may connect: the sender (nginx, Apache, the front) usually
#: runs as another user sharing a group with the receiver (--socket-group).
DEFAULT_SOCKET_MODE: Final = 0o660

#: Probe timeout for a possibly stale socket file; a live listener answers at
#: once (connect on a UNIX socket completes in the kernel).
_PROBE_TIMEOUT: Final = 1.0

_KINDS: Final = {"unix": socket.SOCK_STREAM, "unix-seqpacket": socket.SOCK_SEQPACKET}


@dataclass(frozen=True, slots=True)
class Bind:
    """One ``--bind`` value: ``unix:PATH`` or ``unix-seqpacket:PATH``.

    A path starting with ``@`` names a Linux abstract socket (no file).
    """

    path: str
    kind: int = socket.SOCK_STREAM

    @classmethod
    def parse(cls, spec: str) -> Bind:
        scheme, sep, path = spec.partition(":")
        if not sep or scheme not in _KINDS or not path:
            raise ConfigError(f"--bind {spec!r}: expected unix:PATH or unix-seqpacket:PATH")
        return cls(path, _KINDS[scheme])

    @property
    def abstract(self) -> bool:
        return self.path.startswith("@")

    @property
    def address(self) -> str:
        return "\0" + self.path[1:] if self.abstract else self.path

    def __str__(self) -> str:
        scheme = "unix-seqpacket" if self.kind == socket.SOCK_SEQPACKET else "unix"
        return f"{scheme}:{self.path}"


@dataclass(frozen=True, slots=True)
class Listener:
    bind: Bind
    sock: socket.socket
    #: (st_dev, st_ino) of the socket file we created; None for abstract names.
    identity: tuple[int, int] | None


def _probe(path: str, kind: int) -> bool:
    """True if something accepts connections at ``path``."""
    for probe_kind in (kind, socket.SOCK_SEQPACKET + socket.SOCK_STREAM - kind):
        with socket.socket(socket.AF_UNIX, probe_kind) as probe:
            probe.settimeout(_PROBE_TIMEOUT)
            try:
                probe.connect(path)
            except OSError as exc:
                if exc.errno == errno.EPROTOTYPE:
                    continue  # a socket of the other type: probe that one
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    return False
                if exc.errno == errno.EAGAIN:
                    return True  # backlog full: very much alive
                raise ConfigError(f"cannot check existing socket {path}: {exc.strerror}") from exc
            return True
    return False


def _clear_stale(path: str, kind: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    if _probe(path, kind):
        raise ConfigError(f"{path} is in use: another process accepts connections on it")
    os.unlink(path)


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"--socket-group {group!r}: no such group") from None


def open_listener(
    bind: Bind,
    *,
    mode: int = DEFAULT_SOCKET_MODE,
    group: str | None = None,
    backlog: int = socket.SOMAXCONN,
    inherited: Inherited | None = None,
) -> Listener:
    """Bind and listen, or take the socket the service manager bound for
    ``bind`` (``inherited``); the socket is non-blocking and close-on-exec.

    A passed socket keeps the owner and mode its ``.socket`` unit gave it
    (``SocketMode=``, ``SocketGroup=``), and its file is systemd's: it is
    never removed here.
    """
    if inherited is not None and inherited.count:
        passed = inherited.take_unix(bind.address, bind.kind)
        if passed is not None:
            try:
                passed.listen(backlog)  # on a listening socket: only sets the backlog
                passed.setblocking(False)
            except OSError as exc:
                passed.close()
                raise ConfigError(f"cannot listen on {bind} (passed by systemd): {exc}") from exc
            return Listener(bind, passed, None)
    sock = socket.socket(socket.AF_UNIX, bind.kind | socket.SOCK_CLOEXEC)
    identity: tuple[int, int] | None = None
    try:
        if bind.abstract:
            sock.bind(bind.address)
        else:
            _clear_stale(bind.path, bind.kind)
            # Created with no permissions for others, then opened up to `mode`:
            # never briefly connectable by everyone (umask is process-wide, so
            # this runs at start-up only).
            old = os.umask(0o177)
            try:
                sock.bind(bind.path)
            finally:
                os.umask(old)
            st = os.stat(bind.path)
            identity = (st.st_dev, st.st_ino)
            if group is not None:
                os.chown(bind.path, -1, _group_id(group))
            os.chmod(bind.path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException as exc:
        # Also for a SIGTERM while starting (runner._Terminated): the file
        # bound a moment ago is ours to remove.
        sock.close()
        if identity is not None:
            with contextlib.suppress(OSError):
                os.unlink(bind.path)
        if not isinstance(exc, OSError):  # ConfigError, a signal, a bug: as it is
            raise
        raise ConfigError(f"cannot listen on {bind}: {exc.strerror or exc}") from exc
    return Listener(bind, sock, identity)


def close_listener(listener: Listener, *, unlink: bool = True) -> None:
    """Close the socket and remove its file if it is still ours."""
    listener.sock.close()
    if not unlink or listener.identity is None:
        return
    with contextlib.suppress(OSError):
        st = os.lstat(listener.bind.path)
        if (st.st_dev, st.st_ino) == listener.identity:
            os.unlink(listener.bind.path)
