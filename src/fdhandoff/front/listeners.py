"""Listening sockets for the front: TCP (IPv4, IPv6) and UNIX paths."""

from __future__ import annotations

import _socket
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import ConfigError
from .config import Address
from .describe import Endpoint

__all__ = ["Listener", "close_listener", "open_listener"]

log = logging.getLogger("fdhandoff.front")

#: Seconds the kernel may hold a new TCP connection until its first bytes
#: arrive (TCP_DEFER_ACCEPT, tcp(7)): the front is woken once per request,
#: with the head already readable, instead of once for the connection and
#: once more for the data.  HTTP clients always speak first.
DEFER_ACCEPT_SECONDS: Final = 5


@dataclass(slots=True)
class Listener:
    """One bound, listening, non-blocking socket and what SCGI says about it."""

    sock: socket.socket
    address: Address
    #: Shown in logs and on the ready line: the bound address (port 0 resolved).
    label: str
    #: SERVER_ADDR / SERVER_PORT when they are the same for every connection;
    #: None for a wildcard address, where getsockname() tells per connection.
    server: Endpoint | None
    is_unix: bool
    #: (st_dev, st_ino) of the socket file we created, so only ours is removed.
    inode: tuple[int, int] | None = None
    #: TLS listeners: the context every handshake uses (replaced on reload,
    #: so renewed certificates apply to new connections).
    tls: ssl.SSLContext | None = None
    #: accept4(2) returning (fd, address): the C method under socket.accept().
    accept: Callable[[], tuple[int, Any]] = field(init=False)
    family: int = field(init=False)

    def __post_init__(self) -> None:
        self.accept = self.sock._accept  # type: ignore[attr-defined]
        self.family = int(self.sock.family)


def _remove_stale_unix_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"listen unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket file %s (nobody listens on it)", path)
        os.unlink(path)
        return
    except OSError:
        return  # let bind() report the real problem
    finally:
        probe.close()
    raise ConfigError(f"listen unix:{path}: another process is listening on it")


def open_listener(address: Address, backlog: int) -> Listener:
    """Bind and listen; raises ConfigError (exit 2) with the reason on failure."""
    if address.is_unix:
        return _open_unix(address, backlog)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Listen on exactly what was asked; [::] does not also take IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit TCP_NODELAY from the listener on Linux, so
        # every client socket has it without a setsockopt per connection: the
        # receiver's small writes (SSE events, WebSocket frames) go out at once.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen {address.text}: {exc.strerror or exc}") from None
    host, port = sock.getsockname()[:2]
    label = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    wildcard = host in ("0.0.0.0", "::")
    server = None if wildcard else Endpoint(host.encode("ascii"), b"%d" % port)
    return Listener(sock, address, label, server, is_unix=False)


def _open_unix(address: Address, backlog: int) -> Listener:
    _remove_stale_unix_socket(address.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address.path)
        info = os.stat(address.path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen {address.text}: {exc.strerror or exc}") from None
    server = Endpoint(b"unix:" + os.fsencode(address.path), b"")
    return Listener(
        sock, address, address.text, server, is_unix=True, inode=(info.st_dev, info.st_ino)
    )


def close_listener(listener: Listener) -> None:
    """Close the socket and remove our UNIX socket file (only if it is still ours)."""
    listener.sock.close()
    if listener.inode is None:
        return
    with contextlib.suppress(OSError):
        info = os.stat(listener.address.path)
        if (info.st_dev, info.st_ino) == listener.inode:
            os.unlink(listener.address.path)


def peer_endpoint(listener: Listener, addr: object) -> Endpoint:
    """REMOTE_ADDR / REMOTE_PORT from accept()'s address."""
    if listener.is_unix:
        return Endpoint(b"unix:", b"")
    assert isinstance(addr, tuple)
    return Endpoint(addr[0].encode("ascii"), b"%d" % addr[1])


def server_endpoint(listener: Listener, sock: _socket.socket) -> Endpoint:
    """SERVER_ADDR / SERVER_PORT: fixed per listener unless it is a wildcard."""
    if listener.server is not None:
        return listener.server
    try:
        host, port = sock.getsockname()[:2]
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return Endpoint(b"", b"")
        raise
    return Endpoint(host.encode("ascii"), b"%d" % port)
