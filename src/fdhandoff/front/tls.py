"""TLS listeners: the handshake in the front, then kernel TLS, then the same handoff.

A TLS connection can only be handed to another process if the kernel holds its
record layer (kTLS, the kernel's ``tls`` module): then the receiver reads and
writes plain bytes on the socket it was given, and the kernel decrypts and
encrypts, as with nginx ``fd_pass``.  So the front:

1. does the handshake with OpenSSL on the client socket, with
   ``SSL_OP_ENABLE_KTLS``: once the keys are agreed OpenSSL installs them in
   the kernel for both directions (``TCP_ULP "tls"``, then ``SOL_TLS``
   ``TLS_TX`` / ``TLS_RX``);
2. checks that both directions really are offloaded (``fdpass.tls_offloaded``); a
   connection the kernel does not carry both ways is refused (``500``, as
   nginx does), never handed off half-encrypted;
3. drops OpenSSL's state (no ``close_notify``: the connection lives on) and
   reads the head exactly as on plain TCP: ``recv(MSG_PEEK)`` and ``recv`` of
   the head only return decrypted bytes, and a record is consumed only as far
   as it was read, so the body and any pipelined request stay in the kernel
   for the receiver.  Nothing is read ahead, and ``CONTENT_LENGTH`` stays 0.

Kernel-side receive offload for TLS 1.3 needs OpenSSL 3.2 or newer; with an
older OpenSSL the context stops at TLS 1.2 (AES-GCM or ChaCha20-Poly1305 with
ECDHE, which the kernel offloads both ways).  Renegotiation is refused: a new
handshake would arrive at the receiver as records the kernel cannot decrypt.
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError
from ..fdpass import TCP_ULP, tls_offloaded

__all__ = ["NamedCertificate", "TlsFiles", "probe_offload", "server_context"]

#: SSL_OP_ENABLE_KTLS (OpenSSL 3.0, ssl.h: bit 3).  Python 3.12 names it
#: ssl.OP_ENABLE_KTLS; 3.11 passes the same bit through to OpenSSL unchanged.
OP_ENABLE_KTLS: Final = int(getattr(ssl, "OP_ENABLE_KTLS", 1 << 3))

#: OpenSSL 3.2 added kernel receive offload for TLS 1.3.
_TLS13_RX: Final = ssl.OPENSSL_VERSION_INFO >= (3, 2)

#: TLS 1.2 suites the kernel offloads both ways (linux/tls.h), forward secret.
_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: How long the start-up self-test may take (a loopback handshake).
_PROBE_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class NamedCertificate:
    """``[[listen.sni]]``: a certificate for the host names a client may ask for."""

    #: Lower-case host names; ``*.example.com`` stands for exactly one label.
    names: tuple[str, ...]
    certificate: str
    key: str


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """``[[listen]] tls_certificate`` (the chain, leaf first) and ``tls_key`` (PEM),
    and the certificates chosen by server name (``[[listen.sni]]``)."""

    certificate: str
    key: str
    named: tuple[NamedCertificate, ...] = ()


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The context of one TLS listener; ConfigError naming the file and the reason.

    With ``named`` certificates the listener picks one per connection from the
    server name the client sends (SNI, RFC 6066 §3): an exact name first, then
    a wildcard for its first label (RFC 6125 §6.4.3: ``*.example.com`` is
    ``a.example.com``, not ``example.com`` nor ``a.b.example.com``).  A client
    that sends no name, or one no certificate lists, gets the listener's own
    certificate, as nginx's default server does.
    """
    context = _context(TlsFiles(files.certificate, files.key))
    if files.named:
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        for named in files.named:
            chosen = _context(TlsFiles(named.certificate, named.key))
            for name in named.names:
                if name.startswith("*."):
                    wildcard[name[2:]] = chosen
                else:
                    exact[name] = chosen
        context.sni_callback = _chooser(exact, wildcard)
    return context


def _chooser(
    exact: dict[str, ssl.SSLContext], wildcard: dict[str, ssl.SSLContext]
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    def choose(tls: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if not name:
            return
        name = name.lower().rstrip(".")  # a trailing dot names the same host
        chosen = exact.get(name)
        if chosen is None:
            parent = name.partition(".")[2]
            chosen = wildcard.get(parent) if parent else None
        if chosen is not None:
            tls.context = chosen

    return choose


def _context(files: TlsFiles) -> ssl.SSLContext:
    """One certificate's context, with everything kernel TLS needs."""
    # OpenSSL's errors for a missing or unreadable file do not say which one.
    for what, path in (("certificate", files.certificate), ("key", files.key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"TLS {what} {path}: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # Without a password callback OpenSSL would ask for an encrypted key's
        # pass phrase on the terminal, and wait there (a reload too).
        context.load_cert_chain(files.certificate, files.key, password=_no_pass_phrase(files))
    except ConfigError:
        raise
    except ssl.SSLError as exc:  # an OSError too: first
        raise ConfigError(
            f"TLS: certificate {files.certificate} / key {files.key}: "
            f"{exc.reason or exc} (PEM files, the key matching the certificate)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"TLS: {files.certificate}: {exc.strerror or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not _TLS13_RX:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_CIPHERS)
    context.options |= OP_ENABLE_KTLS | ssl.OP_NO_RENEGOTIATION
    # ALPN (RFC 7301): this server speaks HTTP/1.1 only; clients that would
    # prefer h2 (browsers, curl) settle on http/1.1 in the handshake.
    context.set_alpn_protocols(["http/1.1"])
    return context


def _no_pass_phrase(files: TlsFiles) -> Callable[[], str]:
    def refuse() -> str:
        raise ConfigError(
            f"TLS key {files.key} is encrypted: give the front an unencrypted key, "
            "readable by its user only"
        )

    return refuse


def probe_offload(context: ssl.SSLContext) -> str | None:
    """Do one loopback handshake with ``context``; None if kTLS carried it both ways.

    Run at start-up (and by ``fdhandoff check``): a front on a kernel without
    the tls module, or on an OpenSSL built without kTLS, would otherwise
    accept TLS connections it can never hand off.
    """
    try:
        listener = socket.create_server(("127.0.0.1", 0))
    except OSError as exc:
        return f"loopback test connection: {exc.strerror}"
    client = socket.socket()
    result: list[str | None] = []
    try:
        listener.settimeout(_PROBE_TIMEOUT)
        client.settimeout(_PROBE_TIMEOUT)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with server:
            try:
                server.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return "this kernel has no TLS offload (kTLS): load its tls module"
                return f"kernel TLS: {exc.strerror}"
        # The ULP test used that connection up; the handshake needs a fresh one.
        client.close()
        client = socket.socket()
        client.settimeout(_PROBE_TIMEOUT)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        server.settimeout(_PROBE_TIMEOUT)
        thread = threading.Thread(target=_probe_client, args=(client,), daemon=True)
        thread.start()
        try:
            with context.wrap_socket(server, server_side=True) as tls:
                result.append(tls_offloaded(tls))
        except (OSError, ssl.SSLError) as exc:
            result.append(f"test handshake failed: {exc}")
        thread.join(_PROBE_TIMEOUT)
    except OSError as exc:
        return f"loopback test connection: {exc.strerror or exc}"
    finally:
        client.close()
        listener.close()
    return result[0]


def _probe_client(sock: socket.socket) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the server's offload is under test
    try:
        with context.wrap_socket(sock) as tls:
            tls.recv(1)  # until the server closes
    except (OSError, ssl.SSLError):
        pass
