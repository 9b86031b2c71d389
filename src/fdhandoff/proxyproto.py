"""The PROXY protocol header, versions 1 and 2 (sans-IO).

A TCP load balancer (HAProxy ``send-proxy`` / ``send-proxy-v2``, AWS NLB,
Google's and Azure's, nginx ``proxy_protocol on`` in a ``stream`` block) opens
its own connection to the front, so the front's peer is the balancer.  With the
PROXY protocol the balancer writes, before any byte of the client's, one header
naming the client's address and the address it connected to; a listener with
``proxy_protocol = true`` reads it, and the client's address is then what
``REMOTE_ADDR`` says, what the access log shows and what auth mode puts in
``X-Forwarded-For``.

The format (HAProxy's specification "The PROXY protocol", versions 1 and 2):

* version 1, one line of text of at most 107 bytes::

      PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\\r\\n
      PROXY TCP6 2001:db8::10 2001:db8::1 56324 443\\r\\n
      PROXY UNKNOWN ...\\r\\n

* version 2, binary: a 12-byte signature, a version/command byte (``0x21``
  PROXY, ``0x20`` LOCAL), a family/transport byte, a 16-bit length, then the
  addresses (12 bytes for TCP over IPv4, 36 for IPv6, 216 for UNIX paths) and
  type-length-value extensions.  ``PP2_TYPE_SSL`` says whether the client
  spoke TLS to the balancer.

The specification requires the receiver to take the header as it is sent: no
guessing whether one is present (a listener either requires it or does not
accept it), and a connection whose header is invalid is dropped.  LOCAL
(version 2) and UNKNOWN (version 1) connections, the balancer's own health
checks, keep the connection's real addresses.

:func:`parse` looks at the first bytes of a connection and says how many of
them are the header, without consuming any: the caller peeks, parses, then
reads exactly that many, so the request that follows stays in the socket.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from .errors import ProtocolError

__all__ = ["MAX_HEADER_SIZE", "ProxyHeader", "parse"]

#: Version 1: "PROXY " and at most 101 more bytes, CRLF included.
V1_MAX: Final = 107
V1_PREFIX: Final = b"PROXY "

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command, family/transport, length.
V2_FIXED: Final = 16

#: The largest version 2 header accepted (fixed part, addresses and
#: extensions).  Balancers send well under 1 KiB (HAProxy's SSL and unique-ID
#: extensions included); the 16-bit length would allow 64 KiB of buffering
#: per connection before the request even starts.
MAX_HEADER_SIZE: Final = 4096

_PROXY_CMD: Final = 0x1
_LOCAL_CMD: Final = 0x0
_INET, _INET6, _UNIX = 0x1, 0x2, 0x3
_STREAM: Final = 0x1
#: Bytes of the address block per family (section 2.2).
_ADDRESS_SIZE: Final = {_INET: 12, _INET6: 36, _UNIX: 216}

#: PP2_TYPE_SSL and its PP2_CLIENT_SSL bit: the client spoke TLS to the balancer.
_PP2_TYPE_SSL: Final = 0x20
_PP2_CLIENT_SSL: Final = 0x01


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: its length, and what it says about the client."""

    #: Bytes the header takes at the start of the connection.
    length: int
    #: The client's (address, port); None when the header names none (LOCAL,
    #: UNKNOWN, UNSPEC or UNIX): the connection's own addresses apply then.
    source: tuple[str, int] | None = None
    #: The address the client connected to, as the balancer saw it.
    destination: tuple[str, int] | None = None
    #: Version 2 ``PP2_TYPE_SSL`` with ``PP2_CLIENT_SSL``: the client used TLS
    #: to the balancer, which terminated it.
    ssl: bool = False
    version: int = 1


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``, or None if more bytes are needed.

    Raises :class:`ProtocolError` for anything that is not a valid header:
    the caller drops the connection (the specification allows no answer).
    """
    data = bytes(data[:MAX_HEADER_SIZE])
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return None
    raise ProtocolError(f"no PROXY protocol header: the connection starts {data[:16]!r}")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProtocolError(f"no PROXY protocol header: the connection starts {data[:16]!r}")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProtocolError(f"PROXY v1 header without CRLF in its first {V1_MAX} bytes")
        if b"\n" in data or (b"\r" in data[:-1]):
            raise ProtocolError("PROXY v1 header ends with a bare LF or CR")
        return None
    line = data[len(V1_PREFIX) : end]
    if b"\n" in line or b"\r" in line:
        raise ProtocolError("PROXY v1 header ends with a bare LF or CR")
    length = end + 2
    fields = line.split(b" ")
    family = fields[0]
    if family == b"UNKNOWN":
        # Section 2.1: the rest of the line is ignored, the real addresses apply.
        return ProxyHeader(length)
    if family not in (b"TCP4", b"TCP6"):
        raise ProtocolError(f"PROXY v1 header: unknown protocol {family[:16]!r}")
    if len(fields) != 5:
        raise ProtocolError(
            f"PROXY v1 header: {family.decode()} needs 4 fields separated by single spaces"
        )
    version = 4 if family == b"TCP4" else 6
    source = _v1_address(fields[1], version), _v1_port(fields[3])
    destination = _v1_address(fields[2], version), _v1_port(fields[4])
    return ProxyHeader(length, source, destination)


def _v1_address(text: bytes, version: int) -> str:
    try:
        decoded = text.decode("ascii")
        if version == 4:
            # IPv4Address takes the dotted quad only, without leading zeros:
            # the text is then already the address's one spelling.
            ipaddress.IPv4Address(decoded)
            return decoded
        return str(ipaddress.IPv6Address(decoded))
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        other = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"PROXY v1 header: invalid address {text[:46]!r}") from None
    raise ProtocolError(f"PROXY v1 header: {text[:46]!r} is an IPv{other.version} address")


def _v1_port(text: bytes) -> int:
    # Decimal, 0 to 65535; a leading zero would make the same port two strings.
    if (
        not (text.isdigit() and text.isascii())
        or len(text) > 5
        or (len(text) > 1 and text[:1] == b"0")
        or int(text) > 0xFFFF
    ):
        raise ProtocolError(f"PROXY v1 header: invalid port {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProtocolError(f"no PROXY protocol header: the connection starts {data[:16]!r}")
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProtocolError(f"PROXY v2 header: version {version}, expected 2")
    if command not in (_PROXY_CMD, _LOCAL_CMD):
        raise ProtocolError(f"PROXY v2 header: unknown command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    size = int.from_bytes(data[14:16], "big")
    length = V2_FIXED + size
    if length > MAX_HEADER_SIZE:
        raise ProtocolError(
            f"PROXY v2 header of {length} bytes, more than the limit of {MAX_HEADER_SIZE}"
        )
    if len(data) < length:
        return None
    block = data[V2_FIXED:length]
    if command == _LOCAL_CMD:
        # Section 2.2: the balancer's own connection (a health check); the
        # address block, whatever it holds, is skipped.
        return ProxyHeader(length, version=2)
    if family not in (0, _INET, _INET6, _UNIX) or transport not in (0, _STREAM, 2):
        raise ProtocolError(f"PROXY v2 header: unknown family/transport byte {data[13]:#04x}")
    if family and transport == 2:
        raise ProtocolError("PROXY v2 header describes a datagram (UDP) connection")
    address_size = _ADDRESS_SIZE.get(family, 0)
    if size < address_size:
        raise ProtocolError(
            f"PROXY v2 header: {size} bytes after the fixed part, the addresses need {address_size}"
        )
    ssl = _client_ssl(block[address_size:]) if family else False
    if family == _INET:
        source = ".".join(map(str, block[0:4])), int.from_bytes(block[8:10], "big")
        dest = ".".join(map(str, block[4:8])), int.from_bytes(block[10:12], "big")
        return ProxyHeader(length, source, dest, ssl, 2)
    if family == _INET6:
        source = _ipv6(block[0:16]), int.from_bytes(block[32:34], "big")
        dest = _ipv6(block[16:32]), int.from_bytes(block[34:36], "big")
        return ProxyHeader(length, source, dest, ssl, 2)
    # UNSPEC: nothing to say about the client; UNIX: a path, not an address a
    # receiver could use as REMOTE_ADDR.  The connection's own addresses apply.
    return ProxyHeader(length, ssl=ssl, version=2)


def _ipv6(raw: bytes) -> str:
    address = ipaddress.IPv6Address(raw)
    # An IPv4 client of a dual-stack balancer: shown as the IPv4 address it is.
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def _client_ssl(tlvs: bytes) -> bool:
    """True if the extensions carry PP2_TYPE_SSL with PP2_CLIENT_SSL set."""
    ssl = False
    at = 0
    while at < len(tlvs):
        if len(tlvs) - at < 3:
            raise ProtocolError("PROXY v2 header: truncated extension (TLV) header")
        kind, size = tlvs[at], int.from_bytes(tlvs[at + 1 : at + 3], "big")
        value = tlvs[at + 3 : at + 3 + size]
        if len(value) != size:
            raise ProtocolError(f"PROXY v2 header: extension {kind:#04x} runs past the header")
        if kind == _PP2_TYPE_SSL:
            if size < 5:
                raise ProtocolError("PROXY v2 header: PP2_TYPE_SSL shorter than 5 bytes")
            ssl = bool(value[0] & _PP2_CLIENT_SSL)
        at += 3 + size
    return ssl
