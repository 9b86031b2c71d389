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
from typing import Any, Final, NamedTuple

from ..errors import ConfigError
from ..systemd import Inherited
from .config import Address
from .describe import Endpoint

__all__ = ["Listener", "Proxied", "close_listener", "open_listener"]

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
    #: Passed by the service manager (socket activation): systemd keeps
    #: listening on it, so a reload that drops it gives it back rather than
    #: closing it, and its UNIX socket file is systemd's to remove.
    inherited: bool = False
    #: Every connection starts with a PROXY protocol header (proxy_protocol).
    proxy: bool = False
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


def _tune_tcp(sock: socket.socket) -> None:
    # Accepted sockets inherit TCP_NODELAY from the listener on Linux, so
    # every client socket has it without a setsockopt per connection: the
    # receiver's small writes (SSE events, WebSocket frames) go out at once.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)


def open_listener(address: Address, backlog: int, inherited: Inherited | None = None) -> Listener:
    """Bind and listen, or take the socket the service manager bound for
    ``address`` (``inherited``); raises ConfigError (exit 2) with the reason."""
    if inherited is not None and inherited.count:
        adopted = _adopt(address, backlog, inherited)
        if adopted is not None:
            return adopted
    if address.is_unix:
        return _open_unix(address, backlog)
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Listen on exactly what was asked; [::] does not also take IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _tune_tcp(sock)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen {address.text}: {exc.strerror or exc}") from None
    return _tcp_listener(sock, address)


def _tcp_listener(sock: socket.socket, address: Address, *, inherited: bool = False) -> Listener:
    host, port = sock.getsockname()[:2]
    label = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
    wildcard = host in ("0.0.0.0", "::")
    server = None if wildcard else Endpoint(host.encode("ascii"), b"%d" % port)
    return Listener(sock, address, label, server, is_unix=False, inherited=inherited)


def _adopt(address: Address, backlog: int, inherited: Inherited) -> Listener | None:
    """The listener on a socket systemd passed for ``address``, or None."""
    if address.is_unix:
        sock = inherited.take_unix(address.path, socket.SOCK_STREAM)
    else:
        sock = inherited.take_tcp(address.host, address.port)
    if sock is None:
        return None
    try:
        if not address.is_unix:
            _tune_tcp(sock)
        # listen(2) on a listening socket only sets the backlog: the
        # configured one applies, as on a socket the front binds itself.
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        inherited.give_back(sock)
        raise ConfigError(f"listen {address.text} (passed by systemd): {exc.strerror}") from None
    if address.is_unix:
        server = Endpoint(b"unix:" + os.fsencode(address.path), b"")
        return Listener(sock, address, address.text, server, is_unix=True, inherited=True)
    return _tcp_listener(sock, address, inherited=True)


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


class Proxied(NamedTuple):
    """The client's address as a PROXY protocol header gave it; stands in for
    accept()'s ``(host, port)`` from then on (logs, REMOTE_ADDR, X-Forwarded-For)."""

    host: str
    port: int
    #: The client spoke TLS to the balancer that sent the header (PP2_TYPE_SSL).
    https: bool


def peer_endpoint(listener: Listener, addr: object) -> Endpoint:
    """REMOTE_ADDR / REMOTE_PORT from accept()'s address, or the PROXY header's."""
    if not isinstance(addr, tuple):  # a UNIX listener's client has no address
        return Endpoint(b"unix:", b"")
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
